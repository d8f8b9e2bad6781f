//! The `[[keys]]` and `[policies.NAME]` sections validated: each key's name and hashes checked, its
//! policy merged with its own overrides, and the limits turned into runtime [`Limits`].
//!
//! Edge cases: key names are metric labels (1-64 plain characters, never `unauthenticated`, never
//! twice); a hash may not appear twice across keys, and a token pasted where its hash belongs is
//! refused with a hint; a key's own field replaces its policy's; `models = ["*"]` is stored as no
//! list; a key with quotas needs `max_tokens`, so that its worst case is bounded.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::num::NonZeroU32;
use std::sync::Arc;

use toml::Spanned;

use super::budgets::quota_windows;
use super::limits::{is_valid_key_name, rate_limit};
use super::raw::{RawKey, RawLimits};
use super::source::Source;
use super::{Budgets, ConfigError, KeyConfig, Limits};
use crate::observability::metrics::UNAUTHENTICATED;

/// What every key `tollgate keygen` makes starts with, so that a leaked one is recognisable (and
/// one pasted where its hash belongs is refused).
pub(crate) const TOKEN_PREFIX: &str = "tg-";

/// Builds each key's limits from its policy and its own fields, and checks names and hashes.
pub(super) fn resolve_keys(
    policies: &BTreeMap<String, RawLimits>,
    raw_keys: Vec<RawKey>,
    src: &Source,
) -> Result<Vec<KeyConfig>, ConfigError> {
    for (name, policy) in policies {
        let prefix = format!("policies.{name}");
        validate_limits(policy, &prefix, Owner::Policy, src)?;
    }
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    let mut keys = Vec::with_capacity(raw_keys.len());
    for (i, raw) in raw_keys.into_iter().enumerate() {
        let prefix = format!("keys[{i}]");
        keys.push(resolve_key(
            policies,
            raw,
            &prefix,
            (&mut names, &mut hashes),
            src,
        )?);
    }
    Ok(keys)
}

/// Names and hashes taken by the keys resolved so far.
type Taken<'a> = (&'a mut HashSet<String>, &'a mut HashSet<[u8; 32]>);

/// One key: its name and hashes checked, its policy merged with its own fields, its limits
/// validated. `prefix` is its key path (`keys[0]`, or empty for a key of the admin API).
fn resolve_key(
    policies: &BTreeMap<String, RawLimits>,
    raw: RawKey,
    prefix: &str,
    (names, hashes): Taken<'_>,
    src: &Source,
) -> Result<KeyConfig, ConfigError> {
    let name = key_name(&raw.name, &join(prefix, "name"), names, src)?;
    let sha256 = key_hashes(&raw.sha256, &join(prefix, "sha256"), hashes, src)?;
    let merged = merged_limits(policies, raw, &join(prefix, "policy"), src)?;
    let limits = validate_limits(&merged, prefix, Owner::Key, src)?;
    Ok(KeyConfig {
        name,
        sha256,
        limits,
    })
}

/// `prefix.field`, or `field` alone at the top of a request body.
fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

/// The `[policies.NAME]` of the config in force and its prices and groups, kept so that keys
/// made through the admin API are resolved and checked against them exactly as the file's own
/// keys are.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policies {
    policies: Arc<BTreeMap<String, RawLimits>>,
    budgets: Arc<Budgets>,
}

impl Policies {
    pub(super) fn new(policies: BTreeMap<String, RawLimits>, budgets: Budgets) -> Self {
        Policies {
            policies: Arc::new(policies),
            budgets: Arc::new(budgets),
        }
    }

    /// The prices and groups the keys are built with.
    pub(crate) fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// A key made through the admin API: `fields` are what a `[[keys]]` entry holds besides
    /// `name` and `sha256`, as JSON. They are read by the same raw type and resolved by the same
    /// code as the file's keys, so a field the file accepts is accepted here and every message is
    /// the file's, without file and line: `max_tokens: must be at least 1 (…)`.
    pub(crate) fn resolve(
        &self,
        name: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
        sha256: &[[u8; 32]],
    ) -> Result<KeyConfig, ConfigError> {
        let mut table = toml::Table::new();
        table.insert("name".into(), toml::Value::String(name.to_owned()));
        let hashes = sha256.iter().map(|h| toml::Value::String(hex::encode(h)));
        table.insert("sha256".into(), toml::Value::Array(hashes.collect()));
        // `name` and `sha256` are the record's own, never a field's.
        let own = |field: &str| field == "name" || field == "sha256";
        for (field, value) in fields.iter().filter(|(field, _)| !own(field)) {
            if let Some(value) =
                toml_value(value).map_err(|msg| ConfigError(format!("{field}: {msg}")))?
            {
                table.insert(field.clone(), value);
            }
        }
        // One line per field, each value inline, as a `[[keys]]` entry may write it.
        let mut text = String::new();
        for (field, value) in &table {
            let quoted = toml::Value::String(field.clone());
            let _ = writeln!(text, "{quoted} = {value}");
        }
        let raw = super::read::parse_key(&text)?;
        let src = Source::body(&text);
        let key = resolve_key(
            &self.policies,
            raw,
            "",
            (&mut HashSet::new(), &mut HashSet::new()),
            &src,
        )?;
        super::budgets::check_key(&key, None, &self.budgets, &src)?;
        Ok(key)
    }
}

/// A JSON value as the config file would write it; `None` for null (a field left out).
fn toml_value(value: &serde_json::Value) -> Result<Option<toml::Value>, String> {
    use serde_json::Value;
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
            _ => return Err(format!("{n} is out of range")),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(items) => {
            let mut array = Vec::with_capacity(items.len());
            for item in items {
                array.push(toml_value(item)?.ok_or("an array cannot hold null")?);
            }
            toml::Value::Array(array)
        }
        Value::Object(map) => {
            let mut table = toml::Table::new();
            for (k, v) in map {
                if let Some(v) = toml_value(v)? {
                    table.insert(k.clone(), v);
                }
            }
            toml::Value::Table(table)
        }
    }))
}

/// Whose limits are validated: a key's must bound the worst case of its quotas.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Policy,
    Key,
}

/// A key's name: plain, not reserved, and not taken by an earlier key.
fn key_name(
    name: &Spanned<String>,
    path: &str,
    names: &mut HashSet<String>,
    src: &Source,
) -> Result<Arc<str>, ConfigError> {
    let text = name.get_ref().as_str();
    if !is_valid_key_name(text) {
        return Err(src.at(
            name.span(),
            path,
            format!("{text:?}: use 1-64 letters, digits, '-', '_' or '.'"),
        ));
    }
    if text == UNAUTHENTICATED {
        return Err(src.at(
            name.span(),
            path,
            format!("{text:?} is reserved for requests without a valid key"),
        ));
    }
    if !names.insert(text.to_owned()) {
        return Err(src.at(name.span(), path, format!("duplicate key name {text:?}")));
    }
    Ok(Arc::from(text))
}

/// A key's hashes (one, or several while it is rotated), none of them used by an earlier key.
fn key_hashes(
    sha256: &Spanned<super::raw::OneOrMany>,
    path: &str,
    hashes: &mut HashSet<[u8; 32]>,
    src: &Source,
) -> Result<Vec<[u8; 32]>, ConfigError> {
    let texts = sha256.get_ref().as_slice();
    if texts.is_empty() {
        return Err(src.at(sha256.span(), path, "needs at least one hash".to_owned()));
    }
    let mut digests = Vec::with_capacity(texts.len());
    for text in texts {
        let digest = parse_sha256(text).map_err(|msg| src.at(sha256.span(), path, msg))?;
        if !hashes.insert(digest) {
            return Err(src.at(
                sha256.span(),
                path,
                "the same hash is used twice".to_owned(),
            ));
        }
        digests.push(digest);
    }
    Ok(digests)
}

fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let mut digest = [0u8; 32];
    if text.starts_with(TOKEN_PREFIX) {
        return Err(
            "this looks like a key itself; put its SHA-256 here (tollgate keygen prints it)".into(),
        );
    }
    hex::decode_to_slice(text, &mut digest)
        .map_err(|_| "must be 64 hex digits: the SHA-256 of the key".to_owned())?;
    Ok(digest)
}

/// The key's policy (if it names one) with the key's own fields laid over it.
fn merged_limits(
    policies: &BTreeMap<String, RawLimits>,
    raw: RawKey,
    path: &str,
    src: &Source,
) -> Result<RawLimits, ConfigError> {
    let mut merged = match &raw.policy {
        Some(policy) => policies.get(policy.get_ref()).cloned().ok_or_else(|| {
            let known: Vec<&str> = policies.keys().map(String::as_str).collect();
            src.at(
                policy.span(),
                path,
                format!(
                    "no policy named {:?} (defined: {known:?})",
                    policy.get_ref()
                ),
            )
        })?,
        None => RawLimits::default(),
    };
    if raw.group.is_some() {
        merged.group = raw.group;
    }
    if raw.quotas.is_some() {
        merged.quotas = raw.quotas;
    }
    if raw.models.is_some() {
        merged.models = raw.models;
    }
    if raw.max_tokens.is_some() {
        merged.max_tokens = raw.max_tokens;
    }
    if raw.max_n.is_some() {
        merged.max_n = raw.max_n;
    }
    if raw.concurrency.is_some() {
        merged.concurrency = raw.concurrency;
    }
    if raw.rate.is_some() {
        merged.rate = raw.rate;
    }
    Ok(merged)
}

/// A policy's or a key's limits, checked; `prefix` is its key path (`keys[0]`, `policies.x`, or
/// empty for a key of the admin API).
fn validate_limits(
    raw: &RawLimits,
    prefix: &str,
    owner: Owner,
    src: &Source,
) -> Result<Limits, ConfigError> {
    let concurrency = at_least_one(
        raw.concurrency.as_ref(),
        &join(prefix, "concurrency"),
        "must be at least 1 (leave it out for no limit)",
        src,
    )?;
    let rate = match &raw.rate {
        Some(spanned) => Some(rate_limit(spanned, &join(prefix, "rate"), src)?),
        None => None,
    };
    let max_tokens = at_least_one(
        raw.max_tokens.as_ref(),
        &join(prefix, "max_tokens"),
        "must be at least 1 (leave it out for no cap)",
        src,
    )?;
    let max_n = at_least_one(
        raw.max_n.as_ref(),
        &join(prefix, "max_n"),
        "must be at least 1 (1 allows one answer per request; leave it out for no cap)",
        src,
    )?;
    let mut quotas = Vec::new();
    if let Some(raw_quotas) = &raw.quotas {
        let key = join(prefix, "quotas");
        quotas = quota_windows(raw_quotas, &key, src)?;
        if !quotas.is_empty() && raw.max_tokens.is_none() && owner == Owner::Key {
            return Err(src.at(
                raw_quotas.span(),
                &key,
                "a key with quotas needs max_tokens: a request that names no max_tokens reserves \
                 the key's cap, so the worst case must be bounded"
                    .into(),
            ));
        }
    }
    // `["*"]` and no list at all mean the same; keep one spelling.
    let models = raw
        .models
        .clone()
        .filter(|models| !models.iter().any(|m| m == "*"));
    let group = match &raw.group {
        Some(group) if !is_valid_key_name(group.get_ref()) => {
            return Err(src.at(
                group.span(),
                &format!("{prefix}.group"),
                format!("{:?} is not a group name", group.get_ref()),
            ))
        }
        Some(group) => Some(Arc::from(group.get_ref().as_str())),
        None => None,
    };
    Ok(Limits {
        quotas,
        group,
        models,
        max_tokens,
        max_n,
        concurrency,
        rate,
    })
}

/// An optional count that, when given, must be at least 1.
fn at_least_one(
    value: Option<&Spanned<u32>>,
    key: &str,
    message: &str,
    src: &Source,
) -> Result<Option<NonZeroU32>, ConfigError> {
    match value {
        Some(value) => NonZeroU32::new(*value.get_ref())
            .map(Some)
            .ok_or_else(|| src.at(value.span(), key, message.into())),
        None => Ok(None),
    }
}

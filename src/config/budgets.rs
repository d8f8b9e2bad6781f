//! `[pricing]`, `[groups.NAME]` and the quota lists of keys, policies and groups, validated.
//!
//! Edge cases: prices and cost limits are read from their decimal text in the file (the span of
//! the TOML value), never through a float, so `0.1` is exactly a tenth; a price has at most 3
//! decimals per million tokens (then it is a whole number of 10^-9 units per token), a cost limit
//! at most 9; a quota is tokens or cost, never both; two quotas of one list may not count the same
//! unit over the same window; a key whose quotas (or whose group's) count cost must have a price
//! for every model it may ask for — a `"*"` entry, or one that covers each of its `models`.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::limits::{is_valid_key_name, rate_limit};
use super::raw::{RawGroup, RawPricing, RawQuota};
use super::source::Source;
use super::{Budgets, ConfigError, GroupConfig, KeyConfig, Period, Price, Pricing, Quota, Unit};

/// Decimals a price per million tokens may have: 10^-3 per million is 10^-9 per token.
const PRICE_DECIMALS: u32 = 3;
/// Decimals a cost limit may have: the nano-unit.
const COST_DECIMALS: u32 = 9;

/// The price table and the groups.
pub(super) fn resolve_budgets(
    pricing: Option<RawPricing>,
    groups: BTreeMap<String, RawGroup>,
    src: &Source,
) -> Result<Budgets, ConfigError> {
    let pricing = match pricing {
        Some(raw) => {
            let mut models = Vec::with_capacity(raw.models.len());
            for (i, price) in raw.models.iter().enumerate() {
                let path = |field: &str| format!("pricing.models[{i}].{field}");
                models.push(Price {
                    model: price.model.clone(),
                    prompt: decimal(&price.prompt, PRICE_DECIMALS, &path("prompt"), src)?,
                    completion: decimal(
                        &price.completion,
                        PRICE_DECIMALS,
                        &path("completion"),
                        src,
                    )?,
                });
            }
            Pricing {
                currency: raw.currency,
                models,
            }
        }
        None => Pricing::default(),
    };
    let mut resolved = Vec::with_capacity(groups.len());
    for (name, group) in groups {
        let prefix = format!("groups.{name}");
        if !is_valid_key_name(&name) {
            return Err(src.whole(&format!(
                "{prefix}: use 1-64 letters, digits, '-', '_' or '.' in a group's name"
            )));
        }
        let quotas = match &group.quotas {
            Some(quotas) => quota_windows(quotas, &format!("{prefix}.quotas"), src)?,
            None => Vec::new(),
        };
        let concurrency = match &group.concurrency {
            Some(c) => Some(NonZeroU32::new(*c.get_ref()).ok_or_else(|| {
                src.at(
                    c.span(),
                    &format!("{prefix}.concurrency"),
                    "must be at least 1 (leave it out for no limit)".into(),
                )
            })?),
            None => None,
        };
        let rate = match &group.rate {
            Some(rate) => Some(rate_limit(rate, &format!("{prefix}.rate"), src)?),
            None => None,
        };
        resolved.push(GroupConfig {
            name: Arc::from(name),
            quotas,
            concurrency,
            rate,
        });
    }
    Ok(Budgets {
        pricing,
        groups: resolved,
    })
}

/// Each key's group exists; a key under a quota (its own or its group's) bounds its worst case
/// with `max_tokens`; a key under a cost quota has a price for every model it may use.
pub(super) fn check_keys(
    keys: &[KeyConfig],
    budgets: &Budgets,
    src: &Source,
) -> Result<(), ConfigError> {
    for (i, key) in keys.iter().enumerate() {
        check_key(key, Some(i), budgets, src)?;
    }
    Ok(())
}

/// [`check_keys`] for one key, the `index`th of the file (`None` for a key of the admin API,
/// whose messages name the field alone, as they do for its other fields).
pub(super) fn check_key(
    key: &KeyConfig,
    index: Option<usize>,
    budgets: &Budgets,
    src: &Source,
) -> Result<(), ConfigError> {
    let field = |name: &str| match index {
        Some(i) => format!("keys[{i}].{name}"),
        None => name.to_owned(),
    };
    let whole = match index {
        Some(i) => format!("keys[{i}] ({})", key.name),
        None => "the key".to_owned(),
    };
    let group =
        match &key.limits.group {
            Some(name) => Some(budgets.groups.iter().find(|g| g.name == *name).ok_or_else(
                || {
                    let known: Vec<&str> = budgets.groups.iter().map(|g| &*g.name).collect();
                    src.whole(&format!(
                        "{}: no group named {name:?} (defined: {known:?})",
                        field("group")
                    ))
                },
            )?),
            None => None,
        };
    let group_quotas = group.map_or(&[][..], |g| &g.quotas[..]);
    if !group_quotas.is_empty() && key.limits.max_tokens.is_none() {
        return Err(src.whole(&format!(
            "{whole}: its group {:?} has quotas, so the key needs max_tokens: a request that \
             names no max_tokens reserves the key's cap, so the worst case must be bounded",
            key.limits.group.as_deref().unwrap_or("")
        )));
    }
    let costs = key
        .limits
        .quotas
        .iter()
        .chain(group_quotas)
        .any(|q| q.unit == Unit::Cost);
    if costs {
        if let Some(gap) = unpriced(&budgets.pricing, key.limits.models.as_deref()) {
            return Err(src.whole(&format!(
                "{whole} has a cost quota (its own or its group's) and may use {gap}, which \
                 no [pricing] entry prices: add an entry for it or a {{ model = \"*\", … }} one"
            )));
        }
    }
    Ok(())
}

/// A model the key may ask for that no price matches (`models`: the key's allow-list, `None` for
/// any model), described for an error.
fn unpriced(pricing: &Pricing, models: Option<&[String]>) -> Option<String> {
    let covers = |price: &Price, wanted: &str| match (
        price.model.strip_suffix('*'),
        wanted.strip_suffix('*'),
    ) {
        (Some(prefix), Some(wanted_prefix)) => wanted_prefix.starts_with(prefix),
        (Some(prefix), None) => wanted.starts_with(prefix),
        (None, Some(_)) => false,
        (None, None) => price.model == wanted,
    };
    match models {
        None => (!pricing.models.iter().any(|p| p.model == "*"))
            .then(|| "any model (it has no models list)".to_owned()),
        Some(models) => models
            .iter()
            .find(|wanted| !pricing.models.iter().any(|p| covers(p, wanted)))
            .map(|wanted| format!("the model {wanted:?}")),
    }
}

/// Token and cost quotas: each tokens or cost, with a window of whole seconds, a week or a month;
/// no two counting the same unit over the same window.
pub(super) fn quota_windows(
    raw_quotas: &Spanned<Vec<RawQuota>>,
    key: &str,
    src: &Source,
) -> Result<Vec<Quota>, ConfigError> {
    let mut quotas: Vec<Quota> = Vec::new();
    let refuse = |msg: &str| src.at(raw_quotas.span(), key, msg.to_owned());
    for raw in raw_quotas.get_ref() {
        let per = period(&raw.per, key, src)?;
        let (limit, unit) = match (raw.tokens, &raw.cost) {
            (Some(tokens), None) => (tokens, Unit::Tokens),
            (None, Some(cost)) => (decimal(cost, COST_DECIMALS, key, src)?, Unit::Cost),
            _ => {
                return Err(refuse(
                    "each quota is { tokens = N, per = W } or { cost = X, per = W }",
                ))
            }
        };
        if limit == 0 {
            return Err(refuse("a quota's tokens or cost must be more than 0"));
        }
        if quotas.iter().any(|q| q.per == per && q.unit == unit) {
            return Err(refuse(&format!(
                "two {} quotas over the same window ({})",
                unit.label(),
                per.label()
            )));
        }
        quotas.push(Quota { limit, unit, per });
    }
    Ok(quotas)
}

/// `"month"`, `"week"`, or a duration of whole seconds, at least 1s.
fn period(per: &Spanned<String>, key: &str, src: &Source) -> Result<Period, ConfigError> {
    let text = per.get_ref().trim();
    match text {
        "month" => return Ok(Period::Month),
        "week" => return Ok(Period::Week),
        _ => {}
    }
    let refuse = |msg: String| src.at(per.span(), &format!("{key}.per"), msg);
    let duration = humantime::parse_duration(text).map_err(|e| {
        refuse(format!(
            "{text:?}: expected a duration (\"1h\", \"30d\"), \"week\" or \"month\": {e}"
        ))
    })?;
    if duration < Duration::from_secs(1) || duration.subsec_nanos() != 0 {
        return Err(refuse("windows are whole seconds, at least 1s".into()));
    }
    Ok(Period::fixed(duration))
}

/// A non-negative number with at most `decimals` decimals, read exactly from its text in the file,
/// as a whole number of 10^-`decimals` units.
fn decimal(
    value: &Spanned<f64>,
    decimals: u32,
    key: &str,
    src: &Source,
) -> Result<u64, ConfigError> {
    let text = src.text_at(value.span());
    parse_decimal(text, decimals).map_err(|why| src.at(value.span(), key, why))
}

/// `text` (TOML's decimal forms: `3`, `0.5`, `1_000.25`, `2.5e-1`) times 10^`decimals`, exactly;
/// an error when it is negative, not a number, or has more than `decimals` decimals.
pub(super) fn parse_decimal(text: &str, decimals: u32) -> Result<u64, String> {
    let bad =
        || format!("{text:?}: expected a number of at least 0 with at most {decimals} decimals");
    let cleaned: String = text.trim().trim_start_matches('+').replace('_', "");
    let (mantissa, exponent) = match cleaned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().map_err(|_| bad())?),
        None => (cleaned.as_str(), 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(fraction) {
        return Err(bad());
    }
    let fraction = fraction.trim_end_matches('0');
    // Decimal places once the exponent is applied.
    let places = i64::try_from(fraction.len()).map_err(|_| bad())? - i64::from(exponent);
    if places > i64::from(decimals) {
        return Err(format!(
            "{text:?} has more than {decimals} decimals; at most {decimals} are allowed"
        ));
    }
    let digits = format!("{whole}{fraction}");
    let value: u128 = digits.parse().map_err(|_| bad())?;
    let scale = u32::try_from(i64::from(decimals) - places).map_err(|_| bad())?;
    10u128
        .checked_pow(scale)
        .and_then(|factor| value.checked_mul(factor))
        .and_then(|scaled| u64::try_from(scaled).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_decimal;

    #[test]
    fn decimals_are_read_exactly_from_their_text() {
        assert_eq!(parse_decimal("0.1", 3), Ok(100));
        assert_eq!(parse_decimal("3.00", 3), Ok(3000));
        assert_eq!(parse_decimal("15", 3), Ok(15_000));
        assert_eq!(parse_decimal("1_000.125", 3), Ok(1_000_125));
        assert_eq!(parse_decimal("2.5e-1", 3), Ok(250));
        assert_eq!(parse_decimal("1e3", 3), Ok(1_000_000));
        assert_eq!(parse_decimal("500.0", 9), Ok(500_000_000_000));
        assert_eq!(parse_decimal("0.000000001", 9), Ok(1));
        assert_eq!(parse_decimal("0.12340", 3).map_err(|_| ()), Err(()));
        assert!(parse_decimal("0.0005", 3).is_err(), "4 decimals");
        assert!(parse_decimal("1e-4", 3).is_err(), "4 decimals by exponent");
        assert!(parse_decimal("-1", 3).is_err(), "negative");
        assert!(parse_decimal("inf", 3).is_err());
        assert!(parse_decimal("nan", 3).is_err());
        assert!(parse_decimal("1e30", 9).is_err(), "too large");
    }
}

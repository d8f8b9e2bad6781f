//! What keys, policies and groups write alike: names, and the request-rate limit. (Beside
//! `keys.rs` and `budgets.rs`, which both use it, so that neither imports the other for it.)

use std::num::NonZeroU32;

use toml::Spanned;

use super::raw::RawRate;
use super::source::Source;
use super::{ConfigError, RateLimit};

/// Key (and group, and pool) names become metric labels and log fields: keep them plain.
pub(crate) fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `rate = { requests, per, burst }`, checked (`key` is its path in messages).
pub(super) fn rate_limit(
    spanned: &Spanned<RawRate>,
    key: &str,
    src: &Source,
) -> Result<RateLimit, ConfigError> {
    let rate = spanned.get_ref();
    let requests = NonZeroU32::new(rate.requests)
        .ok_or_else(|| src.at(spanned.span(), key, "requests must be at least 1".into()))?;
    if rate.per.is_zero() {
        return Err(src.at(spanned.span(), key, "per must be longer than 0s".into()));
    }
    let burst = match rate.burst {
        Some(burst) => NonZeroU32::new(burst)
            .ok_or_else(|| src.at(spanned.span(), key, "burst must be at least 1".into()))?,
        None => requests,
    };
    Ok(RateLimit {
        requests,
        per: rate.per,
        burst,
    })
}

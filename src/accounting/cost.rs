//! Money in integers: a request's cost in nano-units (10^-9) of the pricing's currency, so that
//! sums are exact — a million requests charge exactly the sum of their costs, and the ledger, the
//! report, the admin API's windows and the quota windows agree to the last nano-unit.
//!
//! A price per million tokens with at most 3 decimals is a whole number of nano-units per token
//! ($1 per 1M tokens = 10^9 nano-units / 10^6 tokens = 1000 per token), so
//! `cost = prompt × prompt price + completion × completion price` is an integer product. Costs are
//! printed from the integer (never through a float): [`decimal`] for the ledger's JSON number,
//! [`fixed`] for the report's 9-decimal column, and read back exactly by [`parse`].

use serde::{Serialize, Serializer};

use crate::config::Price;

const NANO: u128 = 1_000_000_000;

/// A cost in nano-units, written to JSON as an exact decimal number (`0.000135`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Cost(pub(crate) u64);

impl Serialize for Cost {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = serde_json::value::RawValue::from_string(decimal(u128::from(self.0)))
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// A model's price for one request: nano-units per prompt and per completion token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub prompt: u64,
    pub completion: u64,
}

impl Rate {
    pub(crate) fn of(price: &Price) -> Rate {
        Rate {
            prompt: price.prompt,
            completion: price.completion,
        }
    }

    /// The cost of `prompt` and `completion` tokens, saturating (never in practice: tokens per
    /// request are capped at 2^32 and a price of 10^6 units per 1M tokens is 10^9 per token).
    pub(crate) fn cost(self, prompt: u64, completion: u64) -> u64 {
        let total = u128::from(prompt) * u128::from(self.prompt)
            + u128::from(completion) * u128::from(self.completion);
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

/// `nano` as a decimal of currency units with at most 9 decimals and no trailing zeros
/// (`12.5`, `0.000135`, `3`).
pub(crate) fn decimal(nano: u128) -> String {
    let (whole, fraction) = (nano / NANO, nano % NANO);
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:09}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// `nano` as currency units with exactly 9 decimals (`12.500000000`).
pub(crate) fn fixed(nano: u128) -> String {
    format!("{}.{:09}", nano / NANO, nano % NANO)
}

/// A non-negative decimal number (as [`decimal`] or [`fixed`] write it, or with an exponent) in
/// nano-units, exactly; `None` if it is not one or has more than 9 decimals.
pub(crate) fn parse(text: &str) -> Option<u128> {
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(fraction) {
        return None;
    }
    let fraction = fraction.trim_end_matches('0');
    let places = i64::try_from(fraction.len()).ok()? - i64::from(exponent);
    let scale = u32::try_from(9 - places).ok()?;
    let value: u128 = format!("{whole}{fraction}").parse().ok()?;
    value.checked_mul(10u128.checked_pow(scale)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_print_and_parse_back_exactly() {
        for nano in [
            0u128,
            1,
            135_000,
            12_500_000_000,
            3_000_000_000,
            999_999_999,
            u128::from(u64::MAX),
        ] {
            assert_eq!(parse(&decimal(nano)), Some(nano), "{}", decimal(nano));
            assert_eq!(parse(&fixed(nano)), Some(nano), "{}", fixed(nano));
        }
        assert_eq!(decimal(135_000), "0.000135");
        assert_eq!(decimal(12_500_000_000), "12.5");
        assert_eq!(fixed(12_500_000_000), "12.500000000");
        assert_eq!(parse("1.5e-9"), None, "below a nano-unit");
        assert_eq!(parse("1.35e-4"), Some(135_000));
        assert_eq!(parse("-1"), None);
    }

    #[test]
    fn a_cost_is_tokens_times_prices_in_nano_units() {
        // $3 and $15 per million tokens: 3000 and 15000 nano-units per token.
        let price = Price {
            model: "*".into(),
            prompt: 3_000,
            completion: 15_000,
        };
        let rate = Rate::of(&price);
        assert_eq!(rate.cost(1_000, 500), 3_000_000 + 7_500_000);
        let json = serde_json::to_string(&Cost(rate.cost(1_000, 500))).expect("json");
        assert_eq!(json, "0.0105");
    }
}

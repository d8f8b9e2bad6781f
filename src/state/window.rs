//! Where a quota window begins and ends: fixed windows aligned to multiples of their length since
//! the Unix epoch (`1h` on the hour, `1d` at 00:00 UTC), ISO weeks (Monday 00:00 UTC) and calendar
//! months (the 1st at 00:00 UTC, 28 to 31 days).
//!
//! Why hand-written civil arithmetic and not a calendar crate: the same computation must run in
//! the Redis scripts ([`LUA_BOUNDS`]), which read the time from Redis and cannot call Rust, and
//! the two must agree to the second. Both are Howard Hinnant's `days_from_civil` /
//! `civil_from_days` (public domain, exact for every proleptic Gregorian date), written line for
//! line alike; the tests check the Rust one against humantime's calendar over many years, and the
//! Redis tests check the Lua one against the Rust one.

use std::sync::{Arc, OnceLock};

use prometheus::{Gauge, IntGauge};

use crate::config::{Period, Quota, Unit};

/// Whose limit a window or a refusal is: the key's own, or its group's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Key,
    Group,
}

impl Scope {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Group => "group",
        }
    }
}

/// One counter of usage: a key's or a group's, of tokens or cost, over one window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WindowId {
    pub(crate) scope: Scope,
    /// The key's or the group's name.
    pub(crate) name: Arc<str>,
    pub(crate) unit: Unit,
    pub(crate) per: Period,
}

/// A counter and its limit: what a reservation must find room in.
#[derive(Debug, Clone)]
pub struct Window {
    pub(crate) id: WindowId,
    pub(crate) limit: u64,
    /// `id.per`'s label (`1h`, `month`), made once: the gauges are set on every request.
    pub(crate) label: Arc<str>,
    /// Its used-in-window gauge, looked up on first use and then kept (the gauge is set on every
    /// request); shared by the window's clones, so a group's window looks it up once for all
    /// its keys.
    pub(crate) gauge: Arc<OnceLock<UsedGauge>>,
    /// Its `RateLimit-Policy` field, made by the first answer that names it (it is on every
    /// answer) and kept with the length it was made for: a month's length changes.
    pub(crate) policy_header: Arc<OnceLock<PolicyHeader>>,
}

/// A window's name in the IETF fields (`tokens-1h`) and its `RateLimit-Policy` value.
#[derive(Debug)]
pub(crate) struct PolicyHeader {
    pub(crate) name: String,
    pub(crate) length: std::time::Duration,
    /// `None` if it could not be a field value (it always can: a name and digits).
    pub(crate) value: Option<http::HeaderValue>,
}

/// The used-in-window gauge of a token window, or of a cost window (in currency units).
#[derive(Debug)]
pub(crate) enum UsedGauge {
    Tokens(IntGauge),
    Cost(Gauge),
}

impl Window {
    /// The windows of `quotas` held by `name` in `scope`.
    pub fn of(scope: Scope, name: &Arc<str>, quotas: &[Quota]) -> Vec<Window> {
        quotas
            .iter()
            .map(|quota| Window {
                id: WindowId {
                    scope,
                    name: name.clone(),
                    unit: quota.unit,
                    per: quota.per,
                },
                limit: quota.limit,
                label: Arc::from(quota.per.label()),
                gauge: Arc::default(),
                policy_header: Arc::default(),
            })
            .collect()
    }
}

const DAY: u64 = 86_400;
const WEEK: u64 = 7 * DAY;
/// 1970-01-01 was a Thursday; the first Monday 00:00 UTC after the epoch is 4 days later.
const FIRST_MONDAY: u64 = 4 * DAY;

/// `[start, end)` in Unix seconds of the window of `period` that contains `now`.
pub fn bounds(period: Period, now: u64) -> (u64, u64) {
    match period {
        Period::Fixed(secs) => {
            let per = secs.get();
            let start = now - now % per;
            (start, start + per)
        }
        Period::Week => {
            // `now` before the first Monday is before 1970-01-05: never a real clock.
            let start = now - (now + WEEK - FIRST_MONDAY) % WEEK;
            (start, start + WEEK)
        }
        Period::Month => {
            let (year, month, _) = civil_from_days(now / DAY);
            let start = days_from_civil(year, month, 1) * DAY;
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            (start, days_from_civil(next_year, next_month, 1) * DAY)
        }
    }
}

/// Days since 1970-01-01 of a date (year, month 1-12, day 1-31), for years from 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month 1-12, day 1-31) `days` after 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The same as [`bounds`] for the Redis scripts: `bounds(per, now)` returns `start, end`, where
/// `per` is a window's id as [`Period::id`] writes it (`"3600"`, `"week"`, `"month"`). Lua's `%`
/// and `math.floor` on these non-negative integers (below 2^53) are exact.
pub const LUA_BOUNDS: &str = r"
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function bounds(per, now)
  if per == 'month' then
    local y, m = civil_from_days(math.floor(now / 86400))
    local start = days_from_civil(y, m, 1) * 86400
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    return start, days_from_civil(y, m, 1) * 86400
  elseif per == 'week' then
    local start = now - ((now + 604800 - 345600) % 604800)
    return start, start + 604800
  end
  local p = tonumber(per)
  local start = now - (now % p)
  return start, start + p
end
";

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU64;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(rfc3339: &str) -> u64 {
        humantime::parse_rfc3339(rfc3339)
            .expect("a time")
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs()
    }

    fn text(secs: u64) -> String {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
    }

    #[test]
    fn months_run_from_the_first_including_february_in_leap_years_and_not() {
        for (now, start, end) in [
            (
                "2024-02-29T23:59:59Z",
                "2024-02-01T00:00:00Z",
                "2024-03-01T00:00:00Z",
            ),
            (
                "2024-03-01T00:00:00Z",
                "2024-03-01T00:00:00Z",
                "2024-04-01T00:00:00Z",
            ),
            (
                "2023-02-28T12:00:00Z",
                "2023-02-01T00:00:00Z",
                "2023-03-01T00:00:00Z",
            ),
            (
                "2100-02-15T00:00:00Z",
                "2100-02-01T00:00:00Z",
                "2100-03-01T00:00:00Z",
            ),
            (
                "2000-02-29T00:00:00Z",
                "2000-02-01T00:00:00Z",
                "2000-03-01T00:00:00Z",
            ),
            (
                "2025-12-31T23:59:59Z",
                "2025-12-01T00:00:00Z",
                "2026-01-01T00:00:00Z",
            ),
            (
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:00:00Z",
                "2026-02-01T00:00:00Z",
            ),
        ] {
            let (s, e) = bounds(Period::Month, at(now));
            assert_eq!(
                (text(s), text(e)),
                (start.to_owned(), end.to_owned()),
                "{now}"
            );
        }
        let feb = |year: &str| {
            let (s, e) = bounds(Period::Month, at(&format!("{year}-02-10T00:00:00Z")));
            (e - s) / DAY
        };
        assert_eq!(
            (feb("2024"), feb("2023"), feb("2100"), feb("2000")),
            (29, 28, 28, 29)
        );
    }

    #[test]
    fn every_day_for_sixty_years_lies_in_the_month_humantime_names() {
        let mut now = at("1990-01-01T00:00:00Z");
        let last = at("2050-01-01T00:00:00Z");
        while now < last {
            let (start, end) = bounds(Period::Month, now);
            let day = text(now);
            assert_eq!(text(start), format!("{}-01T00:00:00Z", &day[..7]), "{day}");
            assert!(text(end).ends_with("-01T00:00:00Z") && end > now, "{day}");
            assert_ne!(text(end)[..7], day[..7], "the end is the next month: {day}");
            assert!((28..=31).contains(&((end - start) / DAY)), "{day}");
            now += DAY + 3_599;
        }
    }

    #[test]
    fn weeks_run_from_monday_midnight_utc() {
        // 2024-01-01 was a Monday.
        for now in [
            "2024-01-01T00:00:00Z",
            "2024-01-03T12:34:56Z",
            "2024-01-07T23:59:59Z",
        ] {
            let (s, e) = bounds(Period::Week, at(now));
            assert_eq!(text(s), "2024-01-01T00:00:00Z", "{now}");
            assert_eq!(text(e), "2024-01-08T00:00:00Z", "{now}");
        }
        let (s, _) = bounds(Period::Week, at("2024-01-08T00:00:00Z"));
        assert_eq!(text(s), "2024-01-08T00:00:00Z");
    }

    #[test]
    fn fixed_windows_are_aligned_to_their_length() {
        let hour = Period::Fixed(NonZeroU64::new(3600).expect("nonzero"));
        assert_eq!(
            bounds(hour, at("2024-05-05T10:20:30Z")),
            (at("2024-05-05T10:00:00Z"), at("2024-05-05T11:00:00Z"))
        );
    }
}

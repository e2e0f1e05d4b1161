//! UTC calendar arithmetic on Unix milliseconds, for usage days, budgets and bills: the one
//! copy the store and the server's quota windows share.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `YYYY-MM-DD` (UTC) of Unix milliseconds.
pub fn utc_day(ms: i64) -> String {
    // days since 1970-01-01 to a civil date (Howard Hinnant's algorithm)
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Unix milliseconds of 00:00 UTC of `YYYY-MM-DD`.
pub fn day_start_ms(day: &str) -> Result<i64> {
    let bad = || Error::Invalid(format!("{day:?} is not a date such as 2026-11-29"));
    let mut parts = day.split('-').map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let (y, m, d) = (y?, m?, d?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // civil date to days since 1970-01-01 (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Ok((era * 146_097 + doe - 719_468) * 86_400_000)
}

/// Unix milliseconds of 00:00 UTC of the day of `ms`.
pub fn day_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(86_400_000)
}

/// Unix milliseconds of 00:00 UTC on the first of the month of `ms`.
pub fn month_start(ms: i64) -> i64 {
    let day = utc_day(ms);
    let dom: i64 = day[8..].parse().unwrap_or(1);
    day_start(ms) - (dom - 1) * 86_400_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn days_parse() {
        use super::day_start_ms;
        assert_eq!(day_start_ms("1970-01-01").ok(), Some(0));
        assert_eq!(day_start_ms("2026-11-29").ok(), Some(1_795_910_400_000));
        assert_eq!(day_start_ms("2000-03-01").ok(), Some(951_868_800_000));
        assert!(day_start_ms("2026-13-01").is_err());
        assert!(day_start_ms("2026-11-29-1").is_err());
        assert!(day_start_ms("yesterday").is_err());
    }

    #[test]
    fn month_and_day_starts() {
        // 2024-02-29T13:00Z: the leap day, its midnight, and the first of February
        let ms = 1_709_211_600_000;
        assert_eq!(super::day_start(ms), 1_709_164_800_000);
        assert_eq!(super::month_start(ms), 1_706_745_600_000);
        assert_eq!(super::month_start(1_706_745_600_000), 1_706_745_600_000);
    }

    #[test]
    fn utc_days() {
        assert_eq!(super::utc_day(0), "1970-01-01");
        assert_eq!(super::utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(super::utc_day(1_795_910_400_000 - 1), "2026-11-28");
        assert_eq!(super::utc_day(1_795_910_400_000), "2026-11-29");
    }
}

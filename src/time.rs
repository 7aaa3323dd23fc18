//! Wall-clock timestamps for the journal and the run directory name, in UTC.
//!
//! Only the journal and file names need calendar time; every duration and deadline in gpuwarden
//! uses `Instant`. Converting days to a civil date is a few lines of integer arithmetic (the
//! proleptic Gregorian calendar), so no date crate is pulled in for it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Splits seconds since the Unix epoch into (year, month, day, hour, minute, second).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of a 400-year era.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3_600) as u32,
        ((rem % 3_600) / 60) as u32,
        (rem % 60) as u32,
    )
}

fn since_epoch(t: SystemTime) -> std::time::Duration {
    // A clock before 1970 is a broken clock; show the epoch rather than fail to journal.
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// RFC 3339 with microseconds, e.g. `2026-11-26T01:02:03.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = since_epoch(t);
    let (y, mo, da, h, mi, s) = civil(d.as_secs());
    format!(
        "{y:04}-{mo:02}-{da:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
        d.subsec_micros()
    )
}

/// A compact stamp for directory names, e.g. `20261126T010203Z`.
pub fn compact(t: SystemTime) -> String {
    let (y, mo, da, h, mi, s) = civil(since_epoch(t).as_secs());
    format!("{y:04}{mo:02}{da:02}T{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
    }

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day in a year divisible by 400).
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.000005Z");
        // date -u -d @1795650123 -> 2026-11-25T23:42:03Z
        assert_eq!(
            rfc3339(at(1_795_650_123, 123_456)),
            "2026-11-25T23:42:03.123456Z"
        );
        assert_eq!(compact(at(1_795_650_123, 0)), "20261125T234203Z");
        // 2100 is not a leap year: 2100-03-01 follows 2100-02-28.
        assert_eq!(compact(at(4_107_456_000, 0)), "21000228T000000Z");
        assert_eq!(compact(at(4_107_456_000 + 86_400, 0)), "21000301T000000Z");
    }
}

//! Wall-clock times (seconds since the Unix epoch), their local and UTC
//! renderings, and durations as users type them (`90s`, `15m`, `2h30m`, `7d`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::{Error, Result};

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A civil time broken down (local time zone unless said otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i32,
    /// 1..=12
    pub month: u32,
    /// 1..=31
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday .. 6 = Saturday
    pub weekday: u32,
}

impl LocalTime {
    fn from_tm(tm: &libc::tm) -> Self {
        let field = |v: libc::c_int| u32::try_from(v).unwrap_or(0);
        LocalTime {
            year: tm.tm_year + 1900,
            month: field(tm.tm_mon + 1),
            day: field(tm.tm_mday),
            hour: field(tm.tm_hour),
            minute: field(tm.tm_min),
            second: field(tm.tm_sec),
            weekday: field(tm.tm_wday),
        }
    }

    /// `t` in the local time zone (TZ), or UTC if the C library cannot say.
    pub fn local(t: i64) -> Self {
        Self::convert(t, true)
    }

    /// `t` in UTC.
    pub fn utc(t: i64) -> Self {
        Self::convert(t, false)
    }

    fn convert(t: i64, local: bool) -> Self {
        let time: libc::time_t = t;
        // SAFETY: an all-zero `tm` is a valid value (integers and a null
        // time zone name pointer).
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers refer to live, properly aligned values for
        // the duration of the call; the _r variants keep no reference.
        let ok = unsafe {
            if local {
                !libc::localtime_r(&time, &mut tm).is_null()
            } else {
                !libc::gmtime_r(&time, &mut tm).is_null()
            }
        };
        if !ok && local {
            return Self::convert(t, false);
        }
        Self::from_tm(&tm)
    }

    /// The epoch seconds of this local time (mktime: a time in a DST gap is
    /// moved forward), or None if it cannot be represented.
    pub fn to_epoch_local(self) -> Option<i64> {
        let int = |v: u32| libc::c_int::try_from(v).ok();
        // SAFETY: an all-zero `tm` is a valid value.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        tm.tm_year = self.year - 1900;
        tm.tm_mon = int(self.month)? - 1;
        tm.tm_mday = int(self.day)?;
        tm.tm_hour = int(self.hour)?;
        tm.tm_min = int(self.minute)?;
        tm.tm_sec = int(self.second)?;
        tm.tm_isdst = -1;
        // SAFETY: `tm` is a valid, exclusively borrowed struct; mktime only
        // normalizes it in place.
        let t = unsafe { libc::mktime(&mut tm) };
        (t != -1).then_some(t)
    }
}

/// `YYYY-MM-DD HH:MM:SS` in local time, for tables.
pub fn format_local(t: i64) -> String {
    let l = LocalTime::local(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        l.year, l.month, l.day, l.hour, l.minute, l.second
    )
}

/// RFC 3339 in UTC (`2026-03-07T09:05:01Z`), for JSON and logs.
pub fn format_utc(t: i64) -> String {
    let l = LocalTime::utc(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        l.year, l.month, l.day, l.hour, l.minute, l.second
    )
}

/// Parses a duration: one or more `<number><unit>` with units s, m, h, d, w
/// (`90s`, `15m`, `2h30m`, `7d`); a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let bad = |why: &str| {
        Error::Invalid(format!(
            "duration {text:?}: {why} (examples: 30s, 15m, 2h30m, 7d)"
        ))
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad(&format!("unknown unit {c:?}"))),
        };
        if digits.is_empty() {
            return Err(bad("a unit without a number"));
        }
        let n: u64 = digits.parse().map_err(|_| bad("number too large"))?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too large"))?;
    }
    if !digits.is_empty() {
        return Err(bad("a number without a unit at the end"));
    }
    Ok(Duration::from_secs(total))
}

/// A short rendering of a number of seconds: `45s`, `12m`, `3h5m`, `2d4h`.
pub fn format_duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let cases = [
            ("30", 30),
            ("30s", 30),
            ("15m", 900),
            ("2h30m", 9000),
            ("7d", 604_800),
            ("1w", 604_800),
            ("1h1m1s", 3661),
            (" 5m ", 300),
        ];
        for (text, secs) in cases {
            assert_eq!(parse_duration(text).unwrap().as_secs(), secs, "{text}");
        }
        for (text, want) in [
            ("", "empty"),
            ("5x", "unknown unit 'x'"),
            ("m", "without a number"),
            ("5m3", "without a unit"),
            ("-5s", "unknown unit '-'"),
            ("99999999999999999999s", "too large"),
            ("999999999999999w", "too large"),
        ] {
            let e = parse_duration(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn durations_format() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(120), "2m");
        assert_eq!(format_duration(125), "2m5s");
        assert_eq!(format_duration(3600), "1h");
        assert_eq!(format_duration(3660), "1h1m");
        assert_eq!(format_duration(86_400 * 2), "2d");
        assert_eq!(format_duration(86_400 * 2 + 3600 * 4 + 5), "2d4h");
    }

    #[test]
    fn utc_rendering_and_round_trip() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_772_874_301), "2026-03-07T09:05:01Z");
        let u = LocalTime::utc(1_772_874_301);
        assert_eq!(u.weekday, 6); // a Saturday
        let t = now();
        let l = LocalTime::local(t);
        assert_eq!(l.to_epoch_local(), Some(t));
        assert_eq!(format_local(t).len(), 19);
    }
}

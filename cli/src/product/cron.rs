//! Snapshot schedules: standard 5-field cron expressions in local time
//! (`minute hour day-of-month month day-of-week`, with `*`, lists, ranges,
//! steps and 3-letter month/day names), the `@hourly`-style shorthands, and
//! `@every DURATION` (for example `@every 5s`) for fine-grained intervals.
//!
//! As in cron, when both day fields are restricted a day matching either one
//! matches.

use super::clock::{parse_duration, LocalTime};
use super::error::{Error, Result};

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Cron(CronSpec),
    /// Every N seconds, counted from the previous tick.
    Every(u64),
}

/// The five fields, each as a bit set of allowed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSpec {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Schedule {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        if let Some(rest) = t.strip_prefix("@every") {
            let secs = parse_duration(rest)?.as_secs();
            if secs == 0 {
                return Err(Error::Invalid(format!(
                    "schedule {text:?}: the interval must be at least 1s"
                )));
            }
            return Ok(Schedule::Every(secs));
        }
        let expanded = match t {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other => other,
        };
        CronSpec::parse(expanded)
            .map(Schedule::Cron)
            .map_err(|why| Error::Invalid(format!("schedule {text:?}: {why}")))
    }

    /// The first tick strictly after `t` (epoch seconds), or None if there
    /// is none within about five years.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        match self {
            Schedule::Every(secs) => t.checked_add(i64::try_from(*secs).ok()?),
            Schedule::Cron(spec) => {
                let mut from = t;
                // mktime may map a match into the past around DST changes;
                // search on from the minute after.
                for _ in 0..4 {
                    let start = next_minute(LocalTime::local(from));
                    let hit = spec.next_from(start)?;
                    let at = hit.to_epoch_local()?;
                    if at > t {
                        return Some(at);
                    }
                    from = from.checked_add(3600)?;
                }
                None
            }
        }
    }
}

impl CronSpec {
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        }
        let minutes = parse_field(fields[0], "minute", 0, 59, &[])?;
        let hours = parse_field(fields[1], "hour", 0, 23, &[])?;
        let days = parse_field(fields[2], "day-of-month", 1, 31, &[])?;
        let months = parse_field(fields[3], "month", 1, 12, &MONTHS)?;
        let mut weekdays = parse_field(fields[4], "day-of-week", 0, 7, &WEEKDAYS)?;
        // 7 is Sunday too.
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        let narrow =
            |v: u64, what: &str| u32::try_from(v).map_err(|_| format!("{what} out of range"));
        Ok(CronSpec {
            minutes,
            hours: narrow(hours, "hour")?,
            days: narrow(days, "day-of-month")?,
            months: u16::try_from(months).map_err(|_| "month out of range".to_string())?,
            weekdays: u8::try_from(weekdays).map_err(|_| "day-of-week out of range".to_string())?,
            days_restricted: !fields[2].starts_with('*'),
            weekdays_restricted: !fields[4].starts_with('*'),
        })
    }

    fn day_matches(&self, c: &LocalTime) -> bool {
        let dom = self.days & (1 << c.day) != 0;
        let dow = self.weekdays & (1 << weekday(c.year, c.month, c.day)) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first matching minute at or after `c` (seconds ignored), in civil
    /// time; None beyond about five years.
    fn next_from(&self, mut c: LocalTime) -> Option<LocalTime> {
        c.second = 0;
        let limit = c.year + 5;
        while c.year <= limit {
            if self.months & (1 << c.month) == 0 {
                c = LocalTime {
                    day: 1,
                    hour: 0,
                    minute: 0,
                    ..c
                };
                c = add_months(c, 1);
            } else if !self.day_matches(&c) {
                c = next_day(c);
            } else if self.hours & (1 << c.hour) == 0 {
                c = if c.hour == 23 {
                    next_day(c)
                } else {
                    LocalTime {
                        hour: c.hour + 1,
                        minute: 0,
                        ..c
                    }
                };
            } else if self.minutes & (1 << c.minute) == 0 {
                c = next_minute(c);
            } else {
                c.weekday = weekday(c.year, c.month, c.day);
                return Some(c);
            }
        }
        None
    }
}

/// Parses one field into a bit set over `lo..=hi`.
fn parse_field(
    text: &str,
    what: &str,
    lo: u32,
    hi: u32,
    names: &[&str],
) -> std::result::Result<u64, String> {
    let value = |s: &str| -> std::result::Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            // Month names count from 1, weekday names from 0: both from `lo`.
            return Ok(u32::try_from(i).unwrap_or(0) + lo);
        }
        let v: u32 = s
            .parse()
            .map_err(|_| format!("{what} field: {s:?} is not a number"))?;
        if v < lo || v > hi {
            return Err(format!("{what} field: {v} is outside {lo}-{hi}"));
        }
        Ok(v)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 =
                    s.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        format!("{what} field: step {s:?} must be a positive number")
                    })?;
                (r, step)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `5/15` means from 5 to the end in steps of 15.
            (v, if step > 1 { hi } else { v })
        };
        if a > b {
            return Err(format!("{what} field: range {a}-{b} is backwards"));
        }
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    if set == 0 {
        return Err(format!("{what} field is empty"));
    }
    Ok(set)
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// 0 = Sunday; Sakamoto's method.
fn weekday(y: i32, m: u32, d: u32) -> u32 {
    const T: [i32; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
    let y = if m < 3 { y - 1 } else { y };
    let idx = usize::try_from(m.saturating_sub(1)).unwrap_or(0).min(11);
    let d = i32::try_from(d).unwrap_or(1);
    let w = (y + y / 4 - y / 100 + y / 400 + T[idx] + d).rem_euclid(7);
    u32::try_from(w).unwrap_or(0)
}

/// `c` with its weekday recomputed from the date.
fn dated(c: LocalTime) -> LocalTime {
    LocalTime {
        weekday: weekday(c.year, c.month, c.day),
        ..c
    }
}

fn add_months(c: LocalTime, n: u32) -> LocalTime {
    let total = c.month - 1 + n;
    dated(LocalTime {
        year: c.year + i32::try_from(total / 12).unwrap_or(0),
        month: total % 12 + 1,
        ..c
    })
}

fn next_day(c: LocalTime) -> LocalTime {
    let c = LocalTime {
        hour: 0,
        minute: 0,
        second: 0,
        ..c
    };
    if c.day < days_in_month(c.year, c.month) {
        dated(LocalTime {
            day: c.day + 1,
            ..c
        })
    } else {
        add_months(LocalTime { day: 1, ..c }, 1)
    }
}

fn next_minute(c: LocalTime) -> LocalTime {
    let c = LocalTime { second: 0, ..c };
    if c.minute < 59 {
        LocalTime {
            minute: c.minute + 1,
            ..c
        }
    } else if c.hour < 23 {
        LocalTime {
            hour: c.hour + 1,
            minute: 0,
            ..c
        }
    } else {
        next_day(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(year: i32, month: u32, day: u32, hour: u32, minute: u32) -> LocalTime {
        LocalTime {
            year,
            month,
            day,
            hour,
            minute,
            second: 0,
            weekday: weekday(year, month, day),
        }
    }

    fn next(expr: &str, from: LocalTime) -> LocalTime {
        let Schedule::Cron(spec) = Schedule::parse(expr).unwrap() else {
            panic!("not cron");
        };
        spec.next_from(from).unwrap()
    }

    #[test]
    fn weekdays_and_calendar() {
        assert_eq!(weekday(2026, 3, 7), 6);
        assert_eq!(weekday(2000, 1, 1), 6);
        assert_eq!(weekday(2024, 2, 29), 4);
        assert_eq!(next_day(at(2024, 2, 28, 5, 5)), at(2024, 2, 29, 0, 0));
        assert_eq!(next_day(at(2023, 2, 28, 5, 5)), at(2023, 3, 1, 0, 0));
        assert_eq!(next_minute(at(2026, 12, 31, 23, 59)), at(2027, 1, 1, 0, 0));
    }

    #[test]
    fn next_matches() {
        let from = at(2026, 3, 7, 9, 5); // Saturday
        assert_eq!(next("* * * * *", from), from);
        assert_eq!(next("0 */2 * * *", from), at(2026, 3, 7, 10, 0));
        assert_eq!(next("30 9 * * *", from), at(2026, 3, 7, 9, 30));
        assert_eq!(next("0 9 * * *", from), at(2026, 3, 8, 9, 0));
        assert_eq!(next("0 0 * * mon", from), at(2026, 3, 9, 0, 0));
        assert_eq!(next("0 0 * * 7", from), at(2026, 3, 8, 0, 0));
        assert_eq!(next("0 0 1 * *", from), at(2026, 4, 1, 0, 0));
        assert_eq!(next("0 0 29 feb *", from), at(2028, 2, 29, 0, 0));
        assert_eq!(next("15,45 * * * *", from), at(2026, 3, 7, 9, 15));
        assert_eq!(
            next("5/20 * * * *", at(2026, 3, 7, 9, 6)),
            at(2026, 3, 7, 9, 25)
        );
        assert_eq!(next("0 8-10/2 * * *", from), at(2026, 3, 7, 10, 0));
        // Both day fields restricted: either matches (the 10th, or a Monday).
        assert_eq!(next("0 0 10 * mon", from), at(2026, 3, 9, 0, 0));
        assert_eq!(next("@monthly", from), at(2026, 4, 1, 0, 0));
        assert_eq!(next("@yearly", from), at(2027, 1, 1, 0, 0));
    }

    #[test]
    fn impossible_dates_end() {
        let Schedule::Cron(spec) = Schedule::parse("0 0 31 2 *").unwrap() else {
            panic!()
        };
        assert_eq!(spec.next_from(at(2026, 1, 1, 0, 0)), None);
        assert_eq!(Schedule::parse("0 0 31 2 *").unwrap().next_after(0), None);
    }

    #[test]
    fn every_and_epoch() {
        assert_eq!(Schedule::parse("@every 5s").unwrap(), Schedule::Every(5));
        assert_eq!(
            Schedule::parse("@every 2m").unwrap().next_after(100),
            Some(220)
        );
        let s = Schedule::parse("* * * * *").unwrap();
        let t = super::super::clock::now();
        let n = s.next_after(t).unwrap();
        assert!(n > t && n <= t + 60 && n % 60 == LocalTime::local(n).second as i64 % 60);
        assert_eq!(LocalTime::local(n).second, 0);
    }

    #[test]
    fn errors() {
        let cases = [
            ("* * * *", "expected 5 fields"),
            ("60 * * * *", "minute field: 60 is outside 0-59"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day-of-month field: 0"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day-of-week field"),
            ("*/0 * * * *", "step"),
            ("5-1 * * * *", "backwards"),
            ("x * * * *", "not a number"),
            ("* * * foo *", "not a number"),
            ("@every 0s", "at least 1s"),
            ("@every", "empty"),
        ];
        for (expr, want) in cases {
            let e = Schedule::parse(expr).unwrap_err().to_string();
            assert!(e.contains(want), "{expr}: {e}");
        }
        assert!(Schedule::parse("0 0 * JAN SUN").is_ok());
    }
}

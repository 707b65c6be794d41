//! Period buckets: hours, days, ISO weeks (Monday first) and months, aligned in the request's
//! timezone and clipped to the requested window, as the upstream reports rows. The emulator
//! makes its rows per bucket; the gateway cuts oversized requests only at bucket boundaries.

use crate::domain::{Period, Timezone};
use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, NaiveDateTime, Timelike, Utc};

/// One bucket of an aggregation, as `aggregationStartTime`/`aggregationEndTime` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bucket {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// The buckets covering `[start, end)`, each clipped to that window.
pub(crate) fn buckets(start: DateTime<Utc>, end: DateTime<Utc>, period: Period, tz: Timezone) -> Buckets {
    let offset = Duration::minutes(i64::from(tz.offset_minutes()));
    Buckets { cursor: floor(start.naive_utc() + offset, period) - offset, start, end, period, offset }
}

/// Iterator over [`Bucket`]s; see [`buckets`].
#[derive(Debug, Clone)]
pub(crate) struct Buckets {
    /// The unclipped start of the next bucket, in UTC.
    cursor: NaiveDateTime,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    period: Period,
    offset: Duration,
}

impl Iterator for Buckets {
    type Item = Bucket;

    fn next(&mut self) -> Option<Bucket> {
        let bucket_start = self.cursor.and_utc();
        if bucket_start >= self.end {
            return None;
        }
        let next = step(self.cursor + self.offset, self.period)? - self.offset;
        self.cursor = next;
        Some(Bucket { start: bucket_start.max(self.start), end: next.and_utc().min(self.end) })
    }
}

/// How many buckets [`buckets`] yields for the window, without walking them: a window of
/// centuries is as cheap as a day (the gateway counts them for every estimate).
pub(crate) fn bucket_count(start: DateTime<Utc>, end: DateTime<Utc>, period: Period, tz: Timezone) -> u64 {
    if start >= end {
        return 0;
    }
    let offset = Duration::minutes(i64::from(tz.offset_minutes()));
    let (first, last) = (floor(start.naive_utc() + offset, period), end.naive_utc() + offset);
    let length = match period {
        Period::Hourly => Duration::hours(1),
        Period::Daily => Duration::days(1),
        Period::Weekly => Duration::weeks(1),
        Period::Monthly => {
            let months = (last.year() - first.year()) * 12 + last.month() as i32 - first.month() as i32;
            let months = u32::try_from(months).unwrap_or(0);
            let whole = first.checked_add_months(Months::new(months)).is_some_and(|m| m >= last);
            return u64::from(months) + u64::from(!whole);
        }
    };
    let span = (last - first).num_seconds();
    let len = length.num_seconds();
    u64::try_from((span + len - 1) / len).unwrap_or(0)
}

/// Whether `t` is where a bucket of `period` in `tz` begins (and the one before it ends).
pub(crate) fn on_boundary(t: DateTime<Utc>, period: Period, tz: Timezone) -> bool {
    let local = t.naive_utc() + Duration::minutes(i64::from(tz.offset_minutes()));
    floor(local, period) == local
}

fn floor(local: NaiveDateTime, period: Period) -> NaiveDateTime {
    let date = local.date();
    let day = match period {
        Period::Hourly => return midnight(date) + Duration::hours(i64::from(local.hour())),
        Period::Daily => date,
        Period::Weekly => date - Duration::days(i64::from(date.weekday().num_days_from_monday())),
        Period::Monthly => date.with_day(1).unwrap_or(date),
    };
    midnight(day)
}

fn step(local: NaiveDateTime, period: Period) -> Option<NaiveDateTime> {
    match period {
        Period::Hourly => local.checked_add_signed(Duration::hours(1)),
        Period::Daily => local.checked_add_signed(Duration::days(1)),
        Period::Weekly => local.checked_add_signed(Duration::weeks(1)),
        Period::Monthly => local.checked_add_months(Months::new(1)),
    }
}

fn midnight(date: NaiveDate) -> NaiveDateTime {
    date.and_time(chrono::NaiveTime::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("test timestamp").with_timezone(&Utc)
    }

    fn tz(s: &str) -> Timezone {
        Timezone::parse(s).expect("test timezone")
    }

    fn spans(start: &str, end: &str, period: Period, zone: &str) -> Vec<(String, String)> {
        buckets(t(start), t(end), period, tz(zone)).map(|b| (b.start.to_rfc3339(), b.end.to_rfc3339())).collect()
    }

    #[test]
    fn hourly_buckets_follow_half_hour_offsets() {
        let b = spans("2026-03-01T00:00:00Z", "2026-03-01T02:00:00Z", Period::Hourly, "UTC+05:30");
        assert_eq!(
            b,
            vec![
                ("2026-03-01T00:00:00+00:00".into(), "2026-03-01T00:30:00+00:00".into()),
                ("2026-03-01T00:30:00+00:00".into(), "2026-03-01T01:30:00+00:00".into()),
                ("2026-03-01T01:30:00+00:00".into(), "2026-03-01T02:00:00+00:00".into()),
            ]
        );
    }

    #[test]
    fn daily_buckets_start_at_local_midnight() {
        let b = spans("2026-03-01T12:00:00Z", "2026-03-03T00:00:00Z", Period::Daily, "UTC-08:00");
        assert_eq!(b[0], ("2026-03-01T12:00:00+00:00".into(), "2026-03-02T08:00:00+00:00".into()));
        assert_eq!(b[1], ("2026-03-02T08:00:00+00:00".into(), "2026-03-03T00:00:00+00:00".into()));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn weekly_buckets_start_on_monday() {
        // 2026-03-04 is a Wednesday; the week began Monday 2026-03-02 local (UTC+08:00).
        let b = spans("2026-03-04T00:00:00Z", "2026-03-20T00:00:00Z", Period::Weekly, "UTC+08:00");
        assert_eq!(b[1].0, "2026-03-08T16:00:00+00:00");
        assert_eq!(b[2].0, "2026-03-15T16:00:00+00:00");
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn monthly_buckets_cross_month_and_year_ends_in_local_time() {
        // In UTC+10:00, 2025-12-31T15:00Z is already 2026-01-01 01:00 local.
        let b = spans("2025-12-15T00:00:00Z", "2026-03-05T00:00:00Z", Period::Monthly, "UTC+10:00");
        let starts: Vec<&str> = b.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            starts,
            vec![
                "2025-12-15T00:00:00+00:00",
                "2025-12-31T14:00:00+00:00",
                "2026-01-31T14:00:00+00:00",
                "2026-02-28T14:00:00+00:00",
            ]
        );
        // February is 28 days long in 2026; the last bucket is clipped to the window's end.
        assert_eq!(b[3].1, "2026-03-05T00:00:00+00:00");
    }

    #[test]
    fn buckets_are_counted_as_they_are_walked() {
        use proptest::prelude::*;
        let config = proptest::test_runner::Config { cases: 2_000, failure_persistence: None, ..Default::default() };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let windows = (0usize..4, -24i32..=28, 0i64..2_000_000, 1i64..2_000_000);
        let result = runner.run(&windows, |(p, half_hours, from, minutes)| {
            let period = Period::ALL[p];
            let sign = if half_hours < 0 { '-' } else { '+' };
            let offset = half_hours.unsigned_abs() * 30;
            let zone = tz(&format!("UTC{sign}{:02}:{:02}", offset / 60, offset % 60));
            let start = t("2024-01-01T00:00:00Z") + Duration::minutes(from);
            let end = start + Duration::minutes(minutes);
            let walked = buckets(start, end, period, zone).count() as u64;
            prop_assert_eq!(bucket_count(start, end, period, zone), walked, "{:?} {} {}", period, start, end);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        let (start, end) = (t("1970-01-01T00:00:00Z"), t("2200-01-01T00:00:00Z"));
        let hours = u64::try_from((end - start).num_hours()).expect("positive");
        assert_eq!(bucket_count(start, end, Period::Hourly, tz("UTC+00:00")), hours, "centuries, counted at once");
    }

    #[test]
    fn buckets_tile_the_window_without_gaps() {
        for period in Period::ALL {
            for zone in ["UTC-11:30", "UTC+00:00", "UTC+13:00"] {
                let (start, end) = (t("2026-01-30T07:45:00Z"), t("2026-04-02T03:15:00Z"));
                let all: Vec<Bucket> = buckets(start, end, *period, tz(zone)).collect();
                assert_eq!(all.first().map(|b| b.start), Some(start));
                assert_eq!(all.last().map(|b| b.end), Some(end));
                assert!(all.windows(2).all(|w| w[0].end == w[1].start && w[0].start < w[0].end));
            }
        }
    }
}

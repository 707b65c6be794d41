//! The upstream's timezone notation: `UTC[-+][01][0-9]:(30|00)`, exactly nine characters.

use chrono::{FixedOffset, Offset, Utc};
use std::fmt;

/// A fixed UTC offset written the way the upstream wants it (`UTC+08:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timezone {
    offset_minutes: i32,
}

impl Timezone {
    pub const UTC: Timezone = Timezone { offset_minutes: 0 };

    /// Parses `UTC+08:00`; `None` for anything the model's pattern rejects.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 9 || !s.starts_with("UTC") || b[6] != b':' {
            return None;
        }
        let sign = match b[3] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        if !matches!(b[4], b'0' | b'1') || !b[5].is_ascii_digit() {
            return None;
        }
        let minutes = match &s[7..] {
            "00" => 0,
            "30" => 30,
            _ => return None,
        };
        let hours = i32::from(b[4] - b'0') * 10 + i32::from(b[5] - b'0');
        Some(Self { offset_minutes: sign * (hours * 60 + minutes) })
    }

    /// The offset in minutes east of UTC.
    pub fn offset_minutes(self) -> i32 {
        self.offset_minutes
    }

    /// The offset as chrono sees it.
    pub fn fixed_offset(self) -> FixedOffset {
        // The pattern caps hours at 19, far inside chrono's ±24h range.
        FixedOffset::east_opt(self.offset_minutes * 60).unwrap_or_else(|| Utc.fix())
    }
}

impl fmt::Display for Timezone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.offset_minutes < 0 { '-' } else { '+' };
        let abs = self.offset_minutes.abs();
        write!(f, "UTC{sign}{:02}:{:02}", abs / 60, abs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_model_pattern() {
        for s in ["UTC+08:00", "UTC-05:30", "UTC+00:00", "UTC+19:30", "UTC-10:00"] {
            let tz = Timezone::parse(s).unwrap_or_else(|| panic!("{s} should parse"));
            assert_eq!(tz.to_string(), s);
        }
        assert_eq!(Timezone::parse("UTC-05:30").map(Timezone::offset_minutes), Some(-330));
    }

    #[test]
    fn rejects_what_the_pattern_rejects() {
        for s in ["UTC+8", "UTC+8:00", "UTC+20:00", "UTC+08:15", "GMT+08:00", "UTC 08:00", "UTC+08:000", ""] {
            assert_eq!(Timezone::parse(s), None, "{s} should be rejected");
        }
    }
}

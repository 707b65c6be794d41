//! What `query` shows while it waits: on a terminal, one live line on stderr (queue position,
//! state, elapsed and estimated remaining time); otherwise a plain line per change, for logs;
//! nothing with `--quiet`. Rows go to stdout either way.

use crate::grpc::pb::{Aggregation, AggregationState};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal as _;
use std::time::{Duration, Instant, SystemTime};

/// How progress is shown.
pub(crate) struct Progress {
    shown: Shown,
    began: Instant,
}

enum Shown {
    Nothing,
    /// A live line on a terminal.
    Live(ProgressBar),
    /// A line per change.
    Lines,
}

impl Progress {
    /// Progress on stderr: live when it is a terminal, lines when not, none when `quiet`.
    pub(crate) fn on_stderr(quiet: bool) -> Self {
        let shown = if quiet {
            Shown::Nothing
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            Shown::Live(bar)
        } else {
            Shown::Lines
        };
        Self { shown, began: Instant::now() }
    }

    /// The aggregation changed.
    pub(crate) fn update(&self, a: &Aggregation) {
        match &self.shown {
            Shown::Nothing => {}
            Shown::Live(bar) => bar.set_message(live(a, self.began.elapsed(), SystemTime::now())),
            Shown::Lines => eprintln!("{}", line(a, self.began.elapsed())),
        }
    }

    /// Waiting is over.
    pub(crate) fn finish(&self) {
        if let Shown::Live(bar) = &self.shown {
            bar.finish_and_clear();
        }
    }
}

fn state(a: &Aggregation) -> &'static str {
    match a.state() {
        AggregationState::Queued => "QUEUED",
        AggregationState::Running => "RUNNING",
        AggregationState::Completed => "COMPLETED",
        AggregationState::Failed => "FAILED",
        AggregationState::TimedOut => "TIMED_OUT",
        AggregationState::Unspecified => "UNKNOWN",
    }
}

fn time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The live line: state, place, elapsed, and what is left as far as the gateway can tell.
fn live(a: &Aggregation, elapsed: Duration, now: SystemTime) -> String {
    let mut text = format!("{} {}", a.aggregation_id, state(a));
    if a.state() == AggregationState::Queued {
        text.push_str(&format!(", {} ahead", a.queue_position));
    }
    text.push_str(&format!(", elapsed {}", clock(elapsed)));
    let left = |at: Option<SystemTime>| at.map(|t| t.duration_since(now).unwrap_or_default());
    match (left(time(a.estimated_start_time)), left(time(a.estimated_completion_time))) {
        (_, Some(Duration::ZERO)) => text.push_str(", due any moment"),
        (Some(start), Some(done)) => text.push_str(&format!(", starts in ~{}, ~{} left", clock(start), clock(done))),
        (None, Some(done)) => text.push_str(&format!(", ~{} left", clock(done))),
        _ if matches!(a.state(), AggregationState::Queued | AggregationState::Running) => {
            text.push_str(", no estimate yet");
        }
        _ => {}
    }
    text
}

/// One plain line: what changed, with absolute estimated times (logs outlive the moment).
fn line(a: &Aggregation, elapsed: Duration) -> String {
    let rfc3339 = |t: SystemTime| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339();
    let mut text = format!("aggregation {} {} elapsed={}s", a.aggregation_id, state(a), elapsed.as_secs());
    if a.state() == AggregationState::Queued {
        text.push_str(&format!(" queue_position={}", a.queue_position));
    }
    if let Some(t) = time(a.estimated_start_time) {
        text.push_str(&format!(" estimated_start={}", rfc3339(t)));
    }
    if let Some(t) = time(a.estimated_completion_time) {
        text.push_str(&format!(" estimated_completion={}", rfc3339(t)));
    }
    if a.state() == AggregationState::Completed {
        text.push_str(&format!(" rows={}", a.row_count));
    }
    if !a.status_message.is_empty() {
        text.push_str(&format!(" message={:?}", a.status_message));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_line_says_where_it_stands_and_what_is_left() {
        let now = SystemTime::now();
        let mut a = Aggregation {
            aggregation_id: "agg-1".into(),
            state: AggregationState::Queued as i32,
            queue_position: 2,
            ..Default::default()
        };
        assert_eq!(live(&a, Duration::from_secs(5), now), "agg-1 QUEUED, 2 ahead, elapsed 0:05, no estimate yet");
        a.estimated_start_time = Some((now + Duration::from_secs(30)).into());
        a.estimated_completion_time = Some((now + Duration::from_secs(95)).into());
        assert_eq!(
            live(&a, Duration::from_secs(5), now),
            "agg-1 QUEUED, 2 ahead, elapsed 0:05, starts in ~0:30, ~1:35 left"
        );
        a.state = AggregationState::Running as i32;
        a.estimated_start_time = None;
        a.estimated_completion_time = Some((now - Duration::from_secs(1)).into());
        assert_eq!(live(&a, Duration::from_secs(3700), now), "agg-1 RUNNING, elapsed 1:01:40, due any moment");
        assert!(
            line(&a, Duration::from_secs(7)).starts_with("aggregation agg-1 RUNNING elapsed=7s estimated_completion=")
        );
    }
}

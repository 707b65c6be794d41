//! Fault injection: error rates per exception, added latency, dropped connections and forced
//! FAILED/TIMEOUT outcomes, set by flags or at runtime through `/_emulator/faults`.

use super::error::ErrorKind;
use crate::domain::AggregationStatus;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Which emulated operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Start,
    Get,
}

/// The final status a forced fault gives new aggregations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ForcedStatus {
    Failed,
    Timeout,
}

impl ForcedStatus {
    pub fn status(self) -> AggregationStatus {
        match self {
            Self::Failed => AggregationStatus::Failed,
            Self::Timeout => AggregationStatus::Timeout,
        }
    }
}

/// The faults in force; the JSON body of `POST /_emulator/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSpec {
    /// Probability (0..=1) that a request is answered with that exception.
    pub error_rates: BTreeMap<ErrorKind, f64>,
    /// Probability (0..=1) that the connection is closed without a response.
    pub drop_rate: f64,
    /// Probability (0..=1) that the request is carried out and then its connection is closed
    /// without the response: the caller cannot know whether it happened.
    pub lose_response_rate: f64,
    /// The `Retry-After` seconds of injected ThrottlingExceptions (default 1).
    pub retry_after_secs: Option<u64>,
    /// Delay added before every affected request is handled.
    pub latency_ms: u64,
    /// New aggregations end with this status instead of COMPLETED.
    pub force_status: Option<ForcedStatus>,
    /// New aggregations stay IN_PROGRESS this long instead of the configured duration (a slow
    /// upstream); those started earlier keep theirs.
    pub aggregation_duration_ms: Option<u64>,
    /// The operations affected; empty means both.
    pub operations: Vec<Operation>,
    /// How many errors and drops may still fire; `None` is unlimited.
    pub remaining: Option<u64>,
}

impl FaultSpec {
    /// Checks that every rate is a probability.
    pub fn validate(&self) -> Result<(), String> {
        let rates = self
            .error_rates
            .iter()
            .map(|(k, r)| (k.as_str(), *r))
            .chain([("drop_rate", self.drop_rate), ("lose_response_rate", self.lose_response_rate)]);
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name}: rate {rate} must be between 0 and 1"));
            }
        }
        Ok(())
    }

    fn affects(&self, op: Operation) -> bool {
        self.operations.is_empty() || self.operations.contains(&op)
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Proceed,
    /// Answer with this exception; the `Retry-After` seconds of a throttle.
    Fail(ErrorKind, u64),
    Drop,
    /// Carry the request out, then close the connection without the response.
    LoseResponse,
}

/// The live fault settings, shared by every connection.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    spec: Mutex<FaultSpec>,
}

impl Faults {
    pub(crate) fn new(spec: FaultSpec) -> Self {
        Self { spec: Mutex::new(spec) }
    }

    pub(crate) fn get(&self) -> FaultSpec {
        self.lock().clone()
    }

    pub(crate) fn set(&self, spec: FaultSpec) {
        *self.lock() = spec;
    }

    /// The latency to add to a request for `op`.
    pub(crate) fn latency(&self, op: Operation) -> Duration {
        let spec = self.lock();
        if spec.affects(op) { Duration::from_millis(spec.latency_ms) } else { Duration::ZERO }
    }

    /// The forced final status for a new aggregation, if any.
    pub(crate) fn forced_status(&self) -> Option<ForcedStatus> {
        self.lock().force_status
    }

    /// How long a new aggregation stays IN_PROGRESS, when a fault says.
    pub(crate) fn aggregation_duration(&self) -> Option<Duration> {
        self.lock().aggregation_duration_ms.map(Duration::from_millis)
    }

    /// Rolls the dice for one request of `op`.
    pub(crate) fn decide(&self, op: Operation) -> Action {
        let mut spec = self.lock();
        if !spec.affects(op) || spec.remaining == Some(0) {
            return Action::Proceed;
        }
        let mut rng = rand::rng();
        let retry_after = spec.retry_after_secs.unwrap_or(1);
        let action = if rng.random_bool(spec.drop_rate) {
            Action::Drop
        } else if rng.random_bool(spec.lose_response_rate) {
            Action::LoseResponse
        } else {
            spec.error_rates
                .iter()
                .find(|(_, rate)| rng.random_bool(**rate))
                .map_or(Action::Proceed, |(kind, _)| Action::Fail(*kind, retry_after))
        };
        if action != Action::Proceed {
            spec.remaining = spec.remaining.map(|n| n.saturating_sub(1));
        }
        action
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultSpec> {
        self.spec.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certain_faults_fire_for_their_operations_until_exhausted() {
        let faults = Faults::new(FaultSpec {
            error_rates: [(ErrorKind::ThrottlingException, 1.0)].into(),
            operations: vec![Operation::Start],
            remaining: Some(2),
            ..FaultSpec::default()
        });
        assert_eq!(faults.decide(Operation::Get), Action::Proceed);
        assert_eq!(faults.decide(Operation::Start), Action::Fail(ErrorKind::ThrottlingException, 1));
        assert_eq!(faults.decide(Operation::Start), Action::Fail(ErrorKind::ThrottlingException, 1));
        assert_eq!(faults.decide(Operation::Start), Action::Proceed);
    }

    #[test]
    fn rates_must_be_probabilities() {
        let spec = FaultSpec { drop_rate: 1.5, ..FaultSpec::default() };
        assert!(spec.validate().is_err());
        assert!(FaultSpec::default().validate().is_ok());
    }

    #[test]
    fn the_json_form_is_stable() {
        let spec: FaultSpec = serde_json::from_str(
            r#"{"error_rates":{"InternalServerErrorException":0.5},"drop_rate":0.1,"latency_ms":20,"force_status":"TIMEOUT","operations":["get"]}"#,
        )
        .expect("parses");
        assert_eq!(spec.force_status, Some(ForcedStatus::Timeout));
        assert_eq!(spec.operations, vec![Operation::Get]);
        assert!(serde_json::from_str::<FaultSpec>(r#"{"bogus":1}"#).is_err());
    }
}

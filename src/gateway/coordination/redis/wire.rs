//! How a record is stored in Redis: JSON of plain values (a version of the gateway that adds a
//! field reads records without it), the state and failure codes by name, times in
//! milliseconds since the epoch, and the canonical request as one string (the key index's name).

use crate::domain::{AggregationRequest, GroupBy, Period, Resources, Statistic, Timezone};
use crate::gateway::coordination::StoreError;
use crate::gateway::key::CanonicalKey;
use crate::gateway::record::{AggregationRecord, Failure, FailureCode, Offer, Priority, SplitPart, State};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or_default())
}

/// The name of a state, as scripts compare it.
pub(crate) fn state_name(s: State) -> &'static str {
    match s {
        State::Queued => "QUEUED",
        State::Running => "RUNNING",
        State::Completed => "COMPLETED",
        State::Failed => "FAILED",
        State::TimedOut => "TIMED_OUT",
    }
}

const STATES: [State; 5] = [State::Queued, State::Running, State::Completed, State::Failed, State::TimedOut];

const CODES: [(FailureCode, &str); 9] = [
    (FailureCode::InvalidArgument, "INVALID_ARGUMENT"),
    (FailureCode::NotFound, "NOT_FOUND"),
    (FailureCode::PermissionDenied, "PERMISSION_DENIED"),
    (FailureCode::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (FailureCode::FailedPrecondition, "FAILED_PRECONDITION"),
    (FailureCode::Aborted, "ABORTED"),
    (FailureCode::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (FailureCode::Unavailable, "UNAVAILABLE"),
    (FailureCode::Internal, "INTERNAL"),
];

/// The canonical request as one string: the key index's name.
pub(crate) fn canonical(key: &CanonicalKey) -> String {
    let whole = if key.may_split() { "" } else { "|no-split" };
    format!("{}{whole}", canonical_request(key.request()))
}

fn canonical_request(r: &AggregationRequest) -> String {
    let (kind, ids) = match &r.resources {
        Resources::Queues(ids) => ("q", ids),
        Resources::Fleets(ids) => ("f", ids),
    };
    let list = |v: Vec<&str>| v.join(",");
    format!(
        "{}|{kind}:{}|{}|{}|{}|{}|{}|{}",
        r.farm_id,
        ids.join(","),
        r.start_time.timestamp_millis(),
        r.end_time.timestamp_millis(),
        r.timezone.map(|t| t.to_string()).unwrap_or_default(),
        r.period.map(Period::as_str).unwrap_or_default(),
        list(r.group_by.iter().map(|g| g.as_str()).collect()),
        list(r.statistics.iter().map(|s| s.as_str()).collect()),
    )
}

/// A record as it is stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    id: String,
    farm_id: String,
    fleets: bool,
    resource_ids: Vec<String>,
    start_ms: i64,
    end_ms: i64,
    timezone: Option<String>,
    period: Option<String>,
    group_by: Vec<String>,
    statistics: Vec<String>,
    state: String,
    upstream_id: Option<String>,
    status_message: String,
    error: Option<(String, String)>,
    create_ms: i64,
    expire_ms: Option<i64>,
    data_ms: Option<i64>,
    running_ms: Option<i64>,
    row_count: u64,
    #[serde(default)]
    parts: u32,
    #[serde(default)]
    no_split: bool,
    #[serde(default)]
    refresh: bool,
    #[serde(default)]
    estimate_ms: Option<i64>,
    /// Absent: interactive (and in records of earlier versions). The claim script raises a
    /// waiting batch aggregation that an interactive caller joins by taking out exactly
    /// `,"priority":"batch"`: keep the field's name and place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    split: Vec<WirePart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    derived_from: Option<String>,
}

/// A part of a split aggregation as it is stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct WirePart {
    start_ms: i64,
    end_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resource_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_ms: Option<i64>,
    #[serde(default)]
    done: bool,
}

/// A record as it is stored.
pub(crate) fn to_json(r: &AggregationRecord) -> Result<String, StoreError> {
    let q = r.key.request();
    let (fleets, ids) = match &q.resources {
        Resources::Queues(ids) => (false, ids.clone()),
        Resources::Fleets(ids) => (true, ids.clone()),
    };
    let wire = Wire {
        id: r.id.to_string(),
        farm_id: q.farm_id.clone(),
        fleets,
        resource_ids: ids,
        start_ms: q.start_time.timestamp_millis(),
        end_ms: q.end_time.timestamp_millis(),
        timezone: q.timezone.map(|t| t.to_string()),
        period: q.period.map(|p| p.as_str().to_owned()),
        group_by: q.group_by.iter().map(|g| g.as_str().to_owned()).collect(),
        statistics: q.statistics.iter().map(|s| s.as_str().to_owned()).collect(),
        state: state_name(r.state).to_owned(),
        upstream_id: r.upstream_id.clone(),
        status_message: r.status_message.clone(),
        error: r.error.as_ref().map(|e| {
            let code = CODES.iter().find(|(c, _)| *c == e.code).map_or("INTERNAL", |(_, n)| n);
            (code.to_owned(), e.message.clone())
        }),
        create_ms: millis(r.create_time),
        expire_ms: r.expire_time.map(millis),
        data_ms: r.data_time.map(millis),
        running_ms: r.running_since.map(millis),
        row_count: r.row_count,
        parts: r.parts,
        no_split: !r.key.may_split(),
        refresh: r.refresh,
        estimate_ms: r.estimated_completion.map(millis),
        priority: (r.priority != Priority::Interactive).then(|| r.priority.name().to_owned()),
        split: r.split.iter().map(WirePart::of).collect(),
        derived_from: r.derived_from.as_ref().map(|id| id.to_string()),
    };
    serde_json::to_string(&wire).map_err(|e| StoreError::corrupt(format!("the record of {}", r.id), e))
}

/// A stored record; one that does not decode is [`StoreError::Corrupt`].
pub(crate) fn from_json(json: &str) -> Result<AggregationRecord, StoreError> {
    let bad = |what: &str| StoreError::Corrupt { what: format!("a record with {what}"), source: None };
    let w: Wire = serde_json::from_str(json).map_err(|e| StoreError::corrupt("a record", e))?;
    let time = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).ok_or_else(|| bad("a bad time"));
    let request = AggregationRequest {
        farm_id: w.farm_id,
        resources: if w.fleets { Resources::Fleets(w.resource_ids) } else { Resources::Queues(w.resource_ids) },
        start_time: time(w.start_ms)?,
        end_time: time(w.end_ms)?,
        timezone: w.timezone.map(|t| Timezone::parse(&t).ok_or_else(|| bad("a bad timezone"))).transpose()?,
        period: w.period.map(|p| Period::parse(&p).ok_or_else(|| bad("a bad period"))).transpose()?,
        group_by: w
            .group_by
            .iter()
            .map(|g| GroupBy::parse(g).ok_or_else(|| bad("a bad group")))
            .collect::<Result<_, _>>()?,
        statistics: w
            .statistics
            .iter()
            .map(|s| Statistic::parse(s).ok_or_else(|| bad("a bad statistic")))
            .collect::<Result<_, _>>()?,
    };
    let state = STATES.into_iter().find(|s| state_name(*s) == w.state).ok_or_else(|| bad("a bad state"))?;
    let error = w
        .error
        .map(|(code, message)| {
            let code = CODES.iter().find(|(_, n)| *n == code).map(|(c, _)| *c).ok_or_else(|| bad("a bad code"))?;
            Ok::<_, StoreError>(Failure { code, message })
        })
        .transpose()?;
    Ok(AggregationRecord {
        id: w.id.into(),
        key: if w.no_split { CanonicalKey::new(&request).no_split() } else { CanonicalKey::new(&request) },
        state,
        upstream_id: w.upstream_id,
        status_message: w.status_message,
        error,
        create_time: from_millis(w.create_ms),
        expire_time: w.expire_ms.map(from_millis),
        data_time: w.data_ms.map(from_millis),
        running_since: w.running_ms.map(from_millis),
        row_count: w.row_count,
        parts: w.parts,
        refresh: w.refresh,
        priority: match w.priority.as_deref() {
            None => Priority::Interactive,
            Some(name) => Priority::parse(name).ok_or_else(|| bad("a bad priority"))?,
        },
        estimated_completion: w.estimate_ms.map(from_millis),
        split: w.split.into_iter().map(WirePart::part).collect::<Result<_, StoreError>>()?,
        derived_from: w.derived_from.map(Into::into),
    })
}

impl WirePart {
    fn of(p: &SplitPart) -> Self {
        Self {
            start_ms: p.start_time.timestamp_millis(),
            end_ms: p.end_time.timestamp_millis(),
            resource_ids: p.resource_ids.clone(),
            upstream_id: p.upstream.as_ref().map(|(id, _)| id.clone()),
            started_ms: p.upstream.as_ref().map(|(_, at)| millis(*at)),
            done: p.done,
        }
    }

    fn part(self) -> Result<SplitPart, StoreError> {
        let time = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .ok_or_else(|| StoreError::Corrupt { what: "a split part with a bad time".into(), source: None })
        };
        Ok(SplitPart {
            start_time: time(self.start_ms)?,
            end_time: time(self.end_ms)?,
            resource_ids: self.resource_ids,
            upstream: self.upstream_id.zip(self.started_ms.map(from_millis)),
            done: self.done,
        })
    }
}

/// An [`Offer`] as it is stored, in its aggregation's record.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireOffer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part: Option<(usize, WirePart)>,
    upstream_id: String,
    started_ms: i64,
}

/// An offer as it is stored.
pub(crate) fn offer_to_json(offer: &Offer) -> Result<String, StoreError> {
    let wire = WireOffer {
        part: offer.part.as_ref().map(|(i, p)| (*i, WirePart::of(p))),
        upstream_id: offer.upstream_id.clone(),
        started_ms: millis(offer.started),
    };
    serde_json::to_string(&wire).map_err(|e| StoreError::corrupt("an offer", e))
}

/// A stored offer; one that does not decode is [`StoreError::Corrupt`].
pub(crate) fn offer_from_json(json: &str) -> Result<Offer, StoreError> {
    let w: WireOffer = serde_json::from_str(json).map_err(|e| StoreError::corrupt("an offer", e))?;
    Ok(Offer {
        part: w.part.map(|(i, p)| Ok::<_, StoreError>((i, p.part()?))).transpose()?,
        upstream_id: w.upstream_id,
        started: from_millis(w.started_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_wire_form() {
        let key = crate::gateway::key::test_key(1, 2);
        let mut r = AggregationRecord::queued("agg-1".into(), key, SystemTime::now());
        r.state = State::Failed;
        r.error = Some(Failure { code: FailureCode::Unavailable, message: "gone".into() });
        r.expire_time = Some(from_millis(1_800_000_000_123));
        r.running_since = Some(from_millis(1_800_000_000_000));
        r.create_time = from_millis(millis(r.create_time));
        r.parts = 3;
        let whole = r.key.request().clone();
        let (mut early, mut late) = (whole.clone(), whole.clone());
        early.end_time = whole.start_time + chrono::Duration::hours(1);
        late.start_time = early.end_time;
        late.resources = Resources::Queues(vec!["queue-only".into()]);
        r.split = vec![SplitPart::of(&early, &whole), SplitPart::of(&late, &whole)];
        r.split[0].upstream = Some(("upstream-1".into(), from_millis(1_800_000_000_456)));
        r.split[0].done = true;
        let back = from_json(&to_json(&r).expect("encodes")).expect("decodes");
        assert_eq!(back, r);
        assert_eq!(back.split[1].request(&whole), late, "a part's request comes back whole");
        r.key = r.key.clone().no_split();
        let back = from_json(&to_json(&r).expect("encodes")).expect("decodes");
        assert!(!back.key.may_split(), "a request that refused a split stays so");
        assert!(from_json("{}").is_err());
    }
}

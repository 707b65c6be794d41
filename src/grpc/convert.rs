//! Proto ⇄ domain: requests into validated domain requests (every bad field reported with its
//! proto path), aggregations and rows into proto messages.

use super::pb;
use crate::domain::validate::{Field, FieldViolation, RequestDraft, oversized_list};
use crate::domain::{AggregationRequest, GroupBy, Period, Statistic, StatisticsRow, Stats, UsageType};
use crate::gateway::{AggregationRecord, Disposition, Failure, FailureCode, GatewayError, Priority, State};
use chrono::{DateTime, Utc};
use std::time::SystemTime;

/// The proto path of a request field, with `[i]` for a list element.
pub fn field_name(field: Field, index: Option<usize>) -> String {
    let name = match field {
        Field::FarmId => "farm_id",
        Field::ResourceIds => "resources",
        Field::QueueIds => "queue_ids.ids",
        Field::FleetIds => "fleet_ids.ids",
        Field::StartTime => "start_time",
        Field::EndTime => "end_time",
        Field::Timezone => "timezone",
        Field::Period => "period",
        Field::GroupBy => "group_by",
        Field::Statistics => "statistics",
        Field::AggregationId => "aggregation_id",
        Field::MaxResults => "page_size",
        Field::NextToken => "page_token",
        Field::Wait => "wait",
        Field::MaxStaleness => "max_staleness",
        Field::Priority => "priority",
    };
    match index {
        Some(i) => format!("{name}[{i}]"),
        None => name.to_owned(),
    }
}

/// A StartAggregation request, decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct StartRequest {
    pub request: AggregationRequest,
    /// The oldest cached answer the caller accepts.
    pub max_staleness: Option<std::time::Duration>,
    /// The caller refuses a split answer.
    pub no_split: bool,
    /// The class asked for (`None`: unspecified, the caller's default).
    pub priority: Option<Priority>,
    /// The caller refuses an answer derived from a larger result.
    pub no_derive: bool,
}

/// Decodes and validates a StartAggregation request.
pub fn start_request(mut req: pb::StartAggregationRequest) -> Result<StartRequest, GatewayError> {
    let max_staleness = req.max_staleness.take().map(std::time::Duration::try_from);
    let mut staleness_violation = None;
    let max_staleness = match max_staleness {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => {
            staleness_violation = Some(FieldViolation::new(Field::MaxStaleness, "must be a non-negative duration"));
            None
        }
    };
    let (no_split, no_derive) = (req.no_split, req.no_derive);
    let mut violations: Vec<FieldViolation> = staleness_violation.into_iter().collect();
    let priority = match pb::Priority::try_from(req.priority) {
        Ok(pb::Priority::Unspecified) => None,
        Ok(pb::Priority::Interactive) => Some(Priority::Interactive),
        Ok(pb::Priority::Batch) => Some(Priority::Batch),
        Err(_) => {
            violations.push(FieldViolation::new(Field::Priority, format!("{} is not a Priority", req.priority)));
            None
        }
    };
    let request = aggregation_request(req, violations)?;
    Ok(StartRequest { request, max_staleness, no_split, priority, no_derive })
}

fn aggregation_request(
    req: pb::StartAggregationRequest,
    violations: Vec<FieldViolation>,
) -> Result<AggregationRequest, GatewayError> {
    let mut draft = RequestDraft {
        farm_id: req.farm_id,
        timezone: Some(req.timezone).filter(|tz| !tz.is_empty()),
        ..RequestDraft::default()
    };
    match req.resources {
        Some(pb::start_aggregation_request::Resources::QueueIds(r)) => draft.queue_ids = Some(r.ids),
        Some(pb::start_aggregation_request::Resources::FleetIds(r)) => draft.fleet_ids = Some(r.ids),
        None => {}
    }
    draft.violations.extend(violations);
    draft.start_time = req.start_time.and_then(|t| time(&t, Field::StartTime, &mut draft.violations));
    draft.end_time = req.end_time.and_then(|t| time(&t, Field::EndTime, &mut draft.violations));
    draft.period = match pb::Period::try_from(req.period) {
        Ok(pb::Period::Unspecified) => None,
        Ok(p) => period(p),
        Err(_) => {
            draft.violations.push(FieldViolation::new(Field::Period, format!("{} is not a Period", req.period)));
            None
        }
    };
    // Lists too long to be sensible are refused before their items are decoded.
    let oversized =
        [oversized_list(Field::GroupBy, req.group_by.len()), oversized_list(Field::Statistics, req.statistics.len())];
    if oversized.iter().any(Option::is_some) {
        draft.violations.extend(oversized.into_iter().flatten());
        return Err(GatewayError::Invalid(draft.violations));
    }
    for (i, g) in req.group_by.iter().enumerate() {
        match pb::GroupBy::try_from(*g).ok().and_then(group_by) {
            Some(g) => draft.group_by.push(g),
            None => draft.violations.push(FieldViolation::at(Field::GroupBy, i, format!("{g} is not a GroupBy value"))),
        }
    }
    for (i, s) in req.statistics.iter().enumerate() {
        match pb::Statistic::try_from(*s).ok().and_then(statistic) {
            Some(s) => draft.statistics.push(s),
            None => {
                draft.violations.push(FieldViolation::at(Field::Statistics, i, format!("{s} is not a Statistic value")))
            }
        }
    }
    draft.validate().map_err(GatewayError::Invalid)
}

fn time(t: &prost_types::Timestamp, field: Field, v: &mut Vec<FieldViolation>) -> Option<DateTime<Utc>> {
    let parsed = datetime(t);
    if parsed.is_none() {
        v.push(FieldViolation::new(field, "is not a valid timestamp"));
    }
    parsed
}

fn period(p: pb::Period) -> Option<Period> {
    Some(match p {
        pb::Period::Unspecified => return None,
        pb::Period::Hourly => Period::Hourly,
        pb::Period::Daily => Period::Daily,
        pb::Period::Weekly => Period::Weekly,
        pb::Period::Monthly => Period::Monthly,
    })
}

fn group_by(g: pb::GroupBy) -> Option<GroupBy> {
    Some(match g {
        pb::GroupBy::Unspecified => return None,
        pb::GroupBy::QueueId => GroupBy::QueueId,
        pb::GroupBy::FleetId => GroupBy::FleetId,
        pb::GroupBy::JobId => GroupBy::JobId,
        pb::GroupBy::UserId => GroupBy::UserId,
        pb::GroupBy::UsageType => GroupBy::UsageType,
        pb::GroupBy::InstanceType => GroupBy::InstanceType,
        pb::GroupBy::LicenseProduct => GroupBy::LicenseProduct,
    })
}

fn statistic(s: pb::Statistic) -> Option<Statistic> {
    Some(match s {
        pb::Statistic::Unspecified => return None,
        pb::Statistic::Sum => Statistic::Sum,
        pb::Statistic::Min => Statistic::Min,
        pb::Statistic::Max => Statistic::Max,
        pb::Statistic::Avg => Statistic::Avg,
    })
}

pub fn disposition(d: Disposition) -> pb::Disposition {
    match d {
        Disposition::Started => pb::Disposition::Started,
        Disposition::Joined => pb::Disposition::Joined,
        Disposition::Cached => pb::Disposition::Cached,
        Disposition::Derived => pb::Disposition::Derived,
    }
}

/// The proto view of an aggregation, `queue_position` aggregations behind the head of its farm.
pub fn aggregation(r: &AggregationRecord, queue_position: u32) -> pb::Aggregation {
    let running = crate::gateway::estimate::Estimate { start: None, completion: r.estimated_completion };
    let estimate = if r.state == State::Running { running } else { Default::default() };
    estimated(r, queue_position, &estimate)
}

/// The aggregation with its predicted times.
pub fn estimated(
    r: &AggregationRecord,
    queue_position: u32,
    estimate: &crate::gateway::estimate::Estimate,
) -> pb::Aggregation {
    pb::Aggregation {
        aggregation_id: r.id.to_string(),
        farm_id: r.farm_id().to_owned(),
        state: state(r.state) as i32,
        queue_position: if r.state == State::Queued { queue_position } else { 0 },
        create_time: Some(r.create_time.into()),
        expire_time: r.expire_time.map(prost_types::Timestamp::from),
        status_message: r.status_message.clone(),
        error: r.error.as_ref().map(status),
        row_count: r.row_count,
        parts: r.parts,
        estimated_start_time: estimate.start.filter(|_| r.state == State::Queued).map(prost_types::Timestamp::from),
        estimated_completion_time: estimate
            .completion
            .filter(|_| matches!(r.state, State::Queued | State::Running))
            .map(prost_types::Timestamp::from),
        priority: priority(r.priority) as i32,
        derived_from: r.derived_from.as_deref().unwrap_or_default().to_owned(),
    }
}

pub fn priority(p: Priority) -> pb::Priority {
    match p {
        Priority::Interactive => pb::Priority::Interactive,
        Priority::Batch => pb::Priority::Batch,
    }
}

fn state(s: State) -> pb::AggregationState {
    match s {
        State::Queued => pb::AggregationState::Queued,
        State::Running => pb::AggregationState::Running,
        State::Completed => pb::AggregationState::Completed,
        State::Failed => pb::AggregationState::Failed,
        State::TimedOut => pb::AggregationState::TimedOut,
    }
}

fn status(f: &Failure) -> tonic_types::pb::Status {
    tonic_types::pb::Status { code: code(f.code) as i32, message: f.message.clone(), details: vec![] }
}

/// The gRPC code of a failure.
pub fn code(c: FailureCode) -> tonic::Code {
    match c {
        FailureCode::InvalidArgument => tonic::Code::InvalidArgument,
        FailureCode::NotFound => tonic::Code::NotFound,
        FailureCode::PermissionDenied => tonic::Code::PermissionDenied,
        FailureCode::ResourceExhausted => tonic::Code::ResourceExhausted,
        FailureCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        FailureCode::Aborted => tonic::Code::Aborted,
        FailureCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        FailureCode::Unavailable => tonic::Code::Unavailable,
        FailureCode::Internal => tonic::Code::Internal,
    }
}

/// Appends one row to `buf` exactly as it appears inside a `GetAggregationResponse`: field 2
/// (`statistics`), length-delimited. Stored so, a page of rows is one contiguous slice that goes
/// to the wire as it is. This is the gateway's [`crate::gateway::rows::RowEncoder`].
pub fn encode_row(r: &StatisticsRow, buf: &mut Vec<u8>) {
    prost::encoding::message::encode(super::wire::STATISTICS, &row(r), buf);
}

/// Reads back one row as [`encode_row`] wrote it; `None` when the bytes are not one.
pub fn decode_row(mut bytes: &[u8]) -> Option<StatisticsRow> {
    use prost::Message as _;
    let response = pb::GetAggregationResponse::decode(&mut bytes).ok()?;
    let [row] = <[pb::StatisticsRow; 1]>::try_from(response.statistics).ok()?;
    Some(domain_row(row))
}

/// The gateway's rows on the wire: [`encode_row`] and [`decode_row`].
pub const ROW_CODEC: crate::gateway::rows::RowCodec =
    crate::gateway::rows::RowCodec { encode: encode_row, decode: decode_row };

/// The domain form of one proto row (unknown enum values read as absent).
fn domain_row(r: pb::StatisticsRow) -> StatisticsRow {
    let usage_type = match pb::UsageType::try_from(r.usage_type) {
        Ok(pb::UsageType::Compute) => Some(UsageType::Compute),
        Ok(pb::UsageType::License) => Some(UsageType::License),
        Ok(pb::UsageType::PersistentVolume) => Some(UsageType::PersistentVolume),
        _ => None,
    };
    let stats = |s: Option<pb::Stats>| {
        s.map_or_else(Stats::default, |s| Stats { min: s.min, max: s.max, avg: s.avg, sum: s.sum })
    };
    StatisticsRow {
        queue_id: r.queue_id,
        fleet_id: r.fleet_id,
        job_id: r.job_id,
        job_name: r.job_name,
        user_id: r.user_id,
        license_product: r.license_product,
        instance_type: r.instance_type,
        usage_type,
        count: r.count,
        cost_in_usd: stats(r.cost_in_usd),
        runtime_in_seconds: stats(r.runtime_in_seconds),
        aggregation_start_time: r.aggregation_start_time.as_ref().and_then(datetime),
        aggregation_end_time: r.aggregation_end_time.as_ref().and_then(datetime),
    }
}

/// The proto form of one row.
pub fn row(r: &StatisticsRow) -> pb::StatisticsRow {
    pb::StatisticsRow {
        queue_id: r.queue_id.clone(),
        fleet_id: r.fleet_id.clone(),
        job_id: r.job_id.clone(),
        job_name: r.job_name.clone(),
        user_id: r.user_id.clone(),
        license_product: r.license_product.clone(),
        instance_type: r.instance_type.clone(),
        usage_type: r.usage_type.map_or(pb::UsageType::Unspecified, usage_type) as i32,
        count: r.count,
        cost_in_usd: Some(stats(&r.cost_in_usd)),
        runtime_in_seconds: Some(stats(&r.runtime_in_seconds)),
        aggregation_start_time: r.aggregation_start_time.map(timestamp),
        aggregation_end_time: r.aggregation_end_time.map(timestamp),
    }
}

fn usage_type(u: UsageType) -> pb::UsageType {
    match u {
        UsageType::Compute => pb::UsageType::Compute,
        UsageType::License => pb::UsageType::License,
        UsageType::PersistentVolume => pb::UsageType::PersistentVolume,
    }
}

fn stats(s: &Stats) -> pb::Stats {
    pb::Stats { min: s.min, max: s.max, avg: s.avg, sum: s.sum }
}

/// A protobuf timestamp as a chrono time; `None` when it is out of range.
pub fn datetime(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    u32::try_from(t.nanos).ok().and_then(|n| DateTime::from_timestamp(t.seconds, n))
}

/// A chrono time as a protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::StartAggregationRequest {
        pb::StartAggregationRequest {
            farm_id: format!("farm-{}", "a".repeat(32)),
            resources: Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
                ids: vec![format!("queue-{}", "b".repeat(32))],
            })),
            start_time: Some(prost_types::Timestamp { seconds: 1_767_225_600, nanos: 0 }),
            end_time: Some(prost_types::Timestamp { seconds: 1_767_312_000, nanos: 0 }),
            timezone: String::new(),
            period: pb::Period::Hourly as i32,
            group_by: vec![pb::GroupBy::QueueId as i32],
            statistics: vec![pb::Statistic::Sum as i32],
            max_staleness: None,
            no_split: false,
            priority: 0,
            no_derive: false,
        }
    }

    fn violations(req: pb::StartAggregationRequest) -> Vec<String> {
        match start_request(req) {
            Err(GatewayError::Invalid(v)) => v.into_iter().map(|f| field_name(f.field, f.index)).collect(),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_converts() {
        let r = start_request(good()).expect("valid").request;
        assert_eq!((r.period, r.timezone), (Some(Period::Hourly), None));
    }

    #[test]
    fn every_bad_field_is_named_by_its_proto_path() {
        let mut req = good();
        req.resources = Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
            ids: vec![format!("queue-{}", "b".repeat(32)), "q".into(), "r".into(), "queue-x".into()],
        }));
        req.group_by = vec![pb::GroupBy::QueueId as i32, 0, 99];
        req.statistics = vec![];
        req.period = 42;
        req.start_time = Some(prost_types::Timestamp { seconds: 0, nanos: -1 });
        req.timezone = "UTC+8".into();
        assert_eq!(
            violations(req),
            vec![
                "start_time",
                "period",
                "group_by[1]",
                "group_by[2]",
                "queue_ids.ids[1]",
                "queue_ids.ids[2]",
                "queue_ids.ids[3]",
                "timezone",
                "statistics"
            ]
        );
    }

    #[test]
    fn max_staleness_is_read_and_checked() {
        let mut req = good();
        req.max_staleness = Some(prost_types::Duration { seconds: 300, nanos: 0 });
        assert_eq!(start_request(req).expect("valid").max_staleness, Some(std::time::Duration::from_secs(300)));
        let mut req = good();
        req.max_staleness = Some(prost_types::Duration { seconds: -1, nanos: 0 });
        assert_eq!(violations(req), vec!["max_staleness"]);
    }

    #[test]
    fn oversized_enum_lists_are_refused_whole() {
        let mut req = good();
        req.group_by = vec![99; 1_000_000];
        req.statistics = vec![pb::Statistic::Sum as i32; 1_000_000];
        assert_eq!(violations(req), vec!["group_by", "statistics"]);
    }

    #[test]
    fn resources_are_required() {
        let mut req = good();
        req.resources = None;
        req.farm_id = String::new();
        assert_eq!(violations(req), vec!["farm_id", "resources"]);
    }

    fn stats() -> impl proptest::strategy::Strategy<Value = Stats> {
        use proptest::prelude::*;
        let stat = || proptest::option::of(-1e12..1e12f64);
        (stat(), stat(), stat(), stat()).prop_map(|(min, max, avg, sum)| Stats { min, max, avg, sum })
    }

    proptest::proptest! {
        /// What a derived answer reads back is the row that was stored, field by field.
        #[test]
        fn a_row_reads_back_as_it_was_encoded(
            ids in proptest::collection::vec(proptest::option::of("[a-z0-9-]{0,40}"), 7),
            usage in 0..4usize,
            count in proptest::prelude::any::<i32>(),
            cost in stats(),
            runtime in stats(),
            times in proptest::option::of((0..4_000_000_000i64, 0..4_000_000_000i64)),
        ) {
            let usage_type = [None, Some(UsageType::Compute), Some(UsageType::License), Some(UsageType::PersistentVolume)][usage];
            let at = |s: i64| DateTime::from_timestamp(s, 0);
            let row = StatisticsRow {
                queue_id: ids[0].clone(),
                fleet_id: ids[1].clone(),
                job_id: ids[2].clone(),
                job_name: ids[3].clone(),
                user_id: ids[4].clone(),
                license_product: ids[5].clone(),
                instance_type: ids[6].clone(),
                usage_type,
                count,
                cost_in_usd: cost,
                runtime_in_seconds: runtime,
                aggregation_start_time: times.and_then(|(s, _)| at(s)),
                aggregation_end_time: times.and_then(|(_, e)| at(e)),
            };
            let mut buf = Vec::new();
            encode_row(&row, &mut buf);
            proptest::prop_assert_eq!(decode_row(&buf), Some(row));
        }
    }

    #[test]
    fn bytes_that_are_not_one_row_read_as_none() {
        let mut two = Vec::new();
        encode_row(&StatisticsRow::default(), &mut two);
        encode_row(&StatisticsRow::default(), &mut two);
        assert_eq!(decode_row(&two), None, "two rows");
        assert_eq!(decode_row(b"\x12\x05ab"), None, "cut short");
        assert_eq!(decode_row(&[]), None, "nothing");
    }
}

//! The REST-JSON wire form of the two operations: camelCase members, ISO-8601 timestamps and
//! the model's enum strings, converted to and from the domain types.

use super::error::{ApiError, ValidationReason};
use super::state::Page;
use crate::domain::validate::{Field, FieldViolation, RequestDraft};
use crate::domain::{AggregationRequest, GroupBy, Period, Statistic, StatisticsRow, Stats};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of StartSessionsStatisticsAggregation.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartBody {
    resource_ids: Option<ResourceIdsBody>,
    start_time: Option<Value>,
    end_time: Option<Value>,
    timezone: Option<String>,
    period: Option<String>,
    group_by: Option<Vec<String>>,
    statistics: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceIdsBody {
    queue_ids: Option<Vec<String>>,
    fleet_ids: Option<Vec<String>>,
}

/// The wire name of a request field, with `[i]` for a list element.
pub(super) fn field_name(field: Field, index: Option<usize>) -> String {
    let name = match field {
        Field::FarmId => "farmId",
        Field::ResourceIds => "resourceIds",
        Field::QueueIds => "resourceIds.queueIds",
        Field::FleetIds => "resourceIds.fleetIds",
        Field::StartTime => "startTime",
        Field::EndTime => "endTime",
        Field::Timezone => "timezone",
        Field::Period => "period",
        Field::GroupBy => "groupBy",
        Field::Statistics => "statistics",
        Field::AggregationId => "aggregationId",
        Field::MaxResults => "maxResults",
        Field::NextToken => "nextToken",
        Field::Wait => "wait",
        Field::MaxStaleness => "maxStaleness",
        Field::Priority => "priority",
    };
    match index {
        Some(i) => format!("{name}[{i}]"),
        None => name.to_owned(),
    }
}

/// Renders violations as a FIELD_VALIDATION_FAILED ValidationException.
pub(super) fn violations(v: Vec<FieldViolation>) -> ApiError {
    ApiError::fields(v.into_iter().map(|f| (field_name(f.field, f.index), f.description)).collect())
}

/// Decodes and validates a Start request.
pub(super) fn start_request(farm_id: String, body: &[u8]) -> Result<AggregationRequest, ApiError> {
    let body: StartBody = serde_json::from_slice(body).map_err(|e| ApiError::Validation {
        reason: ValidationReason::CannotParse,
        message: format!("the request body is not valid JSON for this operation: {e}"),
        fields: vec![],
    })?;
    let mut draft = RequestDraft { farm_id, timezone: body.timezone, ..RequestDraft::default() };
    if let Some(r) = body.resource_ids {
        draft.queue_ids = r.queue_ids;
        draft.fleet_ids = r.fleet_ids;
    }
    draft.start_time = body.start_time.and_then(|t| timestamp(&t, Field::StartTime, &mut draft.violations));
    draft.end_time = body.end_time.and_then(|t| timestamp(&t, Field::EndTime, &mut draft.violations));
    draft.period = body.period.and_then(|p| parse_enum(&p, Period::parse, Field::Period, None, &mut draft.violations));
    for (i, g) in body.group_by.unwrap_or_default().iter().enumerate() {
        draft.group_by.extend(parse_enum(g, GroupBy::parse, Field::GroupBy, Some(i), &mut draft.violations));
    }
    for (i, s) in body.statistics.unwrap_or_default().iter().enumerate() {
        draft.statistics.extend(parse_enum(s, Statistic::parse, Field::Statistics, Some(i), &mut draft.violations));
    }
    draft.validate().map_err(violations)
}

/// ISO-8601 text, or epoch seconds as some clients send them.
fn timestamp(v: &Value, field: Field, violations: &mut Vec<FieldViolation>) -> Option<DateTime<Utc>> {
    let parsed = match v {
        Value::String(s) => DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc)),
        Value::Number(n) => n.as_f64().and_then(|secs| DateTime::from_timestamp_millis((secs * 1000.0).round() as i64)),
        _ => None,
    };
    if parsed.is_none() {
        violations.push(FieldViolation::new(field, format!("{v} is not an ISO-8601 timestamp")));
    }
    parsed
}

fn parse_enum<T>(
    s: &str,
    parse: fn(&str) -> Option<T>,
    field: Field,
    index: Option<usize>,
    v: &mut Vec<FieldViolation>,
) -> Option<T> {
    let parsed = parse(s);
    if parsed.is_none() {
        v.push(FieldViolation { field, index, description: format!("'{s}' is not a valid value") });
    }
    parsed
}

/// The body of StartSessionsStatisticsAggregation's response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StartOutput {
    pub aggregation_id: String,
}

/// The body of GetSessionsStatisticsAggregation's response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GetOutput {
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    statistics: Option<Vec<RowOut>>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_message: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RowOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    license_product: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_type: Option<String>,
    count: i32,
    cost_in_usd: StatsOut,
    runtime_in_seconds: StatsOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregation_start_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregation_end_time: Option<String>,
}

#[derive(Debug, Serialize)]
struct StatsOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sum: Option<f64>,
}

impl From<Page> for GetOutput {
    fn from(page: Page) -> Self {
        Self {
            next_token: page.next_token,
            statistics: page.rows.map(|rows| rows.into_iter().map(RowOut::from).collect()),
            status: page.status.as_str(),
            status_message: page.status_message,
        }
    }
}

impl From<StatisticsRow> for RowOut {
    fn from(r: StatisticsRow) -> Self {
        Self {
            queue_id: r.queue_id,
            fleet_id: r.fleet_id,
            job_id: r.job_id,
            job_name: r.job_name,
            user_id: r.user_id,
            usage_type: r.usage_type.map(|u| u.as_str()),
            license_product: r.license_product,
            instance_type: r.instance_type,
            count: r.count,
            cost_in_usd: r.cost_in_usd.into(),
            runtime_in_seconds: r.runtime_in_seconds.into(),
            aggregation_start_time: r.aggregation_start_time.map(iso8601),
            aggregation_end_time: r.aggregation_end_time.map(iso8601),
        }
    }
}

impl From<Stats> for StatsOut {
    fn from(s: Stats) -> Self {
        Self { min: s.min, max: s.max, avg: s.avg, sum: s.sum }
    }
}

fn iso8601(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FARM: &str = "farm-00000000000000000000000000000001";
    const QUEUE: &str = "queue-00000000000000000000000000000001";

    #[test]
    fn a_well_formed_body_decodes() {
        let body = format!(
            r#"{{"resourceIds":{{"queueIds":["{QUEUE}"]}},"startTime":"2026-01-01T00:00:00Z","endTime":1767312000,
            "timezone":"UTC+01:00","period":"HOURLY","groupBy":["QUEUE_ID","USAGE_TYPE"],"statistics":["SUM","MAX"]}}"#
        );
        let req = start_request(FARM.into(), body.as_bytes()).expect("valid");
        assert_eq!(req.group_by, vec![GroupBy::QueueId, GroupBy::UsageType]);
        assert_eq!(req.end_time.timestamp(), 1_767_312_000);
    }

    #[test]
    fn bad_fields_are_named_in_wire_form() {
        let body = r#"{"resourceIds":{"queueIds":["queue-1"]},"startTime":"yesterday","period":"YEARLY","groupBy":["QUEUE_ID","BOGUS"],"statistics":["SUM"]}"#;
        let ApiError::Validation { reason, fields, .. } =
            start_request("farm-1".into(), body.as_bytes()).expect_err("invalid")
        else {
            panic!("expected a ValidationException");
        };
        assert_eq!(reason, ValidationReason::FieldValidationFailed);
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["startTime", "period", "groupBy[1]", "farmId", "resourceIds.queueIds[0]", "endTime"]);
    }

    #[test]
    fn malformed_json_cannot_be_parsed() {
        let err = start_request(FARM.into(), b"{not json").expect_err("invalid");
        assert!(matches!(err, ApiError::Validation { reason: ValidationReason::CannotParse, .. }));
    }
}

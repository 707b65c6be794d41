//! The console's JSON: the gateway's views as the API under `/api/v1/` returns them. Times are
//! RFC 3339 (UTC, milliseconds), durations seconds; absent values are `null`. Every string a
//! caller chose (identities, ids) is data here, never markup: the page escapes what it shows.

use crate::domain::{AggregationRequest, Resources};
use crate::gateway::activity::{Event, What, state_name, time_of};
use crate::gateway::estimate::Estimate;
use crate::gateway::inspect::{AggregationView, FarmSummary, FarmView, PREVIEW_ROWS, Queued, callers};
use crate::gateway::{AggregationRecord, SplitPart};
use prost::Message as _;
use serde_json::{Value, json};
use std::time::SystemTime;

/// `t` as RFC 3339 in UTC, to the millisecond.
pub fn time(t: SystemTime) -> Value {
    let t: chrono::DateTime<chrono::Utc> = t.into();
    Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn time_opt(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, time)
}

fn ms(ms: Option<u64>) -> Value {
    time_opt(ms.map(time_of))
}

/// Seconds from `from` to `to` (0 when `to` is earlier).
pub fn seconds(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from).map_or(0.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// What an aggregation asks for.
pub fn request(r: &AggregationRequest) -> Value {
    let (kind, ids) = match &r.resources {
        Resources::Queues(ids) => ("queues", ids),
        Resources::Fleets(ids) => ("fleets", ids),
    };
    json!({
        "farm_id": r.farm_id,
        "resource_kind": kind,
        "resource_ids": ids,
        "start_time": time(r.start_time.into()),
        "end_time": time(r.end_time.into()),
        "timezone": r.timezone.map(|t| t.to_string()),
        "period": r.period.map(|p| p.as_str()),
        "group_by": r.group_by.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
        "statistics": r.statistics.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    })
}

fn estimate(e: &Estimate) -> Value {
    json!({ "start": time_opt(e.start), "completion": time_opt(e.completion) })
}

fn part(p: &SplitPart) -> Value {
    json!({
        "start_time": time(p.start_time.into()),
        "end_time": time(p.end_time.into()),
        "resource_ids": p.resource_ids,
        "upstream_id": p.upstream.as_ref().map(|(id, _)| id),
        "started": time_opt(p.upstream.as_ref().map(|(_, at)| *at)),
        "done": p.done,
    })
}

/// The record's own fields.
pub fn record(r: &AggregationRecord) -> Value {
    json!({
        "id": &*r.id,
        "farm_id": r.farm_id(),
        "state": state_name(r.state),
        "refresh": r.refresh,
        "class": r.class_name(),
        "upstream_id": r.upstream_id,
        "status_message": r.status_message,
        "error": r.error.as_ref().map(|e| json!({ "code": format!("{:?}", e.code), "message": e.message })),
        "created": time(r.create_time),
        "running_since": time_opt(r.running_since),
        "estimated_completion": time_opt(r.estimated_completion),
        "expire_time": time_opt(r.expire_time),
        "data_time": time_opt(r.data_time),
        "row_count": r.row_count,
        "parts": r.parts,
        "derived_from": r.derived_from.as_deref(),
        "split": r.split.iter().map(part).collect::<Vec<_>>(),
        "parts_done": r.split.iter().filter(|p| p.done).count(),
        "request": request(r.key.request()),
    })
}

/// One event of a timeline (or a farm's recent list).
pub fn event(e: &Event) -> Value {
    let mut v = json!({ "at": ms(Some(e.at_ms)), "aggregation_id": e.aggregation, "farm_id": e.farm });
    let fields = match &e.what {
        What::Queued { caller, trace_id } => json!({ "event": "queued", "caller": caller, "trace_id": trace_id }),
        What::Joined { caller, trace_id } => json!({ "event": "joined", "caller": caller, "trace_id": trace_id }),
        What::Derived { caller, from } => json!({ "event": "derived", "caller": caller, "from": from }),
        What::Driving { holder, trace_id } => json!({ "event": "driving", "holder": holder, "trace_id": trace_id }),
        What::Running { upstream_id, estimated_completion_ms } => json!({
            "event": "running", "upstream_id": upstream_id, "estimated_completion": ms(*estimated_completion_ms),
        }),
        What::Split { parts } => json!({ "event": "split", "parts": parts }),
        What::PartStarted { part, parts, upstream_id } => {
            json!({ "event": "part_started", "part": part, "parts": parts, "upstream_id": upstream_id })
        }
        What::Ended { state, rows, parts, error, queued_ms, running_since_ms, estimated_completion_ms } => json!({
            "event": "ended",
            "state": state,
            "rows": rows,
            "parts": parts,
            "error": error,
            "queued": ms(Some(*queued_ms)),
            "running_since": ms(*running_since_ms),
            "estimated_completion": ms(*estimated_completion_ms),
            "duration_seconds": seconds(time_of(*queued_ms), time_of(e.at_ms)),
            "estimate_error_seconds": estimated_completion_ms
                .map(|p| (e.at_ms as f64 - p as f64) / 1000.0),
        }),
        What::Discarded { fault } => json!({ "event": "discarded", "fault": fault }),
    };
    if let (Value::Object(v), Value::Object(fields)) = (&mut v, fields) {
        v.extend(fields);
    }
    v
}

/// The replica driving the aggregation, as its timeline last said.
pub fn holder(timeline: &[Event]) -> Option<&str> {
    timeline.iter().rev().find_map(|e| match &e.what {
        What::Driving { holder, .. } => Some(holder.as_str()),
        _ => None,
    })
}

/// The aggregation's trace: the first trace id its timeline names.
pub fn trace_id(timeline: &[Event]) -> Option<&str> {
    timeline.iter().find_map(|e| match &e.what {
        What::Queued { trace_id, .. } | What::Joined { trace_id, .. } | What::Driving { trace_id, .. } => {
            trace_id.as_deref()
        }
        _ => None,
    })
}

/// A farm in the list of farms.
pub fn farm_summary(f: &FarmSummary, now: SystemTime) -> Value {
    let head = f.head.as_ref().map(|h| {
        json!({
            "id": &*h.id,
            "state": state_name(h.state),
            "upstream_id": h.upstream_id,
            "running_since": time_opt(h.running_since),
            "estimated_completion": time_opt(h.estimated_completion),
            "parts": h.split.len(),
            "parts_done": h.split.iter().filter(|p| p.done).count(),
            "refresh": h.refresh,
        })
    });
    json!({
        "farm_id": f.farm,
        "queued": f.load.queued,
        "running": f.load.running,
        "head": head,
        "oldest_wait_seconds": f.oldest_waiting.as_ref().map(|r| seconds(r.create_time, now)),
        "holder": f.holder,
        "route": f.route,
    })
}

fn queued(q: &Queued, now: SystemTime) -> Value {
    json!({
        "position": q.position,
        "id": &*q.record.id,
        "state": state_name(q.record.state),
        "refresh": q.record.refresh,
        "class": q.record.class_name(),
        "created": time(q.record.create_time),
        "waiting_seconds": seconds(q.record.create_time, now),
        "upstream_id": q.record.upstream_id,
        "running_since": time_opt(q.record.running_since),
        "request": request(q.record.key.request()),
        "callers": q.callers,
        "estimate": estimate(&q.estimate),
    })
}

/// A farm's page.
pub fn farm(v: &FarmView, now: SystemTime) -> Value {
    json!({
        "farm_id": v.farm,
        "length": v.length,
        "holder": v.holder,
        "route": v.route,
        "queue": v.queue.iter().map(|q| queued(q, now)).collect::<Vec<_>>(),
        "recent": v.recent.iter().map(event).collect::<Vec<_>>(),
    })
}

/// The first rows of a result, decoded from the transport's encoding.
fn preview(rows: &crate::gateway::rows::RowBlock) -> Vec<Value> {
    let shown = rows.len().min(PREVIEW_ROWS);
    let decoded = crate::grpc::pb::GetAggregationResponse::decode(rows.slice(0..shown)).unwrap_or_default();
    decoded.statistics.iter().map(row).collect()
}

fn stats(s: &Option<crate::grpc::pb::Stats>) -> Value {
    s.as_ref().map_or(Value::Null, |s| json!({ "min": s.min, "max": s.max, "avg": s.avg, "sum": s.sum }))
}

fn row(r: &crate::grpc::pb::StatisticsRow) -> Value {
    let t = |t: &Option<prost_types::Timestamp>| {
        t.as_ref().and_then(crate::grpc::convert::datetime).map_or(Value::Null, |t| time(t.into()))
    };
    let some = |s: &Option<String>| s.clone().map_or(Value::Null, Value::String);
    json!({
        "start": t(&r.aggregation_start_time),
        "end": t(&r.aggregation_end_time),
        "queue_id": some(&r.queue_id),
        "fleet_id": some(&r.fleet_id),
        "job_id": some(&r.job_id),
        "user_id": some(&r.user_id),
        "usage_type": r.usage_type().as_str_name(),
        "instance_type": some(&r.instance_type),
        "license_product": some(&r.license_product),
        "count": r.count,
        "cost_in_usd": stats(&r.cost_in_usd),
        "runtime_in_seconds": stats(&r.runtime_in_seconds),
    })
}

/// An aggregation's page; `trace_url` fills the operator's template with its trace id.
pub fn aggregation(v: &AggregationView, trace_url: impl Fn(&str) -> Option<String>) -> Value {
    let mut out = record(&v.record);
    let trace = trace_id(&v.timeline);
    let extra = json!({
        "queue_position": v.queue_position,
        "estimate": estimate(&v.estimate),
        "holder": holder(&v.timeline),
        "callers": callers(&v.timeline),
        "trace_id": trace,
        "trace_url": trace.and_then(&trace_url),
        "timeline": v.timeline.iter().map(event).collect::<Vec<_>>(),
        "rows_preview": v.rows.as_ref().map(|r| preview(r)),
        "note": v.note,
    });
    if let (Value::Object(out), Value::Object(extra)) = (&mut out, extra) {
        out.extend(extra);
    }
    out
}

/// What is known of an aggregation whose record is gone: its timeline alone.
pub fn aggregation_history(id: &str, timeline: &[Event]) -> Value {
    json!({
        "id": id,
        "state": timeline.iter().rev().find_map(|e| match &e.what {
            What::Ended { state, .. } => Some(state.clone()),
            _ => None,
        }),
        "note": "the store no longer holds this aggregation (its result expired or was dropped); its timeline remains",
        "callers": callers(timeline),
        "trace_id": trace_id(timeline),
        "timeline": timeline.iter().map(event).collect::<Vec<_>>(),
    })
}

//! Micro-benchmarks of the hot path: the canonical key, a cache lookup, encoding a page of 100
//! rows, and a caller's token-bucket check.

use criterion::{Criterion, criterion_group, criterion_main};
use deadline_stats_gateway::domain::{
    AggregationRequest, GroupBy, Resources, Statistic, StatisticsRow, Stats, UsageType, ids::format_id,
};
use deadline_stats_gateway::gateway::coordination::ResultsCache;
use deadline_stats_gateway::gateway::ids::IdMinter;
use deadline_stats_gateway::gateway::key::CanonicalKey;
use deadline_stats_gateway::gateway::paging;
use deadline_stats_gateway::gateway::rate::Rate;
use deadline_stats_gateway::gateway::rows::RowBlockBuilder;
use deadline_stats_gateway::gateway::throttle::CallerBuckets;
use deadline_stats_gateway::gateway::{AggregationRecord, CachedResult, State};
use deadline_stats_gateway::grpc::convert;
use deadline_stats_gateway::grpc::pb;
use deadline_stats_gateway::grpc::wire::{self, EncodedRows};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn request() -> AggregationRequest {
    let start = chrono::DateTime::from_timestamp(1_790_812_800, 0).expect("start");
    AggregationRequest {
        farm_id: format_id("farm-", 1, 2),
        resources: Resources::Queues((0..5).rev().map(|i| format_id("queue-", 3, i)).collect()),
        start_time: start,
        end_time: start + chrono::Duration::days(7),
        timezone: None,
        period: None,
        group_by: vec![GroupBy::UserId, GroupBy::QueueId],
        statistics: vec![Statistic::Max, Statistic::Sum, Statistic::Avg],
    }
}

fn rows(n: u64) -> Vec<StatisticsRow> {
    let t = chrono::DateTime::from_timestamp(1_790_812_800, 0);
    (0..n)
        .map(|i| StatisticsRow {
            queue_id: Some(format_id("queue-", 3, i % 5)),
            job_id: Some(format_id("job-", 4, i)),
            job_name: Some(format!("sq010_sh{i:04}_lighting_v012")),
            usage_type: Some(UsageType::Compute),
            instance_type: Some("c5.4xlarge".into()),
            count: 7,
            cost_in_usd: Stats { sum: Some(12.5), avg: Some(1.78), ..Stats::default() },
            runtime_in_seconds: Stats { sum: Some(43_200.0), avg: Some(6171.4), ..Stats::default() },
            aggregation_start_time: t,
            aggregation_end_time: t,
            ..StatisticsRow::default()
        })
        .collect()
}

fn hot_path(c: &mut Criterion) {
    let req = request();
    c.bench_function("canonical_key", |b| b.iter(|| CanonicalKey::new(black_box(&req))));

    let results = ResultsCache::new(1 << 30, Duration::ZERO, Box::new(|_, _| {}));
    let key = CanonicalKey::new(&req);
    let id = IdMinter::new().mint(key.farm_id());
    let mut record = AggregationRecord::queued(id, key, std::time::SystemTime::now());
    let mut block = RowBlockBuilder::new(convert::encode_row);
    rows(100).iter().for_each(|r| block.push(r));
    let all = Arc::new(block.finish());
    record.state = State::Completed;
    record.row_count = 100;
    record.expire_time = Some(SystemTime::now() + Duration::from_secs(3600));
    let result = Arc::new(CachedResult::new(Arc::new(record), Some(all.clone())));
    results.insert(result.clone());
    let id = result.record.id.to_string();
    c.bench_function("cache_lookup", |b| b.iter(|| results.get(black_box(&id))));

    c.bench_function("encode_page_100_rows", |b| {
        b.iter(|| {
            // What GetAggregation does per page: the page's shared head (the result's encoded
            // view and the next page's token, made once), the rows as a shared slice (see
            // grpc::page_route).
            let head = result.view.page_head(Some(100), || {
                let view =
                    result.view.get_or_init(|| wire::encode_aggregation(&convert::aggregation(&result.record, 0)));
                wire::encode_head(&view, Some(&paging::encode(&result.record.id, 100)))
            });
            let response = pb::GetAggregationResponse {
                encoded_head: Some(head),
                encoded_statistics: Some(EncodedRows { rows: all.clone(), range: 0..100 }),
                ..Default::default()
            };
            black_box(response.into_parts())
        })
    });

    // A replica's own buckets answer at once: the check is polled once, with no runtime.
    let buckets = CallerBuckets::new(Rate { per_second: 1e9, burst: 1_000_000 }).expect("limited");
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    c.bench_function("governor_check", |b| {
        b.iter(|| {
            let mut check = std::pin::pin!(buckets.check(black_box("caller-17")));
            let std::task::Poll::Ready(granted) = check.as_mut().poll(&mut cx) else {
                panic!("a replica's own bucket answers at once");
            };
            black_box(granted)
        })
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);

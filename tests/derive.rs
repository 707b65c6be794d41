//! Answers derived from a cached superset, end to end: a gateway in front of the emulator
//! through the real SDK. A request inside a completed result (its ids, its days in its
//! timezone, some of its statistics) is answered at once, DERIVED, with exactly the rows the
//! upstream gives it when run directly (a gateway with `--derive false` in front of another
//! emulator: the emulator's rows depend only on farm, group and bucket), and no upstream call;
//! later identical Starts are CACHED on it. Each disqualification runs upstream instead. On
//! Redis with two replicas: the result completed on one answers on the other, and a derived
//! result whose rows Redis lost is cut again from its source.

mod common;

use common::*;
use deadline_stats_gateway::bench::requests::WINDOW_START;
use deadline_stats_gateway::grpc::pb::{
    self, AggregationState, Disposition, GroupBy, Period, StartAggregationRequest, Statistic,
};
use std::sync::Arc;
use std::time::Duration;

const DAY: i64 = 86_400;
/// Local midnight in UTC+02:00 on the day of [`WINDOW_START`].
const LOCAL_MIDNIGHT: i64 = WINDOW_START - 2 * 3600;

/// The dashboard's superset: queues 0..3 of farm `farm_n` for a week of local days in
/// UTC+02:00, daily, grouped by queue and usage type, with every statistic.
fn week(farm_n: u64) -> StartAggregationRequest {
    let mut r = start_request(farm_n, 3, 7, &[GroupBy::QueueId, GroupBy::UsageType]);
    r.start_time = Some(prost_types::Timestamp { seconds: LOCAL_MIDNIGHT, nanos: 0 });
    r.end_time = Some(prost_types::Timestamp { seconds: LOCAL_MIDNIGHT + 7 * DAY, nanos: 0 });
    r.timezone = "UTC+02:00".into();
    r.period = Period::Daily as i32;
    r.statistics = [Statistic::Sum, Statistic::Avg, Statistic::Min, Statistic::Max].map(|s| s as i32).to_vec();
    r
}

/// A team's page: queue 1 of the week, its third and fourth local days, average only, the
/// groups in another order.
fn team(farm_n: u64) -> StartAggregationRequest {
    let mut q = week(farm_n);
    q.resources = Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds {
        ids: vec![deadline_stats_gateway::bench::requests::queue(1)],
    }));
    q.start_time = Some(prost_types::Timestamp { seconds: LOCAL_MIDNIGHT + 2 * DAY, nanos: 0 });
    q.end_time = Some(prost_types::Timestamp { seconds: LOCAL_MIDNIGHT + 4 * DAY, nanos: 0 });
    q.group_by = vec![GroupBy::UsageType as i32, GroupBy::QueueId as i32];
    q.statistics = vec![Statistic::Avg as i32];
    q
}

/// A change to a request, as a disqualification is made.
type Change = fn(&mut StartAggregationRequest);

async fn start(client: &mut Client, request: StartAggregationRequest) -> (pb::Aggregation, Disposition) {
    let answer = client.start_aggregation(request).await.expect("start").into_inner();
    let disposition = answer.disposition();
    (answer.aggregation.expect("aggregation"), disposition)
}

/// Starts `request` and waits for it: COMPLETED.
async fn completed(client: &mut Client, request: StartAggregationRequest) -> pb::Aggregation {
    let (a, _) = start(client, request).await;
    let done = wait_terminal(client, &a.aggregation_id).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "{done:?}");
    done
}

/// Every row of a completed aggregation, page by page, each rendered whole, sorted: the rows
/// as a multiset, compared field by field.
async fn rows_of(client: &mut Client, id: &str) -> Vec<String> {
    let (mut rows, mut token) = (Vec::new(), String::new());
    loop {
        let page = client.get_aggregation(get_request(id, 7, &token, Duration::ZERO)).await.expect("page").into_inner();
        rows.extend(page.statistics.iter().map(|s| format!("{s:?}")));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    rows.sort();
    rows
}

/// The rows the upstream gives `request` run directly: a gateway that derives nothing, in
/// front of an emulator of its own.
async fn direct_rows(request: StartAggregationRequest) -> Vec<String> {
    let mut config = fast_config(Duration::from_secs(600));
    config.derive = false;
    let g = gateway(Duration::from_millis(100), config).await;
    let mut client = g.client().await;
    let done = completed(&mut client, request).await;
    rows_of(&mut client, &done.aggregation_id).await
}

fn derive_config() -> Config {
    fast_config(Duration::from_secs(600))
}

#[tokio::test]
async fn a_request_inside_a_cached_result_is_answered_at_once_with_the_rows_the_upstream_gives_it() {
    let g = gateway(Duration::from_millis(100), derive_config()).await;
    let mut client = g.client().await;
    let superset = completed(&mut client, week(600)).await;
    let (derived, disposition) = start(&mut client, team(600)).await;
    assert_eq!(disposition, Disposition::Derived);
    assert_eq!(derived.state(), AggregationState::Completed, "at once: {derived:?}");
    assert_eq!(derived.derived_from, superset.aggregation_id);
    assert_eq!(derived.expire_time, superset.expire_time, "it expires with its source");
    assert_ne!(derived.aggregation_id, superset.aggregation_id);
    let rows = rows_of(&mut client, &derived.aggregation_id).await;
    assert_eq!(u64::try_from(rows.len()).ok(), Some(derived.row_count));
    assert!(!rows.is_empty(), "the queue has usage on those days");
    assert_eq!(rows, direct_rows(team(600)).await, "exactly the upstream's rows for the request");
    assert_eq!(g.upstream(&farm(600)).await["start_calls"], 1, "no upstream call but the superset's");

    // Watched, it is COMPLETED at once, and the stream ends.
    let watch = pb::WatchAggregationRequest { aggregation_id: derived.aggregation_id.clone() };
    let mut stream = client.watch_aggregation(watch).await.expect("watch").into_inner();
    let first = stream.message().await.expect("a message").expect("the current view");
    assert_eq!((first.state(), &first.derived_from), (AggregationState::Completed, &superset.aggregation_id));
    assert!(stream.message().await.expect("ends cleanly").is_none(), "a terminal aggregation's watch ends");
    let (again, disposition) = start(&mut client, team(600)).await;
    assert_eq!((disposition, &again.aggregation_id), (Disposition::Cached, &derived.aggregation_id));
    let mut own = team(600);
    own.no_derive = true;
    let (own, disposition) = start(&mut client, own).await;
    assert_eq!(
        (disposition, &own.aggregation_id),
        (Disposition::Cached, &derived.aggregation_id),
        "no_derive refuses a derivation, not an identical cached result"
    );
    let (same, disposition) = start(&mut client, week(600)).await;
    assert_eq!((disposition, &same.aggregation_id), (Disposition::Cached, &superset.aggregation_id));
    assert_eq!(g.metrics.derived.get(), 1);
}

#[tokio::test]
async fn what_a_cached_result_does_not_contain_exactly_runs_upstream() {
    let g = gateway(Duration::from_millis(100), derive_config()).await;
    let mut client = g.client().await;
    completed(&mut client, week(610)).await;
    let cases: [(&str, Change); 5] = [
        ("an end inside a local day", |q| {
            q.end_time = Some(prost_types::Timestamp { seconds: LOCAL_MIDNIGHT + 4 * DAY - 3600, nanos: 0 })
        }),
        ("a start on a UTC midnight, not a local one", |q| {
            q.start_time = Some(prost_types::Timestamp { seconds: WINDOW_START + 2 * DAY, nanos: 0 })
        }),
        ("another timezone", |q| q.timezone = "UTC+03:00".into()),
        ("other groups", |q| q.group_by = vec![GroupBy::QueueId as i32]),
        ("refused by the caller", |q| q.no_derive = true),
    ];
    for (why, change) in cases {
        let mut q = team(610);
        change(&mut q);
        let (a, disposition) = start(&mut client, q).await;
        assert_eq!(disposition, Disposition::Started, "{why}: {a:?}");
        assert!(a.derived_from.is_empty(), "{why}");
    }
    let mut without_min = week(611);
    without_min.statistics = vec![Statistic::Sum as i32, Statistic::Avg as i32];
    completed(&mut client, without_min).await;
    let mut q = team(611);
    q.statistics = vec![Statistic::Min as i32];
    let (_, disposition) = start(&mut client, q).await;
    assert_eq!(disposition, Disposition::Started, "a statistic the result lacks");
    assert_eq!(g.metrics.derived.get(), 0);
}

#[tokio::test]
async fn ids_other_than_the_results_are_derived_only_from_rows_grouped_by_id() {
    let g = gateway(Duration::from_millis(100), derive_config()).await;
    let mut client = g.client().await;
    let mut by_usage = week(620);
    by_usage.group_by = vec![GroupBy::UsageType as i32];
    completed(&mut client, by_usage.clone()).await;
    let mut q = team(620);
    q.group_by = vec![GroupBy::UsageType as i32];
    let (_, disposition) = start(&mut client, q).await;
    assert_eq!(disposition, Disposition::Started, "one queue's rows cannot be told apart from the others'");
    // The same ids as the result, grouped the same way: derived.
    let mut all_queues = by_usage;
    all_queues.start_time = Some(prost_types::Timestamp { seconds: LOCAL_MIDNIGHT + DAY, nanos: 0 });
    all_queues.statistics = vec![Statistic::Max as i32];
    let (a, disposition) = start(&mut client, all_queues.clone()).await;
    assert_eq!(disposition, Disposition::Derived, "{a:?}");
    assert_eq!(rows_of(&mut client, &a.aggregation_id).await, direct_rows(all_queues).await);
}

#[tokio::test]
async fn a_result_too_close_to_its_expiry_or_too_stale_is_not_derived_from() {
    let mut config = fast_config(Duration::from_secs(4));
    config.min_remaining_validity = Duration::from_secs(3);
    let g = gateway(Duration::from_millis(100), config).await;
    let mut client = g.client().await;
    completed(&mut client, week(630)).await;
    // However slow the machine, the week has less than the 3 s a derived answer needs left
    // once 1.5 s of its 4 s are gone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, disposition) = start(&mut client, team(630)).await;
    assert_eq!(disposition, Disposition::Started, "nearly expired");

    let g = gateway(Duration::from_millis(100), derive_config()).await;
    let mut client = g.client().await;
    completed(&mut client, week(631)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut q = team(631);
    q.max_staleness = Some(prost_types::Duration { seconds: 0, nanos: 10_000_000 });
    let (_, disposition) = start(&mut client, q).await;
    assert_eq!(disposition, Disposition::Started, "its data is older than the caller accepts");
}

#[tokio::test]
async fn with_derive_off_every_distinct_request_runs_upstream() {
    let mut config = derive_config();
    config.derive = false;
    let g = gateway(Duration::from_millis(100), config).await;
    let mut client = g.client().await;
    completed(&mut client, week(640)).await;
    let (_, disposition) = start(&mut client, team(640)).await;
    assert_eq!(disposition, Disposition::Started);
}

#[tokio::test]
async fn on_redis_a_result_completed_on_one_replica_answers_on_another_and_lost_rows_are_cut_again() {
    let server = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let emu = Arc::new(emulator(Duration::from_millis(100), Duration::from_secs(600)).await);
    let config = derive_config();
    let replica_on = |emu| {
        let config = config.clone();
        let url = server.url();
        async move {
            let coordination = on_redis(&url, &config).await;
            replica(emu, config, coordination).await
        }
    };
    let (a, b) = (replica_on(emu.clone()).await, replica_on(emu.clone()).await);
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let superset = completed(&mut on_a, week(650)).await;
    let (derived, disposition) = start(&mut on_b, team(650)).await;
    assert_eq!((disposition, &derived.derived_from), (Disposition::Derived, &superset.aggregation_id));
    let rows = rows_of(&mut on_a, &derived.aggregation_id).await;
    assert_eq!(rows, direct_rows(team(650)).await);
    let (again, disposition) = start(&mut on_a, team(650)).await;
    assert_eq!((disposition, &again.aggregation_id), (Disposition::Cached, &derived.aggregation_id));

    // Redis loses the derived rows; a replica that never held them cuts them again.
    let mut conn = redis_conn(&server.url()).await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("*rows:{}", derived.aggregation_id))
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: i64 = ::redis::cmd("DEL").arg(&keys[0]).query_async(&mut conn).await.expect("DEL");
    let c = replica_on(emu.clone()).await;
    let mut on_c = c.client().await;
    assert_eq!(rows_of(&mut on_c, &derived.aggregation_id).await, rows);
    assert_eq!(emu_starts(&a, 650).await, 1, "the superset's Start only");
}

async fn emu_starts(g: &TestGateway, farm_n: u64) -> serde_json::Value {
    g.upstream(&farm(farm_n)).await["start_calls"].clone()
}

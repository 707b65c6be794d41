//! Three gateway processes on one real `redis-server`, in front of one emulator process: the
//! replica driving a farm is SIGKILLed at each point of an aggregation's life, and a survivor
//! finishes every aggregation under the id its caller holds (the design's failure matrix,
//! `shared/design/replicas.md`); and rows lost from Redis are fetched again from the upstream.
//!
//! Each test finds the holder the way an operator would: the farm's lease in Redis names it.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::{AggregationState, GroupBy};
use serde_json::json;
use std::time::Duration;

/// Three replicas, their Redis and their emulator.
struct Cluster {
    replicas: Vec<(Running, String, String)>,
    clients: Vec<Client>,
    conn: ::redis::aio::MultiplexedConnection,
    endpoint: String,
    _emulator: Running,
    _redis: RedisServer,
}

impl Cluster {
    async fn launch(emulator_flags: &[&str]) -> Self {
        Self::launch_with(emulator_flags, &[]).await
    }

    /// [`Cluster::launch`] with `replica_flags` given to every replica.
    async fn launch_with(emulator_flags: &[&str], replica_flags: &[&str]) -> Self {
        let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
        let (emulator, endpoint) = spawn_emulator(emulator_flags);
        let replicas: Vec<_> = (0..3).map(|n| redis_replica(&endpoint, &redis.url(), n, replica_flags)).collect();
        let mut clients = Vec::new();
        for (_, url, _) in &replicas {
            clients.push(client_of(url).await);
        }
        let conn = redis_conn(&redis.url()).await;
        Self { replicas, clients, conn, endpoint, _emulator: emulator, _redis: redis }
    }

    /// Starts `request` on replica `on`; its id.
    /// Starts `request` on replica `on`, as the caller `caller-{on}` (refresh-ahead counts a
    /// caller once).
    async fn start(&mut self, on: usize, request: deadline_stats_gateway::grpc::pb::StartAggregationRequest) -> String {
        let mut request = tonic::Request::new(request);
        request.metadata_mut().insert("x-caller-id", format!("caller-{on}").parse().expect("ASCII"));
        let resp = self.clients[on].start_aggregation(request).await.expect("start").into_inner();
        resp.aggregation.expect("aggregation").aggregation_id
    }

    /// Waits until the stored record of `id` satisfies `check`.
    async fn until_record(&self, id: &str, check: impl Fn(&serde_json::Value) -> bool) {
        eventually(Duration::from_secs(20), || {
            let mut conn = self.conn.clone();
            let check = &check;
            async move { record_json(&mut conn, id).await.filter(|r| check(r)).map(|_| ()) }
        })
        .await;
    }

    /// SIGKILLs the replica holding `farm_id`'s lease; which one it was.
    async fn kill_holder(&mut self, farm_id: &str) -> usize {
        let holder = lease_holder(&mut self.conn, farm_id).await.expect("a replica of ours holds the lease");
        let process = &mut self.replicas[holder].0;
        let _ = process.0.kill();
        let _ = process.0.wait();
        holder
    }

    /// A client of a replica other than `killed`.
    fn survivor(&self, killed: usize) -> Client {
        self.clients[(killed + 1) % 3].clone()
    }

    async fn upstream(&self, farm_id: &str) -> serde_json::Value {
        upstream_of(&self.endpoint, farm_id).await
    }
}

fn state(r: &serde_json::Value) -> &str {
    r["state"].as_str().unwrap_or_default()
}

/// Every row of `id` read page by page (50 rows a page) from `client`, with the page tokens.
async fn read_all(client: &mut Client, id: &str) -> (Vec<String>, Vec<String>) {
    let (mut rows, mut tokens, mut token) = (Vec::new(), Vec::new(), String::new());
    loop {
        let page =
            client.get_aggregation(get_request(id, 50, &token, Duration::ZERO)).await.expect("page").into_inner();
        rows.extend(page.statistics.iter().map(|s| format!("{s:?}")));
        if page.next_page_token.is_empty() {
            return (rows, tokens);
        }
        tokens.push(page.next_page_token.clone());
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn killed_while_aggregations_wait_in_its_farms_queue_the_survivors_run_them_all() {
    let mut c = Cluster::launch(&["--aggregation-duration", "2s"]).await;
    let farm_id = farm(120);
    let running = c.start(0, start_request(120, 1, 1, &[GroupBy::QueueId])).await;
    let queued = [
        c.start(1, start_request(120, 1, 2, &[GroupBy::QueueId])).await,
        c.start(2, start_request(120, 1, 3, &[GroupBy::QueueId])).await,
    ];
    c.until_record(&running, |r| !r["upstream_id"].is_null()).await;
    for id in &queued {
        c.until_record(id, |r| state(r) == "QUEUED").await;
    }
    let killed = c.kill_holder(&farm_id).await;
    let mut survivor = c.survivor(killed);
    for (id, rows) in [(&running, 24), (&queued[0], 48), (&queued[1], 72)] {
        let done = wait_terminal(&mut survivor, id).await.aggregation.expect("aggregation");
        assert_eq!((done.state(), done.row_count), (AggregationState::Completed, rows), "{id}: {done:?}");
    }
    let upstream = c.upstream(&farm_id).await;
    assert_eq!(
        (upstream["start_calls"].as_u64(), upstream["max_in_progress"].as_u64(), upstream["throttled_starts"].as_u64()),
        (Some(3), Some(1), Some(0)),
        "the running one resumed, the queued ones ran once each, one at a time: {upstream}"
    );
}

#[tokio::test]
async fn killed_after_sending_start_before_recording_its_id_the_survivor_waits_out_the_orphan() {
    let mut c = Cluster::launch(&["--aggregation-duration", "4s"]).await;
    let farm_id = farm(121);
    // The Start takes 400 ms upstream: the holder is killed while it waits for the answer,
    // and the emulator still carries the Start out, as a real service does.
    faults_of(&c.endpoint, json!({ "latency_ms": 400, "operations": ["start"] })).await;
    let id = c.start(0, start_request(121, 1, 1, &[GroupBy::QueueId])).await;
    c.until_record(&id, |r| state(r) == "RUNNING" && r["upstream_id"].is_null()).await;
    eventually(Duration::from_secs(5), || {
        let (endpoint, farm_id) = (c.endpoint.clone(), farm_id.clone());
        async move { (upstream_of(&endpoint, &farm_id).await["start_calls"] == 1).then_some(()) }
    })
    .await;
    let killed = c.kill_holder(&farm_id).await;
    faults_of(&c.endpoint, json!({})).await;
    let mut survivor = c.survivor(killed);
    let done = wait_terminal(&mut survivor, &id).await.aggregation.expect("aggregation");
    assert_eq!((done.state(), done.row_count), (AggregationState::Completed, 24), "{done:?}");
    let upstream = c.upstream(&farm_id).await;
    let (calls, throttled) = (upstream["start_calls"].as_u64(), upstream["throttled_starts"].as_u64());
    assert_eq!(
        calls.zip(throttled).map(|(c, t)| c - t),
        Some(2),
        "two upstream aggregations: the orphan and the survivor's own: {upstream}"
    );
    assert_eq!(upstream["max_in_progress"], 1, "never two at once: {upstream}");
    assert!(
        upstream["throttled_starts"].as_u64() >= Some(1),
        "the survivor's Start met the orphan and waited it out: {upstream}"
    );
}

#[tokio::test]
async fn killed_halfway_through_the_pages_the_survivor_fetches_them_all_again() {
    let mut c = Cluster::launch(&["--aggregation-duration", "300ms"]).await;
    let farm_id = farm(122);
    // Twelve upstream pages at 250 ms each: seconds of fetching to be killed in.
    faults_of(&c.endpoint, json!({ "latency_ms": 250, "operations": ["get"] })).await;
    let id = c.start(0, start_request(122, 2, 4, &[GroupBy::QueueId, GroupBy::JobId])).await;
    eventually(Duration::from_secs(20), || {
        let (endpoint, farm_id) = (c.endpoint.clone(), farm_id.clone());
        async move { (upstream_of(&endpoint, &farm_id).await["page_calls"].as_u64() >= Some(3)).then_some(()) }
    })
    .await;
    let killed = c.kill_holder(&farm_id).await;
    let paged_before = c.upstream(&farm_id).await["page_calls"].as_u64().unwrap_or_default();
    assert!(paged_before < 11, "killed halfway, not after the last page ({paged_before} pages fetched)");
    let record = record_json(&mut c.conn, &id).await.expect("record");
    assert_eq!(state(&record), "RUNNING", "no rows were stored: they are only stored whole");
    faults_of(&c.endpoint, json!({})).await;
    let mut survivor = c.survivor(killed);
    let done = wait_terminal(&mut survivor, &id).await.aggregation.expect("aggregation");
    assert_eq!((done.state(), done.row_count), (AggregationState::Completed, 1152), "{done:?}");
    let upstream = c.upstream(&farm_id).await;
    assert_eq!(upstream["start_calls"], 1, "no second Start: {upstream}");
    assert!(upstream["page_calls"].as_u64() >= Some(3 + 11), "the pages were fetched again from the first: {upstream}");
    let (rows, _) = read_all(&mut survivor, &id).await;
    assert_eq!(rows.len(), 1152);
}

#[tokio::test]
async fn killed_right_after_storing_the_rows_every_survivor_serves_them_from_redis() {
    let mut c = Cluster::launch(&["--aggregation-duration", "300ms"]).await;
    let farm_id = farm(123);
    let id = c.start(0, start_request(123, 2, 4, &[GroupBy::QueueId, GroupBy::JobId])).await;
    // A second aggregation waits behind it, so the holder keeps the farm's lease (and can be
    // found by it) once the first is done.
    let next = c.start(0, start_request(123, 2, 1, &[GroupBy::QueueId])).await;
    // Rows and COMPLETED are one write (one script): there is no moment with one and not the
    // other. Kill the holder the moment that write is visible.
    c.until_record(&id, |r| state(r) == "COMPLETED").await;
    let killed = c.kill_holder(&farm_id).await;
    let gets_before = c.upstream(&farm_id).await["page_calls"].clone();
    let mut first = c.clients[(killed + 1) % 3].clone();
    let mut second = c.clients[(killed + 2) % 3].clone();
    let (rows_a, tokens_a) = read_all(&mut first, &id).await;
    let (rows_b, tokens_b) = read_all(&mut second, &id).await;
    assert_eq!(rows_a.len(), 1152);
    assert_eq!((&rows_a, &tokens_a), (&rows_b, &tokens_b), "the same rows and page tokens on every replica");
    assert_eq!(c.upstream(&farm_id).await["page_calls"], gets_before, "served from Redis, not fetched again");
    let done = wait_terminal(&mut first, &next).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "the one behind it is taken over too: {done:?}");
}

#[tokio::test]
async fn rows_lost_from_redis_are_fetched_again_from_the_upstream_under_the_same_id() {
    let redis = tokio::task::spawn_blocking(redis_server).await.expect("joins");
    let (_emulator, endpoint) = spawn_emulator(&["--aggregation-duration", "200ms"]);
    let (_a, url_a, _) = redis_replica(&endpoint, &redis.url(), 0, &[]);
    let mut on_a = client_of(&url_a).await;
    let mut ids = Vec::new();
    for days in [4, 5] {
        let resp = on_a.start_aggregation(start_request(124, 2, days, &[GroupBy::QueueId])).await.expect("start");
        ids.push(resp.into_inner().aggregation.expect("aggregation").aggregation_id);
    }
    for id in &ids {
        let done = wait_terminal(&mut on_a, id).await.aggregation.expect("aggregation");
        assert_eq!(done.state(), AggregationState::Completed);
    }
    let (rows, tokens) = read_all(&mut on_a, &ids[0]).await;
    assert_eq!(rows.len(), 192);

    // Redis loses both results' rows (an eviction, a failover to a replica that lagged); the
    // second's upstream id also no longer answers upstream.
    let mut conn = redis_conn(&redis.url()).await;
    for id in &ids {
        let deleted: i64 = ::redis::cmd("DEL")
            .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).rows(id))
            .query_async(&mut conn)
            .await
            .expect("DEL");
        assert_eq!(deleted, 1);
    }
    let mut record = record_json(&mut conn, &ids[1]).await.expect("the record survives");
    record["upstream_id"] = json!("0123456789abcdef0123456789abcdef");
    let _: () = ::redis::cmd("HSET")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).record(&ids[1]))
        .arg("json")
        .arg(record.to_string())
        .query_async(&mut conn)
        .await
        .expect("HSET");

    // A replica that never held them: the rows come back from the upstream, the same.
    let farm_id = farm(124);
    let gets_before = upstream_of(&endpoint, &farm_id).await["get_calls"].as_u64().unwrap_or_default();
    let (_b, url_b, admin_b) = redis_replica(&endpoint, &redis.url(), 1, &[]);
    let mut on_b = client_of(&url_b).await;
    let readers: Vec<_> = (0..5)
        .map(|_| {
            let (mut client, id) = (on_b.clone(), ids[0].clone());
            tokio::spawn(async move { read_all(&mut client, &id).await })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.expect("joins"), (rows.clone(), tokens.clone()), "the same rows and page tokens");
    }
    let gets = upstream_of(&endpoint, &farm_id).await["get_calls"].as_u64().unwrap_or_default() - gets_before;
    assert_eq!(gets, 2, "one fetch of the two upstream pages, shared by five concurrent readers");
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(deadline_stats_gateway::gateway::coordination::redis::RedisKeys::new("dsg:", false).rows(&ids[0]))
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(ttl > 0, "the rows are back in Redis, expiring with the result ({ttl} ms)");

    // The second cannot be had again: a clear answer, not a hang or an empty page.
    let lost = on_b.get_aggregation(get_request(&ids[1], 50, "", Duration::ZERO)).await.expect_err("lost");
    assert_eq!(lost.code(), tonic::Code::NotFound, "{lost:?}");
    assert!(lost.message().contains("could not give them again"), "{}", lost.message());
    use tonic_types::StatusExt as _;
    assert_eq!(lost.get_details_error_info().map(|i| i.reason), Some("AGGREGATION_EVICTED".to_owned()));

    let (_, _, body) = http("GET", &format!("{admin_b}/metrics"), None, &[]).await;
    let metrics = parse_metrics(&body);
    assert_eq!(metrics.get("dsg_rows_refetched_total{outcome=\"recovered\"}"), Some(&1.0), "{body}");
    assert_eq!(metrics.get("dsg_rows_refetched_total{outcome=\"failed\"}"), Some(&1.0), "{body}");
}

#[tokio::test]
async fn killed_while_driving_a_refresh_a_survivor_finishes_it_and_the_key_moves_on() {
    // Results live 12 s and are refreshed with 8 s left; each upstream run takes 3 s, so the
    // refresh starts as soon as the first result is in, and runs long enough to be cut short.
    let replica_flags = [
        "--result-validity",
        "12s",
        "--validity-margin",
        "500ms",
        "--refresh-ahead",
        "8s",
        "--min-remaining-validity",
        "0s",
    ];
    let mut c = Cluster::launch_with(&["--aggregation-duration", "3s"], &replica_flags).await;
    let farm_id = farm(125);
    let request = start_request(125, 1, 1, &[GroupBy::QueueId]);
    let old = c.start(0, request.clone()).await;
    let mut first = c.clients[0].clone();
    wait_terminal(&mut first, &old).await;
    for on in [1, 2] {
        assert_eq!(c.start(on, request.clone()).await, old, "answered from the cache");
    }
    // The refresh is running upstream: its holder dies.
    eventually(Duration::from_secs(10), || {
        let (endpoint, farm_id) = (c.endpoint.clone(), farm_id.clone());
        async move { (upstream_of(&endpoint, &farm_id).await["start_calls"] == 2).then_some(()) }
    })
    .await;
    let killed = c.kill_holder(&farm_id).await;
    let mut survivor = c.survivor(killed);
    let renewed = eventually(Duration::from_secs(30), || {
        let (mut client, request, old) = (survivor.clone(), request.clone(), old.clone());
        async move {
            let answer = client.start_aggregation(request).await.ok()?.into_inner();
            let id = answer.aggregation?.aggregation_id;
            (answer.disposition == deadline_stats_gateway::grpc::pb::Disposition::Cached as i32 && id != old)
                .then_some(id)
        }
    })
    .await;
    let done = wait_terminal(&mut survivor, &renewed).await.aggregation.expect("aggregation");
    assert_eq!((done.state(), done.row_count), (AggregationState::Completed, 24), "{done:?}");
    let upstream = c.upstream(&farm_id).await;
    assert_eq!(upstream["max_in_progress"].as_u64(), Some(1), "one at a time on the farm: {upstream}");
}

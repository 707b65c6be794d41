//! Gateway processes sharing one Redis (a server, a proxy in front of one, or a cluster) in
//! front of one emulator process, and what the fault tests check of them: every accepted
//! aggregation ends COMPLETED with its rows, each farm accepted one upstream Start per
//! aggregation and never ran two at once.

use super::{
    Client, Running, client_of, eventually, farm, get_request, redis_replica, spawn_emulator, start_request,
    upstream_of,
};
use deadline_stats_gateway::grpc::pb::{AggregationState, GroupBy};
use std::time::Duration;

/// Replicas and their emulator.
pub struct Fleet {
    pub replicas: Vec<(Running, String, String)>,
    pub clients: Vec<Client>,
    pub endpoint: String,
    _emulator: Running,
}

/// What one accepted aggregation must end as.
pub struct Accepted {
    pub id: String,
    pub farm_n: u64,
    pub rows: u64,
}

impl Fleet {
    /// `n` replicas on the Redis at `url` with `replica_flags`, over an emulator run with
    /// `emulator_flags`.
    pub async fn launch(url: &str, n: usize, replica_flags: &[&str], emulator_flags: &[&str]) -> Self {
        let (emulator, endpoint) = spawn_emulator(emulator_flags);
        let replicas: Vec<_> = (0..n).map(|i| redis_replica(&endpoint, url, i, replica_flags)).collect();
        let mut clients = Vec::new();
        for (_, url, _) in &replicas {
            clients.push(client_of(url).await);
        }
        Self { replicas, clients, endpoint, _emulator: emulator }
    }

    /// `per_farm` distinct aggregations on each of `farms`, spread over the replicas.
    pub async fn start_many(&mut self, farms: std::ops::Range<u64>, per_farm: i64) -> Vec<Accepted> {
        let mut accepted = Vec::new();
        for farm_n in farms {
            for days in 1..=per_farm {
                let on = accepted.len() % self.clients.len();
                let request = start_request(farm_n, 1, days, &[GroupBy::QueueId]);
                let resp = self.clients[on].start_aggregation(request).await.expect("start").into_inner();
                let id = resp.aggregation.expect("aggregation").aggregation_id;
                accepted.push(Accepted { id, farm_n, rows: 24 * u64::try_from(days).expect("positive") });
            }
        }
        accepted
    }

    /// [`Rig::start_many`] where a Start may be refused as unavailable: the accepted ones.
    pub async fn try_start_many(&mut self, farms: std::ops::Range<u64>, per_farm: i64) -> Vec<Accepted> {
        let mut accepted = Vec::new();
        for (i, farm_n) in farms.enumerate() {
            for days in 1..=per_farm {
                let on = (i + usize::try_from(days).expect("positive")) % self.clients.len();
                let request = start_request(farm_n, 1, days, &[GroupBy::QueueId]);
                match self.clients[on].start_aggregation(request).await {
                    Ok(resp) => {
                        let id = resp.into_inner().aggregation.expect("aggregation").aggregation_id;
                        accepted.push(Accepted { id, farm_n, rows: 24 * u64::try_from(days).expect("positive") });
                    }
                    Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "refused only as unavailable: {e:?}"),
                }
            }
        }
        accepted
    }

    /// Waits until `farm_n` has been sent `n` upstream Starts (or more).
    pub async fn until_starts(&self, farm_n: u64, n: u64) {
        eventually(Duration::from_secs(10), || {
            let (endpoint, farm_id) = (self.endpoint.clone(), farm(farm_n));
            async move { (upstream_of(&endpoint, &farm_id).await["start_calls"].as_u64() >= Some(n)).then_some(()) }
        })
        .await;
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to replica `n`.
    pub fn signal(&self, n: usize, signal: &str) {
        let pid = self.replicas[n].0.0.id().to_string();
        let sent = std::process::Command::new("kill").args([signal, &pid]).status().expect("kill runs");
        assert!(sent.success(), "kill {signal} {pid} failed");
    }

    /// Every accepted aggregation ended COMPLETED with its rows, each farm accepted one
    /// upstream Start per aggregation, and never ran two at once.
    pub async fn assert_all_completed_once(&mut self, accepted: &[Accepted]) {
        for (i, a) in accepted.iter().enumerate() {
            let client = &mut self.clients[i % self.replicas.len()];
            let done = until_terminal(client, &a.id).await;
            assert_eq!((done.state(), done.row_count), (AggregationState::Completed, a.rows), "{}: {done:?}", a.id);
        }
        let mut farms: Vec<u64> = accepted.iter().map(|a| a.farm_n).collect();
        farms.dedup();
        for farm_n in farms {
            let upstream = upstream_of(&self.endpoint, &farm(farm_n)).await;
            let count = accepted.iter().filter(|a| a.farm_n == farm_n).count() as u64;
            let started = upstream["aggregations_started"].as_u64();
            assert_eq!(
                started,
                Some(count),
                "one upstream aggregation per aggregation on {}: {upstream}",
                farm(farm_n)
            );
            assert_eq!(upstream["max_in_progress"], 1, "never two at once on {}: {upstream}", farm(farm_n));
        }
    }
}

/// Long-polls `id` until it is terminal, as a client does: `UNAVAILABLE` (the store failing
/// over) is retried after the second it says.
pub async fn until_terminal(client: &mut Client, id: &str) -> deadline_stats_gateway::grpc::pb::Aggregation {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{id} never became terminal");
        match client.get_aggregation(get_request(id, 0, "", Duration::from_secs(10))).await {
            Ok(page) => {
                let a = page.into_inner().aggregation.expect("aggregation");
                if matches!(
                    a.state(),
                    AggregationState::Completed | AggregationState::Failed | AggregationState::TimedOut
                ) {
                    return a;
                }
            }
            Err(e) if e.code() == tonic::Code::Unavailable => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(e) => panic!("get {id}: {e:?}"),
        }
    }
}

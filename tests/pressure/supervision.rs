//! A task that panics or overruns the run limit: its aggregation ends with the reason and its
//! farm moves on.

use super::*;
use deadline_stats_gateway::domain::AggregationRequest;
use deadline_stats_gateway::upstream::{Upstream, UpstreamError, UpstreamPage};
use std::sync::atomic::{AtomicBool, Ordering};

/// The real SDK upstream, except that the first Start for `farm` panics (a bug in the task
/// driving that aggregation) or, with `hang`, never returns.
struct Sabotaged {
    inner: deadline_stats_gateway::upstream::sdk::SdkUpstream,
    farm: String,
    hang: bool,
    fired: AtomicBool,
}

impl Sabotaged {
    async fn new(emu: &deadline_stats_gateway::emulator::EmulatorHandle, farm_n: u64, hang: bool) -> Self {
        Self { inner: sdk(&emu.endpoint_url()).await, farm: farm(farm_n), hang, fired: AtomicBool::new(false) }
    }
}

#[async_trait::async_trait]
impl Upstream for Sabotaged {
    async fn start(&self, request: &AggregationRequest) -> Result<String, UpstreamError> {
        if request.farm_id == self.farm && !self.fired.swap(true, Ordering::SeqCst) {
            if self.hang {
                std::future::pending::<()>().await;
            }
            panic!("injected bug in the aggregation task");
        }
        self.inner.start(request).await
    }

    async fn get_page(
        &self,
        farm_id: &str,
        aggregation_id: &str,
        max_results: u32,
        next_token: Option<&str>,
    ) -> Result<UpstreamPage, UpstreamError> {
        self.inner.get_page(farm_id, aggregation_id, max_results, next_token).await
    }
}

#[tokio::test]
async fn a_panicking_aggregation_ends_failed_internal_and_its_farm_moves_on() {
    let emu = emulator(Duration::from_millis(50), HOUR).await;
    let upstream = Sabotaged::new(&emu, 44, false).await;
    let gw = gateway_over(emu, Arc::new(upstream), fast_config(HOUR)).await;
    let mut client = gw.client().await;
    let doomed = id_of(&start(&mut client, start_request(44, 1, 1, &[GroupBy::QueueId])).await);
    let next = id_of(&start(&mut client, start_request(44, 1, 2, &[GroupBy::QueueId])).await);
    let failed = wait_terminal(&mut client, &doomed).await.aggregation.expect("aggregation");
    assert_eq!(failed.state(), AggregationState::Failed);
    let error = failed.error.expect("error");
    assert_eq!(error.code, Code::Internal as i32);
    assert!(error.message.contains("injected bug"), "{}", error.message);
    let done = wait_terminal(&mut client, &next).await.aggregation.expect("aggregation");
    assert_eq!(done.state(), AggregationState::Completed, "the farm moved on");
    assert_eq!(metric(&gw, r#"dsg_aggregations_abandoned_total{reason="crashed"}"#), 1.0);
    let retried = start(&mut client, start_request(44, 1, 1, &[GroupBy::QueueId])).await;
    assert_eq!(retried.disposition(), Disposition::Cached, "its identical Starts see why, for the failed TTL");
}

#[tokio::test]
async fn an_aggregation_over_the_run_limit_ends_deadline_exceeded_and_its_farm_moves_on() {
    let mut config = fast_config(HOUR);
    config.run_limit = Some(Duration::from_millis(800));
    let emu = emulator(Duration::from_millis(100), HOUR).await;
    let upstream = Sabotaged::new(&emu, 45, true).await;
    let gw = gateway_over(emu, Arc::new(upstream), config).await;
    let mut client = gw.client().await;
    let stuck = id_of(&start(&mut client, start_request(45, 1, 1, &[GroupBy::QueueId])).await);
    let next = id_of(&start(&mut client, start_request(45, 1, 2, &[GroupBy::QueueId])).await);
    let over = wait_terminal(&mut client, &stuck).await.aggregation.expect("aggregation");
    assert_eq!(
        (over.state(), over.error.map(|e| e.code)),
        (AggregationState::Failed, Some(Code::DeadlineExceeded as i32))
    );
    let page = wait_terminal(&mut client, &next).await;
    assert_eq!(page.aggregation.expect("aggregation").state(), AggregationState::Completed, "the farm moved on");
    assert_eq!(metric(&gw, r#"dsg_aggregations_abandoned_total{reason="overran"}"#), 1.0);
}

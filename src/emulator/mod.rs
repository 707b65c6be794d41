//! A Deadline Cloud emulator for the sessions-statistics API, served over real HTTP so that the
//! real `aws-sdk-deadline` client (and botocore) can talk to it.
//!
//! It follows `deadline-sessions-statistics-model.json`: paths, camelCase JSON, validation,
//! REST-JSON errors, the one-running-aggregation-per-farm rule, result expiry and paging, with
//! deterministic synthetic rows. Faults and counters sit under the reserved `/_emulator/` prefix.
//! It checks SigV4 as far as it can: the region a request is signed for, and the signature of
//! credentials its own STS (`sts`) handed out. It must never be mistaken for the real service:
//! it keeps no data, and any other key is accepted unchecked.

mod dataset;
mod error;
mod faults;
mod routes;
mod server;
mod sigv4;
mod state;
pub mod sts;
mod wire;

pub use error::ErrorKind;
pub use faults::{FaultSpec, ForcedStatus, Operation};
pub use state::{Emulator, FarmStats, StatsReport};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How the emulator behaves.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// How long an aggregation stays IN_PROGRESS.
    pub aggregation_duration: Duration,
    /// How long results stay retrievable after the Start call.
    pub result_validity: Duration,
    /// Results with more rows end FAILED as too large.
    pub max_rows: u64,
    /// Faults in force from the start.
    pub faults: FaultSpec,
    /// The region it answers for: a request signed for another is refused.
    pub region: String,
    /// Its STS: the credentials it hands out, and which it accepts.
    pub sts: sts::StsConfig,
    /// The farms it holds (`ListFarms` lists them; any other farm id is not found); empty: any
    /// farm id is accepted, and `ListFarms` lists the farms seen so far.
    pub farms: Vec<String>,
}

/// Decodes and validates the JSON body of a StartSessionsStatisticsAggregation call, as the
/// emulator's route does; the refusal as its message. For property tests of the parser.
pub fn parse_start_body(farm_id: &str, body: &[u8]) -> Result<crate::domain::AggregationRequest, String> {
    wire::start_request(farm_id.to_owned(), body).map_err(|e| format!("{e:?}"))
}

/// The default of every emulator setting, for [`EmulatorConfig::default`] and the command line.
pub mod defaults {
    use std::time::Duration;

    pub const AGGREGATION_DURATION: Duration = Duration::from_secs(2);
    pub const RESULT_VALIDITY: Duration = Duration::from_secs(3600);
    pub const MAX_ROWS: u64 = 100_000;
    pub const REGION: &str = "us-west-2";
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            aggregation_duration: defaults::AGGREGATION_DURATION,
            result_validity: defaults::RESULT_VALIDITY,
            max_rows: defaults::MAX_ROWS,
            faults: FaultSpec::default(),
            region: defaults::REGION.to_owned(),
            sts: sts::StsConfig::default(),
            farms: Vec::new(),
        }
    }
}

/// A running emulator; dropping it stops the server.
#[derive(Debug)]
pub struct EmulatorHandle {
    addr: SocketAddr,
    emulator: Arc<Emulator>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl EmulatorHandle {
    /// Binds `listen` (port 0 picks a free one) and serves in the background.
    pub async fn spawn(config: EmulatorConfig, listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let emulator = Arc::new(Emulator::new(config));
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server::serve(listener, emulator.clone(), async {
            let _ = rx.await;
        }));
        Ok(Self { addr, emulator, shutdown: Some(tx), task: Some(task) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the endpoint URL to give the SDK.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The emulated service, for in-process inspection.
    pub fn emulator(&self) -> &Arc<Emulator> {
        &self.emulator
    }

    /// Stops accepting, drains open connections and waits for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

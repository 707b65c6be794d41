//! `emulator`: run the Deadline Cloud emulator as a process.

use super::{RunError, announce, shutdown_signal};
use crate::emulator::{EmulatorConfig, EmulatorHandle, ErrorKind, FaultSpec, ForcedStatus, Operation, defaults};
use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct EmulatorArgs {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, env = "DSG_EMULATOR_LISTEN", default_value = "127.0.0.1:4567")]
    pub listen: SocketAddr,
    /// How long each aggregation stays IN_PROGRESS.
    #[arg(long, env = "DSG_EMULATOR_AGGREGATION_DURATION", default_value_t = defaults::AGGREGATION_DURATION.into())]
    pub aggregation_duration: humantime::Duration,
    /// How long results stay retrievable after the Start call.
    #[arg(long, env = "DSG_EMULATOR_RESULT_VALIDITY", default_value_t = defaults::RESULT_VALIDITY.into())]
    pub result_validity: humantime::Duration,
    /// Aggregations with more rows end FAILED as too large.
    #[arg(long, env = "DSG_EMULATOR_MAX_ROWS", default_value_t = defaults::MAX_ROWS)]
    pub max_rows: u64,
    /// The AWS region it answers for: a request signed for another region is refused, as AWS
    /// refuses it. Several emulator processes act as several regions.
    #[arg(long, env = "DSG_EMULATOR_REGION", default_value = defaults::REGION)]
    pub region: String,
    /// How long the credentials its STS `AssumeRole` hands out last.
    #[arg(long, env = "DSG_EMULATOR_STS_CREDENTIAL_LIFETIME", default_value = "1h")]
    pub sts_credential_lifetime: humantime::Duration,
    /// The `ExternalId` an `AssumeRole` must give (else refused with AccessDenied).
    #[arg(long, env = "DSG_EMULATOR_STS_EXTERNAL_ID")]
    pub sts_external_id: Option<String>,
    /// What STS credentials are derived with: emulators that share it accept each other's.
    #[arg(long, env = "DSG_EMULATOR_STS_SECRET", default_value = crate::emulator::sts::DEFAULT_SECRET, hide_default_value = true)]
    pub sts_secret: String,
    /// A farm it holds (repeatable): `ListFarms` lists exactly these and any other farm id is
    /// not found. Without it, every farm id is accepted and `ListFarms` lists those seen so far.
    #[arg(long = "farm", value_name = "FARM_ID", value_parser = parse_farm_id)]
    pub farms: Vec<String>,
    #[command(flatten)]
    pub faults: FaultArgs,
}

#[derive(Debug, Args)]
pub struct FaultArgs {
    /// Answer this share of requests with an exception: KIND=RATE, e.g. ThrottlingException=0.1.
    #[arg(long = "fault-error", value_name = "KIND=RATE", value_parser = parse_error_rate)]
    pub errors: Vec<(ErrorKind, f64)>,
    /// Close this share of connections without answering.
    #[arg(long = "fault-drop-rate", default_value_t = 0.0, value_parser = parse_rate)]
    pub drop_rate: f64,
    /// Delay added to every request.
    #[arg(long = "fault-latency", default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Make every new aggregation end FAILED or TIMEOUT.
    #[arg(long = "fault-force-status", value_parser = parse_forced_status)]
    pub force_status: Option<ForcedStatus>,
    /// Restrict faults to these operations (start, get); all when empty.
    #[arg(long = "fault-operations", value_delimiter = ',', value_parser = parse_operation)]
    pub operations: Vec<Operation>,
}

impl FaultArgs {
    fn spec(&self) -> FaultSpec {
        FaultSpec {
            error_rates: self.errors.iter().copied().collect(),
            drop_rate: self.drop_rate,
            latency_ms: u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            force_status: self.force_status,
            operations: self.operations.clone(),
            remaining: None,
            ..FaultSpec::default()
        }
    }
}

impl EmulatorArgs {
    pub fn config(&self) -> EmulatorConfig {
        EmulatorConfig {
            aggregation_duration: *self.aggregation_duration,
            result_validity: *self.result_validity,
            max_rows: self.max_rows,
            faults: self.faults.spec(),
            region: self.region.clone(),
            sts: crate::emulator::sts::StsConfig {
                credential_lifetime: *self.sts_credential_lifetime,
                external_id: self.sts_external_id.clone(),
                secret: self.sts_secret.clone(),
            },
            farms: self.farms.clone(),
        }
    }
}

fn parse_farm_id(s: &str) -> Result<String, String> {
    let hex =
        s.strip_prefix("farm-").filter(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    hex.map(|_| s.to_owned()).ok_or_else(|| format!("'{s}' is not a farm id (farm- and 32 lowercase hex digits)"))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&rate) { Ok(rate) } else { Err(format!("{rate} is not between 0 and 1")) }
}

fn parse_error_rate(s: &str) -> Result<(ErrorKind, f64), String> {
    let (kind, rate) = s.split_once('=').ok_or_else(|| format!("'{s}' is not KIND=RATE"))?;
    let kind = ErrorKind::parse(kind).ok_or_else(|| {
        format!("'{kind}' is not an exception of the API (AccessDeniedException, InternalServerErrorException, ResourceNotFoundException, ThrottlingException, ValidationException)")
    })?;
    Ok((kind, parse_rate(rate)?))
}

fn parse_forced_status(s: &str) -> Result<ForcedStatus, String> {
    match s.to_ascii_uppercase().as_str() {
        "FAILED" => Ok(ForcedStatus::Failed),
        "TIMEOUT" => Ok(ForcedStatus::Timeout),
        _ => Err(format!("'{s}' is not FAILED or TIMEOUT")),
    }
}

fn parse_operation(s: &str) -> Result<Operation, String> {
    match s {
        "start" => Ok(Operation::Start),
        "get" => Ok(Operation::Get),
        _ => Err(format!("'{s}' is not start or get")),
    }
}

pub(crate) async fn run(args: EmulatorArgs) -> Result<(), RunError> {
    let signal = shutdown_signal().map_err(RunError::Signal)?;
    let handle = EmulatorHandle::spawn(args.config(), args.listen)
        .await
        .map_err(|source| RunError::Listen { addr: args.listen, source })?;
    announce(&handle.endpoint_url());
    signal.await;
    handle.shutdown().await;
    Ok(())
}

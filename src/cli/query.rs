//! `query`: a client of the gateway. Starts an aggregation (or, with `--watch`, attaches to one),
//! follows it with WatchAggregation to a terminal state while showing its progress on stderr,
//! pages through every row and prints them as a table, JSON lines or CSV. Against a gateway
//! without WatchAggregation it long-polls instead.

use super::RunError;
use crate::grpc::convert::timestamp;
use crate::grpc::pb::aggregation_service_client::AggregationServiceClient;
use crate::grpc::pb::{self, start_aggregation_request::Resources};
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use std::io::Write as _;
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The gateway's URL.
    #[arg(long, env = "DSG_GATEWAY", default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// Attach to this existing aggregation id instead of starting one (the request flags are
    /// then not needed).
    #[arg(long, conflicts_with_all = ["farm_id", "queue_ids", "fleet_ids", "start", "end", "group_by", "statistics"])]
    pub watch: Option<String>,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    #[arg(long, required_unless_present = "watch")]
    pub farm_id: Option<String>,
    /// Comma-separated queue ids (or use --fleet-ids).
    #[arg(long, value_delimiter = ',', conflicts_with = "fleet_ids", required_unless_present_any = ["fleet_ids", "watch"])]
    pub queue_ids: Vec<String>,
    /// Comma-separated fleet ids.
    #[arg(long, value_delimiter = ',')]
    pub fleet_ids: Vec<String>,
    /// Start of the window, RFC 3339 (2026-10-01T00:00:00Z).
    #[arg(long, required_unless_present = "watch")]
    pub start: Option<DateTime<Utc>>,
    /// End of the window, RFC 3339.
    #[arg(long, required_unless_present = "watch")]
    pub end: Option<DateTime<Utc>>,
    /// Comma-separated: queue-id, fleet-id, job-id, user-id, usage-type, instance-type, license-product.
    #[arg(long, value_delimiter = ',', value_enum, required_unless_present = "watch")]
    pub group_by: Vec<GroupByArg>,
    /// Comma-separated: sum, min, max, avg.
    #[arg(long, value_delimiter = ',', value_enum, required_unless_present = "watch")]
    pub statistics: Vec<StatisticArg>,
    #[arg(long, value_enum)]
    pub period: Option<PeriodArg>,
    /// UTC+08:00
    #[arg(long)]
    pub timezone: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Sent as x-caller-id.
    #[arg(long, env = "DSG_CALLER_ID")]
    pub caller_id: Option<String>,
    /// Accept a cached result only if its data is at most this old (e.g. 5m); else it runs
    /// afresh. Omitted: any valid result.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_staleness: Option<Duration>,
    /// Give up waiting for the aggregation after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// If the upstream finds the result too large, fail instead of letting the gateway split it.
    #[arg(long)]
    pub no_split: bool,
    /// Never answer from a larger cached result: an identical cached or running aggregation
    /// still answers, else it runs upstream.
    #[arg(long)]
    pub no_derive: bool,
    /// How urgently: waiting interactive work on a farm goes before waiting batch work
    /// (default: interactive, or what the authorization policy allows this caller).
    #[arg(long, value_enum)]
    pub priority: Option<PriorityArg>,
    /// With an https:// --gateway (required then): the CA (PEM) its certificate chains to.
    #[arg(long, env = "DSG_QUERY_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) to present, for a gateway with mutual TLS.
    #[arg(long, env = "DSG_QUERY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "DSG_QUERY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name the gateway's certificate must carry (default: the --gateway host).
    #[arg(long)]
    pub tls_server_name: Option<String>,
}

impl QueryArgs {
    /// TLS for an https:// gateway: the CA and client certificate given, if any.
    fn tls(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, RunError> {
        if !self.gateway.starts_with("https://") {
            return Ok(None);
        }
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| RunError::Query(format!("cannot read {}: {e}", p.display())))
        };
        let ca =
            self.tls_ca.as_deref().ok_or_else(|| RunError::Query("an https:// --gateway needs --tls-ca".into()))?;
        let mut tls =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(Some(tls))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupByArg {
    QueueId,
    FleetId,
    JobId,
    UserId,
    UsageType,
    InstanceType,
    LicenseProduct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatisticArg {
    Sum,
    Min,
    Max,
    Avg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    Interactive,
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeriodArg {
    Hourly,
    Daily,
    Weekly,
    Monthly,
}

impl QueryArgs {
    fn request(&self) -> pb::StartAggregationRequest {
        let resources = if self.fleet_ids.is_empty() {
            Resources::QueueIds(pb::ResourceIds { ids: self.queue_ids.clone() })
        } else {
            Resources::FleetIds(pb::ResourceIds { ids: self.fleet_ids.clone() })
        };
        pb::StartAggregationRequest {
            farm_id: self.farm_id.clone().unwrap_or_default(),
            resources: Some(resources),
            start_time: self.start.map(timestamp),
            end_time: self.end.map(timestamp),
            timezone: self.timezone.clone().unwrap_or_default(),
            period: self.period.map_or(pb::Period::Unspecified, |p| match p {
                PeriodArg::Hourly => pb::Period::Hourly,
                PeriodArg::Daily => pb::Period::Daily,
                PeriodArg::Weekly => pb::Period::Weekly,
                PeriodArg::Monthly => pb::Period::Monthly,
            }) as i32,
            group_by: self.group_by.iter().map(|g| group_by(*g) as i32).collect(),
            statistics: self.statistics.iter().map(|s| statistic(*s) as i32).collect(),
            max_staleness: self.max_staleness.and_then(|d| prost_types::Duration::try_from(d).ok()),
            no_split: self.no_split,
            priority: self.priority.map_or(pb::Priority::Unspecified, |p| match p {
                PriorityArg::Interactive => pb::Priority::Interactive,
                PriorityArg::Batch => pb::Priority::Batch,
            }) as i32,
            no_derive: self.no_derive,
        }
    }
}

fn group_by(g: GroupByArg) -> pb::GroupBy {
    match g {
        GroupByArg::QueueId => pb::GroupBy::QueueId,
        GroupByArg::FleetId => pb::GroupBy::FleetId,
        GroupByArg::JobId => pb::GroupBy::JobId,
        GroupByArg::UserId => pb::GroupBy::UserId,
        GroupByArg::UsageType => pb::GroupBy::UsageType,
        GroupByArg::InstanceType => pb::GroupBy::InstanceType,
        GroupByArg::LicenseProduct => pb::GroupBy::LicenseProduct,
    }
}

fn statistic(s: StatisticArg) -> pb::Statistic {
    match s {
        StatisticArg::Sum => pb::Statistic::Sum,
        StatisticArg::Min => pb::Statistic::Min,
        StatisticArg::Max => pb::Statistic::Max,
        StatisticArg::Avg => pb::Statistic::Avg,
    }
}

/// Longest single long-poll the client asks for (against a gateway without WatchAggregation).
const POLL_WAIT: Duration = Duration::from_secs(30);

pub(crate) async fn run(args: QueryArgs) -> Result<(), RunError> {
    let mut endpoint = Channel::from_shared(args.gateway.clone())
        .map_err(|e| RunError::Query(format!("bad --gateway URL {}: {e}", args.gateway)))?;
    if let Some(tls) = args.tls()? {
        endpoint = endpoint.tls_config(tls).map_err(|e| RunError::Query(format!("TLS: {e}")))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| RunError::Query(format!("cannot reach the gateway at {}: {e}", args.gateway)))?;
    let mut client = AggregationServiceClient::new(channel);
    let id = match &args.watch {
        Some(id) => id.clone(),
        None => {
            let started = client.start_aggregation(with_caller(args.request(), &args)).await.map_err(describe)?;
            started.into_inner().aggregation.map(|a| a.aggregation_id).unwrap_or_default()
        }
    };
    let deadline = tokio::time::Instant::now() + args.timeout;
    let progress = super::progress::Progress::on_stderr(args.quiet);
    let waited = wait_terminal(&mut client, &args, &id, deadline, &progress).await;
    progress.finish();
    let agg = waited?;
    if matches!(agg.state(), pb::AggregationState::Failed | pb::AggregationState::TimedOut) {
        let code = agg.error.as_ref().map_or(0, |e| e.code);
        return Err(RunError::Query(format!(
            "aggregation {id} ended {:?} (code {code}): {}",
            agg.state(),
            agg.status_message
        )));
    }
    let (mut rows, mut token) = (Vec::new(), String::new());
    loop {
        let get = pb::GetAggregationRequest {
            aggregation_id: id.clone(),
            page_size: 1000,
            page_token: token.clone(),
            wait: None,
        };
        let page = client.get_aggregation(with_caller(get, &args)).await.map_err(describe)?.into_inner();
        rows.extend(page.statistics);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    match print(&rows, args.format) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(RunError::Query(format!("cannot write the rows: {e}")))
        }
        _ => Ok(()),
    }
}

fn terminal(a: &pb::Aggregation) -> bool {
    matches!(a.state(), pb::AggregationState::Completed | pb::AggregationState::Failed | pb::AggregationState::TimedOut)
}

/// Follows the aggregation until it is terminal (watching again when a stream ends early, as at
/// a gateway's shutdown), showing each change; long-polls a gateway that cannot stream.
async fn wait_terminal(
    client: &mut AggregationServiceClient<Channel>,
    args: &QueryArgs,
    id: &str,
    deadline: tokio::time::Instant,
    progress: &super::progress::Progress,
) -> Result<pb::Aggregation, RunError> {
    let late = || RunError::Query(format!("aggregation {id} did not finish within {:?}", args.timeout));
    loop {
        let request = pb::WatchAggregationRequest { aggregation_id: id.to_owned() };
        let mut stream = match client.watch_aggregation(with_caller(request, args)).await {
            Ok(stream) => stream.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return long_poll(client, args, id, deadline, progress).await;
            }
            Err(status) => return Err(describe(status)),
        };
        loop {
            let next = tokio::time::timeout_at(deadline, stream.message()).await.map_err(|_| late())?;
            match next.map_err(describe)? {
                Some(agg) => {
                    progress.update(&agg);
                    if terminal(&agg) {
                        return Ok(agg);
                    }
                }
                None => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(late());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Long-polls until the aggregation is terminal.
async fn long_poll(
    client: &mut AggregationServiceClient<Channel>,
    args: &QueryArgs,
    id: &str,
    deadline: tokio::time::Instant,
    progress: &super::progress::Progress,
) -> Result<pb::Aggregation, RunError> {
    loop {
        let get = pb::GetAggregationRequest {
            aggregation_id: id.to_owned(),
            page_size: 0,
            page_token: String::new(),
            wait: prost_types::Duration::try_from(POLL_WAIT).ok(),
        };
        let agg = client.get_aggregation(with_caller(get, args)).await.map_err(describe)?.into_inner();
        let agg = agg.aggregation.unwrap_or_default();
        progress.update(&agg);
        if terminal(&agg) {
            return Ok(agg);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RunError::Query(format!("aggregation {id} did not finish within {:?}", args.timeout)));
        }
    }
}

fn with_caller<T>(message: T, args: &QueryArgs) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(id) = args.caller_id.as_deref().and_then(|id| id.parse().ok()) {
        request.metadata_mut().insert(crate::grpc::service::CALLER_ID_HEADER, id);
    }
    request
}

fn describe(status: tonic::Status) -> RunError {
    use tonic_types::StatusExt as _;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for v in bad.field_violations {
            text.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    if let Some(retry) = status.get_details_retry_info().and_then(|r| r.retry_delay) {
        text.push_str(&format!("\n  retry in {retry:?}"));
    }
    RunError::Query(text)
}

/// The printable columns of a row, in a fixed order.
fn cells(r: &pb::StatisticsRow) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let num = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_default();
    let time = |t: &Option<prost_types::Timestamp>| {
        t.as_ref().and_then(crate::grpc::convert::datetime).map(|t| t.to_rfc3339()).unwrap_or_default()
    };
    let usage = pb::UsageType::try_from(r.usage_type).ok().filter(|u| *u != pb::UsageType::Unspecified);
    let (cost, runtime) = (r.cost_in_usd.unwrap_or_default(), r.runtime_in_seconds.unwrap_or_default());
    vec![
        ("start", time(&r.aggregation_start_time)),
        ("end", time(&r.aggregation_end_time)),
        ("queue_id", opt(&r.queue_id)),
        ("fleet_id", opt(&r.fleet_id)),
        ("job_id", opt(&r.job_id)),
        ("job_name", opt(&r.job_name)),
        ("user_id", opt(&r.user_id)),
        ("usage_type", usage.map(|u| u.as_str_name().trim_start_matches("USAGE_TYPE_").to_owned()).unwrap_or_default()),
        ("instance_type", opt(&r.instance_type)),
        ("license_product", opt(&r.license_product)),
        ("count", r.count.to_string()),
        ("cost_sum", num(cost.sum)),
        ("cost_min", num(cost.min)),
        ("cost_max", num(cost.max)),
        ("cost_avg", num(cost.avg)),
        ("runtime_sum", num(runtime.sum)),
        ("runtime_min", num(runtime.min)),
        ("runtime_max", num(runtime.max)),
        ("runtime_avg", num(runtime.avg)),
    ]
}

fn print(rows: &[pb::StatisticsRow], format: Format) -> std::io::Result<()> {
    let table: Vec<Vec<(&str, String)>> = rows.iter().map(cells).collect();
    let Some(first) = table.first() else {
        return Ok(());
    };
    // Only the columns some row fills.
    let keep: Vec<usize> = (0..first.len()).filter(|&i| table.iter().any(|r| !r[i].1.is_empty())).collect();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for r in &table {
                let obj: serde_json::Map<String, serde_json::Value> =
                    keep.iter().map(|&i| (r[i].0.to_owned(), r[i].1.clone().into())).collect();
                writeln!(out, "{}", serde_json::Value::Object(obj))?;
            }
        }
        Format::Csv => {
            writeln!(out, "{}", keep.iter().map(|&i| first[i].0).collect::<Vec<_>>().join(","))?;
            for r in &table {
                writeln!(out, "{}", keep.iter().map(|&i| csv_field(&r[i].1)).collect::<Vec<_>>().join(","))?;
            }
        }
        Format::Table => {
            let header: Vec<&str> = keep.iter().map(|&i| first[i].0).collect();
            let rows: Vec<Vec<String>> = table.iter().map(|r| keep.iter().map(|&i| r[i].1.clone()).collect()).collect();
            writeln!(out, "{}", super::table(&header, &rows))?;
        }
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

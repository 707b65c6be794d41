//! `status`: the operator console's data in a terminal, read from a gateway's admin listener
//! (`/api/v1/`): the overview with its farms, one farm's queue, or one aggregation.

use super::RunError;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// How long the admin listener may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The gateway's admin listener.
    #[arg(long, env = "DSG_ADMIN", default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// One farm's queue and recent aggregations.
    #[arg(long, conflicts_with = "aggregation")]
    pub farm: Option<String>,
    /// One aggregation: its state, timeline and callers.
    #[arg(long)]
    pub aggregation: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// A file holding the admin token (the gateway's --admin-token-file).
    #[arg(long, env = "DSG_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub(crate) async fn run(args: StatusArgs) -> Result<(), RunError> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| RunError::Query(format!("--token-file {}: {e}", path.display())))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let (path, render): (String, fn(&Value) -> String) = match (&args.farm, &args.aggregation) {
        (Some(farm), _) => (format!("/api/v1/farms/{farm}?limit=500"), farm_table),
        (_, Some(id)) => (format!("/api/v1/aggregations/{id}"), aggregation_table),
        _ => ("/api/v1/overview".to_owned(), overview_table),
    };
    let body = get(&args.admin, &path, token.as_deref()).await?;
    let body = match (&args.farm, &args.aggregation) {
        (None, None) => {
            let farms = get(&args.admin, "/api/v1/farms?limit=500&order=queued", token.as_deref()).await?;
            let mut overview = body;
            overview["farms"] = farms;
            overview
        }
        _ => body,
    };
    let out = match args.format {
        Format::Json => serde_json::to_string_pretty(&body).unwrap_or_default(),
        Format::Table => render(&body),
    };
    super::print_line(&out);
    Ok(())
}

/// `GET {admin}{path}` as JSON; an answer that is not 200 is the error it names.
async fn get(admin: &str, path: &str, token: Option<&str>) -> Result<Value, RunError> {
    let fail = |what: String| RunError::Query(format!("{admin}{path}: {what}"));
    let uri: http::Uri = format!("{}{path}", admin.trim_end_matches('/')).parse().map_err(|e| fail(format!("{e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(fail("--admin must be an http:// URL (the admin listener speaks plain HTTP)".into()));
    }
    let host = uri.host().ok_or_else(|| fail("no host".into()))?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let call = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| fail(format!("{e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| fail(format!("{e}")))?;
        tokio::spawn(conn);
        let mut request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| fail(format!("{e}")))?;
        let response = sender.send_request(request).await.map_err(|e| fail(format!("{e}")))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| fail(format!("{e}")))?.to_bytes();
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| fail(format!("not JSON ({e})")))?;
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or_default();
            return Err(fail(format!("{status}: {message}")));
        }
        Ok(body)
    };
    tokio::time::timeout(TIMEOUT, call).await.map_err(|_| fail(format!("no answer within {TIMEOUT:?}")))?
}

/// A value as a table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn overview_table(o: &Value) -> String {
    let b = &o["bounds"];
    let mut out = vec![
        format!(
            "version {}   up {} s   store {} (up: {})",
            cell(&o["version"]),
            cell(&o["uptime_seconds"]),
            cell(&o["store"]["kind"]),
            cell(&o["store"]["up"])
        ),
        format!(
            "active {}/{}   farms {}/{}   cache {}/{} bytes   hit ratio {}",
            cell(&b["active_aggregations"]["used"]),
            cell(&b["active_aggregations"]["limit"]),
            cell(&b["farms"]["used"]),
            cell(&b["farms"]["limit"]),
            cell(&b["cache_bytes"]["used"]),
            cell(&b["cache_bytes"]["limit"]),
            cell(&o["cache"]["hit_ratio"]),
        ),
        format!(
            "replicas: {}",
            o["replicas"].as_array().map_or(String::new(), |r| r
                .iter()
                .map(|r| cell(&r["id"]))
                .collect::<Vec<_>>()
                .join(", "))
        ),
        String::new(),
    ];
    let rows: Vec<Vec<String>> = o["farms"]["farms"]
        .as_array()
        .map(|farms| {
            farms
                .iter()
                .map(|f| {
                    vec![
                        cell(&f["farm_id"]),
                        cell(&f["head"]["state"]),
                        cell(&f["head"]["id"]),
                        cell(&f["head"]["running_since"]),
                        cell(&f["queued"]),
                        cell(&f["oldest_wait_seconds"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push(super::table(&["FARM", "HEAD", "AGGREGATION", "RUNNING SINCE", "QUEUED", "OLDEST WAIT S"], &rows));
    out.join("\n")
}

fn farm_table(f: &Value) -> String {
    let queue: Vec<Vec<String>> = f["queue"]
        .as_array()
        .map(|q| {
            q.iter()
                .map(|q| {
                    vec![
                        cell(&q["position"]),
                        cell(&q["id"]),
                        cell(&q["state"]),
                        cell(&q["class"]),
                        cell(&q["callers"]),
                        cell(&q["waiting_seconds"]),
                        cell(&q["estimate"]["start"]),
                        cell(&q["estimate"]["completion"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let recent: Vec<Vec<String>> = f["recent"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|e| {
                    vec![
                        cell(&e["aggregation_id"]),
                        cell(&e["state"]),
                        cell(&e["at"]),
                        cell(&e["duration_seconds"]),
                        cell(&e["error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    [
        format!(
            "farm {}: {} in the queue, driven by {}, upstream route {}",
            cell(&f["farm_id"]),
            cell(&f["length"]),
            cell(&f["holder"]),
            cell(&f["route"])
        ),
        super::table(
            &["#", "AGGREGATION", "STATE", "CLASS", "CALLERS", "WAITING S", "EST. START", "EST. COMPLETION"],
            &queue,
        ),
        String::new(),
        "recent:".into(),
        super::table(&["AGGREGATION", "OUTCOME", "ENDED", "DURATION S", "ERROR"], &recent),
    ]
    .join("\n")
}

fn aggregation_table(a: &Value) -> String {
    let fields = [
        "id",
        "state",
        "class",
        "farm_id",
        "queue_position",
        "upstream_id",
        "created",
        "running_since",
        "expire_time",
        "row_count",
        "holder",
        "callers",
        "trace_id",
        "trace_url",
        "note",
    ];
    let mut out: Vec<String> =
        fields.iter().filter(|k| !a[**k].is_null()).map(|k| format!("{k:<15} {}", cell(&a[*k]))).collect();
    if !a["estimate"].is_null() {
        out.push(format!(
            "{:<15} start {}, completion {}",
            "estimate",
            cell(&a["estimate"]["start"]),
            cell(&a["estimate"]["completion"])
        ));
    }
    if !a["error"].is_null() {
        out.push(format!("{:<15} {}: {}", "error", cell(&a["error"]["code"]), cell(&a["error"]["message"])));
    }
    out.push(String::new());
    out.push("timeline:".into());
    for e in a["timeline"].as_array().into_iter().flatten() {
        let detail: Vec<String> =
            ["caller", "holder", "upstream_id", "state", "rows", "part", "parts", "error", "fault"]
                .iter()
                .filter(|k| !e[**k].is_null())
                .map(|k| format!("{k}={}", cell(&e[*k])))
                .collect();
        out.push(format!("  {}  {:<12} {}", cell(&e["at"]), cell(&e["event"]), detail.join(" ")));
    }
    out.join("\n")
}

//! The command line: `serve` (the gateway), `query` (a client of it), `status` (its console in
//! a terminal) and `emulator`.
//!
//! Every `serve` and `emulator` flag also reads a `DSG_*` environment variable. Parsing and
//! validation happen here; the work is done by the library modules.

pub(crate) mod bench;
pub mod config;
pub(crate) mod emulator;
pub(crate) mod progress;
pub(crate) mod query;
pub(crate) mod serve;
pub(crate) mod status;

use clap::{Parser, Subcommand};
use std::io::Write as _;
use std::net::SocketAddr;

#[derive(Debug, Parser)]
#[command(
    name = "deadline-stats-gateway",
    version,
    about = "A gRPC gateway for AWS Deadline Cloud's sessions-statistics API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<serve::ServeArgs>),
    /// Start an aggregation through a gateway, wait for it, and print every row.
    Query(Box<query::QueryArgs>),
    /// Show a gateway's farms, queues and aggregations (its operator console, in a terminal).
    Status(Box<status::StatusArgs>),
    /// Run the Deadline Cloud emulator (the sessions-statistics REST-JSON API) over HTTP.
    Emulator(Box<emulator::EmulatorArgs>),
    /// Run a benchmark scenario against the gateway (and the bare-tonic baseline).
    Bench(bench::BenchArgs),
    /// The bare-tonic baseline server of `bench cache-hit`.
    #[command(hide = true)]
    BenchBaseline(bench::BaselineArgs),
}

/// A failure that ends the process with a non-zero status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot wait for a shutdown signal: {0}")]
    Signal(std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Serve(#[from] crate::grpc::server::ServeError),
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    #[error("{0}")]
    Query(String),
    #[error("benchmark failed: {0}")]
    Bench(String),
}

/// Runs a parsed command to completion.
pub async fn run(cli: Cli) -> Result<(), RunError> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Query(args) => query::run(*args).await,
        Command::Status(args) => status::run(*args).await,
        Command::Emulator(args) => emulator::run(*args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::BenchBaseline(args) => bench::baseline(args).await,
    }
}

/// Prints the first line on stdout, which scripts and tests wait for.
fn announce(what: &str) {
    print_line(&format!("listening on {what}"));
}

/// Prints a line on stdout at once.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Rows under a header, each column as wide as its widest cell, for a terminal.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].chars().count()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    out.join("\n")
}

/// Installs SIGINT and SIGTERM handlers now; the future resolves on the first signal.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}

impl Cli {
    /// The log format the command asks for.
    pub fn log_format(&self) -> crate::telemetry::LogFormat {
        match &self.command {
            Command::Serve(args) => args.log_format,
            _ => crate::telemetry::LogFormat::Text,
        }
    }
}

/// A non-negative number of events per second.
fn parse_per_second(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("'{s}' is not a non-negative number (per second; 0 = unlimited)")),
    }
}

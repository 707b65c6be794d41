//! The `deadline-stats-gateway` binary: parse the command line (and `serve --config`), start
//! telemetry, run, flush telemetry.
#![forbid(unsafe_code)]

use deadline_stats_gateway::cli::{self, config};
use deadline_stats_gateway::telemetry;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(config::ParseError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init(cli.log_format()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = cli::run(cli).await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The optional `--config` file of `serve`: a TOML table whose keys are the flag names
//! (`farm-queue-capacity = 50`, or `farm_queue_capacity`). Flags and environment variables
//! win over the file; the file wins over defaults. Its values go through the same parsers as
//! flags, so a bad value is refused with the flag's name.

use super::Cli;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use std::ffi::OsString;
use std::path::Path;

/// Why the command line (with its config file) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
}

/// Parses `args`, folding in the `serve --config` file when one is named.
pub fn parse(args: Vec<OsString>) -> Result<Cli, ParseError> {
    let matches = Cli::command().try_get_matches_from(&args)?;
    let extra = match matches.subcommand() {
        Some(("serve", serve)) => match serve.get_one::<std::path::PathBuf>("config") {
            Some(path) => file_args(path, serve)?,
            None => Vec::new(),
        },
        _ => Vec::new(),
    };
    if extra.is_empty() {
        return Ok(Cli::from_arg_matches(&matches)?);
    }
    let all: Vec<OsString> = args.into_iter().chain(extra.into_iter().map(OsString::from)).collect();
    Ok(Cli::from_arg_matches(&Cli::command().try_get_matches_from(all)?)?)
}

/// `--flag=value` for each setting of the file that neither a flag nor a variable set.
fn file_args(path: &Path, given: &clap::ArgMatches) -> Result<Vec<String>, ParseError> {
    let fail = |message: String| ParseError::File { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| fail(format!("not valid TOML: {}", e.message())))?;
    let command = Cli::command();
    let serve = command.find_subcommand("serve").ok_or_else(|| fail("no serve command".into()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        let arg = serve
            .get_arguments()
            .find(|a| {
                a.get_id().as_str() == id
                    && a.get_long().is_some()
                    && !["config", "check_config"].contains(&id.as_str())
            })
            .ok_or_else(|| fail(format!("unknown setting '{key}'")))?;
        if matches!(given.value_source(&id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(fail(format!("'{key}' must be a string, number or boolean, not {}", other.type_str())));
            }
        };
        out.push(format!("--{}={text}", arg.get_long().unwrap_or(&key)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn args(list: &[&str]) -> Vec<OsString> {
        std::iter::once("deadline-stats-gateway").chain(list.iter().copied()).map(OsString::from).collect()
    }

    fn serve(cli: Cli) -> Box<crate::cli::serve::ServeArgs> {
        match cli.command {
            Command::Serve(s) => s,
            _ => panic!("expected serve"),
        }
    }

    #[test]
    fn the_command_lines_defaults_are_the_libraries_defaults() {
        let s = serve(parse(args(&["serve", "--upstream", "emulator"])).expect("parses"));
        let config = s.gateway_config();
        config.validate().expect("the defaults are valid");
        assert_eq!(format!("{config:?}"), format!("{:?}", crate::gateway::GatewayConfig::default()));
        assert_eq!(format!("{:?}", s.server_options()), format!("{:?}", crate::grpc::server::ServerOptions::default()));
        assert_eq!(*s.emulator_aggregation_duration, crate::emulator::defaults::AGGREGATION_DURATION);
        assert_eq!(*s.upstream_attempt_timeout, crate::upstream::sdk::defaults::ATTEMPT_TIMEOUT);
    }

    #[test]
    fn refresh_ahead_must_be_shorter_than_the_result_validity() {
        let with = |extra: &[&str]| {
            let list: Vec<&str> = ["serve", "--upstream", "emulator"].iter().chain(extra).copied().collect();
            let config = serve(parse(args(&list)).expect("parses")).gateway_config();
            config.validate().map(|()| config)
        };
        let err = with(&["--refresh-ahead", "1h"]).expect_err("as long as the validity");
        assert!(err.to_string().contains("--refresh-ahead (1h) must be shorter than --result-validity"), "{err}");
        let off = with(&["--refresh-ahead", "0s", "--refresh-min-hits", "5"]).expect("0 turns it off");
        assert!(!off.refresh.enabled());
        assert_eq!(off.refresh.min_hits, 5);
    }

    #[test]
    fn the_file_fills_in_what_flags_do_not_set() {
        let dir = std::env::temp_dir().join(format!("dsg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("gateway.toml");
        std::fs::write(&path, "farm-queue-capacity = 7\nmax_wait = \"5s\"\nlisten = \"127.0.0.1:6000\"\n")
            .expect("write");
        let p = path.to_string_lossy().into_owned();
        let s = serve(
            parse(args(&["serve", "--upstream", "emulator", "--config", &p, "--listen", "127.0.0.1:7000"]))
                .expect("parses"),
        );
        assert_eq!(s.farm_queue_capacity, 7);
        assert_eq!(*s.max_wait, std::time::Duration::from_secs(5));
        assert_eq!(s.listen.port(), 7000, "the flag wins over the file");

        std::fs::write(&path, "farm-queue-size = 7\n").expect("write");
        let err = parse(args(&["serve", "--upstream", "emulator", "--config", &p])).expect_err("unknown key");
        assert!(err.to_string().contains("unknown setting 'farm-queue-size'"), "{err}");

        std::fs::write(&path, "farm-queue-capacity = \"lots\"\n").expect("write");
        let err = parse(args(&["serve", "--upstream", "emulator", "--config", &p])).expect_err("bad value");
        assert!(err.to_string().contains("--farm-queue-capacity"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

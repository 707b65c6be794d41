//! `bench cache-hit --profile DIR`: `perf record` on the gateway and on the baseline while the
//! closed-loop rounds run, then a per-symbol comparison in samples per 1,000 requests, so a
//! regression of the cache-hit path is found in minutes.
//!
//! Sampling is by CPU clock (`-e cpu-clock`), which works on virtual machines without hardware
//! counters, at 1,999 Hz, with call graphs off (flat profiles: each sample is charged to the
//! symbol it was in). Where `perf` is missing or refused (`perf_event_paranoid`), the bench
//! says so in its report and runs without it.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// How many symbols the comparison lists, by the gateway's extra samples.
const SHOWN: usize = 40;

/// A `perf record` running on one server.
pub(crate) struct Recording {
    child: Child,
    data: PathBuf,
}

/// Starts `perf record` on `pid`, writing `DIR/NAME.perf.data`.
pub(crate) fn record(dir: &Path, name: &'static str, pid: u32) -> Result<Recording, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("--profile {}: {e}", dir.display()))?;
    let data = dir.join(format!("{name}.perf.data"));
    let child = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "1999", "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run perf ({e}); install linux-perf (Debian) to profile"))?;
    Ok(Recording { child, data })
}

impl Recording {
    /// Stops recording (SIGINT, as perf expects) and reads the flat profile: samples by
    /// symbol.
    pub(crate) fn finish(mut self) -> Result<BTreeMap<String, u64>, String> {
        // perf writes its data file on SIGINT.
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if !self.data.exists() {
            return Err(format!("perf record wrote nothing ({status}); is perf_event_paranoid too high?"));
        }
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-F", "sample,sym", "--sort", "sym", "-i"])
            .arg(&self.data)
            .output()
            .map_err(|e| e.to_string())?;
        Ok(parse_report(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Samples by symbol from `perf report --stdio -F sample,sym` (`  1234  [.] symbol`).
fn parse_report(text: &str) -> BTreeMap<String, u64> {
    let mut samples = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((count, rest)) = line.split_once(char::is_whitespace) else { continue };
        let Ok(count) = count.parse::<u64>() else { continue };
        let symbol = rest.trim().trim_start_matches("[.]").trim_start_matches("[k]").trim();
        *samples.entry(symbol.to_owned()).or_insert(0) += count;
    }
    samples
}

/// The comparison: per symbol, samples per 1,000 requests of each server and the difference,
/// the symbols the gateway spends most extra on first.
pub(crate) fn compare(
    gateway: &BTreeMap<String, u64>,
    gateway_requests: u64,
    baseline: &BTreeMap<String, u64>,
    baseline_requests: u64,
) -> Value {
    let per_k = |n: u64, requests: u64| n as f64 * 1000.0 / requests.max(1) as f64;
    let mut rows: Vec<(String, f64, f64)> = gateway
        .keys()
        .chain(baseline.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|s| {
            let g = per_k(gateway.get(s).copied().unwrap_or(0), gateway_requests);
            let b = per_k(baseline.get(s).copied().unwrap_or(0), baseline_requests);
            (s.clone(), g, b)
        })
        .collect();
    rows.sort_by(|x, y| (y.1 - y.2).total_cmp(&(x.1 - x.2)));
    let r = |x: f64| (x * 100.0).round() / 100.0;
    let total = |m: &BTreeMap<String, u64>, requests| per_k(m.values().sum(), requests);
    json!({
        "unit": "samples per 1,000 requests (cpu-clock at 1,999 Hz)",
        "gateway_total": r(total(gateway, gateway_requests)),
        "baseline_total": r(total(baseline, baseline_requests)),
        "symbols": rows.iter().take(SHOWN).map(|(s, g, b)| json!({
            "symbol": s, "gateway": r(*g), "baseline": r(*b), "extra": r(g - b),
        })).collect::<Vec<_>>(),
    })
}

/// The comparison as a table for a terminal.
pub(crate) fn table(comparison: &Value) -> String {
    let mut out = format!(
        "{:>9} {:>9} {:>9}  symbol ({})\n",
        "gateway",
        "baseline",
        "extra",
        comparison["unit"].as_str().unwrap_or_default()
    );
    for row in comparison["symbols"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:>9.2} {:>9.2} {:>9.2}  {}\n",
            row["gateway"].as_f64().unwrap_or_default(),
            row["baseline"].as_f64().unwrap_or_default(),
            row["extra"].as_f64().unwrap_or_default(),
            row["symbol"].as_str().unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perf_report_is_read_by_symbol_and_compared_per_request() {
        let report = "# Samples: 3K of event 'cpu-clock'\n#\n#  Samples  Symbol\n\
            #  .......  ......\n#\n      1200  [k] copy_user_generic\n       300  [.] moka::sync::cache::Cache<K,V,S>::get\n\
            \n        25  [.] __memmove_avx_unaligned_erms\n";
        let gateway = parse_report(report);
        assert_eq!(gateway.get("copy_user_generic"), Some(&1200));
        assert_eq!(gateway.get("moka::sync::cache::Cache<K,V,S>::get"), Some(&300));
        assert_eq!(gateway.len(), 3);
        let baseline = parse_report("      1000  [k] copy_user_generic\n");
        let c = compare(&gateway, 10_000, &baseline, 10_000);
        assert_eq!(c["symbols"][0]["symbol"], "moka::sync::cache::Cache<K,V,S>::get", "most extra first");
        assert_eq!(c["symbols"][0]["extra"], 30.0);
        assert_eq!(c["gateway_total"], 152.5);
        assert!(table(&c).contains("moka::sync::cache"));
    }
}

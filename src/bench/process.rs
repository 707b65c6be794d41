//! Processes under test: started from this executable, pinned to a core with `taskset`, their
//! CPU time and resident memory read from `/proc`.

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Why a scenario could not run.
pub(crate) type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// A child process that is killed when dropped.
pub struct Server {
    child: Child,
    /// The lines it announced on stdout.
    pub lines: Vec<String>,
}

impl Server {
    /// Starts this executable with `args` (pinned to `core` when given), and reads the first
    /// `announced` lines of its stdout.
    pub fn start(core: Option<usize>, args: &[String], announced: usize) -> std::io::Result<Self> {
        Self::start_with_env(core, args, &[], announced)
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with_env(
        core: Option<usize>,
        args: &[String],
        env: &[(&str, &str)],
        announced: usize,
    ) -> std::io::Result<Self> {
        // `DSG_BENCH_LOGS=DIR` keeps each server's logs in DIR, for looking into a run.
        let logs = match std::env::var_os("DSG_BENCH_LOGS") {
            Some(dir) => {
                let name = format!("{}-{}.log", args.first().map_or("server", String::as_str), rand::random::<u32>());
                Stdio::from(std::fs::File::create(std::path::Path::new(&dir).join(name))?)
            }
            None => Stdio::null(),
        };
        Self::spawn(this_executable(core)?, args, env, announced, logs)
    }

    /// [`Server::start`] with its logs (stderr) written to `log`.
    pub fn start_logging(
        core: Option<usize>,
        args: &[String],
        announced: usize,
        log: std::fs::File,
    ) -> std::io::Result<Self> {
        Self::spawn(this_executable(core)?, args, &[], announced, Stdio::from(log))
    }

    /// [`Server::start`] allowed at most `files` open file descriptors (`ulimit -n`).
    pub fn start_with_fd_limit(args: &[String], files: u64, announced: usize) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("ulimit -n {files} && exec \"$0\" \"$@\"")).arg(exe);
        Self::spawn(cmd, args, &[], announced, Stdio::null())
    }

    fn spawn(
        mut cmd: Command,
        args: &[String],
        env: &[(&str, &str)],
        announced: usize,
        stderr: Stdio,
    ) -> std::io::Result<Self> {
        // The servers run with their production defaults: `info` logs, no trace export.
        for var in ["RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] {
            cmd.env_remove(var);
        }
        cmd.args(args).envs(env.iter().copied()).stdout(Stdio::piped()).stderr(stderr);
        let mut child = cmd.spawn()?;
        match announced_lines(&mut child, announced, Duration::from_secs(60)) {
            Ok(lines) => Ok(Self { child, lines }),
            Err(e) => {
                let _ = child.kill();
                Err(std::io::Error::other(format!("{args:?}: {e}")))
            }
        }
    }

    /// The URL in the announced line that starts with `prefix`.
    pub fn url(&self, prefix: &str) -> Option<String> {
        self.lines.iter().find_map(|l| l.strip_prefix(prefix)).map(str::to_owned)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time used so far.
    pub fn cpu_time(&self) -> CpuTime {
        cpu_time(self.pid()).unwrap_or_default()
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid()).unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command running this executable, pinned to `core` when given.
fn this_executable(core: Option<usize>) -> std::io::Result<Command> {
    let exe = std::env::current_exe()?;
    Ok(match core {
        Some(core) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(core.to_string()).arg(exe);
            c
        }
        None => Command::new(exe),
    })
}

/// The first `n` lines the child prints on stdout (which must be piped), trimmed, waiting at
/// most `limit` for each; the rest of its output is drained so it never blocks on the pipe.
pub fn announced_lines(child: &mut Child, n: usize, limit: Duration) -> std::io::Result<Vec<String>> {
    let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("stdout is not piped"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        for _ in 0..n {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let _ = tx.send(line.trim().to_owned());
        }
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    (0..n)
        .map(|_| rx.recv_timeout(limit).map_err(|_| std::io::Error::other("the process did not announce itself")))
        .collect()
}

/// Clock ticks per second of `/proc/*/stat` times (`getconf CLK_TCK`, 100 on Linux).
fn ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// CPU time of a process (all its threads), in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// The time used between `earlier` and `self`.
    pub fn since(&self, earlier: CpuTime) -> CpuTime {
        CpuTime { user: self.user.saturating_sub(earlier.user), system: self.system.saturating_sub(earlier.system) }
    }

    pub fn add(&mut self, other: CpuTime) {
        self.user += other.user;
        self.system += other.system;
    }
}

/// utime and stime of a process, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), closed by ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    let tick = 1.0 / ticks_per_second() as f64;
    Some(CpuTime {
        user: Duration::from_secs_f64(utime as f64 * tick),
        system: Duration::from_secs_f64(stime as f64 * tick),
    })
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// The cores the benchmark may use: (server core, load generator core), or `None` on a
/// single-core machine.
pub fn cores() -> Option<(usize, usize)> {
    (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) >= 2).then_some((0, 1))
}

/// Pins every thread of this process to `core`.
pub fn pin_self(core: usize) {
    let pid = std::process::id().to_string();
    let _ = Command::new("taskset").args(["-a", "-p", "-c", &core.to_string(), &pid]).stdout(Stdio::null()).status();
}

/// `GET path` over plain HTTP/1.0 on loopback; the body.
/// `POST {base}{path}` with a JSON `body` (HTTP/1.0); the answer's body.
pub async fn http_post(base: &str, path: &str, body: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

pub async fn http_get(base: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

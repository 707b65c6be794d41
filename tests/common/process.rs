//! The gateway binary as a child process: started, announced, terminated, waited for.

use std::time::Duration;

/// The gateway binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_deadline-stats-gateway");

/// A child process, killed if the test ends before stopping it.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let sent =
            std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().expect("kill runs");
        assert!(sent.success(), "kill -TERM failed");
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the process did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads `n` lines of the child's stdout (waiting at most 30 s).
pub fn stdout_lines(child: &mut std::process::Child, n: usize) -> Vec<String> {
    deadline_stats_gateway::bench::process::announced_lines(child, n, Duration::from_secs(30))
        .expect("the process announces itself")
}

/// `serve --upstream emulator` on loopback ports with `extra` flags and `env`; returns the
/// process, the gRPC URL and the admin URL.
pub fn spawn_serve(extra: &[&str], env: &[(&str, &str)]) -> (Running, String, String) {
    spawn_serve_logging(extra, env, std::process::Stdio::null())
}

/// [`spawn_serve`] with its stderr (the logs) sent to `stderr`.
pub fn spawn_serve_logging(
    extra: &[&str],
    env: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> (Running, String, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--upstream", "emulator", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr);
    let mut child = cmd.spawn().expect("serve starts");
    let lines = stdout_lines(&mut child, 2);
    let grpc = lines[0].strip_prefix("listening on ").expect("gRPC address line").to_owned();
    let admin = lines[1].strip_prefix("admin on ").expect("admin address line").to_owned();
    (Running(child), grpc, admin)
}

/// `emulator` as a process of its own on a loopback port (`extra` flags appended); the process
/// and its endpoint URL.
pub fn spawn_emulator(extra: &[&str]) -> (Running, String) {
    let mut child = std::process::Command::new(BIN)
        .args(["emulator", "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the emulator starts");
    let lines = stdout_lines(&mut child, 1);
    let url = lines[0].strip_prefix("listening on ").expect("the emulator's address").to_owned();
    (Running(child), url)
}

/// `serve --upstream aws` in front of the emulator at `endpoint` (through the standard endpoint
/// variable and static keys), on loopback ports, with `extra` flags; the process, the gRPC URL
/// and the admin URL.
pub fn spawn_replica(endpoint: &str, extra: &[&str]) -> (Running, String, String) {
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--upstream", "aws", "--region", "us-west-2"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .env("AWS_ENDPOINT_URL_DEADLINE", endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(std::process::Stdio::piped())
        .stderr(replica_logs())
        .spawn()
        .expect("serve starts");
    let lines = stdout_lines(&mut child, 2);
    let grpc = lines[0].strip_prefix("listening on ").expect("gRPC address line").to_owned();
    let admin = lines[1].strip_prefix("admin on ").expect("admin address line").to_owned();
    (Running(child), grpc, admin)
}

/// Where a replica's logs go: nowhere, unless `DSG_TEST_LOGS` is set (then to the test's
/// stderr, for debugging a test).
fn replica_logs() -> std::process::Stdio {
    if std::env::var_os("DSG_TEST_LOGS").is_some() {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    }
}

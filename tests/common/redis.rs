//! A real `redis-server` per test, on a free loopback port with its own directory, stopped when
//! dropped. Debian's `redis-server` package is installed (apt-get, once per machine) when the
//! machine lacks it, as the Python tools are.

use super::IssuedCert;
use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
    extra: Vec<String>,
    /// The default user's password (`--requirepass`), which `redis-cli` is given.
    password: Option<String>,
    /// With TLS only (`--tls-port`): the CA certificate `redis-cli` trusts.
    tls_ca: Option<String>,
    /// While stopped: its port, held so no other process of the test takes it.
    held: Option<PortHolder>,
}

/// A stopped server's port, kept from every other process of the test (another test's proxy
/// or server would otherwise be given it, and clients still pointed there, such as a
/// Sentinel's old primary, would reach it): every connection is accepted and closed at once,
/// as a host whose server died resets it.
struct PortHolder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PortHolder {
    fn hold(port: u16) -> Option<Self> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).ok()?;
        listener.set_nonblocking(true).ok()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Some(Self { stop, thread: Some(thread) })
    }
}

impl Drop for PortHolder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisServer {
    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (its data is gone: no persistence).
    /// Its port stays held until it restarts (see [`PortHolder`]).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.held.is_none() {
            self.held = PortHolder::hold(self.port);
        }
    }

    /// Starts it again on the same port: empty, or from the last `SAVE` (an older snapshot).
    pub fn restart(&mut self) {
        self.stop();
        self.held = None;
        self.child = spawn(self.port, &self.dir, &self.extra);
        assert!(self.wait_until_up(), "redis-server on port {} exited at restart", self.port);
    }
}

/// A free loopback port no server of this test process was given before: a server a test
/// killed leaves its port to nobody else, so clients still pointed at it (a Sentinel's old
/// primary, a cluster's dead node) never reach another test's server there.
pub fn fresh_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The path of `redis-server`, installing Debian's packages first when it (or `redis-cli`,
/// which the cluster tests use) is missing.
fn redis_binary() -> &'static str {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let present =
            |tool: &str| Command::new(tool).arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
        if present("redis-server") && present("redis-cli") {
            return;
        }
        if let Err(e) = super::apt_install(&["redis-server", "redis-tools"]) {
            panic!("redis-server cannot be installed: {e}");
        }
    });
    "redis-server"
}

/// A fresh `redis-server` with the gateway's required settings (no persistence, `noeviction`),
/// answering PING.
pub fn redis_server() -> RedisServer {
    redis_server_with(&[])
}

/// [`redis_server`] with `extra` arguments (`--maxmemory-policy allkeys-lru`) after the defaults.
pub fn redis_server_with(extra: &[&str]) -> RedisServer {
    redis_server_at(fresh_port(), extra)
}

/// [`redis_server_with`] on `port`; with `--tls-port` among `extra` (and `--port 0`), spoken to
/// over TLS only, trusting `--tls-ca-cert-file`.
pub fn redis_server_at(port: u16, extra: &[&str]) -> RedisServer {
    try_redis_server_at(port, extra)
        .unwrap_or_else(|| panic!("redis-server on port {port} exited at start-up (its port was taken?)"))
}

/// [`redis_server_at`], or `None` when the server exited at start-up: a port chosen free was
/// taken meanwhile (by another test's server, say).
pub fn try_redis_server_at(port: u16, extra: &[&str]) -> Option<RedisServer> {
    let dir = std::env::temp_dir().join(format!("dsg-redis-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for redis");
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    let child = spawn(port, &dir, &extra);
    let after = |flag: &str| extra.iter().position(|a| a == flag).and_then(|i| extra.get(i + 1)).cloned();
    let (password, tls_ca) = (after("--requirepass"), after("--tls-port").and(after("--tls-ca-cert-file")));
    let mut server = RedisServer { child, port, dir, extra, password, tls_ca, held: None };
    server.wait_until_up().then_some(server)
}

fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    Command::new(redis_binary())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--maxmemory-policy", "noeviction", "--dir"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

fn wait_for_pong(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pong(port) {
        assert!(Instant::now() < deadline, "redis-server on port {port} did not answer PING within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pong(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut answer = [0u8; 7];
    // A server that wants a password is up too.
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && (&answer == b"+PONG\r\n" || &answer == b"-NOAUTH")
}

impl RedisServer {
    /// Sends one command (as RESP) on a connection of its own and returns the first line of the
    /// answer (`+OK`, `:1`, `$5`…); an error reply or no answer is `Err`.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut command = format!("*{}\r\n", args.len());
        for arg in args {
            command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(command.as_bytes()).map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        if line.starts_with('-') { Err(line) } else { Ok(line) }
    }
}

/// A Redis Sentinel (`redis-server --sentinel`) watching the primary on `primary_port` as
/// `mymaster`, with a quorum of one, stopped when dropped.
///
/// Down-after is three seconds: Sentinel pings each instance once a second and, right after a
/// switch to a promoted replica, times its first answer from the switch, so a one-second
/// down-after on a loaded machine can find the new primary "down" before its first answer
/// arrives and fail over a second time, losing what was written to the first (seen in CI).
pub struct RedisSentinel {
    child: Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // With `DSG_TEST_LOGS`, what the Sentinel decided (its failovers) is shown with the
        // replicas' logs.
        if std::env::var_os("DSG_TEST_LOGS").is_some() {
            eprintln!("{}", std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisSentinel {
    /// `redis+sentinel://127.0.0.1:PORT/mymaster`, as the gateway takes it.
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.port)
    }
}

/// Starts a Sentinel for the primary on `primary_port`, answering PING.
pub fn redis_sentinel(primary_port: u16) -> RedisSentinel {
    let port = fresh_port();
    let dir = std::env::temp_dir().join(format!("dsg-sentinel-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the sentinel");
    let conf = dir.join("sentinel.conf");
    let text = format!(
        "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {primary_port} 1\n\
         sentinel down-after-milliseconds mymaster 3000\nsentinel failover-timeout mymaster 10000\nlogfile {}\n",
        dir.display(),
        dir.join("sentinel.log").display()
    );
    std::fs::write(&conf, text).expect("writes sentinel.conf");
    let child = Command::new(redis_binary())
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel starts");
    wait_for_pong(port);
    RedisSentinel { child, port, dir }
}

/// A Redis Cluster on loopback: three primaries with a replica each (`redis-server
/// --cluster-enabled yes`, joined by `redis-cli --cluster create`, from Debian's
/// `redis-tools`, which `redis-server` brings), once every node says `cluster_state:ok`;
/// stopped when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `redis://127.0.0.1:PORT` of one node (any node knows the whole cluster).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// `redis-cluster://127.0.0.1:PORT,…` with every node as a seed, as the gateway takes it.
    pub fn cluster_url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis-cluster://{}", seeds.join(","))
    }
}

/// Starts a [`RedisCluster`].
pub fn redis_cluster() -> RedisCluster {
    redis_cluster_with(&[])
}

/// [`redis_cluster`] with `extra` arguments for every node (`--requirepass`, `--user …`).
pub fn redis_cluster_with(extra: &[&str]) -> RedisCluster {
    redis_cluster_of(|_| extra.iter().map(|a| (*a).to_owned()).collect())
}

/// [`redis_cluster`] over TLS only: every node serves its port with `server`'s certificate, and
/// the cluster bus and replication speak TLS too (the nodes showing `node` to each other);
/// clients need not show a certificate.
pub fn redis_tls_cluster(server: &IssuedCert, node: &IssuedCert, ca: &std::path::Path) -> RedisCluster {
    let path = |p: &std::path::Path| p.display().to_string();
    let files = [
        ("--tls-cert-file", path(&server.cert)),
        ("--tls-key-file", path(&server.key)),
        ("--tls-client-cert-file", path(&node.cert)),
        ("--tls-client-key-file", path(&node.key)),
        ("--tls-ca-cert-file", path(ca)),
    ];
    redis_cluster_of(|port| {
        let mut args: Vec<String> = ["--port", "0", "--tls-port", &port.to_string()].map(str::to_owned).to_vec();
        for (flag, value) in &files {
            args.extend([(*flag).to_owned(), value.clone()]);
        }
        args.extend(
            ["--tls-auth-clients", "no", "--tls-cluster", "yes", "--tls-replication", "yes"].map(str::to_owned),
        );
        args
    })
}

/// Six nodes, each started with what `extra(port)` adds, joined as three primaries with a
/// replica each.
fn redis_cluster_of(extra: impl Fn(u16) -> Vec<String>) -> RedisCluster {
    let free = fresh_port;
    // The bus port is chosen too: the default (port + 10000) may not exist.
    let nodes: Vec<RedisServer> = (0..6)
        .map(|_| {
            // A port chosen free may be taken before the node binds it: choose again.
            (0..5)
                .find_map(|_| {
                    let (port, bus) = (free(), free().to_string());
                    let own = extra(port);
                    let mut args =
                        vec!["--cluster-enabled", "yes", "--cluster-port", &bus, "--cluster-node-timeout", "2000"];
                    args.extend(own.iter().map(String::as_str));
                    try_redis_server_at(port, &args)
                })
                .expect("a cluster node starts on free ports")
        })
        .collect();
    let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
    let created = Command::new("redis-cli")
        .args(nodes[0].cli_options())
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut created = created.expect("redis-cli runs");
    // Bounded: nodes that cannot meet (a bus that refuses them) keep it waiting for ever.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = created.try_wait().expect("redis-cli runs") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = created.kill();
            panic!("redis-cli --cluster create did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "redis-cli --cluster create failed");
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        loop {
            let info = node.redis_cli(&["cluster", "info"]).unwrap_or_default();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not come up within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Every primary's replica has synced (writes that wait for a replica go through).
    for node in &nodes {
        loop {
            let info = node.redis_cli(&["INFO", "replication"]).unwrap_or_default();
            let primary_with_replica =
                info.contains("role:master") && info.contains("slave0:") && info.contains("state=online");
            if info.contains("role:slave") && info.contains("master_link_status:up") || primary_with_replica {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster's replicas did not sync within 30 s: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    RedisCluster { nodes }
}

/// The Redis replicas share in a test: one server, or a cluster.
pub enum SharedRedis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl SharedRedis {
    /// A fresh `redis-server`.
    pub async fn one() -> Self {
        Self::One(tokio::task::spawn_blocking(redis_server).await.expect("joins"))
    }

    /// A fresh three-shard cluster.
    pub async fn cluster() -> Self {
        Self::Cluster(tokio::task::spawn_blocking(redis_cluster).await.expect("joins"))
    }

    /// The URL the gateway is given (`redis-cluster://…` for a cluster).
    pub fn url(&self) -> String {
        match self {
            Self::One(server) => server.url(),
            Self::Cluster(cluster) => cluster.cluster_url(),
        }
    }

    /// A connection of the test's own, for reading (and damaging) the gateway's keys.
    pub async fn conn(&self) -> AnyConn {
        match self {
            Self::One(server) => AnyConn::One(super::redis_conn(&server.url()).await),
            Self::Cluster(cluster) => {
                let nodes: Vec<String> = cluster.nodes.iter().map(RedisServer::url).collect();
                let client = ::redis::cluster::ClusterClient::new(nodes).expect("cluster URLs");
                AnyConn::Cluster(client.get_async_connection().await.expect("connects to the cluster"))
            }
        }
    }
}

/// A connection to one Redis or to a cluster (which routes each command to its key's shard).
#[derive(Clone)]
pub enum AnyConn {
    One(::redis::aio::MultiplexedConnection),
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl ::redis::aio::ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a ::redis::Cmd) -> ::redis::RedisFuture<'a, ::redis::Value> {
        match self {
            Self::One(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        match self {
            Self::One(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl RedisServer {
    /// What `redis-cli` needs to be let in: the password, TLS.
    fn cli_options(&self) -> Vec<&str> {
        let auth = self.password.iter().flat_map(|p| ["-a", p.as_str(), "--no-auth-warning"]);
        auth.chain(self.tls_ca.iter().flat_map(|ca| ["--tls", "--cacert", ca.as_str()])).collect()
    }

    /// Waits until it answers `PING` (over TLS with `redis-cli`).
    /// `false` when the process exited instead (another process answering on its port does not
    /// count: the process must still run a moment after the answer).
    fn wait_until_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            let up = if self.tls_ca.is_none() {
                pong(self.port)
            } else {
                self.redis_cli(&["PING"]).is_ok_and(|pong| pong.contains("PONG"))
            };
            if up {
                std::thread::sleep(Duration::from_millis(50));
                return matches!(self.child.try_wait(), Ok(None));
            }
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING within 10 s", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis-cli` against this server, its output (`Err` when it fails or answers an error).
    pub fn redis_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(self.cli_options())
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.starts_with("ERR") || text.starts_with("(error)") {
            return Err(format!("redis-cli {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(text)
    }
}

impl RedisCluster {
    /// Node `n`'s cluster id.
    pub fn node_id(&self, n: usize) -> String {
        self.nodes[n].redis_cli(&["CLUSTER", "MYID"]).expect("CLUSTER MYID").trim().to_owned()
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.nodes[0].redis_cli(&["CLUSTER", "KEYSLOT", key]).expect("KEYSLOT").trim().parse().expect("a slot")
    }

    /// Which node serves `slot` as primary now, as the first live node reports it.
    pub fn primary_of(&self, slot: u16) -> Option<usize> {
        let nodes = self.nodes.iter().find_map(|n| n.redis_cli(&["CLUSTER", "NODES"]).ok())?;
        let line = nodes.lines().find(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2).is_some_and(|flags| flags.contains("master") && !flags.contains("fail"))
                && fields.iter().skip(8).any(|range| match range.split_once('-') {
                    Some((a, b)) => {
                        a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
                    }
                    None => range.parse::<u16>() == Ok(slot),
                })
        })?;
        let port: u16 = line.split_whitespace().nth(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
        self.nodes.iter().position(|n| n.port == port)
    }

    /// Moves `slot` from node `from` to node `to` as `redis-cli --cluster reshard` does
    /// (`CLUSTER SETSLOT … IMPORTING/MIGRATING`, `MIGRATE` key by key, `SETSLOT … NODE`),
    /// pausing `pause` in the middle of each step so clients meet `ASK` and `TRYAGAIN`.
    pub fn migrate_slot(&self, slot: u16, from: usize, to: usize, pause: Duration) {
        let (from_id, to_id, slot_arg) = (self.node_id(from), self.node_id(to), slot.to_string());
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        target.redis_cli(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id]).expect("IMPORTING");
        source.redis_cli(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id]).expect("MIGRATING");
        std::thread::sleep(pause);
        loop {
            let keys = source.redis_cli(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "1"]).expect("GETKEYSINSLOT");
            let Some(key) = keys.lines().next().map(str::trim).filter(|k| !k.is_empty()) else { break };
            let port = target.port.to_string();
            source.redis_cli(&["MIGRATE", "127.0.0.1", &port, key, "0", "5000", "REPLACE"]).expect("MIGRATE");
            std::thread::sleep(pause / 4);
        }
        for node in [target, source] {
            node.redis_cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]).expect("SETSLOT NODE");
        }
    }
}

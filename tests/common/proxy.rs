//! A TCP proxy on a loopback port in front of a server (Redis), that a test can make misbehave
//! the way networks and managed services do: hold every byte (a black hole: nothing lost yet,
//! nothing answered), reset every connection (what was held is lost, as when a black hole ends
//! in a timeout or a failover drops connections), freeze the open connections for good (a
//! half-open socket), send new connections elsewhere (a DNS name moved by a failover), or pass
//! again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Hold,
}

/// A proxy running in the test's runtime until dropped.
pub struct FaultProxy {
    pub port: u16,
    /// The server's port: new connections go there.
    target: Arc<AtomicU16>,
    /// Connections accepted so far (each is numbered in order).
    accepted: Arc<AtomicU64>,
    mode: watch::Sender<Mode>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    /// Connections numbered below this are frozen: held for good, never reset.
    frozen_below: watch::Sender<u64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.resets.send_modify(|n| *n += 1);
    }
}

/// What one connection's pumps watch.
#[derive(Clone)]
struct Gate {
    number: u64,
    mode: watch::Receiver<Mode>,
    frozen_below: watch::Receiver<u64>,
}

impl Gate {
    /// Waits until bytes may pass.
    async fn open(&mut self) -> Result<(), watch::error::RecvError> {
        loop {
            if *self.mode.borrow_and_update() == Mode::Pass && self.number >= *self.frozen_below.borrow_and_update() {
                return Ok(());
            }
            tokio::select! {
                changed = self.mode.changed() => changed?,
                changed = self.frozen_below.changed() => changed?,
            }
        }
    }
}

impl FaultProxy {
    /// A proxy to `127.0.0.1:target`, passing bytes.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let (mode, _) = watch::channel(Mode::Pass);
        let (resets, _) = watch::channel(0);
        let (frozen_below, _) = watch::channel(0);
        let target = Arc::new(AtomicU16::new(target));
        let accepted = Arc::new(AtomicU64::new(0));
        let (m, r, f, t, a) = (mode.clone(), resets.clone(), frozen_below.clone(), target.clone(), accepted.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = a.fetch_add(1, Ordering::SeqCst);
                let gate = Gate { number, mode: m.subscribe(), frozen_below: f.subscribe() };
                tokio::spawn(connection(client, t.clone(), gate, r.subscribe()));
            }
        });
        Self { port, target, accepted, mode, resets, frozen_below, accepting }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding in both directions (and new connections get no further than accept).
    pub fn hold(&self) {
        self.mode.send_replace(Mode::Hold);
    }

    /// Forwards again, held bytes first.
    pub fn pass(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// Resets every open connection (TCP RST to both ends); what was held is lost.
    pub fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }

    /// Freezes every open connection for good (bytes neither pass nor fail, and no reset ever
    /// comes) while new connections pass: what a half-open socket looks like.
    pub fn freeze_open(&self) {
        self.frozen_below.send_replace(self.accepted.load(Ordering::SeqCst));
    }

    /// Sends new connections to `127.0.0.1:port` and resets the open ones: what a failover
    /// looks like behind a DNS name (ElastiCache's primary endpoint).
    pub fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
        self.reset_all();
    }

    /// Holds for `hold`, then resets every connection and passes again: the writes sent
    /// meanwhile never reach the server, and their senders hear nothing until the reset.
    pub async fn black_hole(&self, hold: Duration) {
        self.hold();
        tokio::time::sleep(hold).await;
        self.reset_all();
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.pass();
    }
}

async fn connection(client: TcpStream, target: Arc<AtomicU16>, mut gate: Gate, mut resets: watch::Receiver<u64>) {
    resets.mark_unchanged();
    if gate.open().await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", target.load(Ordering::SeqCst))).await else { return };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client, server) = (Arc::new(client), Arc::new(server));
    let up = pump(client.clone(), server.clone(), gate.clone());
    let down = pump(server.clone(), client.clone(), gate.clone());
    let frozen = gate.number;
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = resets.changed() => {
            // A frozen connection's far end is gone without a word: no reset reaches it.
            if frozen >= *gate.frozen_below.borrow() {
                let _ = (client.set_zero_linger(), server.set_zero_linger());
            } else {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Copies `from` to `to` while the gate is open; bytes read meanwhile wait for it.
async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, mut gate: Gate) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if gate.open().await.is_err() {
            return;
        }
        let n = match read(&from, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.open().await.is_err() || write(&to, &buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn read(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}

async fn write(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
            Ok(n) => bytes = &bytes[n..],
        }
    }
    Ok(())
}

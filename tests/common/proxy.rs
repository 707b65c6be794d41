//! A TCP proxy on a loopback port in front of a server (Redis), that a test can make misbehave
//! the way networks and managed services do: hold every byte (a black hole: nothing lost yet,
//! nothing answered), reset every connection (what was held is lost, as when a black hole ends
//! in a timeout or a failover drops connections), or pass again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
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
    mode: watch::Sender<Mode>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.resets.send_modify(|n| *n += 1);
    }
}

impl FaultProxy {
    /// A proxy to `127.0.0.1:target`, passing bytes.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let (mode, _) = watch::channel(Mode::Pass);
        let (resets, _) = watch::channel(0);
        let target = Arc::new(AtomicU16::new(target));
        let (m, r, t) = (mode.clone(), resets.clone(), target.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(connection(client, t.clone(), m.subscribe(), r.subscribe()));
            }
        });
        Self { port, target, mode, resets, accepting }
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

async fn connection(
    client: TcpStream,
    target: Arc<AtomicU16>,
    mut mode: watch::Receiver<Mode>,
    mut resets: watch::Receiver<u64>,
) {
    resets.mark_unchanged();
    if passing(&mut mode).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", target.load(Ordering::SeqCst))).await else { return };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (client, server) = (Arc::new(client), Arc::new(server));
    let up = pump(client.clone(), server.clone(), mode.clone());
    let down = pump(server.clone(), client.clone(), mode);
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = resets.changed() => {
            let _ = (client.set_zero_linger(), server.set_zero_linger());
        }
    }
}

/// Waits until the proxy passes bytes.
async fn passing(mode: &mut watch::Receiver<Mode>) -> Result<(), watch::error::RecvError> {
    mode.wait_for(|m| *m == Mode::Pass).await.map(|_| ())
}

/// Copies `from` to `to` while passing; bytes read while holding wait for the proxy to pass.
async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, mut mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if passing(&mut mode).await.is_err() {
            return;
        }
        let n = match read(&from, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if passing(&mut mode).await.is_err() || write(&to, &buf[..n]).await.is_err() {
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

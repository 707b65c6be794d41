//! `bench transport`: what the gRPC listener holds under abuse of the transport itself, while
//! a gRPC health check runs every 10 ms on a connection of its own:
//!
//! - **rapid reset**: HTTP/2 HEADERS each followed at once by RST_STREAM, as fast as one
//!   connection takes them, reconnecting whenever the server closes it;
//! - **stream flood**: ten times `--max-concurrent-streams` streams opened on one connection
//!   and never finished;
//! - **idle sockets**: 500 connections that never send a byte, checked after the handshake
//!   timeout;
//! - **big metadata**: a request with 1 MB of metadata;
//! - **descriptor exhaustion**: a second gateway allowed 256 file descriptors is sent 400
//!   connections; its CPU while they are held, and whether it serves again once they close.
//!
//! The frames are written by hand (a client library would respect the server's limits, which
//! is the point of an attack not to).

use super::process::{Server, cpu_time, rss_bytes};
use super::requests::start_request;
use super::scenarios::{BenchError, BenchOptions, serve_args, string};
use crate::grpc::pb;
use crate::grpc::service::START;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
/// `--max-concurrent-streams` of the gateway under test.
const MAX_STREAMS: u32 = 100;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK string literal (no Huffman coding): its length as a 7-bit-prefix integer, then
/// the bytes.
fn literal(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s.as_bytes());
}

/// The header block of a gRPC StartAggregation call: `:method POST` and `:scheme http` from
/// the static table, the rest as literals without indexing.
fn header_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86];
    b.push(0x04);
    literal(&mut b, START.path);
    b.push(0x01);
    literal(&mut b, authority);
    b.push(0x00);
    literal(&mut b, "content-type");
    literal(&mut b, "application/grpc");
    b.push(0x00);
    literal(&mut b, "te");
    literal(&mut b, "trailers");
    b
}

/// What the server sent back on a raw connection.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    goaway: bool,
    refused: u64,
    /// The error code of the last RST_STREAM.
    last_reset: Option<u32>,
    /// HEADERS frames (responses) received.
    responses: u64,
}

/// A raw HTTP/2 connection: the preface and empty SETTINGS sent; a task reads the server's
/// frames (ACKing its SETTINGS) and tallies them.
struct RawConn {
    writer: std::sync::Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    seen: tokio::sync::watch::Receiver<Seen>,
    next_stream: u32,
}

impl RawConn {
    async fn open(addr: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut reader, mut writer) = stream.into_split();
        let mut hello = PREFACE.to_vec();
        frame(&mut hello, SETTINGS, 0, 0, &[]);
        writer.write_all(&hello).await?;
        let writer = std::sync::Arc::new(tokio::sync::Mutex::new(writer));
        let (tx, seen) = tokio::sync::watch::channel(Seen::default());
        let acks = writer.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 9];
            let mut tally = Seen::default();
            while reader.read_exact(&mut head).await.is_ok() {
                let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let mut payload = vec![0u8; len];
                if reader.read_exact(&mut payload).await.is_err() {
                    break;
                }
                match head[3] {
                    SETTINGS if head[4] & ACK == 0 => {
                        let mut ack = Vec::new();
                        frame(&mut ack, SETTINGS, ACK, 0, &[]);
                        let _ = acks.lock().await.write_all(&ack).await;
                    }
                    RST_STREAM => {
                        let code = payload.get(..4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                        tally.refused += u64::from(code == Some(REFUSED_STREAM));
                        tally.last_reset = code;
                    }
                    HEADERS => tally.responses += 1,
                    GOAWAY => tally.goaway = true,
                    _ => {}
                }
                tx.send_replace(tally);
            }
            tally.goaway = true;
            tx.send_replace(tally);
        });
        Ok(Self { writer, seen, next_stream: 1 })
    }

    /// Opens `n` streams (HEADERS, not ended), each reset at once when `reset`.
    async fn streams(&mut self, block: &[u8], n: u32, reset: bool) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(n as usize * (block.len() + 30));
        for _ in 0..n {
            frame(&mut out, HEADERS, END_HEADERS, self.next_stream, block);
            if reset {
                frame(&mut out, RST_STREAM, 0, self.next_stream, &CANCEL.to_be_bytes());
            }
            self.next_stream += 2;
        }
        self.writer.lock().await.write_all(&out).await
    }

    /// One request whose header block is `block`, split into 16 KB frames (HEADERS, then
    /// CONTINUATION).
    async fn oversized(&mut self, block: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(block.len() + block.len() / 1000);
        let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let (kind, last) = (if i == 0 { HEADERS } else { CONTINUATION }, i + 1 == chunks.len());
            frame(&mut out, kind, if last { END_HEADERS } else { 0 }, self.next_stream, chunk);
        }
        self.next_stream += 2;
        self.writer.lock().await.write_all(&out).await
    }

    fn seen(&self) -> Seen {
        *self.seen.borrow()
    }
}

/// Latencies of the health checks (µs) and how many failed.
struct Health {
    latencies: Vec<u64>,
    failures: u64,
}

/// Checks health every 10 ms on a thread and connection of its own until `stop`.
fn probe(url: String, stop: tokio::sync::watch::Receiver<bool>) -> std::thread::JoinHandle<Health> {
    std::thread::spawn(move || {
        let mut health = Health { latencies: Vec::new(), failures: 0 };
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return health };
        runtime.block_on(async {
            let Ok(endpoint) = tonic::transport::Channel::from_shared(url) else { return };
            let Ok(channel) = endpoint.connect().await else { return };
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !*stop.borrow() {
                tick.tick().await;
                let sent = Instant::now();
                let check = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() });
                match tokio::time::timeout(Duration::from_secs(1), check).await {
                    Ok(Ok(_)) => health.latencies.push(sent.elapsed().as_micros() as u64),
                    _ => health.failures += 1,
                }
            }
        });
        health
    })
}

fn summary(h: Health) -> Value {
    let mut l = h.latencies;
    l.sort_unstable();
    let at = |q: f64| l.get(((l.len().max(1) - 1) as f64 * q).round() as usize).map_or(0.0, |us| *us as f64 / 1000.0);
    json!({ "checks": l.len(), "failures": h.failures, "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0) })
}

pub async fn transport(opts: &BenchOptions) -> Result<Value, BenchError> {
    let length = if opts.smoke { Duration::from_millis(500) } else { Duration::from_secs(5) };
    let handshake = if opts.smoke { Duration::from_secs(1) } else { Duration::from_secs(3) };
    let handshake_flag = format!("{}ms", handshake.as_millis());
    let streams_flag = MAX_STREAMS.to_string();
    let mut args = serve_args();
    args.extend(
        ["--caller-start-rate", "0", "--max-concurrent-streams", &streams_flag, "--handshake-timeout", &handshake_flag]
            .into_iter()
            .map(string),
    );
    let gw = Server::start(None, &args, 3)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let addr = url.trim_start_matches("http://").to_owned();
    let block = header_block(&addr);
    let rss_before = gw.rss_bytes();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let prober = probe(url.clone(), stopped);

    // Rapid reset.
    let begin = Instant::now();
    let (mut resets, mut closed) = (0u64, 0u64);
    let mut conn = RawConn::open(&addr).await?;
    while begin.elapsed() < length {
        if conn.seen().goaway || conn.streams(&block, 100, true).await.is_err() {
            closed += 1;
            conn = RawConn::open(&addr).await?;
            continue;
        }
        resets += 100;
        tokio::task::yield_now().await;
    }
    let reset_secs = begin.elapsed().as_secs_f64();
    let rss_after_resets = gw.rss_bytes();

    // Stream flood beyond --max-concurrent-streams.
    let mut flood = RawConn::open(&addr).await?;
    let opened = MAX_STREAMS * 10;
    flood.streams(&block, opened, false).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooded = flood.seen();
    drop(flood);

    // Idle sockets.
    let sockets = if opts.smoke { 50 } else { 500 };
    let mut idle = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        idle.push(TcpStream::connect(&addr).await?);
    }
    tokio::time::sleep(handshake + Duration::from_secs(1)).await;
    let mut idle_closed = 0;
    for mut s in idle {
        if closed_within(&mut s, Duration::from_millis(50)).await {
            idle_closed += 1;
        }
    }

    // 1 MB of metadata: through tonic (which keeps to the server's advertised limit), and
    // written raw.
    let big = big_metadata(&url).await;
    let mut raw = RawConn::open(&addr).await?;
    let mut block = header_block(&addr);
    block.push(0x00);
    literal(&mut block, "x-padding");
    literal(&mut block, &"x".repeat(1024 * 1024));
    let sent_raw = raw.oversized(&block).await.is_ok();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let raw_seen = raw.seen();
    drop(raw);
    stop.send_replace(true);
    let health = prober.join().map_err(|_| "the health prober panicked")?;
    let alive = rss_bytes(gw.pid()).is_some();
    let rss_end = gw.rss_bytes();
    drop(gw);

    let exhaustion = descriptor_exhaustion(opts).await?;
    Ok(json!({
        "scenario": "transport",
        "rapid_reset": {
            "resets_written": resets,
            "seconds": reset_secs,
            "resets_per_second": (resets as f64 / reset_secs.max(1e-9)).round(),
            "connections_closed_by_server": closed,
        },
        "stream_flood": {
            "max_concurrent_streams": MAX_STREAMS,
            "streams_opened": opened,
            "refused_streams": flooded.refused,
            "connection_closed": flooded.goaway,
        },
        "idle_sockets": {
            "sockets": sockets,
            "handshake_timeout_s": handshake.as_secs_f64(),
            "closed_after_timeout_plus_1s": idle_closed,
        },
        "big_metadata": {
            "tonic_client": big,
            "raw": {
                "written": sent_raw,
                "server_reset_code": raw_seen.last_reset,
                "server_closed_connection": raw_seen.goaway,
                "responses": raw_seen.responses,
            },
        },
        "health_during": summary(health),
        "alive_after": alive,
        "rss_bytes": { "before": rss_before, "after_resets": rss_after_resets, "end": rss_end },
        "descriptor_exhaustion": exhaustion,
        "smoke": opts.smoke,
    }))
}

/// Whether the server closed `socket` within `limit` (EOF or a reset) rather than keeping
/// it; what it sent first (its HTTP/2 SETTINGS) is read past.
pub async fn closed_within(socket: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let until_closed = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, until_closed).await.is_ok()
}

/// A Start carrying 1 MB of metadata: how it was answered.
async fn big_metadata(url: &str) -> Value {
    let connected = match tonic::transport::Channel::from_shared(url.to_owned()) {
        Ok(endpoint) => endpoint.connect().await,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let Ok(channel) = connected else { return json!({ "error": "cannot connect" }) };
    let mut client = pb::aggregation_service_client::AggregationServiceClient::new(channel);
    let mut request = tonic::Request::new(start_request(1, 1, 1, &[pb::GroupBy::QueueId]));
    if let Ok(value) = "x".repeat(1024 * 1024).parse() {
        request.metadata_mut().insert("x-padding", value);
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), client.start_aggregation(request)).await;
    match answer {
        Ok(Ok(_)) => json!({ "code": "Ok" }),
        Ok(Err(status)) => json!({ "code": format!("{:?}", status.code()), "message": status.message() }),
        Err(_) => json!({ "code": "no answer within 10 s" }),
    }
}

/// A gateway allowed 256 descriptors is sent 400 connections that stay silent: its CPU while
/// they are held (a spinning accept loop would use a whole core), then whether it serves.
async fn descriptor_exhaustion(opts: &BenchOptions) -> Result<Value, BenchError> {
    let mut args = serve_args();
    args.extend(["--caller-start-rate", "0", "--handshake-timeout", "60s"].into_iter().map(string));
    let gw = Server::start_with_fd_limit(&args, 256, 3)?;
    let url = gw.url("listening on ").ok_or("no gRPC address")?;
    let addr = url.trim_start_matches("http://").to_owned();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let prober = probe(url.clone(), stopped);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..400 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    let window = if opts.smoke { Duration::from_secs(1) } else { Duration::from_secs(3) };
    let before = cpu_time(gw.pid()).unwrap_or_default();
    tokio::time::sleep(window).await;
    let busy = cpu_time(gw.pid()).unwrap_or_default().since(before).total();
    let held_count = held.len();
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let serves_again = match tonic::transport::Channel::from_shared(url.clone()) {
        Ok(endpoint) => match endpoint.connect().await {
            Ok(channel) => pb::aggregation_service_client::AggregationServiceClient::new(channel)
                .start_aggregation(start_request(2, 1, 1, &[pb::GroupBy::QueueId]))
                .await
                .is_ok(),
            Err(_) => false,
        },
        Err(_) => false,
    };
    stop.send_replace(true);
    let health = prober.join().map_err(|_| "the health prober panicked")?;
    Ok(json!({
        "fd_limit": 256,
        "connections_held": held_count,
        "window_s": window.as_secs_f64(),
        "cpu_fraction_of_a_core": (busy.as_secs_f64() / window.as_secs_f64() * 1000.0).round() / 1000.0,
        "health_during": summary(health),
        "serves_after_release": serves_again,
    }))
}

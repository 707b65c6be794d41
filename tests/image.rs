//! The container image that the manifests deploy, built with `deploy/Dockerfile` and run from
//! its own filesystem.
//!
//! There is no Docker engine here and base images cannot be pulled, so:
//! - the runtime base is a stand-in for `gcr.io/distroless/cc-debian12:nonroot` made from the
//!   same Debian packages (`tests/image_base.sh`, debootstrap), imported with `podman import`;
//! - the Dockerfile's `prebuilt` stage is built with `podman build --isolation chroot` around the
//!   release binary (`cargo build --release`; the `build` stage needs the Rust image);
//! - containers cannot be started (the OCI runtime's `setrlimit` is refused), so the image's
//!   filesystem is exported and its entrypoint run with `chroot` as the image's user, with the
//!   image's environment, on loopback ports. No file in it is writable by that user, as with
//!   the Deployment's `readOnlyRootFilesystem`.
//!
//! Needs root (debootstrap, chroot) and podman and debootstrap, which it installs with apt when
//! missing; where that is impossible every test here says so and passes.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const BASE_TAG: &str = "localhost/dsg-runtime-base:bookworm";
const IMAGE_TAG: &str = "localhost/deadline-stats-gateway:test";
const BINARY: &str = "deadline-stats-gateway";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// Where the base tar, podman's storage, the build context and the exported filesystem live.
fn work() -> PathBuf {
    target_dir().join("image")
}

/// podman with its storage of its own under `target/image` (the `vfs` driver: no overlay
/// mounts needed).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.arg("--root").arg(work().join("storage")).arg("--runroot").arg(work().join("run"));
    cmd.args(["--storage-driver", "vfs"]);
    cmd
}

/// Runs `cmd`, failing the test with its output when it fails; its stdout.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image as built: its configuration (`podman image inspect`), its size, and its exported
/// filesystem.
struct Image {
    config: serde_json::Value,
    size: u64,
    rootfs: PathBuf,
}

impl Image {
    fn user(&self) -> String {
        self.config["User"].as_str().expect("the image names a user").to_owned()
    }

    fn entrypoint(&self) -> Vec<String> {
        strings(&self.config["Entrypoint"])
    }

    fn cmd(&self) -> Vec<String> {
        strings(&self.config["Cmd"])
    }

    /// The image's environment, as `(name, value)`.
    fn env(&self) -> Vec<(String, String)> {
        strings(&self.config["Env"])
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("NAME=value");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap_or_default()
}

/// The image, built once for this test binary; `None` (with the reason printed) where podman or
/// debootstrap cannot be had, or the tests do not run as root.
fn image() -> Option<&'static Image> {
    static IMAGE: OnceLock<Option<Image>> = OnceLock::new();
    IMAGE.get_or_init(build).as_ref()
}

fn build() -> Option<Image> {
    if let Err(why) = tools() {
        eprintln!("SKIPPED: the container image is not built or run here: {why}");
        return None;
    }
    let work = work();
    std::fs::create_dir_all(&work).expect("target/image");

    // The release binary (what `cargo build --release` gives a user), stripped as the
    // Dockerfile's build stage strips it, alone in the build context.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(
        Command::new(cargo).args(["build", "--release", "--locked", "--bin", BINARY]).current_dir(root()),
        "cargo build --release",
    );
    let context = work.join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).expect("a build context");
    std::fs::copy(target_dir().join("release").join(BINARY), context.join(BINARY)).expect("copies the binary");
    run(Command::new("strip").arg(context.join(BINARY)), "strip");

    // The stand-in base, made once per version of its script.
    let script = root().join("tests/image_base.sh");
    let version = fnv(&std::fs::read(&script).expect("tests/image_base.sh"));
    let base = work.join(format!("base-bookworm-{version:016x}.tar"));
    if !base.exists() {
        run(Command::new(&script).arg(&base).arg(work.join("base-work")), "tests/image_base.sh");
    }
    // A fresh store each time: nothing of earlier builds piles up under target/.
    run(podman().args(["system", "reset", "--force"]), "podman system reset");
    run(podman().arg("import").arg(&base).arg(BASE_TAG), "podman import");

    run(
        podman()
            .args(["build", "--isolation", "chroot", "--pull=never", "--target", "prebuilt"])
            .args(["--build-arg", &format!("RUNTIME_IMAGE={BASE_TAG}"), "-t", IMAGE_TAG, "-f"])
            .arg(root().join("deploy/Dockerfile"))
            .arg(&context),
        "podman build",
    );
    let inspect = run(podman().args(["image", "inspect", IMAGE_TAG]), "podman image inspect");
    let inspect: serde_json::Value = serde_json::from_str(&inspect).expect("inspect is JSON");
    let config = inspect[0]["Config"].clone();
    let size = inspect[0]["Size"].as_u64().expect("the image's size");

    // Its filesystem, as a container would see it.
    let container = run(podman().args(["create", IMAGE_TAG]), "podman create").trim().to_owned();
    let exported = work.join("export.tar");
    run(podman().args(["export", "-o"]).arg(&exported).arg(&container), "podman export");
    run(podman().args(["rm", &container]), "podman rm");
    let rootfs = work.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::create_dir_all(&rootfs).expect("a directory for the filesystem");
    run(Command::new("tar").args(["--numeric-owner", "-xpf"]).arg(&exported).arg("-C").arg(&rootfs), "tar -x");
    read_only(&rootfs);
    Some(Image { config, size, rootfs })
}

/// Root, podman and debootstrap (installed with apt when missing).
fn tools() -> Result<(), String> {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).map_err(|e| format!("no /proc: {e}"))?;
    if uid != 0 {
        return Err("not root (debootstrap and chroot need root)".into());
    }
    let present =
        |tool: &str| Command::new(tool).arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if present("podman") && Path::new("/usr/sbin/debootstrap").exists() {
        return Ok(());
    }
    apt_install(&["podman", "debootstrap"]).map_err(|e| format!("podman and debootstrap cannot be installed: {e}"))
}

/// What Kubernetes' `readOnlyRootFilesystem` would give: nothing in the filesystem writable by
/// anyone but root (the directories distroless leaves writable, /tmp and the home, included).
fn read_only(rootfs: &Path) {
    for dir in ["tmp", "home/nonroot"] {
        let path = rootfs.join(dir);
        std::os::unix::fs::chown(&path, Some(0), Some(0)).expect("chown");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    }
}

/// FNV-1a, to name the base tar after its script's contents.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Every path under `dir` (not following links), relative to it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("reads a directory") {
            let path = entry.expect("an entry").path();
            if std::fs::symlink_metadata(&path).expect("metadata").is_dir() {
                stack.push(path.clone());
            }
            out.push(path.strip_prefix(dir).expect("under dir").to_path_buf());
        }
    }
    out.sort();
    out
}

/// The image's entrypoint run in a copy of its filesystem with `chroot`, as the image's user,
/// with only the image's environment plus `env`, and `args` for its command.
fn in_image(image: &Image, rootfs: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let chroot = if Path::new("/usr/sbin/chroot").exists() { "/usr/sbin/chroot" } else { "chroot" };
    let mut cmd = Command::new(chroot);
    cmd.arg(format!("--userspec={}", image.user())).arg(rootfs);
    cmd.args(image.entrypoint()).args(args);
    cmd.env_clear().envs(image.env()).envs(env.iter().copied());
    cmd
}

/// The image's `serve` on loopback ports (the image's `DSG_LISTEN` and `DSG_ADMIN_LISTEN`
/// overridden, as the ConfigMap could); the process, the gRPC URL and the admin URL.
fn serve_in_image(image: &Image, rootfs: &Path, args: &[&str], env: &[(&str, &str)]) -> (Running, String, String) {
    let mut env = env.to_vec();
    env.extend([("DSG_LISTEN", "127.0.0.1:0"), ("DSG_ADMIN_LISTEN", "127.0.0.1:0")]);
    let mut child = in_image(image, rootfs, args, &env)
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("DSG_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .expect("chroot runs");
    let lines = stdout_lines(&mut child, 2);
    let grpc = lines[0].strip_prefix("listening on ").expect("gRPC address line").to_owned();
    let admin = lines[1].strip_prefix("admin on ").expect("admin address line").to_owned();
    (Running(child), grpc, admin)
}

/// The image's `query` against `gateway`: a day of hourly sums for one queue.
fn query_in_image(image: &Image, rootfs: &Path, gateway: &str, timeout: &str) -> std::process::Output {
    let (farm, queue) = (farm(23), queue(1));
    in_image(image, rootfs, &[], &[])
        .args(["query", "--gateway", gateway, "--farm-id", &farm, "--queue-ids", &queue, "--quiet"])
        .args(["--start", "2026-10-01T00:00:00Z", "--end", "2026-10-02T00:00:00Z", "--timeout", timeout])
        .args(["--group-by", "usage-type", "--statistics", "sum", "--period", "hourly", "--format", "csv"])
        .output()
        .expect("query runs")
}

/// A private copy of the image's filesystem, for a test that changes it.
fn copy_of(rootfs: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join("rootfs");
    run(Command::new("cp").arg("-a").arg(rootfs).arg(&copy), "cp -a");
    copy
}

async fn built() -> Option<&'static Image> {
    tokio::task::spawn_blocking(image).await.expect("the build does not panic")
}

#[tokio::test]
async fn the_image_is_configured_as_the_deployment_runs_it() {
    let Some(image) = built().await else { return };

    // The Deployment's pod: runAsUser/runAsGroup 65532, args, container ports.
    let deployment: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/kubernetes/base/deployment.yaml")).expect("deployment.yaml"),
    )
    .expect("YAML");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let id = |key: &str| pod["securityContext"][key].as_u64().expect("a numeric id");
    assert_eq!(image.user(), format!("{}:{}", id("runAsUser"), id("runAsGroup")), "the image's user is the pod's");
    assert_eq!(image.user(), "65532:65532");
    let args: Vec<String> = serde_yaml_ng::from_value(container["args"].clone()).expect("args");
    assert_eq!(image.cmd(), args, "the image's command is the Deployment's args");
    assert_eq!(image.entrypoint(), vec![format!("/usr/local/bin/{BINARY}")]);
    let mut ports: Vec<String> = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| format!("{}/{}", p["containerPort"].as_u64().expect("a port"), "tcp"))
        .collect();
    ports.sort();
    let mut exposed: Vec<String> =
        image.config["ExposedPorts"].as_object().expect("exposed ports").keys().cloned().collect();
    exposed.sort();
    assert_eq!(exposed, ports, "EXPOSE matches the container ports");
    let env = image.env();
    for (k, v) in [("DSG_LISTEN", "0.0.0.0:50051"), ("DSG_ADMIN_LISTEN", "0.0.0.0:9090"), ("DSG_LOG_FORMAT", "json")] {
        assert!(env.iter().any(|(n, val)| n == k && val == v), "{k}={v} in {env:?}");
    }

    // Distroless: no shell, no package manager, no programs but the gateway.
    let programs: Vec<PathBuf> = ["usr/bin", "usr/sbin", "usr/local/bin", "usr/local/sbin"]
        .iter()
        .filter(|d| image.rootfs.join(d).is_dir())
        .flat_map(|d| walk(&image.rootfs.join(d)).into_iter().map(move |p| Path::new(d).join(p)))
        .collect();
    assert_eq!(programs, vec![PathBuf::from(format!("usr/local/bin/{BINARY}"))], "the only program");
    for shell in ["bin/sh", "bin/bash", "bin/dash", "bin/busybox", "usr/bin/sh"] {
        assert!(std::fs::symlink_metadata(image.rootfs.join(shell)).is_err(), "{shell} is in the image");
    }
    let binary = std::fs::metadata(image.rootfs.join("usr/local/bin").join(BINARY)).expect("the binary");
    assert_eq!((binary.uid(), binary.mode() & 0o7777), (0, 0o555), "root's, read and execute only");

    // Nothing writable by the user the pod runs as (what readOnlyRootFilesystem enforces).
    for path in walk(&image.rootfs) {
        let meta = std::fs::symlink_metadata(image.rootfs.join(&path)).expect("metadata");
        if meta.file_type().is_symlink() {
            continue;
        }
        assert!(meta.uid() != 65532 && meta.mode() & 0o002 == 0, "{} is writable by 65532", path.display());
    }

    // Every library the binary needs, found by the image's own dynamic loader in the image.
    let rootfs = image.rootfs.to_str().expect("a UTF-8 path");
    let listed = run(
        Command::new("chroot")
            .args([rootfs, "/lib64/ld-linux-x86-64.so.2", "--list"])
            .arg(format!("/usr/local/bin/{BINARY}")),
        "the image's ld.so --list",
    );
    assert!(!listed.contains("not found"), "{listed}");
    let needed =
        run(Command::new("readelf").args(["-d"]).arg(image.rootfs.join("usr/local/bin").join(BINARY)), "readelf");
    let needed: Vec<&str> = needed
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(!needed.is_empty(), "a dynamically linked binary");
    for lib in needed {
        assert!(listed.contains(lib), "{lib} is not resolved in the image: {listed}");
    }

    // The CA bundle the binary's TLS clients (rustls-native-certs) read, and the time zones.
    let bundle = std::fs::read_to_string(image.rootfs.join("etc/ssl/certs/ca-certificates.crt")).expect("a CA bundle");
    assert!(bundle.matches("BEGIN CERTIFICATE").count() > 100, "Debian's public CAs");
    assert!(image.rootfs.join("usr/share/zoneinfo/Europe/Paris").exists(), "tzdata");

    // Size: what a node pulls (uncompressed). The release binary is most of it.
    eprintln!("image size: {:.1} MB", image.size as f64 / 1e6);
    assert!(image.size < 120_000_000, "the image is {} bytes", image.size);
}

#[tokio::test]
async fn the_binary_serves_from_the_image_as_its_user_and_drains_on_sigterm() {
    let Some(image) = built().await else { return };
    let (mut gateway, grpc, admin) = serve_in_image(
        image,
        &image.rootfs,
        &["serve", "--upstream", "emulator", "--emulator-aggregation-duration", "200ms"],
        &[],
    );

    // The process runs as the image's user.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.0.id())).expect("its status");
    let uid = status.lines().find(|l| l.starts_with("Uid:")).expect("a Uid line");
    assert_eq!(uid.split_whitespace().skip(1).collect::<Vec<_>>(), vec!["65532"; 4], "{uid}");

    // gRPC health, as a client outside the image sees it.
    let channel = tonic::transport::Channel::from_shared(grpc.clone()).expect("URL").connect().await.expect("connects");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers")
        .into_inner();
    assert_eq!(serving.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    // The probes' endpoints and the scrape.
    let (status, _, body) = http("GET", &format!("{admin}/readyz"), None, &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = http("GET", &format!("{admin}/metrics"), None, &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("dsg_"), "{body}");

    // A real query, by the image's binary too.
    let out = tokio::task::spawn_blocking({
        let (grpc, rootfs) = (grpc.clone(), image.rootfs.clone());
        move || query_in_image(image, &rootfs, &grpc, "60s")
    })
    .await
    .expect("joins");
    assert!(out.status.success(), "query failed: {}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.starts_with("start,end,usage_type,count,cost_sum"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 3 * 24, "{csv}");

    gateway.terminate();
    let exit = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(40))).await.expect("joins");
    assert!(exit.success(), "SIGTERM drains and exits 0: {exit}");
}

#[tokio::test]
async fn the_aws_upstream_is_reached_over_tls_trusting_the_image_ca_bundle() {
    let Some(image) = built().await else { return };
    let dir = test_dir("image-tls");
    let ca = TestCa::new("a private CA");
    let cert = ca.server(&dir, "deadline");
    let emu = emulator(Duration::from_millis(100), Duration::from_secs(600)).await;
    let front = TlsFront::spawn(emu.addr(), &cert).await;
    let rootfs = copy_of(&image.rootfs, &dir);
    let endpoint = format!("https://127.0.0.1:{}", front.port);
    let aws_env = [
        ("AWS_ENDPOINT_URL_DEADLINE", endpoint.as_str()),
        ("AWS_REGION", "us-west-2"),
        ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];

    // The image's command (`serve --upstream aws`). The endpoint's CA is in no public bundle:
    // the SDK's TLS client refuses it.
    let (gateway, grpc, _) =
        serve_in_image(image, &rootfs, &image.cmd().iter().map(String::as_str).collect::<Vec<_>>(), &aws_env);
    let out = tokio::task::spawn_blocking({
        let (grpc, rootfs) = (grpc.clone(), rootfs.clone());
        move || query_in_image(image, &rootfs, &grpc, "3s")
    })
    .await
    .expect("joins");
    assert!(!out.status.success(), "no aggregation through an untrusted endpoint");
    let refused = eventually(Duration::from_secs(20), || {
        let front = front.handshakes.clone();
        async move { front.lock().expect("lock").iter().find_map(|h| h.clone().err()) }
    })
    .await;
    assert!(refused.contains("UnknownCA"), "the client rejected the certificate's issuer: {refused}");
    drop(gateway);

    // The CA added to the image's bundle (as an operator's image built FROM this one would):
    // trusted, so the bundle the binary reads is that file of the image.
    let bundle = rootfs.join("etc/ssl/certs/ca-certificates.crt");
    let mut pem = std::fs::read_to_string(&bundle).expect("the bundle");
    pem.push_str(&ca.pem());
    std::fs::write(&bundle, pem).expect("writes the bundle");
    let (mut gateway, grpc, _) =
        serve_in_image(image, &rootfs, &image.cmd().iter().map(String::as_str).collect::<Vec<_>>(), &aws_env);
    let out = tokio::task::spawn_blocking({
        let (grpc, rootfs) = (grpc.clone(), rootfs.clone());
        move || query_in_image(image, &rootfs, &grpc, "60s")
    })
    .await
    .expect("joins");
    assert!(out.status.success(), "query failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1 + 3 * 24);
    let hosts: Vec<String> = serde_json::from_value(stats(&emu).await["hosts"].clone()).expect("hosts");
    assert!(hosts.iter().all(|h| *h == format!("127.0.0.1:{}", front.port)), "through the TLS endpoint: {hosts:?}");
    assert!(!hosts.is_empty());
    gateway.terminate();
    let exit = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(40))).await.expect("joins");
    assert!(exit.success(), "{exit}");
}

/// A TLS endpoint on a loopback port in front of the (plain HTTP) emulator, as the real service
/// is: every handshake's outcome is kept.
struct TlsFront {
    port: u16,
    handshakes: Arc<Mutex<Vec<Result<(), String>>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl TlsFront {
    async fn spawn(target: std::net::SocketAddr, cert: &IssuedCert) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).expect("PEM")],
                PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("PEM"),
            )
            .expect("a server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let port = listener.local_addr().expect("an address").port();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Err(e) => seen.lock().expect("lock").push(Err(e.to_string())),
                        Ok(mut tls) => {
                            seen.lock().expect("lock").push(Ok(()));
                            if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                            }
                        }
                    }
                });
            }
        });
        Self { port, handshakes, accepting }
    }
}

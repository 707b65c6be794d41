//! Who may ask for what, against the real `serve` process: mutual TLS with certificates made
//! for the test (a CA, a server certificate, two tenants' client certificates with different
//! SPIFFE ids, and one from another CA), the identity sources and their spoofing cases, and a
//! per-farm policy file reloaded while the gateway runs.

mod common;

use common::*;
use deadline_stats_gateway::grpc::pb::aggregation_service_client::AggregationServiceClient;
use deadline_stats_gateway::grpc::pb::{Disposition, GroupBy};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_types::StatusExt as _;

const BILLING: &str = "spiffe://cluster.local/ns/billing/sa/reports";
const OPS: &str = "spiffe://cluster.local/ns/ops/sa/viewer";

/// The policy of these tests: billing may use farms 201 and 203, ops farms 202 and 203.
fn policy(extra: &str) -> String {
    format!(
        "[[rule]]\nidentities = [\"spiffe://cluster.local/ns/billing/sa/*\"]\nfarms = [\"{}\", \"{}\"]\n\n\
         [[rule]]\nidentities = [\"{OPS}\"]\nfarms = [\"{}\", \"{}\"]\n{extra}",
        farm(201),
        farm(203),
        farm(202),
        farm(203)
    )
}

/// A gateway with mutual TLS and the policy, its certificates, and its logs.
struct Secured {
    // Dropped first: the gateway stops before its directory goes.
    _process: Running,
    url: String,
    admin: String,
    dir: TestDir,
    ca: TestCa,
    server: IssuedCert,
    billing: IssuedCert,
    ops: IssuedCert,
    logs: PathBuf,
}

fn secured(name: &str) -> Secured {
    let dir = test_dir(name);
    let ca = TestCa::new("gateway test CA");
    let server = ca.server(&dir, "server");
    let (billing, ops) = (ca.client(&dir, "billing", BILLING), ca.client(&dir, "ops", OPS));
    let ca_file = ca.write(&dir, "ca.crt");
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, policy("")).expect("writes");
    let logs = dir.join("gateway.log");
    let log_file = std::fs::File::create(&logs).expect("a log file");
    let (cert, key, ca_arg, policy_arg) = (path(&server.cert), path(&server.key), path(&ca_file), path(&policy_file));
    let (process, url, admin) = spawn_serve_logging(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca_arg,
            "--authz-policy",
            &policy_arg,
            "--log-format",
            "json",
            "--emulator-aggregation-duration",
            "200ms",
            "--poll-initial-interval",
            "50ms",
        ],
        &[],
        log_file.into(),
    );
    Secured { _process: process, url, admin, dir, ca, server, billing, ops, logs }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

type Client = AggregationServiceClient<Channel>;

/// A client over TLS trusting `ca_pem`, presenting `cert` when given.
async fn tls_client(url: &str, ca_pem: &str, cert: Option<&IssuedCert>) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    if let Some(c) = cert {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    let channel = Channel::from_shared(url.to_owned()).expect("URL").tls_config(tls)?.connect().await?;
    Ok(Client::new(channel))
}

fn reason(status: &tonic::Status) -> Option<(String, std::collections::HashMap<String, String>)> {
    status.get_details_error_info().map(|i| (i.reason, i.metadata))
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_of_its_ca() {
    let g = secured("mtls");
    let good = tls_client(&g.url, &g.ca.pem(), Some(&g.billing)).await.expect("a client of the CA connects");
    let ok = good.clone().start_aggregation(start_request(201, 1, 1, &[GroupBy::QueueId])).await;
    assert!(ok.is_ok(), "{ok:?}");

    let rogue_ca = TestCa::new("another CA");
    let rogue = rogue_ca.client(&g.dir, "rogue", BILLING);
    for (who, cert) in [("no certificate", None), ("another CA's certificate", Some(&rogue))] {
        // Refused at the handshake: the connection fails, or the call fails with the
        // transport's error (the server closed the connection), never an answer of the service.
        if let Ok(mut client) = tls_client(&g.url, &g.ca.pem(), cert).await {
            match client.start_aggregation(start_request(201, 1, 1, &[GroupBy::QueueId])).await {
                Ok(r) => panic!("{who}: served {r:?}"),
                Err(status) => {
                    let transport = std::error::Error::source(&status)
                        .is_some_and(|e| e.downcast_ref::<tonic::transport::Error>().is_some());
                    assert!(transport, "{who}: {status:?}");
                }
            }
        }
    }
    // Plaintext to a TLS listener is not served either.
    let plain = Channel::from_shared(g.url.replace("https://", "http://")).expect("URL").connect().await;
    if let Ok(channel) = plain {
        let r = Client::new(channel).start_aggregation(start_request(201, 1, 1, &[GroupBy::QueueId])).await;
        assert!(r.is_err(), "plaintext served: {r:?}");
    }
}

#[tokio::test]
async fn tenants_start_and_read_only_their_farms_and_share_what_both_may_read() {
    let g = secured("tenants");
    let mut billing = tls_client(&g.url, &g.ca.pem(), Some(&g.billing)).await.expect("connects");
    let mut ops = tls_client(&g.url, &g.ca.pem(), Some(&g.ops)).await.expect("connects");

    let started = billing.start_aggregation(start_request(201, 2, 3, &[GroupBy::QueueId])).await.expect("allowed");
    let id = started.into_inner().aggregation.expect("aggregation").aggregation_id;
    let done = wait_terminal(&mut billing, &id).await;
    let first = billing.get_aggregation(get_request(&id, 50, "", Duration::ZERO)).await.expect("own farm").into_inner();
    assert!(!first.next_page_token.is_empty(), "{} rows in pages of 50", done.aggregation.map_or(0, |a| a.row_count));

    // A Start on a farm the caller may not use, even with headers naming the other tenant.
    let mut spoofed = tonic::Request::new(start_request(202, 1, 1, &[GroupBy::QueueId]));
    for (name, value) in [
        ("x-caller-id", OPS.to_owned()),
        ("l5d-client-id", "viewer.ops".to_owned()),
        ("x-forwarded-client-cert", format!("URI={OPS}")),
    ] {
        spoofed.metadata_mut().insert(name, value.parse().expect("ascii"));
    }
    let denied = billing.start_aggregation(spoofed).await.expect_err("farm 202 is not billing's");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let (why, meta) = reason(&denied).expect("ErrorInfo");
    assert_eq!(why, "FARM_NOT_ALLOWED");
    assert_eq!((meta["farm_id"].as_str(), meta["method"].as_str()), (farm(202).as_str(), "StartAggregation"));

    // The other tenant holding the id learns nothing: a Get, a long-poll, a later page.
    for (what, request) in [
        ("a Get", get_request(&id, 50, "", Duration::ZERO)),
        ("a long-poll", get_request(&id, 50, "", Duration::from_secs(60))),
        ("a later page", get_request(&id, 50, &first.next_page_token, Duration::ZERO)),
    ] {
        let denied = ops.get_aggregation(request).await.expect_err(what);
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{what}: {denied:?}");
        assert_eq!(reason(&denied).map(|r| r.0).as_deref(), Some("FARM_NOT_ALLOWED"), "{what}");
        assert!(denied.message().contains("GetAggregation"), "{what}: {}", denied.message());
    }
    let watch = deadline_stats_gateway::grpc::pb::WatchAggregationRequest { aggregation_id: id.clone() };
    let denied = ops.watch_aggregation(watch).await.expect_err("a watch of another tenant's aggregation");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(reason(&denied).map(|r| r.0).as_deref(), Some("FARM_NOT_ALLOWED"));
    assert!(denied.message().contains("WatchAggregation"), "{}", denied.message());

    // Both may use farm 203: their identical Starts are one aggregation, readable by both.
    let request = start_request(203, 1, 2, &[GroupBy::QueueId]);
    let a = billing.start_aggregation(request.clone()).await.expect("allowed").into_inner();
    let b = ops.start_aggregation(request).await.expect("allowed").into_inner();
    let shared_id = a.aggregation.expect("aggregation").aggregation_id;
    assert_eq!(b.disposition(), Disposition::Joined);
    assert_eq!(b.aggregation.expect("aggregation").aggregation_id, shared_id, "coalesced across tenants");
    wait_terminal(&mut ops, &shared_id).await;
    billing.get_aggregation(get_request(&shared_id, 10, "", Duration::ZERO)).await.expect("readable by both");

    let (_, _, body) = http("GET", &format!("{}/metrics", g.admin), None, &[]).await;
    let denied = parse_metrics(&body).get("dsg_authz_denied_total{reason=\"farm_not_allowed\"}").copied();
    assert_eq!(denied, Some(5.0), "one Start, three Gets and a watch: {body}");
    let logs = std::fs::read_to_string(&g.logs).expect("logs");
    let audit = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"audit\"") && l.contains("farm_not_allowed"))
        .collect::<Vec<_>>();
    assert_eq!(audit.len(), 5, "an audit line per denial:\n{logs}");
    assert!(
        audit.iter().any(|l| l.contains(OPS) && l.contains(&farm(201)) && l.contains("GetAggregation")),
        "the audit line names identity, method and farm: {audit:?}"
    );
}

#[tokio::test]
async fn a_changed_policy_is_in_force_within_seconds_and_a_broken_one_keeps_the_last_good() {
    let g = secured("reload");
    let mut billing = tls_client(&g.url, &g.ca.pem(), Some(&g.billing)).await.expect("connects");
    let mut ops = tls_client(&g.url, &g.ca.pem(), Some(&g.ops)).await.expect("connects");
    let started = billing.start_aggregation(start_request(201, 1, 1, &[GroupBy::QueueId])).await.expect("allowed");
    let id = started.into_inner().aggregation.expect("aggregation").aggregation_id;
    let denied = ops.get_aggregation(get_request(&id, 10, "", Duration::ZERO)).await.expect_err("not yet");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let grant =
        format!("\n[[rule]]\nidentities = [\"{OPS}\"]\nfarms = [\"{}\"]\nmethods = [\"GetAggregation\"]\n", farm(201));
    std::fs::write(g.dir.join("policy.toml"), policy(&grant)).expect("writes");
    eventually(Duration::from_secs(15), || {
        let (mut ops, id) = (ops.clone(), id.clone());
        async move { ops.get_aggregation(get_request(&id, 10, "", Duration::ZERO)).await.ok() }
    })
    .await;

    std::fs::write(g.dir.join("policy.toml"), "[[rule]]\nidentities = [").expect("writes");
    let logs = g.logs.clone();
    eventually(Duration::from_secs(15), || {
        let logs = logs.clone();
        async move {
            let text = std::fs::read_to_string(&logs).ok()?;
            text.contains("the changed authorization policy is invalid").then_some(())
        }
    })
    .await;
    ops.get_aggregation(get_request(&id, 10, "", Duration::ZERO)).await.expect("the last good policy stays");
}

#[tokio::test]
async fn rotated_certificate_files_serve_new_connections_and_keep_open_ones() {
    let g = secured("rotate");
    let mut open = tls_client(&g.url, &g.ca.pem(), Some(&g.billing)).await.expect("connects");
    open.start_aggregation(start_request(201, 1, 1, &[GroupBy::QueueId])).await.expect("served");
    let before = served_certificate(&g).await;
    assert_eq!(before, der_of(&g.server.cert_pem));

    // cert-manager writes the new pair in place.
    let renewed = g.ca.server(&g.dir, "server-renewed");
    std::fs::write(&g.server.key, &renewed.key_pem).expect("writes");
    std::fs::write(&g.server.cert, &renewed.cert_pem).expect("writes");
    let want = der_of(&renewed.cert_pem);
    eventually(Duration::from_secs(15), || {
        let want = want.clone();
        let g = &g;
        async move { (served_certificate(g).await == want).then_some(()) }
    })
    .await;
    open.start_aggregation(start_request(201, 1, 2, &[GroupBy::QueueId]))
        .await
        .expect("the open connection still works");
    tls_client(&g.url, &g.ca.pem(), Some(&g.ops)).await.expect("new connections verify the new certificate");
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM").to_vec()
}

/// The certificate the gateway presents to a new connection (a raw TLS handshake).
async fn served_certificate(g: &Secured) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(g.ca.pem().as_bytes()).expect("PEM")).expect("a root");
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(g.billing.cert_pem.as_bytes()).expect("PEM")],
            PrivateKeyDer::from_pem_slice(g.billing.key_pem.as_bytes()).expect("PEM"),
        )
        .expect("a client config");
    let addr = g.url.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connects");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tls = connector.connect(ServerName::try_from("localhost").expect("a name"), tcp).await.expect("handshakes");
    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default()
}

/// A plaintext gateway reading identities from `source`, with the policy.
/// The directory comes first, so a caller's bindings drop it last, after the gateway.
fn behind_a_mesh(name: &str, source: &str) -> (TestDir, Running, String, PathBuf) {
    let dir = test_dir(name);
    let linkerd_rule = format!(
        "\n[[rule]]\nidentities = [\"reports.billing.serviceaccount.identity.linkerd.cluster.local\"]\nfarms = [\"{}\"]\n",
        farm(201)
    );
    std::fs::write(dir.join("policy.toml"), policy(&linkerd_rule)).expect("writes");
    let logs = dir.join("gateway.log");
    let policy_arg = path(&dir.join("policy.toml"));
    let (process, url, _) = spawn_serve_logging(
        &["--identity-source", source, "--authz-policy", &policy_arg, "--log-format", "json"],
        &[],
        std::fs::File::create(&logs).expect("a log file").into(),
    );
    (dir, process, url, logs)
}

/// A Start on farm 201 with `headers`: its code.
async fn start_with(url: &str, headers: &[(&str, &str)]) -> tonic::Code {
    let mut client = client_of(url).await;
    let mut request = tonic::Request::new(start_request(201, 1, 1, &[GroupBy::QueueId]));
    for (k, v) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).expect("a metadata key");
        request.metadata_mut().insert(key, v.parse().expect("ascii"));
    }
    match client.start_aggregation(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn each_identity_source_trusts_only_its_own_place() {
    use tonic::Code::{Ok, PermissionDenied, Unauthenticated};
    const LINKERD_ID: &str = "reports.billing.serviceaccount.identity.linkerd.cluster.local";
    let xfcc = format!("By=spiffe://cluster.local/ns/gw/sa/gw;Hash=abc;URI={BILLING}");
    let xfcc_ops = format!("URI={OPS}");

    let (_dir, _linkerd, url, logs) = behind_a_mesh("linkerd", "linkerd");
    assert_eq!(start_with(&url, &[]).await, Unauthenticated, "linkerd: no header, no identity");
    assert_eq!(start_with(&url, &[("x-caller-id", BILLING)]).await, Unauthenticated, "linkerd ignores x-caller-id");
    assert_eq!(start_with(&url, &[("x-forwarded-client-cert", &xfcc)]).await, Unauthenticated, "and XFCC");
    assert_eq!(start_with(&url, &[("l5d-client-id", LINKERD_ID)]).await, Ok);
    assert_eq!(start_with(&url, &[("l5d-client-id", "viewer.ops.serviceaccount")]).await, PermissionDenied);
    let text = std::fs::read_to_string(&logs).expect("logs");
    assert!(
        text.contains("can be spoofed by any caller that reaches the gateway without going through the mesh"),
        "{text}"
    );

    let (_dir, _xfcc, url, _) = behind_a_mesh("xfcc", "xfcc");
    assert_eq!(start_with(&url, &[("x-caller-id", BILLING)]).await, Unauthenticated, "xfcc ignores x-caller-id");
    assert_eq!(start_with(&url, &[("l5d-client-id", LINKERD_ID)]).await, Unauthenticated, "and l5d-client-id");
    assert_eq!(start_with(&url, &[("x-forwarded-client-cert", &xfcc)]).await, Ok);
    assert_eq!(start_with(&url, &[("x-forwarded-client-cert", &xfcc_ops)]).await, PermissionDenied);

    let (_dir, _header, url, logs) = behind_a_mesh("header", "header");
    assert_eq!(start_with(&url, &[]).await, Unauthenticated);
    assert_eq!(start_with(&url, &[("l5d-client-id", LINKERD_ID)]).await, Unauthenticated, "header ignores l5d");
    assert_eq!(start_with(&url, &[("x-caller-id", BILLING)]).await, Ok, "anyone may claim any identity");
    let text = std::fs::read_to_string(&logs).expect("logs");
    assert!(text.contains("anyone can claim any identity"), "the log says the header can be spoofed: {text}");
}

#[tokio::test]
async fn without_a_policy_everything_is_allowed_and_the_log_says_so() {
    let dir = test_dir("open");
    let logs = dir.join("gateway.log");
    let (_process, url, _) =
        spawn_serve_logging(&["--log-format", "json"], &[], std::fs::File::create(&logs).expect("a log file").into());
    assert_eq!(start_with(&url, &[]).await, tonic::Code::Ok);
    let text = std::fs::read_to_string(&logs).expect("logs");
    assert!(text.contains("no --authz-policy: every caller may start and read aggregations of every farm"), "{text}");
}

#[test]
fn query_reaches_a_gateway_with_mutual_tls_with_a_client_certificate() {
    let g = secured("query");
    let ca = g.dir.join("ca.crt");
    let query = |cert: Option<&IssuedCert>| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["query", "--gateway", &g.url, "--tls-ca", &path(&ca), "--tls-server-name", "localhost"])
            .args(["--farm-id", &farm(201), "--queue-ids", &queue(1)])
            .args(["--start", "2026-10-01T00:00:00Z", "--end", "2026-10-02T00:00:00Z"])
            .args(["--group-by", "queue-id", "--statistics", "sum", "--period", "hourly", "--format", "csv"]);
        if let Some(c) = cert {
            cmd.args(["--tls-cert", &path(&c.cert), "--tls-key", &path(&c.key)]);
        }
        cmd.output().expect("query runs")
    };
    let out = query(Some(&g.billing));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1 + 24, "a header and 24 hours");
    let refused = query(Some(&g.ops));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!query(None).status.success(), "no certificate, no answer");
}

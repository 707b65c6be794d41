//! `bench cache-hit --tls`: mutual TLS and an authorization policy on the gateway, the same
//! TLS on the baseline (tonic's own, client certificates required), and load generator
//! connections that present a client certificate.
//!
//! The certificates are made for the run (see [`super::certs`]) in a directory removed at the
//! end. The caller's identity is its certificate's URI SAN, and the policy lets it read every
//! farm, so each Get pays for identification and a policy check as a production caller does.

use super::certs::{Authority, Issued};
use super::process::BenchError;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::PathBuf;
use std::sync::Arc;

/// The identity the load generator's certificate names.
pub(crate) const CALLER: &str = "spiffe://bench.local/ns/bench/sa/load";

/// The run's certificates and policy, in a directory of its own.
pub(crate) struct BenchTls {
    dir: PathBuf,
    ca: PathBuf,
    ca_pem: String,
    server: Issued,
    client: Issued,
    policy: PathBuf,
}

impl BenchTls {
    pub(crate) fn make() -> Result<Self, BenchError> {
        let dir = std::env::temp_dir().join(format!("dsg-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let authority = Authority::new("bench CA")?;
        let ca = authority.write(&dir, "ca.crt")?;
        let server = authority.server(&dir, "server")?;
        let client = authority.client(&dir, "load", CALLER)?;
        let policy = dir.join("policy.toml");
        std::fs::write(&policy, format!("[[rule]]\nidentities = [\"{CALLER}\"]\nfarms = [\"*\"]\n"))?;
        Ok(Self { dir, ca, ca_pem: authority.pem(), server, client, policy })
    }

    /// `serve` flags: mutual TLS (identities from client certificates) and the policy.
    pub(crate) fn gateway_flags(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            path(&self.server.cert),
            "--tls-key".into(),
            path(&self.server.key),
            "--tls-client-ca".into(),
            path(&self.ca),
            "--authz-policy".into(),
            path(&self.policy),
        ]
    }

    /// `bench-baseline` flags: the same certificate, client certificates required.
    pub(crate) fn baseline_flags(&self) -> Vec<String> {
        let flags = self.gateway_flags();
        flags[..6].to_vec()
    }

    /// A tonic channel's TLS: the run's CA, the load generator's certificate.
    pub(crate) fn channel(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.client.cert_pem, &self.client.key_pem))
            .domain_name("localhost")
    }

    /// A TLS connector for the raw load generator connections: HTTP/2 by ALPN.
    pub(crate) fn connector(&self) -> Result<tokio_rustls::TlsConnector, BenchError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(ca?)?;
        }
        let certs = CertificateDer::pem_slice_iter(self.client.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(self.client.key_pem.as_bytes())?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// The name the server's certificate is checked against.
    pub(crate) fn server_name() -> Result<ServerName<'static>, BenchError> {
        Ok(ServerName::try_from("localhost")?)
    }
}

impl Drop for BenchTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

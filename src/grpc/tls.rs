//! TLS on the gRPC listener: the server's certificate chain and key (PEM files), and
//! optionally a bundle of client CAs that turns on mutual TLS (a client without a certificate
//! signed by one of them fails the handshake).
//!
//! The files are read again when their contents change (cert-manager rotates them in place;
//! a mounted Secret swaps a symlink): new connections get the new configuration, open ones
//! keep theirs. A change that does not load (a half-written file, a key that does not match)
//! is logged and the last good configuration stays in force.

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The PEM files TLS is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; `None`: clients are not asked for one.
    pub client_ca: Option<PathBuf>,
}

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {what}")]
    Pem { path: String, what: String },
    #[error("the TLS configuration is not usable: {0}")]
    Config(String),
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()].into_iter().chain(self.client_ca.as_deref())
    }

    /// The files' contents, to tell when any of them changed.
    fn fingerprint(&self) -> Result<Vec<Vec<u8>>, TlsError> {
        self.paths().map(read).collect()
    }

    /// A server configuration from the files as they are now: HTTP/2 only (ALPN `h2`), TLS 1.2
    /// and 1.3.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certs = certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?).map_err(|e| TlsError::Pem {
            path: self.key.display().to_string(),
            what: format!("no usable private key: {e}"),
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in certificates(path)? {
                    roots.add(ca).map_err(|e| TlsError::Pem {
                        path: path.display().to_string(),
                        what: format!("a CA certificate is not usable: {e}"),
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CAs of {}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("the certificate and key do not go together: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |what: String| TlsError::Pem { path: path.display().to_string(), what };
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(pem("holds no certificate".to_owned()));
    }
    Ok(certs)
}

/// The TLS configuration in force, replaced when its files change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    seen: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl ReloadingTls {
    /// Loads `files`; an error here stops start-up.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let seen = files.fingerprint()?;
        let config = files.load()?;
        Ok(Self { files, current: RwLock::new(config), seen: std::sync::Mutex::new(seen) })
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl super::reload::Reload for ReloadingTls {
    /// Reads the files again if they changed; whether a new configuration is in force.
    fn reload_if_changed(&self) -> bool {
        let Ok(now) = self.files.fingerprint() else {
            // Mid-rotation a file may be missing for a moment: try again next time.
            return false;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        match self.files.load() {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
                *seen = now;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed; new connections use them");
                true
            }
            Err(e) => {
                // Logged once per change of the files, not at every look.
                *seen = now;
                tracing::error!(error = %e, "TLS files changed but do not load; the previous certificate stays in force");
                false
            }
        }
    }
}

/// The identity a verified client certificate names: its first URI SAN (a SPIFFE id such as
/// `spiffe://cluster.local/ns/billing/sa/reports`), else its first DNS SAN.
pub(crate) fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let uri = names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        })
    };
    uri.or_else(dns).map(str::to_owned)
}

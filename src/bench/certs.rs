//! Real X.509 certificates made on the spot (rcgen): a certificate authority, server
//! certificates for `localhost` and 127.0.0.1, and client certificates naming a caller, each
//! written as PEM files. `bench cache-hit --tls` uses them; so do the integration tests.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use std::path::{Path, PathBuf};

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot make a certificate: {0}")]
    Make(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{0:?} is not a name a certificate can hold")]
    Name(String),
}

/// A certificate authority.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, and where they were written.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Authority {
    pub fn new(name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, key)? })
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<PathBuf, CertError> {
        let path = dir.join(name);
        write(&path, &self.pem())?;
        Ok(path)
    }

    /// A server certificate for `localhost` and 127.0.0.1, written as `dir/name.{crt,key}`.
    pub fn server(&self, dir: &Path, name: &str) -> Result<Issued, CertError> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(params, dir, name)
    }

    /// A client certificate whose URI SAN is `uri` (a SPIFFE id), or, when `uri` is not a URI,
    /// whose DNS SAN it is.
    pub fn client(&self, dir: &Path, name: &str, uri: &str) -> Result<Issued, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let bad = || CertError::Name(uri.to_owned());
        let san = if uri.contains("://") {
            SanType::URI(uri.try_into().map_err(|_| bad())?)
        } else {
            SanType::DnsName(uri.try_into().map_err(|_| bad())?)
        };
        params.subject_alt_names.push(san);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(params, dir, name)
    }

    fn issue(&self, params: CertificateParams, dir: &Path, name: &str) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let (cert_path, key_path) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        write(&cert_path, &cert_pem)?;
        write(&key_path, &key_pem)?;
        Ok(Issued { cert_pem, key_pem, cert: cert_path, key: key_path })
    }
}

fn write(path: &Path, text: &str) -> Result<(), CertError> {
    std::fs::write(path, text).map_err(|source| CertError::Write { path: path.to_owned(), source })
}

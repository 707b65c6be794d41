//! Real X.509 certificates made for a test (rcgen): a CA, server and client certificates it
//! signs, written as PEM files into a directory of the test's own.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use std::path::{Path, PathBuf};

/// A certificate authority of the test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, and where they were written.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a key");
        Self { issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate") }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).expect("writes");
        path
    }

    /// A server certificate for `localhost` and 127.0.0.1, written as `dir/name.{crt,key}`.
    pub fn server(&self, dir: &Path, name: &str) -> IssuedCert {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(params, dir, name)
    }

    /// A client certificate whose URI SAN is `uri` (a SPIFFE id), or, when `uri` is not a URI,
    /// whose DNS SAN it is.
    pub fn client(&self, dir: &Path, name: &str, uri: &str) -> IssuedCert {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        let san = if uri.contains("://") {
            SanType::URI(uri.try_into().expect("an IA5 URI"))
        } else {
            SanType::DnsName(uri.try_into().expect("an IA5 name"))
        };
        params.subject_alt_names.push(san);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(params, dir, name)
    }

    fn issue(&self, params: CertificateParams, dir: &Path, name: &str) -> IssuedCert {
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("signs");
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let (cert_path, key_path) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, &cert_pem).expect("writes");
        std::fs::write(&key_path, &key_pem).expect("writes");
        IssuedCert { cert_pem, key_pem, cert: cert_path, key: key_path }
    }
}

/// A fresh directory for a test's files, removed when dropped: keep it (declared) before, so
/// dropped after, any process that uses its files.
pub fn test_dir(name: &str) -> TestDir {
    let dir = std::env::temp_dir().join(format!("dsg-{name}-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("a directory");
    TestDir(dir)
}

/// A test's directory; see [`test_dir`].
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

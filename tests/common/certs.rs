//! Real X.509 certificates made for a test (the crate's own `bench::certs`, on rcgen): a CA,
//! server and client certificates it signs, written as PEM files into a directory of the
//! test's own.

use deadline_stats_gateway::bench::certs::Authority;
pub use deadline_stats_gateway::bench::certs::Issued as IssuedCert;
use std::path::{Path, PathBuf};

/// A certificate authority of the test.
pub struct TestCa(Authority);

impl TestCa {
    pub fn new(name: &str) -> Self {
        Self(Authority::new(name).expect("a CA certificate"))
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        self.0.write(dir, name).expect("writes")
    }

    /// A server certificate for `localhost` and 127.0.0.1, written as `dir/name.{crt,key}`.
    pub fn server(&self, dir: &Path, name: &str) -> IssuedCert {
        self.0.server(dir, name).expect("a server certificate")
    }

    /// A client certificate whose URI SAN is `uri` (a SPIFFE id), or, when `uri` is not a URI,
    /// whose DNS SAN it is.
    pub fn client(&self, dir: &Path, name: &str, uri: &str) -> IssuedCert {
        self.0.client(dir, name, uri).expect("a client certificate")
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

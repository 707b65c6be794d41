//! The console's bearer token, read from a file (a mounted Secret) and read again when the file
//! changes, so a rotated token is in force without a restart. A change that cannot be read
//! keeps the last good token.

use crate::grpc::reload::Reload;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The shortest token accepted: a guessable one is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("--admin-token-file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--admin-token-file {path}: the token must be at least {MIN_TOKEN_LEN} characters (after trimming whitespace)"
    )]
    TooShort { path: String },
}

/// The token in force, and the file it came from.
pub struct TokenFile {
    path: PathBuf,
    /// The token and the file's contents it came from.
    current: RwLock<(String, Vec<u8>)>,
}

fn read(path: &Path) -> Result<(String, Vec<u8>), TokenError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TokenError::Read { path: shown.clone(), source })?;
    let token = String::from_utf8_lossy(&bytes).trim().to_owned();
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort { path: shown });
    }
    Ok((token, bytes))
}

impl TokenFile {
    /// Reads the token now: a missing, unreadable or short one stops start-up.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        Ok(Self { path: path.to_owned(), current: RwLock::new(read(path)?) })
    }

    /// Whether `presented` is the token in force (compared in time independent of where they
    /// differ).
    pub fn admits(&self, presented: &str) -> bool {
        let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (a, b) = (current.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Reload for TokenFile {
    fn reload_if_changed(&self) -> bool {
        let unchanged =
            |bytes: &[u8]| self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).1.as_slice() == bytes;
        match std::fs::read(&self.path) {
            Ok(bytes) if unchanged(&bytes) => false,
            _ => match read(&self.path) {
                Ok(loaded) => {
                    *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
                    tracing::info!(path = %self.path.display(), "admin token reloaded");
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the admin token file changed but cannot be used; the last good token stays");
                    false
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_admitted_exactly_and_a_rotated_one_replaces_it() {
        let dir = std::env::temp_dir().join(format!("dsg-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let path = dir.join("token");
        std::fs::write(&path, "first-token-0123456789\n").expect("writes");
        let token = TokenFile::load(&path).expect("loads");
        assert!(token.admits("first-token-0123456789"));
        assert!(!token.admits("first-token-012345678"));
        assert!(!token.admits(""));
        std::fs::write(&path, "short").expect("writes");
        assert!(!token.reload_if_changed(), "a short token is not taken");
        assert!(token.admits("first-token-0123456789"), "the last good one stays");
        std::fs::write(&path, "second-token-0123456789").expect("writes");
        assert!(token.reload_if_changed());
        assert!(token.admits("second-token-0123456789") && !token.admits("first-token-0123456789"));
        assert!(matches!(TokenFile::load(&dir.join("missing")), Err(TokenError::Read { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

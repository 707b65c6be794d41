//! STS `AssumeRole` on the emulator's listener (the query protocol: a form body, an XML answer,
//! as botocore and the Rust SDK's role provider expect), reached through
//! `AWS_ENDPOINT_URL_STS` or a route's `sts_endpoint_url`.
//!
//! The credentials it hands out are checked by the Deadline endpoint of any emulator process
//! ([`super::sigv4`]): their secret and session token are derived from the key id and expiry
//! with a secret every emulator shares (`--sts-secret`), so no emulator needs another's state.
//! It must never be mistaken for STS: it checks no caller and grants everything.

use hmac::{Hmac, KeyInit, Mac};
use rand::Rng as _;
use sha2::Sha256;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The emulator's STS settings.
#[derive(Debug, Clone)]
pub struct StsConfig {
    /// How long credentials it hands out last.
    pub credential_lifetime: Duration,
    /// The `ExternalId` a role assumption must give (`None`: any or none).
    pub external_id: Option<String>,
    /// What credentials are derived with; the same in every emulator that must accept them.
    pub secret: String,
}

/// The shared secret of emulators that are not told another.
pub const DEFAULT_SECRET: &str = "deadline-stats-gateway-emulator";

impl Default for StsConfig {
    fn default() -> Self {
        Self { credential_lifetime: Duration::from_secs(3600), external_id: None, secret: DEFAULT_SECRET.to_owned() }
    }
}

/// Temporary credentials, as AssumeRole hands them out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret: String,
    pub session_token: String,
    pub expires: SystemTime,
}

impl StsConfig {
    /// New credentials, valid for the configured lifetime from `now`.
    pub fn issue(&self, now: SystemTime) -> Credentials {
        let mut rng = rand::rng();
        let suffix: String =
            (0..16).map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[rng.random_range(0..32)])).collect();
        let access_key = format!("ASIA{suffix}");
        let expires = now + self.credential_lifetime;
        let at = expires.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Credentials {
            secret: self.mac(&format!("secret|{access_key}|{at}")),
            session_token: format!("emu1.{access_key}.{at}.{}", self.mac(&format!("token|{access_key}|{at}"))),
            access_key,
            expires,
        }
    }

    /// The secret of `access_key` if `session_token` is one this STS (or another with the
    /// same secret) issued with it; why not, otherwise.
    pub fn secret_of(&self, access_key: &str, session_token: &str, now: SystemTime) -> Result<String, TokenError> {
        let mut parts = session_token.split('.');
        let (Some("emu1"), Some(key), Some(at), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        if key != access_key || self.mac(&format!("token|{key}|{at}")) != mac {
            return Err(TokenError::Invalid);
        }
        let expires = UNIX_EPOCH + Duration::from_secs(at.parse().map_err(|_| TokenError::Invalid)?);
        if now >= expires {
            return Err(TokenError::Expired);
        }
        Ok(self.mac(&format!("secret|{key}|{at}")))
    }

    fn mac(&self, data: &str) -> String {
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(self.secret.as_bytes()) else {
            return String::new();
        };
        mac.update(data.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Why a session token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Invalid,
    Expired,
}

/// An STS error in the query protocol's XML shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StsError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl StsError {
    pub(super) fn xml(&self) -> String {
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{}</RequestId></ErrorResponse>",
            self.code,
            escape(&self.message),
            request_id()
        )
    }
}

/// A role assumed: who asked for what, and the key it got.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Assumed {
    pub role_arn: String,
    pub session_name: String,
    pub access_key: String,
}

/// Answers an STS query (`Action=AssumeRole&…`, form-encoded): the XML body, or the error.
pub(super) fn assume_role(
    config: &StsConfig,
    form: &HashMap<String, String>,
    now: SystemTime,
) -> Result<(String, Assumed), StsError> {
    let invalid = |message: String| StsError { status: 400, code: "ValidationError", message };
    match form.get("Action").map(String::as_str) {
        Some("AssumeRole") => {}
        other => {
            return Err(StsError {
                status: 400,
                code: "InvalidAction",
                message: format!("the emulator's STS answers AssumeRole only, not {}", other.unwrap_or("nothing")),
            });
        }
    }
    let role_arn = form.get("RoleArn").cloned().unwrap_or_default();
    let session_name = form.get("RoleSessionName").cloned().unwrap_or_default();
    let Some((account, role)) = crate::domain::ids::role_arn_parts(&role_arn) else {
        return Err(invalid(format!("{role_arn} is invalid: a role ARN is arn:aws:iam::ACCOUNT:role/NAME")));
    };
    let name_ok = (2..=64).contains(&session_name.len())
        && session_name.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c));
    if !name_ok {
        return Err(invalid(format!(
            "1 validation error detected: Value '{session_name}' at 'roleSessionName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]*"
        )));
    }
    if let Some(expected) = &config.external_id
        && form.get("ExternalId") != Some(expected)
    {
        return Err(StsError {
            status: 403,
            code: "AccessDenied",
            message: format!("User is not authorized to perform: sts:AssumeRole on resource: {role_arn}"),
        });
    }
    let c = config.issue(now);
    let expiration = chrono::DateTime::<chrono::Utc>::from(c.expires).format("%Y-%m-%dT%H:%M:%SZ");
    let body = format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult><Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken>{}</SessionToken><Expiration>{expiration}</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROAEMULATOR{}:{}</AssumedRoleId><Arn>arn:aws:sts::{account}:assumed-role/{}/{}</Arn></AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata></AssumeRoleResponse>",
        c.access_key,
        c.secret,
        c.session_token,
        account,
        escape(&session_name),
        escape(role.rsplit('/').next().unwrap_or(role)),
        escape(&session_name),
        request_id(),
    );
    Ok((body, Assumed { role_arn, session_name, access_key: c.access_key }))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn request_id() -> String {
    uuid_like(rand::rng().random())
}

fn uuid_like(n: u128) -> String {
    let h = format!("{n:032x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_credentials_are_recognised_by_any_emulator_with_the_secret_until_they_expire() {
        let sts = StsConfig { credential_lifetime: Duration::from_secs(60), ..StsConfig::default() };
        let now = SystemTime::now();
        let c = sts.issue(now);
        assert!(c.access_key.starts_with("ASIA") && c.access_key.len() == 20);
        assert_eq!(sts.secret_of(&c.access_key, &c.session_token, now), Ok(c.secret.clone()));
        assert_eq!(
            sts.secret_of(&c.access_key, &c.session_token, now + Duration::from_secs(61)),
            Err(TokenError::Expired)
        );
        let other = StsConfig { secret: "another".into(), ..sts.clone() };
        assert_eq!(other.secret_of(&c.access_key, &c.session_token, now), Err(TokenError::Invalid));
        assert_eq!(sts.secret_of("ASIAOTHER", &c.session_token, now), Err(TokenError::Invalid), "another key's token");
    }

    #[test]
    fn role_arns_are_checked_as_sts_checks_them() {
        assert_eq!(
            crate::domain::ids::role_arn_parts("arn:aws:iam::123456789012:role/render/Stats"),
            Some(("123456789012", "render/Stats"))
        );
        for bad in ["arn:aws:iam::12345:role/x", "arn:aws:s3:::bucket", "arn:aws:iam::123456789012:user/x", "role"] {
            assert_eq!(crate::domain::ids::role_arn_parts(bad), None, "{bad}");
        }
    }
}

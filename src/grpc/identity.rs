//! Who is calling: the caller's identity, read from one source chosen at start-up, and the key
//! its token buckets are kept under.
//!
//! Only the chosen source is read: in `tls` mode a caller cannot name itself with a header, and
//! a mesh header is trusted only in its own mode (the gateway must then be reachable only
//! through the mesh, which sets or overwrites it).

use super::listener::PeerInfo;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use tonic::metadata::{Ascii, MetadataKey, MetadataMap};

/// The metadata key callers name themselves by in `header` mode.
pub const CALLER_ID_HEADER: &str = "x-caller-id";
/// The header a Linkerd proxy sets on meshed inbound requests: the client's mesh identity.
pub const LINKERD_HEADER: &str = "l5d-client-id";
/// The header Istio/Envoy sets with the client certificate it verified.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";
/// Longest identity accepted from any source.
const MAX_IDENTITY_LEN: usize = 512;

/// Where the caller's identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentitySource {
    /// The verified client certificate (mutual TLS): its URI SAN, else its first DNS SAN.
    Tls,
    /// `l5d-client-id`, set by the Linkerd proxy.
    Linkerd,
    /// The `URI=` of `x-forwarded-client-cert`, set by Istio/Envoy.
    Xfcc,
    /// `x-caller-id`, whatever the caller sends: unauthenticated.
    Header,
}

impl IdentitySource {
    /// The source when none is chosen: the certificate under mutual TLS, else the header.
    pub fn default_for(mutual_tls: bool) -> Self {
        if mutual_tls { Self::Tls } else { Self::Header }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Linkerd => "linkerd",
            Self::Xfcc => "xfcc",
            Self::Header => "header",
        }
    }

    /// What an operator must know about trusting it.
    pub fn trust(self) -> &'static str {
        match self {
            Self::Tls => "verified client certificates; cannot be spoofed",
            Self::Linkerd | Self::Xfcc => {
                "a header set by the mesh proxy; can be spoofed by any caller that reaches the gateway without going \
                 through the mesh"
            }
            Self::Header => "a header the caller chooses; anyone can claim any identity",
        }
    }

    /// The caller's identity, if this source names one.
    pub fn identify(self, metadata: &MetadataMap, peer: Option<&PeerInfo>) -> Option<Arc<str>> {
        // Keys made once: a key given as text is parsed and checked on every lookup.
        static KEYS: LazyLock<[MetadataKey<Ascii>; 3]> =
            LazyLock::new(|| [LINKERD_HEADER, XFCC_HEADER, CALLER_ID_HEADER].map(MetadataKey::from_static));
        let [linkerd, xfcc, caller] = &*KEYS;
        let header = |key| metadata.get(key).and_then(|v| v.to_str().ok()).filter(|v| sensible(v));
        match self {
            Self::Tls => peer.and_then(|p| p.certificate_identity.clone()),
            Self::Linkerd => header(linkerd).map(Arc::from),
            Self::Xfcc => header(xfcc).and_then(xfcc_uri).filter(|v| sensible(v)).map(Arc::from),
            Self::Header => header(caller).map(Arc::from),
        }
    }
}

fn sensible(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_IDENTITY_LEN && v.bytes().all(|b| b.is_ascii_graphic())
}

/// The `URI=` of the last element of an `x-forwarded-client-cert` header (the one the nearest
/// proxy, the sidecar, appended), unquoted. Elements are separated by `,`, pairs by `;`; a
/// quoted value may hold either.
pub fn xfcc_uri(header: &str) -> Option<String> {
    let last = split_unquoted(header, ',').pop()?;
    split_unquoted(&last, ';').into_iter().find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("uri").then(|| unquote(value.trim())).filter(|v| !v.is_empty())
    })
}

fn split_unquoted(s: &str, sep: char) -> Vec<String> {
    let (mut parts, mut current, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => {
                current.push(c);
                escaped = false;
            }
            '\\' if quoted => {
                current.push(c);
                escaped = true;
            }
            '"' => {
                current.push(c);
                quoted = !quoted;
            }
            _ if c == sep && !quoted => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => v.to_owned(),
    }
}

/// The key a caller's token buckets are kept under: its identity, else its IP address.
/// Made for every request, so built without the formatting machinery in the common cases.
pub fn bucket_key(identity: Option<&str>, peer: Option<&PeerInfo>) -> String {
    match (identity, peer.and_then(|p| p.remote_addr)) {
        (Some(id), _) => ["id:", id].concat(),
        (None, Some(addr)) => {
            let mut out = String::with_capacity(48);
            out.push_str("ip:");
            match addr.ip() {
                IpAddr::V4(v4) => {
                    for (i, octet) in v4.octets().into_iter().enumerate() {
                        if i > 0 {
                            out.push('.');
                        }
                        push_decimal(&mut out, octet);
                    }
                }
                IpAddr::V6(v6) => {
                    use std::fmt::Write as _;
                    let _ = write!(out, "{v6}");
                }
            }
            out
        }
        (None, None) => "unknown".to_owned(),
    }
}

fn push_decimal(out: &mut String, n: u8) {
    if n >= 100 {
        out.push(char::from(b'0' + n / 100));
    }
    if n >= 10 {
        out.push(char::from(b'0' + n / 10 % 10));
    }
    out.push(char::from(b'0' + n % 10));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(addr: &str, cert: Option<&str>) -> PeerInfo {
        PeerInfo { remote_addr: Some(addr.parse().expect("address")), certificate_identity: cert.map(Arc::from) }
    }

    #[test]
    fn bucket_keys_name_the_identity_or_the_peer_address() {
        for (addr, want) in [
            ("127.0.0.1:9", "ip:127.0.0.1"),
            ("10.200.3.45:1", "ip:10.200.3.45"),
            ("0.0.0.0:1", "ip:0.0.0.0"),
            ("255.255.255.255:1", "ip:255.255.255.255"),
            ("[::1]:1", "ip:::1"),
        ] {
            assert_eq!(bucket_key(None, Some(&peer(addr, None))), want);
        }
        assert_eq!(bucket_key(Some("render-farm"), Some(&peer("127.0.0.1:9", None))), "id:render-farm");
        assert_eq!(bucket_key(None, None), "unknown");
    }

    #[test]
    fn each_source_reads_only_its_own_place() {
        let mut md = MetadataMap::new();
        md.insert(CALLER_ID_HEADER, "claimed".parse().expect("ascii"));
        md.insert(LINKERD_HEADER, "reports.billing.serviceaccount.identity.linkerd.cluster.local".parse().expect("a"));
        md.insert(XFCC_HEADER, "By=spiffe://x/gw;Hash=ab;URI=spiffe://cluster.local/ns/a/sa/b".parse().expect("a"));
        let p = peer("127.0.0.1:1", Some("spiffe://cluster.local/ns/billing/sa/reports"));
        let id = |s: IdentitySource, peer: Option<&PeerInfo>| s.identify(&md, peer).map(|i| i.to_string());
        assert_eq!(id(IdentitySource::Tls, Some(&p)).as_deref(), Some("spiffe://cluster.local/ns/billing/sa/reports"));
        assert_eq!(id(IdentitySource::Tls, Some(&peer("127.0.0.1:1", None))), None, "no certificate, no identity");
        assert_eq!(
            id(IdentitySource::Linkerd, Some(&p)).as_deref(),
            Some("reports.billing.serviceaccount.identity.linkerd.cluster.local")
        );
        assert_eq!(id(IdentitySource::Xfcc, None).as_deref(), Some("spiffe://cluster.local/ns/a/sa/b"));
        assert_eq!(id(IdentitySource::Header, None).as_deref(), Some("claimed"));
        assert_eq!(IdentitySource::Linkerd.identify(&MetadataMap::new(), Some(&p)), None, "no header, no identity");
    }

    #[test]
    fn xfcc_takes_the_last_elements_uri_and_understands_quotes() {
        assert_eq!(xfcc_uri("URI=spiffe://a"), Some("spiffe://a".into()));
        assert_eq!(
            xfcc_uri(r#"By=spiffe://gw;URI=spiffe://first,By=spiffe://gw;Subject="CN=x,O=y";URI=spiffe://second"#),
            Some("spiffe://second".into()),
            "the element the nearest proxy appended"
        );
        assert_eq!(xfcc_uri(r#"Subject="a;URI=spiffe://fake";uri="spiffe://real""#), Some("spiffe://real".into()));
        assert_eq!(xfcc_uri("By=spiffe://gw;Hash=ab"), None);
        assert_eq!(xfcc_uri(""), None);
    }
}

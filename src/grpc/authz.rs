//! Per-farm authorization: a TOML policy file of rules, each allowing some identities some
//! farms for some methods; default deny. The file is read again when it changes (a mounted
//! ConfigMap); a new version that does not parse is logged and the last good one stays.
//!
//! ```toml
//! [[rule]]
//! identities = ["spiffe://cluster.local/ns/billing/sa/*"]   # exact, or a trailing * wildcard
//! farms = ["farm-0123456789abcdef0123456789abcdef"]          # or ["*"]
//! methods = ["StartAggregation", "GetAggregation"]           # optional, default both
//! max_priority = "batch"                                     # optional, default "interactive"
//! ```
//!
//! `max_priority` caps the class of the Starts a rule allows: an identity may start
//! interactive work on a farm when some rule allowing it to start there has no cap.

use super::methods::{Method, START};
use crate::gateway::{GatewayError, Priority};
use crate::telemetry::Metrics;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// A name a rule matches: one exactly, those starting with a prefix (`prefix*`), or any (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str, what: &str) -> Result<Self, String> {
        match text.find('*') {
            None if text.is_empty() => Err(format!("an empty {what}")),
            None => Ok(Self::Exact(text.to_owned())),
            Some(at) if at + 1 == text.len() => Ok(Self::Prefix(text[..at].to_owned())),
            Some(_) => Err(format!("{what} '{text}': '*' may only end a pattern")),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(e) => e == name,
            Self::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    identities: Vec<Pattern>,
    farms: Vec<Pattern>,
    start: bool,
    get: bool,
    /// The most urgent class of the Starts it allows.
    max_priority: Priority,
}

/// The rules of a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rule: Vec<RuleFile>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    identities: Vec<String>,
    farms: Vec<String>,
    methods: Option<Vec<String>>,
    max_priority: Option<String>,
}

impl Policy {
    /// Parses a policy file's text; the error names the rule and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let rules = file
            .rule
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let at = |e: String| format!("rule {}: {e}", i + 1);
                if r.identities.is_empty() || r.farms.is_empty() {
                    return Err(at("needs at least one identity and one farm".to_owned()));
                }
                let identities =
                    r.identities.iter().map(|p| Pattern::parse(p, "identity")).collect::<Result<_, _>>().map_err(at)?;
                let farms = r
                    .farms
                    .iter()
                    .map(|f| {
                        if f != "*" && !f.ends_with('*') && !crate::domain::ids::is_farm_id(f) {
                            return Err(format!("'{f}' is not a farm id (farm- and 32 hex digits) or '*'"));
                        }
                        Pattern::parse(f, "farm")
                    })
                    .collect::<Result<_, _>>()
                    .map_err(at)?;
                let (mut start, mut get) = (r.methods.is_none(), r.methods.is_none());
                for m in r.methods.iter().flatten() {
                    match m.as_str() {
                        "StartAggregation" => start = true,
                        "GetAggregation" => get = true,
                        other => {
                            return Err(at(format!("unknown method '{other}' (StartAggregation, GetAggregation)")));
                        }
                    }
                }
                let max_priority = match r.max_priority.as_deref() {
                    None => Priority::Interactive,
                    Some(name) => Priority::parse(name)
                        .ok_or_else(|| at(format!("unknown max_priority '{name}' (interactive, batch)")))?,
                };
                Ok(Rule { identities, farms, start, get, max_priority })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    /// Whether some rule allows `identity` to call `method` on `farm`.
    pub fn allows(&self, identity: &str, method: Method, farm: &str) -> bool {
        self.rules.iter().any(|r| {
            (if method.name == START.name { r.start } else { r.get })
                && r.identities.iter().any(|p| p.matches(identity))
                && r.farms.iter().any(|p| p.matches(farm))
        })
    }

    /// The most urgent class `identity` may start on `farm` (`None`: it may not start there).
    pub fn max_priority(&self, identity: &str, farm: &str) -> Option<Priority> {
        self.rules
            .iter()
            .filter(|r| {
                r.start && r.identities.iter().any(|p| p.matches(identity)) && r.farms.iter().any(|p| p.matches(farm))
            })
            .map(|r| r.max_priority)
            .min()
    }

    pub fn rules(&self) -> usize {
        self.rules.len()
    }
}

/// Why a call was denied, as `dsg_authz_denied_total{reason}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    Unauthenticated,
    FarmNotAllowed,
    PriorityNotAllowed,
}

impl Denial {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::FarmNotAllowed => "farm_not_allowed",
            Self::PriorityNotAllowed => "priority_not_allowed",
        }
    }
}

/// The policy in force, read again from its file when the file changes.
pub struct Authorizer {
    path: PathBuf,
    policy: RwLock<Arc<Policy>>,
    seen: Mutex<Option<Vec<u8>>>,
    metrics: Arc<Metrics>,
}

impl Authorizer {
    /// Loads the policy at `path`; an error here stops start-up.
    pub fn load(path: &Path, metrics: Arc<Metrics>) -> Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let policy = Policy::parse(&String::from_utf8_lossy(&text)).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { path: path.to_owned(), policy: RwLock::new(Arc::new(policy)), seen: Mutex::new(Some(text)), metrics })
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `identity` may call `method` on `farm`: the refusal to answer with, audited
    /// and counted.
    pub fn check(&self, identity: Option<&str>, method: Method, farm: &str) -> Result<(), GatewayError> {
        let denial = match identity {
            None => Denial::Unauthenticated,
            Some(id) if self.policy().allows(id, method, farm) => return Ok(()),
            Some(_) => Denial::FarmNotAllowed,
        };
        Err(self.deny(identity, method, Some(farm), denial))
    }

    /// The class a Start of `identity` (allowed on `farm`) runs in: `asked`, or when
    /// unspecified the most urgent the policy allows; asking for more is refused.
    pub fn start_priority(
        &self,
        identity: Option<&str>,
        farm: &str,
        asked: Option<Priority>,
    ) -> Result<Priority, GatewayError> {
        let allowed = identity.and_then(|id| self.policy().max_priority(id, farm)).unwrap_or(Priority::Batch);
        match asked {
            None => Ok(allowed),
            Some(p) if p >= allowed => Ok(p),
            Some(p) => {
                let (who, farm_id) = (identity.unwrap_or_default(), farm);
                tracing::warn!(target: "audit", reason = Denial::PriorityNotAllowed.reason(), enduser.id = who, rpc.method = START.name, farm.id = farm_id, priority = p.name(), "request denied");
                let reason = Denial::PriorityNotAllowed.reason();
                self.metrics.authz_denied.get_or_create(&crate::telemetry::metrics::ReasonLabels { reason }).inc();
                Err(GatewayError::PriorityNotAllowed { farm_id: farm.to_owned(), priority: p })
            }
        }
    }

    /// An unauthenticated caller is refused before anything else is looked at.
    pub fn require_identity(&self, identity: Option<&str>, method: Method) -> Result<(), GatewayError> {
        match identity {
            Some(_) => Ok(()),
            None => Err(self.deny(None, method, None, Denial::Unauthenticated)),
        }
    }

    fn deny(&self, identity: Option<&str>, method: Method, farm: Option<&str>, denial: Denial) -> GatewayError {
        let (who, farm_id) = (identity.unwrap_or_default(), farm.unwrap_or_default());
        tracing::warn!(target: "audit", reason = denial.reason(), enduser.id = who, rpc.method = method.name, farm.id = farm_id, "request denied");
        self.metrics
            .authz_denied
            .get_or_create(&crate::telemetry::metrics::ReasonLabels { reason: denial.reason() })
            .inc();
        match denial {
            Denial::Unauthenticated => GatewayError::Unauthenticated { method: method.name },
            Denial::FarmNotAllowed | Denial::PriorityNotAllowed => {
                GatewayError::FarmNotAllowed { farm_id: farm.unwrap_or_default().to_owned(), method: method.name }
            }
        }
    }
}

impl super::reload::Reload for Authorizer {
    /// Reads the file again if it changed; whether a new policy is in force.
    fn reload_if_changed(&self) -> bool {
        let Ok(text) = std::fs::read(&self.path) else { return false };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.as_deref() == Some(text.as_slice()) {
            return false;
        }
        let parsed = Policy::parse(&String::from_utf8_lossy(&text));
        *seen = Some(text);
        match parsed {
            Ok(policy) => {
                tracing::info!(path = %self.path.display(), rules = policy.rules(), "authorization policy reloaded");
                *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
                true
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "the changed authorization policy is invalid; the previous one stays in force");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::methods::GET;

    const FARM_A: &str = "farm-0123456789abcdef0123456789abcdef";
    const FARM_B: &str = "farm-fedcba9876543210fedcba9876543210";

    #[test]
    fn rules_allow_by_identity_pattern_farm_and_method() {
        let policy = Policy::parse(&format!(
            r#"
            [[rule]]
            identities = ["spiffe://cluster.local/ns/billing/sa/*"]
            farms = ["{FARM_A}"]
            [[rule]]
            identities = ["spiffe://cluster.local/ns/ops/sa/viewer"]
            farms = ["*"]
            methods = ["GetAggregation"]
            "#
        ))
        .expect("a valid policy");
        let billing = "spiffe://cluster.local/ns/billing/sa/reports";
        assert!(policy.allows(billing, START, FARM_A) && policy.allows(billing, GET, FARM_A));
        assert!(!policy.allows(billing, GET, FARM_B), "another farm");
        assert!(!policy.allows("spiffe://cluster.local/ns/billing-other/sa/x", GET, FARM_A), "prefix ends at the /");
        let viewer = "spiffe://cluster.local/ns/ops/sa/viewer";
        assert!(policy.allows(viewer, GET, FARM_B) && !policy.allows(viewer, START, FARM_B), "Get only");
        assert!(!policy.allows("spiffe://cluster.local/ns/ops/sa/viewer2", GET, FARM_B), "exact is exact");
        assert!(!Policy::parse("").expect("no rules").allows(billing, GET, FARM_A), "default deny");
    }

    #[test]
    fn invalid_policies_say_which_rule_and_why() {
        for (text, says) in [
            ("[[rule]]\nidentities = []\nfarms = [\"*\"]", "rule 1: needs at least one identity"),
            ("[[rule]]\nidentities = [\"a*b\"]\nfarms = [\"*\"]", "'*' may only end a pattern"),
            ("[[rule]]\nidentities = [\"a\"]\nfarms = [\"farm-x\"]", "is not a farm id"),
            ("[[rule]]\nidentities = [\"a\"]\nfarms = [\"*\"]\nmethods = [\"Delete\"]", "unknown method 'Delete'"),
            ("[[rule]]\nidentities = [\"a\"]\nfarms = [\"*\"]\nfarm = 1", "unknown field"),
            ("[[rule]", "TOML parse error"),
        ] {
            let err = Policy::parse(text).expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}

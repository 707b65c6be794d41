//! The routes file (`--upstream-routes`): which region and account serves which farm.
//!
//! ```toml
//! [default]                      # optional: every farm no route names
//! region = "us-west-2"
//!
//! [[route]]
//! name = "paris"                 # the `route` label of the upstream metrics
//! farms = ["farm-0123456789abcdef0123456789abcdef"]
//! region = "eu-west-3"
//! role_arn = "arn:aws:iam::111122223333:role/deadline-stats-reader"
//! external_id = "render-studio"  # optional, with role_arn
//!
//! [[route]]
//! name = "montreal"
//! discover = true                # the farms ListFarms finds there
//! region = "ca-central-1"
//! ```
//!
//! Parsing is pure: every mistake is reported with the line it is on, so `--check-config` and a
//! reload that does not take say exactly what to fix. [`super::routed`] puts a parsed file to
//! work.

use crate::domain::ids::{is_farm_id, role_arn_parts};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// The name of the `[default]` table's route.
pub const DEFAULT_ROUTE: &str = "default";

/// A parsed and checked routes file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// In file order.
    pub routes: Vec<Route>,
    /// What serves a farm no route names (`None`: such a farm is not routed).
    pub default: Option<Target>,
}

/// One `[[route]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub farms: RouteFarms,
    pub target: Target,
}

/// The farms a route serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteFarms {
    Listed(Vec<String>),
    /// Whatever `ListFarms` finds in the route's region and account.
    Discovered,
}

/// Where a route's calls go and as whom.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// `None` only for `[default]`: the standard region chain (or `--region`).
    pub region: Option<String>,
    pub role: Option<Role>,
    pub endpoint_url: Option<String>,
}

/// A role assumed with STS from the gateway's own credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Role {
    pub arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    pub sts_endpoint_url: Option<String>,
}

/// The session name of an assumed role when the file names none (what CloudTrail shows).
pub const DEFAULT_SESSION_NAME: &str = "deadline-stats-gateway";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    route: Vec<Spanned<RouteFile>>,
    default: Option<Spanned<TargetFile>>,
}

// The target's keys are spelled out in both tables: serde's `flatten` cannot be combined with
// `deny_unknown_fields`, and a misspelt key must be an error that names its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    name: Option<Spanned<String>>,
    farms: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    discover: bool,
    region: Option<Spanned<String>>,
    role_arn: Option<Spanned<String>>,
    external_id: Option<Spanned<String>>,
    session_name: Option<Spanned<String>>,
    endpoint_url: Option<Spanned<String>>,
    sts_endpoint_url: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    region: Option<Spanned<String>>,
    role_arn: Option<Spanned<String>>,
    external_id: Option<Spanned<String>>,
    session_name: Option<Spanned<String>>,
    endpoint_url: Option<Spanned<String>>,
    sts_endpoint_url: Option<Spanned<String>>,
}

/// The first mistake in a routes file, with its line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RoutesError {
    pub line: usize,
    pub message: String,
}

impl Routes {
    /// Parses and checks a routes file's text.
    pub fn parse(text: &str) -> Result<Self, RoutesError> {
        let at = |offset: usize, message: String| RoutesError { line: line_of(text, offset), message };
        let file: File = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            at(offset, e.message().to_owned())
        })?;
        let default = match file.default {
            Some(d) => {
                let span = d.span().start;
                let d = d.into_inner();
                let fields = TargetFields {
                    region: d.region,
                    role_arn: d.role_arn,
                    external_id: d.external_id,
                    session_name: d.session_name,
                    endpoint_url: d.endpoint_url,
                    sts_endpoint_url: d.sts_endpoint_url,
                };
                Some(fields.target(&at, span, false)?)
            }
            None => None,
        };
        let mut routes = Vec::with_capacity(file.route.len());
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut farms: BTreeMap<String, (String, usize)> = BTreeMap::new();
        for spanned in file.route {
            let span = spanned.span().start;
            let r = spanned.into_inner();
            let Some(name) = r.name else {
                return Err(at(span, "a [[route]] needs a name (the route label of the upstream metrics)".into()));
            };
            let name_at = name.span().start;
            let name = name.into_inner();
            if !is_route_name(&name) {
                return Err(at(
                    name_at,
                    format!("route name '{name}': 1 to 32 of a-z, 0-9 and '-', starting with a letter"),
                ));
            }
            if name == DEFAULT_ROUTE {
                return Err(at(name_at, format!("route name '{DEFAULT_ROUTE}' is the [default] table's")));
            }
            if let Some(first) = names.insert(name.clone(), line_of(text, name_at)) {
                return Err(at(name_at, format!("route name '{name}' is used on line {first} already")));
            }
            let listed = match (r.farms, r.discover) {
                (Some(_), true) => {
                    return Err(at(span, format!("route '{name}': give either farms or discover = true, not both")));
                }
                (None, false) => {
                    return Err(at(span, format!("route '{name}': needs farms = [...] or discover = true")));
                }
                (None, true) => RouteFarms::Discovered,
                (Some(list), false) if list.is_empty() => {
                    return Err(at(span, format!("route '{name}': farms is empty")));
                }
                (Some(list), false) => {
                    let mut ids = Vec::with_capacity(list.len());
                    for farm in list {
                        let farm_at = farm.span().start;
                        let farm = farm.into_inner();
                        if !is_farm_id(&farm) {
                            return Err(at(farm_at, format!("'{farm}' is not a farm id (farm- and 32 hex digits)")));
                        }
                        if let Some((other, line)) = farms.get(&farm) {
                            return Err(at(
                                farm_at,
                                format!(
                                    "farm {farm} is in route '{other}' (line {line}) already: a farm has one route"
                                ),
                            ));
                        }
                        farms.insert(farm.clone(), (name.clone(), line_of(text, farm_at)));
                        ids.push(farm);
                    }
                    RouteFarms::Listed(ids)
                }
            };
            let fields = TargetFields {
                region: r.region,
                role_arn: r.role_arn,
                external_id: r.external_id,
                session_name: r.session_name,
                endpoint_url: r.endpoint_url,
                sts_endpoint_url: r.sts_endpoint_url,
            };
            let target = fields
                .target(&at, span, true)
                .map_err(|e| RoutesError { message: format!("route '{name}': {}", e.message), ..e })?;
            routes.push(Route { name, farms: listed, target });
        }
        Ok(Self { routes, default })
    }
}

struct TargetFields {
    region: Option<Spanned<String>>,
    role_arn: Option<Spanned<String>>,
    external_id: Option<Spanned<String>>,
    session_name: Option<Spanned<String>>,
    endpoint_url: Option<Spanned<String>>,
    sts_endpoint_url: Option<Spanned<String>>,
}

impl TargetFields {
    fn target(
        self,
        at: &impl Fn(usize, String) -> RoutesError,
        table: usize,
        region_required: bool,
    ) -> Result<Target, RoutesError> {
        let check = |field: Option<Spanned<String>>, name: &str, ok: fn(&str) -> bool, expected: &str| {
            field
                .map(|f| {
                    let offset = f.span().start;
                    let value = f.into_inner();
                    if ok(&value) { Ok(value) } else { Err(at(offset, format!("{name} '{value}': {expected}"))) }
                })
                .transpose()
        };
        let region = check(self.region, "region", is_region, "not an AWS region (like us-west-2)")?;
        if region_required && region.is_none() {
            return Err(at(table, "needs a region".into()));
        }
        let role_at = self.role_arn.as_ref().map(|r| r.span().start).unwrap_or(table);
        let arn = check(
            self.role_arn,
            "role_arn",
            |a| role_arn_parts(a).is_some(),
            "not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)",
        )?;
        let external_id =
            check(self.external_id, "external_id", is_external_id, "2 to 1224 of letters, digits and +=,.@:/-_")?;
        let session_name =
            check(self.session_name, "session_name", is_session_name, "2 to 64 of letters, digits and +=,.@-_")?;
        let endpoint_url = check(self.endpoint_url, "endpoint_url", is_url, "not an http:// or https:// URL")?;
        let sts_endpoint_url =
            check(self.sts_endpoint_url, "sts_endpoint_url", is_url, "not an http:// or https:// URL")?;
        let role = match arn {
            Some(arn) => Some(Role {
                arn,
                external_id,
                session_name: session_name.unwrap_or_else(|| DEFAULT_SESSION_NAME.to_owned()),
                sts_endpoint_url,
            }),
            None if external_id.is_some() || session_name.is_some() || sts_endpoint_url.is_some() => {
                return Err(at(role_at, "external_id, session_name and sts_endpoint_url go with a role_arn".into()));
            }
            None => None,
        };
        Ok(Target { region, role, endpoint_url })
    }
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes().iter().take(offset).filter(|b| **b == b'\n').count() + 1
}

/// A route name: what a metric label can carry.
fn is_route_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `us-west-2`, `eu-central-1`, `us-gov-west-1`, `cn-north-1`.
fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1].iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok()
}

fn is_external_id(s: &str) -> bool {
    (2..=1224).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@:/-_".contains(c))
}

fn is_session_name(s: &str) -> bool {
    (2..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c))
}

fn is_url(s: &str) -> bool {
    let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FARM_A: &str = "farm-0123456789abcdef0123456789abcdef";
    const FARM_B: &str = "farm-fedcba9876543210fedcba9876543210";
    const ROLE: &str = "arn:aws:iam::111122223333:role/deadline-stats-reader";

    fn error(text: &str) -> RoutesError {
        Routes::parse(text).expect_err("refused")
    }

    #[test]
    fn a_file_with_a_default_an_explicit_and_a_discovering_route() {
        let text = format!(
            r#"
[default]
region = "us-west-2"

[[route]]
name = "paris"
farms = ["{FARM_A}"]
region = "eu-west-3"
role_arn = "{ROLE}"
external_id = "studio"
sts_endpoint_url = "https://sts.eu-west-3.amazonaws.com"

[[route]]
name = "montreal"
discover = true
region = "ca-central-1"
endpoint_url = "http://127.0.0.1:9000"
"#
        );
        let routes = Routes::parse(&text).expect("parses");
        assert_eq!(routes.default, Some(Target { region: Some("us-west-2".into()), role: None, endpoint_url: None }));
        assert_eq!(routes.routes.len(), 2);
        let paris = &routes.routes[0];
        assert_eq!(paris.farms, RouteFarms::Listed(vec![FARM_A.into()]));
        let role = paris.target.role.as_ref().expect("a role");
        assert_eq!((role.arn.as_str(), role.external_id.as_deref()), (ROLE, Some("studio")));
        assert_eq!(role.session_name, DEFAULT_SESSION_NAME);
        assert_eq!(routes.routes[1].farms, RouteFarms::Discovered);
        assert_eq!(Routes::parse("").expect("empty"), Routes { routes: Vec::new(), default: None });
    }

    #[test]
    fn every_mistake_names_its_line() {
        let unknown = error("[[route]]\nname = \"a\"\nfarms = []\nregoin = \"us-west-2\"\n");
        assert_eq!(unknown.line, 4, "{unknown}");
        assert!(unknown.message.contains("regoin"), "{unknown}");

        let duplicate = error(&format!(
            "[[route]]\nname = \"a\"\nregion = \"us-west-2\"\nfarms = [\"{FARM_A}\"]\n\n[[route]]\nname = \"b\"\nregion = \"us-east-1\"\nfarms = [\n  \"{FARM_B}\",\n  \"{FARM_A}\",\n]\n"
        ));
        assert_eq!(duplicate.line, 11, "{duplicate}");
        assert!(duplicate.message.contains("route 'a' (line 4)"), "{duplicate}");

        let arn = error(&format!(
            "[[route]]\nname = \"a\"\nregion = \"us-west-2\"\nfarms = [\"{FARM_A}\"]\nrole_arn = \"arn:aws:iam::1234:role/x\"\n"
        ));
        assert_eq!(arn.line, 5, "{arn}");
        assert!(arn.message.starts_with("route 'a': role_arn"), "{arn}");

        let farm = error("[[route]]\nname = \"a\"\nregion = \"us-west-2\"\nfarms = [\"farm-1\"]\n");
        assert_eq!((farm.line, farm.message.contains("'farm-1' is not a farm id")), (4, true), "{farm}");

        let region = error(&format!("[[route]]\nname = \"a\"\nregion = \"west\"\nfarms = [\"{FARM_A}\"]\n"));
        assert_eq!(region.line, 3, "{region}");

        let syntax = error("[[route]]\nname = \"a\"\nfarms = [\n");
        assert!(syntax.line >= 3, "{syntax}");
    }

    #[test]
    fn routes_are_named_once_and_say_which_farms_they_serve() {
        let missing = error(&format!("\n[[route]]\nregion = \"us-west-2\"\nfarms = [\"{FARM_A}\"]\n"));
        assert_eq!(missing.line, 2, "{missing}");
        let twice = error(&format!(
            "[[route]]\nname = \"a\"\nregion = \"us-west-2\"\ndiscover = true\n[[route]]\nname = \"a\"\nregion = \"us-east-1\"\nfarms = [\"{FARM_A}\"]\n"
        ));
        assert_eq!(twice.line, 6, "{twice}");
        assert!(
            error("[[route]]\nname = \"default\"\nregion = \"us-west-2\"\ndiscover = true\n")
                .message
                .contains("[default]")
        );
        assert!(
            error("[[route]]\nname = \"Paris\"\nregion = \"us-west-2\"\ndiscover = true\n").message.contains("a-z")
        );
        let both = error(&format!(
            "[[route]]\nname = \"a\"\nregion = \"us-west-2\"\ndiscover = true\nfarms = [\"{FARM_A}\"]\n"
        ));
        assert!(both.message.contains("not both"), "{both}");
        assert!(error("[[route]]\nname = \"a\"\nregion = \"us-west-2\"\n").message.contains("needs farms"));
        assert!(error("[[route]]\nname = \"a\"\ndiscover = true\n").message.contains("needs a region"));
        let orphan = error("[default]\nexternal_id = \"abc\"\n");
        assert!(orphan.message.contains("go with a role_arn"), "{orphan}");
        assert!(Routes::parse("[default]\n").is_ok(), "a default of the standard chain");
    }

    #[test]
    fn regions_and_urls_as_aws_spells_them() {
        for ok in ["us-west-2", "eu-central-1", "us-gov-west-1", "cn-north-1", "ap-southeast-5"] {
            assert!(is_region(ok), "{ok}");
        }
        for bad in ["us-west", "US-WEST-2", "uswest2", "us--2", "u-west-2", "us-west-x"] {
            assert!(!is_region(bad), "{bad}");
        }
        assert!(is_url("http://127.0.0.1:9000") && is_url("https://deadline.us-west-2.amazonaws.com"));
        assert!(!is_url("ftp://x") && !is_url("http://") && !is_url("127.0.0.1:9000"));
    }
}

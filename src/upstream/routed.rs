//! [`Upstream`] over several regions and accounts: the routes file ([`super::routes`]) says
//! which farms each route serves; each route has its own SDK client (its region, its assumed
//! role with credentials refreshed by the SDK before they expire, its endpoint).
//!
//! The table of farms is rebuilt when the file changes and after each discovery
//! (`discover = true` routes list their farms with `ListFarms` every discovery interval). A farm
//! that two routes claim is served by neither until fixed: said in the log and in
//! `dsg_upstream_route_conflicts`. A file that does not parse leaves the last good table in
//! force.

use super::routes::{DEFAULT_ROUTE, RouteFarms, Routes, Target};
use super::sdk::{AssumeRole, SdkUpstream, SdkUpstreamConfig};
use super::{NotRouted, RouteName, Upstream, UpstreamError, UpstreamPage};
use crate::domain::AggregationRequest;
use crate::telemetry::Metrics;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the routes file is looked at for changes.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How a routed upstream is built.
#[derive(Debug, Clone)]
pub struct RoutedConfig {
    /// The routes file.
    pub file: PathBuf,
    /// Every route's client settings (timeouts, base credentials), its region and endpoint
    /// replaced by the route's; `region` is the `[default]` table's when it names none.
    pub base: SdkUpstreamConfig,
    /// How often `discover = true` routes list their farms.
    pub discovery_interval: Duration,
}

/// Why routes could not be put in force at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RoutedError {
    #[error("--upstream-routes {path}: {message}")]
    File { path: String, message: String },
    #[error("route '{route}': {message}")]
    Client { route: String, message: String },
}

/// One route put to work.
struct Served {
    name: RouteName,
    client: SdkUpstream,
}

/// Which route serves each farm, as last built.
#[derive(Default)]
struct Table {
    farms: HashMap<String, Arc<Served>>,
    default: Option<Arc<Served>>,
    /// Farms two or more routes claim, with the routes' names.
    conflicts: HashMap<String, Vec<String>>,
}

/// What the table is built from.
struct Sources {
    /// The file's text in force.
    text: String,
    routes: Routes,
    /// Clients by where they go: a reload that keeps a route's target keeps its client and
    /// credentials.
    clients: HashMap<Target, SdkUpstream>,
    /// The farms each discovering route found last (a route whose discovery failed keeps
    /// what it found before).
    discovered: BTreeMap<String, Vec<String>>,
}

/// How long an upstream aggregation is read from the route that started it: the upstream
/// keeps its results an hour.
const STARTED_ON_TTL: Duration = Duration::from_secs(2 * 3600);

/// Farms routed to regions and accounts by the routes file.
pub struct RoutedUpstream {
    config: RoutedConfig,
    table: RwLock<Arc<Table>>,
    /// The route each upstream aggregation this process started was started on: its Gets go
    /// there even if its farm has moved since (a farm moved mid-aggregation).
    started_on: moka::sync::Cache<String, Arc<Served>>,
    sources: tokio::sync::Mutex<Sources>,
    metrics: Arc<Metrics>,
}

impl RoutedUpstream {
    /// Reads the file, builds each route's client and discovers the farms of discovering
    /// routes once (a region that cannot be listed now is listed again later).
    pub async fn load(config: RoutedConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, RoutedError> {
        let path = config.file.display().to_string();
        let text = std::fs::read_to_string(&config.file)
            .map_err(|e| RoutedError::File { path: path.clone(), message: e.to_string() })?;
        let routes = Routes::parse(&text).map_err(|e| RoutedError::File { path, message: e.to_string() })?;
        let clients = connect_all(&config.base, &routes, &HashMap::new()).await?;
        let sources = Sources { text, routes, clients, discovered: BTreeMap::new() };
        let this = Arc::new(Self {
            config,
            table: RwLock::new(Arc::new(Table::default())),
            started_on: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(STARTED_ON_TTL).build(),
            sources: tokio::sync::Mutex::new(sources),
            metrics,
        });
        let mut sources = this.sources.lock().await;
        this.discover(&mut sources).await;
        this.rebuild(&sources);
        drop(sources);
        Ok(this)
    }

    /// Looks at the file every few seconds and discovers every discovery interval, until
    /// `stop`.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut check = tokio::time::interval(FILE_CHECK_INTERVAL);
            let mut discover = tokio::time::interval(this.config.discovery_interval);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            discover.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = check.tick() => this.reload_if_changed().await,
                    _ = discover.tick() => {
                        let mut sources = this.sources.lock().await;
                        this.discover(&mut sources).await;
                        this.rebuild(&sources);
                    }
                }
            }
        });
    }

    /// Reads the file again; a changed file that parses and whose clients build is put in
    /// force (its discovering routes listed first), else the last good one stays.
    pub async fn reload_if_changed(&self) {
        let path = self.config.file.display().to_string();
        let Ok(text) = tokio::fs::read_to_string(&self.config.file).await else { return };
        let mut sources = self.sources.lock().await;
        if text == sources.text {
            return;
        }
        let routes = match Routes::parse(&text) {
            Ok(routes) => routes,
            Err(e) => {
                tracing::error!(path, error = %e, "the changed routes file is invalid; the previous routes stay in force");
                self.metrics.route_reload("invalid");
                sources.text = text;
                return;
            }
        };
        let clients = match connect_all(&self.config.base, &routes, &sources.clients).await {
            Ok(clients) => clients,
            Err(e) => {
                tracing::error!(path, error = %e, "a route of the changed routes file has no client; the previous routes stay in force");
                self.metrics.route_reload("invalid");
                sources.text = text;
                return;
            }
        };
        let mut next = Sources { text, routes, clients, discovered: BTreeMap::new() };
        // A route still discovering with the same target keeps what it found meanwhile.
        for route in &next.routes.routes {
            let same = sources.routes.routes.iter().any(|r| r.name == route.name && r.target == route.target);
            if route.farms == RouteFarms::Discovered
                && same
                && let Some(found) = sources.discovered.get(&route.name)
            {
                next.discovered.insert(route.name.clone(), found.clone());
            }
        }
        *sources = next;
        self.discover(&mut sources).await;
        self.rebuild(&sources);
        self.metrics.route_reload("ok");
        tracing::info!(path, routes = sources.routes.routes.len(), "routes file reloaded");
    }

    /// Lists the farms of every discovering route.
    async fn discover(&self, sources: &mut Sources) {
        let mut found = BTreeMap::new();
        for route in &sources.routes.routes {
            if route.farms != RouteFarms::Discovered {
                continue;
            }
            let Some(client) = sources.clients.get(&route.target) else { continue };
            match client.farms().await {
                Ok(farms) => {
                    self.metrics.route_discovery(&route.name, "ok");
                    found.insert(route.name.clone(), farms);
                }
                Err(e) => {
                    self.metrics.route_discovery(&route.name, "failed");
                    tracing::warn!(route = %route.name, error = %e, "cannot list the route's farms; what it found before stays");
                    if let Some(before) = sources.discovered.get(&route.name) {
                        found.insert(route.name.clone(), before.clone());
                    }
                }
            }
        }
        sources.discovered = found;
    }

    /// The table from the file and what discovery found.
    fn rebuild(&self, sources: &Sources) {
        let served = |name: &str, target: &Target| {
            sources.clients.get(target).map(|client| Arc::new(Served { name: name.into(), client: client.clone() }))
        };
        let mut claims: HashMap<String, Vec<Arc<Served>>> = HashMap::new();
        let mut counts = BTreeMap::new();
        for route in &sources.routes.routes {
            let Some(s) = served(&route.name, &route.target) else { continue };
            let farms = match &route.farms {
                RouteFarms::Listed(farms) => farms.as_slice(),
                RouteFarms::Discovered => sources.discovered.get(&route.name).map_or(&[][..], Vec::as_slice),
            };
            counts.insert(route.name.clone(), farms.len());
            for farm in farms {
                claims.entry(farm.clone()).or_default().push(s.clone());
            }
        }
        let mut table = Table {
            default: sources.routes.default.as_ref().and_then(|t| served(DEFAULT_ROUTE, t)),
            ..Table::default()
        };
        for (farm, mut routes) in claims {
            if routes.len() == 1 {
                table.farms.insert(farm, routes.remove(0));
            } else {
                let names: Vec<String> = routes.iter().map(|r| r.name.to_string()).collect();
                tracing::error!(farm, routes = ?names, "a farm is claimed by more than one route; it is served by none until the routes file is fixed");
                table.conflicts.insert(farm, names);
            }
        }
        self.metrics.route_table(&counts, table.conflicts.len());
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    fn served(&self, farm_id: &str) -> Result<Arc<Served>, NotRouted> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(routes) = table.conflicts.get(farm_id) {
            return Err(NotRouted {
                message: format!(
                    "farm {farm_id} is claimed by the routes {}; it is served by none until the routes file is fixed",
                    routes.join(" and ")
                ),
            });
        }
        table.farms.get(farm_id).or(table.default.as_ref()).cloned().ok_or_else(|| NotRouted {
            message: format!("no route of the routes file serves farm {farm_id} and there is no [default] route"),
        })
    }
}

/// A client for every target `routes` names: those of `existing` kept, the others built. On
/// failure `existing` is untouched, so the routes in force keep their clients.
async fn connect_all(
    base: &SdkUpstreamConfig,
    routes: &Routes,
    existing: &HashMap<Target, SdkUpstream>,
) -> Result<HashMap<Target, SdkUpstream>, RoutedError> {
    let mut wanted: Vec<(&str, &Target)> = routes.routes.iter().map(|r| (r.name.as_str(), &r.target)).collect();
    if let Some(default) = &routes.default {
        wanted.push((DEFAULT_ROUTE, default));
    }
    let mut clients = HashMap::new();
    for (name, target) in wanted {
        if clients.contains_key(target) {
            continue;
        }
        let client = match existing.get(target) {
            Some(client) => client.clone(),
            None => SdkUpstream::connect(&client_config(base, target))
                .await
                .map_err(|e| RoutedError::Client { route: name.to_owned(), message: e.to_string() })?,
        };
        clients.insert(target.clone(), client);
    }
    Ok(clients)
}

/// A route's client settings: `base` with the route's region, endpoint and role.
fn client_config(base: &SdkUpstreamConfig, target: &Target) -> SdkUpstreamConfig {
    SdkUpstreamConfig {
        region: target.region.clone().or_else(|| base.region.clone()),
        endpoint_url: target.endpoint_url.clone().or_else(|| base.endpoint_url.clone()),
        assume_role: target.role.as_ref().map(|role| AssumeRole {
            role_arn: role.arn.clone(),
            external_id: role.external_id.clone(),
            session_name: role.session_name.clone(),
            sts_endpoint_url: role.sts_endpoint_url.clone(),
        }),
        ..base.clone()
    }
}

#[async_trait::async_trait]
impl Upstream for RoutedUpstream {
    async fn start(&self, request: &AggregationRequest) -> Result<String, UpstreamError> {
        let served = self.served(&request.farm_id).map_err(NotRouted::into_error)?;
        let id = served.client.start(request).await?;
        self.started_on.insert(id.clone(), served);
        Ok(id)
    }

    async fn get_page(
        &self,
        farm_id: &str,
        aggregation_id: &str,
        max_results: u32,
        next_token: Option<&str>,
    ) -> Result<UpstreamPage, UpstreamError> {
        let served = match self.started_on.get(aggregation_id) {
            Some(served) => served,
            None => self.served(farm_id).map_err(NotRouted::into_error)?,
        };
        served.client.get_page(farm_id, aggregation_id, max_results, next_token).await
    }

    fn route(&self, farm_id: &str) -> Result<RouteName, NotRouted> {
        self.served(farm_id).map(|s| s.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::sdk::CredentialSource;

    const FARM_A: &str = "farm-0123456789abcdef0123456789abcdef";
    const FARM_B: &str = "farm-fedcba9876543210fedcba9876543210";

    fn route(name: &str, region: &str, farms: &[&str]) -> String {
        let farms: Vec<String> = farms.iter().map(|f| format!("\"{f}\"")).collect();
        format!("[[route]]\nname = \"{name}\"\nregion = \"{region}\"\nfarms = [{}]\n", farms.join(", "))
    }

    fn config(file: PathBuf) -> RoutedConfig {
        RoutedConfig {
            file,
            base: SdkUpstreamConfig {
                credentials: CredentialSource::Static { access_key_id: "k".into(), secret_access_key: "s".into() },
                ..SdkUpstreamConfig::default()
            },
            discovery_interval: Duration::from_secs(60),
        }
    }

    fn route_of(routed: &RoutedUpstream, farm: &str) -> Option<String> {
        routed.route(farm).ok().map(|r| r.to_string())
    }

    #[tokio::test]
    async fn farms_follow_the_file_and_an_invalid_change_keeps_the_routes_in_force() {
        let dir = std::env::temp_dir().join(format!("dsg-routed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("routes.toml");
        std::fs::write(&file, route("paris", "eu-west-3", &[FARM_A])).expect("writes");
        let metrics = Arc::new(Metrics::new());
        let routed = RoutedUpstream::load(config(file.clone()), metrics.clone()).await.expect("loads");
        assert_eq!(route_of(&routed, FARM_A).as_deref(), Some("paris"));
        let refused = routed.route(FARM_B).expect_err("no route and no [default]");
        assert!(refused.message.contains("no [default]"), "{refused}");

        // Not TOML: refused, the routes in force stay.
        std::fs::write(&file, "[[route]\n").expect("writes");
        routed.reload_if_changed().await;
        assert_eq!(route_of(&routed, FARM_A).as_deref(), Some("paris"));

        // Farm A moves to montreal; the rest goes to the default route.
        std::fs::write(
            &file,
            format!("[default]\nregion = \"us-west-2\"\n{}", route("montreal", "ca-central-1", &[FARM_A])),
        )
        .expect("writes");
        routed.reload_if_changed().await;
        assert_eq!(route_of(&routed, FARM_A).as_deref(), Some("montreal"));
        assert_eq!(route_of(&routed, FARM_B).as_deref(), Some(DEFAULT_ROUTE));
        let text = metrics.encode();
        assert!(text.contains(r#"dsg_upstream_routes_reloads_total{outcome="invalid"} 1"#), "{text}");
        assert!(text.contains(r#"dsg_upstream_route_farms{route="montreal"} 1"#), "{text}");
        assert!(!text.contains(r#"route="paris""#), "a route gone leaves no series: {text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_route_reaches_its_region_endpoint_and_role_over_the_base_settings() {
        let base = SdkUpstreamConfig { region: Some("us-west-2".into()), ..SdkUpstreamConfig::default() };
        let routes = Routes::parse(
            "[[route]]\nname = \"a\"\nregion = \"eu-west-3\"\ndiscover = true\nendpoint_url = \"http://127.0.0.1:9\"\nrole_arn = \"arn:aws:iam::444455556666:role/r\"\nexternal_id = \"x1\"\n[default]\n",
        )
        .expect("parses");
        let routed = client_config(&base, &routes.routes[0].target);
        assert_eq!(routed.region.as_deref(), Some("eu-west-3"));
        assert_eq!(routed.endpoint_url.as_deref(), Some("http://127.0.0.1:9"));
        let role = routed.assume_role.expect("a role");
        assert_eq!(
            (role.role_arn.as_str(), role.external_id.as_deref()),
            ("arn:aws:iam::444455556666:role/r", Some("x1"))
        );
        let default = client_config(&base, routes.default.as_ref().expect("default"));
        assert_eq!((default.region.as_deref(), default.assume_role), (Some("us-west-2"), None), "the base's region");
    }
}

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

/// Farms routed to regions and accounts by the routes file.
pub struct RoutedUpstream {
    config: RoutedConfig,
    table: RwLock<Arc<Table>>,
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
        let mut sources = Sources { text, routes, clients: HashMap::new(), discovered: BTreeMap::new() };
        connect_all(&config.base, &mut sources).await?;
        let this = Arc::new(Self {
            config,
            table: RwLock::new(Arc::new(Table::default())),
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
        let mut next =
            Sources { text, routes, clients: std::mem::take(&mut sources.clients), discovered: BTreeMap::new() };
        if let Err(e) = connect_all(&self.config.base, &mut next).await {
            tracing::error!(path, error = %e, "a route of the changed routes file has no client; the previous routes stay in force");
            self.metrics.route_reload("invalid");
            sources.clients = next.clients;
            sources.text = next.text;
            return;
        }
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

/// Builds a client for every target that has none yet (and drops those no route uses).
async fn connect_all(base: &SdkUpstreamConfig, sources: &mut Sources) -> Result<(), RoutedError> {
    let mut wanted: Vec<(&str, &Target)> =
        sources.routes.routes.iter().map(|r| (r.name.as_str(), &r.target)).collect();
    if let Some(default) = &sources.routes.default {
        wanted.push((DEFAULT_ROUTE, default));
    }
    let mut clients = HashMap::new();
    for (name, target) in wanted {
        if clients.contains_key(target) {
            continue;
        }
        let client = match sources.clients.remove(target) {
            Some(client) => client,
            None => SdkUpstream::connect(&client_config(base, target))
                .await
                .map_err(|e| RoutedError::Client { route: name.to_owned(), message: e.to_string() })?,
        };
        clients.insert(target.clone(), client);
    }
    sources.clients = clients;
    Ok(())
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
        served.client.start(request).await
    }

    async fn get_page(
        &self,
        farm_id: &str,
        aggregation_id: &str,
        max_results: u32,
        next_token: Option<&str>,
    ) -> Result<UpstreamPage, UpstreamError> {
        let served = self.served(farm_id).map_err(NotRouted::into_error)?;
        served.client.get_page(farm_id, aggregation_id, max_results, next_token).await
    }

    fn route(&self, farm_id: &str) -> Result<RouteName, NotRouted> {
        self.served(farm_id).map(|s| s.name.clone())
    }
}

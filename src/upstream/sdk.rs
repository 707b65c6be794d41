//! [`Upstream`] over the real `aws-sdk-deadline` client.
//!
//! Credentials and region come from the standard chain (environment, profile, IRSA web
//! identity, EKS Pod Identity, IMDS). The endpoint can be overridden by flag or by the standard
//! `AWS_ENDPOINT_URL_DEADLINE` / `AWS_ENDPOINT_URL` variables; either way the `management.` host
//! prefix stays off it. Get uses the SDK's standard retry mode; Start is never retried by the
//! SDK, since a retried Start after a lost response would collide with our own aggregation.

use super::host_prefix::NoHostPrefixOnCustomEndpoint;
use super::{InvalidField, Upstream, UpstreamError, UpstreamPage};
use crate::domain::{AggregationRequest, AggregationStatus, Resources, StatisticsRow, Stats, UsageType};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_deadline::Client;
use aws_sdk_deadline::error::{DisplayErrorContext, SdkError};
use aws_sdk_deadline::types::{self, SessionsStatisticsResources, UsageGroupByField, UsageStatistic};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Where the client's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// The standard AWS chain.
    Chain,
    /// Fixed keys: for the emulator, which checks no signature.
    Static { access_key_id: String, secret_access_key: String },
}

/// A role the client assumes with STS from its base credentials, as a route's `role_arn` asks
/// (the SDK's role provider: credentials refreshed before they expire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRole {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    /// Where STS is (else the standard endpoint chain, `AWS_ENDPOINT_URL_STS` included).
    pub sts_endpoint_url: Option<String>,
}

/// How to build the SDK client.
#[derive(Debug, Clone)]
pub struct SdkUpstreamConfig {
    /// Overrides every other endpoint source when set.
    pub endpoint_url: Option<String>,
    /// Overrides the region chain when set.
    pub region: Option<String>,
    pub credentials: CredentialSource,
    /// A role to assume with `credentials` (`None`: use them as they are).
    pub assume_role: Option<AssumeRole>,
    pub connect_timeout: Duration,
    /// Bound on one HTTP attempt.
    pub attempt_timeout: Duration,
    /// Bound on a whole call, retries included.
    pub operation_timeout: Duration,
    /// Attempts for Get (1 = no retry); Start always makes exactly one.
    pub get_max_attempts: u32,
}

/// The default of every client setting, for [`SdkUpstreamConfig::default`] and the command line.
pub mod defaults {
    use std::time::Duration;

    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
    pub const GET_MAX_ATTEMPTS: u32 = 3;
}

impl Default for SdkUpstreamConfig {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            region: None,
            credentials: CredentialSource::Chain,
            assume_role: None,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            attempt_timeout: defaults::ATTEMPT_TIMEOUT,
            operation_timeout: defaults::OPERATION_TIMEOUT,
            get_max_attempts: defaults::GET_MAX_ATTEMPTS,
        }
    }
}

/// A client configuration the SDK cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum SdkConfigError {
    #[error("no AWS region is configured: set AWS_REGION (or a profile region) or pass --region")]
    NoRegion,
    #[error("get_max_attempts must be at least 1")]
    NoAttempts,
}

/// The Deadline Cloud sessions-statistics API through `aws-sdk-deadline`.
#[derive(Debug, Clone)]
pub struct SdkUpstream {
    /// Retries disabled.
    start_client: Client,
    /// Standard retry mode.
    get_client: Client,
}

impl SdkUpstream {
    /// Resolves credentials, region and endpoint, and builds the two clients.
    pub async fn connect(config: &SdkUpstreamConfig) -> Result<Self, SdkConfigError> {
        if config.get_max_attempts == 0 {
            return Err(SdkConfigError::NoAttempts);
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let CredentialSource::Static { access_key_id, secret_access_key } = &config.credentials {
            let creds = aws_sdk_deadline::config::Credentials::new(
                access_key_id,
                secret_access_key,
                None,
                None,
                "deadline-stats-gateway-static",
            );
            loader = loader.credentials_provider(creds);
        }
        let shared = loader.load().await;
        if shared.region().is_none() {
            return Err(SdkConfigError::NoRegion);
        }
        let shared = match &config.assume_role {
            None => shared,
            Some(role) => assuming(shared, role).await,
        };
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .operation_attempt_timeout(config.attempt_timeout)
            .operation_timeout(config.operation_timeout)
            .build();
        let mut builder = aws_sdk_deadline::config::Builder::from(&shared)
            .timeout_config(timeouts)
            .interceptor(NoHostPrefixOnCustomEndpoint);
        if let Some(url) = &config.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        let get_retry = RetryConfig::standard().with_max_attempts(config.get_max_attempts);
        Ok(Self {
            start_client: Client::from_conf(builder.clone().retry_config(RetryConfig::disabled()).build()),
            get_client: Client::from_conf(builder.retry_config(get_retry).build()),
        })
    }
}

impl SdkUpstream {
    /// Every farm the account holds in the client's region (`ListFarms`, page by page): what a
    /// route that discovers its farms serves.
    pub async fn farms(&self) -> Result<Vec<String>, UpstreamError> {
        let mut pages = self.get_client.list_farms().max_results(100).into_paginator().send();
        let mut farms = Vec::new();
        while let Some(page) = pages.next().await {
            farms.extend(page.map_err(map_sdk_error)?.farms().iter().map(|f| f.farm_id().to_owned()));
        }
        Ok(farms)
    }
}

/// `shared` with the credentials of `role`, assumed from `shared`'s own.
async fn assuming(shared: aws_types::SdkConfig, role: &AssumeRole) -> aws_types::SdkConfig {
    let mut sts = shared.clone().into_builder();
    if let Some(url) = &role.sts_endpoint_url {
        sts.set_endpoint_url(Some(url.clone()));
    }
    let mut provider = aws_config::sts::AssumeRoleProvider::builder(&role.role_arn)
        .session_name(&role.session_name)
        .configure(&sts.build());
    if let Some(id) = &role.external_id {
        provider = provider.external_id(id);
    }
    let provider = provider.build().await;
    shared
        .into_builder()
        .credentials_provider(aws_sdk_deadline::config::SharedCredentialsProvider::new(provider))
        .build()
}

#[async_trait::async_trait]
impl Upstream for SdkUpstream {
    async fn start(&self, req: &AggregationRequest) -> Result<String, UpstreamError> {
        let resources = match &req.resources {
            Resources::Queues(ids) => SessionsStatisticsResources::QueueIds(ids.clone()),
            Resources::Fleets(ids) => SessionsStatisticsResources::FleetIds(ids.clone()),
        };
        let out = self
            .start_client
            .start_sessions_statistics_aggregation()
            .farm_id(&req.farm_id)
            .resource_ids(resources)
            .start_time(smithy_time(req.start_time))
            .end_time(smithy_time(req.end_time))
            .set_timezone(req.timezone.map(|tz| tz.to_string()))
            .set_period(req.period.map(|p| types::Period::from(p.as_str())))
            .set_group_by(Some(req.group_by.iter().map(|g| UsageGroupByField::from(g.as_str())).collect()))
            .set_statistics(Some(req.statistics.iter().map(|s| UsageStatistic::from(s.as_str())).collect()))
            .send()
            .await
            .map_err(map_sdk_error)?;
        Ok(out.aggregation_id().to_owned())
    }

    async fn get_page(
        &self,
        farm_id: &str,
        aggregation_id: &str,
        max_results: u32,
        next_token: Option<&str>,
    ) -> Result<UpstreamPage, UpstreamError> {
        let out = self
            .get_client
            .get_sessions_statistics_aggregation()
            .farm_id(farm_id)
            .aggregation_id(aggregation_id)
            .max_results(i32::try_from(max_results).unwrap_or(i32::MAX))
            .set_next_token(next_token.map(str::to_owned))
            .send()
            .await
            .map_err(map_sdk_error)?;
        let status = AggregationStatus::parse(out.status().as_str()).ok_or_else(|| UpstreamError::Other {
            message: format!("upstream returned an unknown status '{}'", out.status().as_str()),
        })?;
        Ok(UpstreamPage {
            status,
            status_message: out.status_message().map(str::to_owned),
            rows: out.statistics().iter().map(row).collect(),
            next_token: out.next_token().filter(|t| !t.is_empty()).map(str::to_owned),
        })
    }
}

fn smithy_time(t: DateTime<Utc>) -> aws_smithy_types::DateTime {
    aws_smithy_types::DateTime::from_millis(t.timestamp_millis())
}

fn chrono_time(t: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

fn row(s: &types::Statistics) -> StatisticsRow {
    StatisticsRow {
        queue_id: s.queue_id().map(str::to_owned),
        fleet_id: s.fleet_id().map(str::to_owned),
        job_id: s.job_id().map(str::to_owned),
        job_name: s.job_name().map(str::to_owned),
        user_id: s.user_id().map(str::to_owned),
        license_product: s.license_product().map(str::to_owned),
        instance_type: s.instance_type().map(str::to_owned),
        usage_type: s.usage_type().and_then(|u| UsageType::parse(u.as_str())),
        count: s.count(),
        cost_in_usd: s.cost_in_usd().map(stats).unwrap_or_default(),
        runtime_in_seconds: s.runtime_in_seconds().map(stats).unwrap_or_default(),
        aggregation_start_time: s.aggregation_start_time().and_then(chrono_time),
        aggregation_end_time: s.aggregation_end_time().and_then(chrono_time),
    }
}

fn stats(s: &types::Stats) -> Stats {
    Stats { min: s.min(), max: s.max(), avg: s.avg(), sum: s.sum() }
}

/// Maps any SDK failure of either operation to the domain's [`UpstreamError`].
fn map_sdk_error<E, R>(err: SdkError<E, R>) -> UpstreamError
where
    E: Into<aws_sdk_deadline::Error> + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let message = DisplayErrorContext(&err).to_string();
    match err {
        SdkError::ServiceError(e) => map_service_error(e.into_err().into()),
        SdkError::TimeoutError(_) => {
            UpstreamError::OutcomeUnknown { message: format!("timed out: {message}"), retry_after: None }
        }
        SdkError::DispatchFailure(ref failure) if never_sent(failure) => {
            UpstreamError::Transient { message, retry_after: None }
        }
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            UpstreamError::OutcomeUnknown { message, retry_after: None }
        }
        _ => UpstreamError::Other { message },
    }
}

/// Whether a dispatch failure happened before any byte of the request could reach the
/// upstream: no connection was made.
fn never_sent(failure: &aws_smithy_runtime_api::client::result::DispatchFailure) -> bool {
    let Some(connector) = failure.as_connector_error() else { return false };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(connector);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::HostUnreachable
            );
        }
        source = e.source();
    }
    false
}

fn map_service_error(err: aws_sdk_deadline::Error) -> UpstreamError {
    use aws_sdk_deadline::Error as E;
    let seconds = |s: Option<i32>| s.and_then(|s| u64::try_from(s).ok()).map(Duration::from_secs);
    match err {
        E::ThrottlingException(e) => {
            UpstreamError::Throttled { message: e.message().to_owned(), retry_after: seconds(e.retry_after_seconds()) }
        }
        E::ValidationException(e) => UpstreamError::Invalid {
            message: e.message().to_owned(),
            fields: e
                .field_list()
                .iter()
                .map(|f| InvalidField { name: f.name().to_owned(), message: f.message().to_owned() })
                .collect(),
        },
        E::ResourceNotFoundException(e) => UpstreamError::NotFound { message: e.message().to_owned() },
        E::AccessDeniedException(e) => UpstreamError::AccessDenied { message: e.message().to_owned() },
        E::InternalServerErrorException(e) => UpstreamError::OutcomeUnknown {
            message: e.message().to_owned(),
            retry_after: seconds(e.retry_after_seconds()),
        },
        other => UpstreamError::Other { message: DisplayErrorContext(&other).to_string() },
    }
}

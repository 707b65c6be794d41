//! Keeps the model's `management.` host prefix off custom endpoints.
//!
//! Every Deadline operation carries `hostPrefix: "management."`, and the Rust SDK prepends it
//! even to an endpoint override: `http://127.0.0.1:4567` would become
//! `http://management.127.0.0.1:4567`. A configured endpoint URL is the exact host to call (as
//! botocore's `inject_host_prefix=False` and the SDKs' custom-endpoint guidance have it), so
//! when one is configured this interceptor removes the prefix before the endpoint is applied.
//! Without an override the prefix stays: the real service needs it.

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::endpoint::EndpointPrefix;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_types::endpoint_config::EndpointUrl;

/// Drops the operation's endpoint prefix whenever an endpoint URL is configured.
#[derive(Debug, Default)]
pub(crate) struct NoHostPrefixOnCustomEndpoint;

impl Intercept for NoHostPrefixOnCustomEndpoint {
    fn name(&self) -> &'static str {
        "NoHostPrefixOnCustomEndpoint"
    }

    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg.load::<EndpointUrl>().is_some() {
            cfg.interceptor_state().unset::<EndpointPrefix>();
        }
        Ok(())
    }
}

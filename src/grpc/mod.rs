//! The gRPC transport: the listener (`listener`, `tls`, files `reload`ed on change), who
//! is calling ([`identity`]) and what they may do ([`authz`]), generated types, proto ⇄ domain
//! conversion, the one error mapping, the tonic service and the server with health and
//! reflection.

pub mod authz;
pub(crate) mod codec;
pub mod convert;
pub mod identity;
pub(crate) mod listener;
pub(crate) mod methods;
pub(crate) mod page_route;
pub(crate) mod reload;
pub mod server;
pub mod service;
pub(crate) mod status;
pub(crate) mod timeout;
pub(crate) mod tls;
pub mod wire;

/// Code generated from `proto/deadline/stats/v1/aggregation.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("deadline.stats.v1");

    /// Hand-written (see `build.rs`): the same wire format, able to send pre-encoded rows.
    pub use super::wire::GetAggregationResponse;

    /// The encoded descriptor set of our protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("aggregation_descriptor");
}

//! The service's methods, each named every way once (its name, the span name, the HTTP/2 path),
//! so no request formats a method's name; the service and the authorization policy both speak
//! of methods in these terms.

/// A method of the service, named every way once so no request formats its name.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    pub name: &'static str,
    /// `service/method`, the span name the RPC conventions ask for.
    pub full_name: &'static str,
    /// The HTTP/2 path it is called at.
    pub path: &'static str,
}

pub const START: Method = Method {
    name: "StartAggregation",
    full_name: "deadline.stats.v1.AggregationService/StartAggregation",
    path: "/deadline.stats.v1.AggregationService/StartAggregation",
};
pub const GET: Method = Method {
    name: "GetAggregation",
    full_name: "deadline.stats.v1.AggregationService/GetAggregation",
    path: "/deadline.stats.v1.AggregationService/GetAggregation",
};

pub const WATCH: Method = Method {
    name: "WatchAggregation",
    full_name: "deadline.stats.v1.AggregationService/WatchAggregation",
    path: "/deadline.stats.v1.AggregationService/WatchAggregation",
};

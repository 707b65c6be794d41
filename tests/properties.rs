//! Property tests (fuzzing without nightly): whatever a caller, an upstream client or an
//! operator's config file sends, the parsers answer with a value or a refusal, never a panic.
//!
//! - the gRPC request → domain conversion and its validation;
//! - page tokens (and that a token only works for its own aggregation);
//! - the emulator's REST request parsing;
//! - the `serve` config file (through the real command-line parser);
//! - the authorization policy file and the `x-forwarded-client-cert` header.
//!
//! `cargo test` runs 1,000 cases of each; `cargo test --release --test properties -- --ignored`
//! runs a million of each (README: the last result).

use deadline_stats_gateway::domain::ids;
use deadline_stats_gateway::gateway::paging;
use deadline_stats_gateway::grpc::pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CI_CASES: u32 = 1_000;
const MILLION: u32 = 1_000_000;

/// Runs `check` on `cases` values of `strategy`; a failing case (a panic included) is shrunk
/// and reported.
fn run<S: Strategy>(cases: u32, strategy: S, check: impl Fn(S::Value)) {
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, |v| {
        check(v);
        Ok(())
    }) {
        panic!("{e}");
    }
}

/// A test of `CI_CASES` cases and an ignored one of a million.
macro_rules! property {
    ($name:ident, $million:ident, $strategy:expr, $check:expr) => {
        #[test]
        fn $name() {
            run(CI_CASES, $strategy, $check);
        }

        #[test]
        #[ignore = "a million cases: cargo test --release --test properties -- --ignored"]
        fn $million() {
            run(MILLION, $strategy, $check);
        }
    };
}

/// Ids that are well formed, nearly so, or anything.
fn id_like(prefix: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{32}".prop_map(move |h| format!("{prefix}-{h}")),
        "[0-9a-fA-F]{0,40}".prop_map(move |h| format!("{prefix}-{h}")),
        ".{0,60}",
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop_oneof![
        Just(None),
        (1_600_000_000i64..1_900_000_000, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
    ]
}

fn start_requests() -> impl Strategy<Value = pb::StartAggregationRequest> {
    let resources = prop_oneof![
        Just(None),
        prop::collection::vec(id_like("queue"), 0..110)
            .prop_map(|ids| Some(pb::start_aggregation_request::Resources::QueueIds(pb::ResourceIds { ids }))),
        prop::collection::vec(id_like("fleet"), 0..110)
            .prop_map(|ids| Some(pb::start_aggregation_request::Resources::FleetIds(pb::ResourceIds { ids }))),
    ];
    let staleness = prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
    ];
    (
        id_like("farm"),
        resources,
        timestamp(),
        timestamp(),
        prop_oneof![Just(String::new()), Just("UTC".to_owned()), "UTC[+-][0-9]{2}:[0-9]{2}", ".{0,20}"],
        any::<i32>(),
        prop::collection::vec(prop_oneof![0i32..8, any::<i32>()], 0..6),
        prop::collection::vec(prop_oneof![0i32..6, any::<i32>()], 0..6),
        staleness,
        any::<bool>(),
        prop_oneof![0i32..3, any::<i32>()],
    )
        .prop_map(
            |(
                farm_id,
                resources,
                start_time,
                end_time,
                timezone,
                period,
                group_by,
                statistics,
                max_staleness,
                no_split,
                priority,
            )| {
                pb::StartAggregationRequest {
                    farm_id,
                    resources,
                    start_time,
                    end_time,
                    timezone,
                    period,
                    group_by,
                    statistics,
                    max_staleness,
                    no_split,
                    priority,
                    no_derive: false,
                }
            },
        )
}

property!(
    any_start_request_converts_or_is_refused,
    any_start_request_converts_or_is_refused_a_million_times,
    start_requests(),
    |req: pb::StartAggregationRequest| {
        let farm = req.farm_id.clone();
        if let Ok(ok) = deadline_stats_gateway::grpc::convert::start_request(req) {
            assert!(ids::is_farm_id(&ok.request.farm_id) && ok.request.farm_id == farm);
            assert!(ok.request.start_time < ok.request.end_time);
            assert!((1..=100).contains(&ok.request.resources.ids().len()));
        }
    }
);

property!(
    any_page_token_decodes_or_is_refused,
    any_page_token_decodes_or_is_refused_a_million_times,
    (".{0,80}", id_like("agg"), "[0-9a-f]{32}", 0usize..10_000_000),
    |(token, id, other, offset): (String, String, String, usize)| {
        let _ = paging::decode(&token, &id);
        let made = paging::encode(&id, offset);
        assert_eq!(paging::decode(&made, &id).ok(), Some(offset), "a token reads back");
        let other = format!("agg-{other}");
        if other != id {
            assert!(paging::decode(&made, &other).is_err(), "a token of {id} works for {other}");
        }
    }
);

/// JSON bodies of the Start route: the API's fields with values right, wrong and absent.
fn start_bodies() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,30}".prop_map(serde_json::Value::from),
        "20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
            .prop_map(serde_json::Value::from),
        prop::collection::vec(id_like("queue"), 0..4).prop_map(serde_json::Value::from),
        prop::collection::vec("[A-Z_]{0,12}", 0..4).prop_map(serde_json::Value::from),
    ];
    let key = prop::sample::select(vec![
        "resourceIds",
        "startTime",
        "endTime",
        "timezone",
        "period",
        "groupBy",
        "statistics",
        "clientToken",
        "queueIds",
    ]);
    let object = prop::collection::vec((key, value.clone()), 0..9).prop_map(|pairs| {
        let mut map = serde_json::Map::new();
        for (k, v) in pairs {
            let v = if k == "resourceIds" { serde_json::json!({ "queueIds": v }) } else { v };
            map.insert(k.to_owned(), v);
        }
        serde_json::to_vec(&map).unwrap_or_default()
    });
    prop_oneof![object, prop::collection::vec(any::<u8>(), 0..200)]
}

property!(
    any_emulator_start_body_parses_or_is_refused,
    any_emulator_start_body_parses_or_is_refused_a_million_times,
    (id_like("farm"), start_bodies()),
    |(farm, body): (String, Vec<u8>)| {
        if let Ok(req) = deadline_stats_gateway::emulator::parse_start_body(&farm, &body) {
            assert!(ids::is_farm_id(&req.farm_id));
        }
    }
);

/// Config files: `key = value` lines with the flags' names (and others), values of every kind.
fn config_files() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "farm-queue-capacity",
            "cache_max_bytes",
            "max-wait",
            "result-validity",
            "caller-start-rate",
            "listen",
            "store",
            "identity-source",
            "config",
            "upstream",
        ])
        .prop_map(str::to_owned),
        "[a-z_-]{1,12}",
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n:?}")),
        "[0-9]{1,4}(ms|s|m|h)".prop_map(|d| format!("\"{d}\"")),
        ".{0,20}".prop_map(|s| format!("{s:?}")),
        Just("true".to_owned()),
        Just("[1, 2]".to_owned()),
        Just("{ a = 1 }".to_owned()),
        ".{0,10}",
    ];
    prop_oneof![
        prop::collection::vec((key, value), 0..6)
            .prop_map(|lines| lines.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect::<String>()),
        ".{0,100}",
    ]
}

property!(
    any_config_file_is_read_or_refused,
    any_config_file_is_read_or_refused_a_million_times,
    config_files(),
    |text: String| {
        thread_local! {
            static FILE: std::path::PathBuf = std::env::temp_dir().join(format!(
                "dsg-config-property-{}-{:?}.toml",
                std::process::id(),
                std::thread::current().id()
            ));
        }
        FILE.with(|path| {
            std::fs::write(path, &text).expect("writes");
            let args = ["deadline-stats-gateway", "serve", "--upstream", "emulator", "--config"]
                .map(std::ffi::OsString::from)
                .into_iter()
                .chain([path.clone().into_os_string()])
                .collect();
            let _ = deadline_stats_gateway::cli::config::parse(args);
        });
    }
);

property!(
    any_policy_file_and_xfcc_header_is_read_or_refused,
    any_policy_file_and_xfcc_header_is_read_or_refused_a_million_times,
    (
        prop_oneof![
            ".{0,200}",
            prop::collection::vec(
                (prop::collection::vec(".{0,20}", 0..3), prop::collection::vec(id_like("farm"), 0..3)),
                0..4
            )
            .prop_map(|rules| {
                rules
                    .into_iter()
                    .map(|(ids, farms)| format!("[[rule]]\nidentities = {ids:?}\nfarms = {farms:?}\n"))
                    .collect::<String>()
            }),
        ],
        "[A-Za-z=;,\"\\\\:/. -]{0,80}",
        ".{0,40}",
    ),
    |(policy, xfcc, identity): (String, String, String)| {
        if let Ok(p) = deadline_stats_gateway::grpc::authz::Policy::parse(&policy) {
            let _ = p.allows(&identity, deadline_stats_gateway::grpc::service::GET, "farm-0");
        }
        let _ = deadline_stats_gateway::grpc::identity::xfcc_uri(&xfcc);
    }
);

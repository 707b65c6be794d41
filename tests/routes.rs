//! One gateway for farms in several regions and accounts (`--upstream-routes`), end to end: a
//! gateway process in front of two emulator processes acting as two regions, through the real
//! `aws-sdk-deadline` client. One route lists its farms; the other discovers them with
//! `ListFarms` and reaches them with a role assumed through the SDK's STS role provider (the
//! emulator's STS checks the external id and hands out credentials that expire in seconds; its
//! Deadline endpoint checks each call's SigV4 signature, region included, and records the key).
//! A farm no route serves, or two routes claim, is refused before anything is queued; an edited
//! routes file moves a farm; a route whose region throttles every Start does not hold up
//! another route's farms (counted in upstream calls, not timed).

mod common;

use common::*;
use deadline_stats_gateway::bench::requests::{farm, start_request};
use deadline_stats_gateway::grpc::pb::{AggregationState, GroupBy};
use std::time::Duration;
use tonic_types::StatusExt;

const ROLE: &str = "arn:aws:iam::123456789012:role/deadline-stats-reader";
/// What east's STS hands out lasts this long: the SDK must refresh within the test.
const EAST_CREDENTIALS: Duration = Duration::from_secs(15);

/// The access keys `farm`'s calls at `endpoint` were signed with.
async fn keys_of(endpoint: &str, farm: &str) -> Vec<String> {
    let farm = upstream_of(endpoint, farm).await;
    farm["access_keys"]
        .as_array()
        .map(|k| k.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// `farms = [...]` of farms number `farms`.
fn farm_list(farms: &[u64]) -> String {
    let farms: Vec<String> = farms.iter().map(|n| format!("\"{}\"", farm(*n))).collect();
    format!("farms = [{}]", farms.join(", "))
}

/// A route named `name` listing `farms`, in `region` at `endpoint`, with the gateway's own
/// credentials.
fn listed_route(name: &str, region: &str, endpoint: &str, farms: &[u64]) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nregion = \"{region}\"\nendpoint_url = \"{endpoint}\"\n{}\n",
        farm_list(farms)
    )
}

fn west_route(west: &str, farms: &[u64]) -> String {
    listed_route("west", "us-west-2", west, farms)
}

fn east_route(east: &str, farms: Option<&[u64]>) -> String {
    let serves = farms.map_or_else(|| "discover = true".to_owned(), farm_list);
    format!(
        "[[route]]\nname = \"east\"\n{serves}\nregion = \"eu-west-1\"\nendpoint_url = \"{east}\"\nrole_arn = \"{ROLE}\"\nexternal_id = \"studio-east\"\nsts_endpoint_url = \"{east}\"\n"
    )
}

/// Starts a request of `days` days on farm `n` and waits for it: its final state.
async fn run(client: &mut Client, n: u64, days: i64) -> AggregationState {
    let answer = client.start_aggregation(start_request(n, 1, days, &[GroupBy::QueueId])).await.expect("start");
    let id = answer.into_inner().aggregation.expect("aggregation").aggregation_id;
    until_terminal(client, &id).await.state()
}

/// The refusal of a Start on farm `n`: its code, ErrorInfo reason and message.
async fn refusal(client: &mut Client, n: u64, days: i64) -> Option<(tonic::Code, String, String)> {
    match client.start_aggregation(start_request(n, 1, days, &[GroupBy::QueueId])).await {
        Ok(_) => None,
        Err(status) => {
            let reason = status.get_details_error_info().map(|i| i.reason).unwrap_or_default();
            Some((status.code(), reason, status.message().to_owned()))
        }
    }
}

/// Waits until the gateway's metric `name` is `value`.
async fn until_metric(admin: &str, name: &str, value: f64) {
    eventually(Duration::from_secs(30), || async move {
        let metrics = parse_metrics(&http("GET", &format!("{admin}/metrics"), None, &[]).await.2);
        (metrics.get(name) == Some(&value)).then_some(())
    })
    .await;
}

fn rewrite(path: &std::path::Path, text: &str) {
    // Written aside and renamed: the gateway never reads half a file.
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).expect("writes");
    std::fs::rename(&aside, path).expect("renames");
}

#[tokio::test]
async fn farms_in_two_regions_reach_their_own_region_and_an_edited_file_moves_a_farm() {
    let dir = test_dir("routes-two-regions");
    // Farm 3 exists in both regions (a farm being migrated): where it is served is the routes
    // file's word.
    let (_west, west) = spawn_emulator(&[
        "--region",
        "us-west-2",
        "--aggregation-duration",
        "300ms",
        "--farm",
        &farm(1),
        "--farm",
        &farm(3),
    ]);
    let lifetime = format!("{}s", EAST_CREDENTIALS.as_secs());
    let (_east, east) = spawn_emulator(&[
        "--region",
        "eu-west-1",
        "--aggregation-duration",
        "300ms",
        "--sts-credential-lifetime",
        &lifetime,
        "--sts-external-id",
        "studio-east",
        "--farm",
        &farm(2),
        "--farm",
        &farm(3),
    ]);
    let path = dir.join("routes.toml");
    rewrite(&path, &format!("{}\n{}", west_route(&west, &[1]), east_route(&east, None)));
    let path_arg = path.display().to_string();
    let flags = [
        "--upstream-routes",
        path_arg.as_str(),
        "--route-discovery-interval",
        "1s",
        "--poll-initial-interval",
        "100ms",
        "--upstream-start-rate",
        "0",
        "--caller-start-rate",
        "0",
        "--caller-get-rate",
        "0",
    ];
    let (_gateway, url, admin) = spawn_replica(&west, &flags);
    let mut client = client_of(&url).await;
    let begin = tokio::time::Instant::now();

    // Farm 1 is west's by the list: signed for us-west-2 with the gateway's own key.
    assert_eq!(run(&mut client, 1, 1).await, AggregationState::Completed);
    assert_eq!(keys_of(&west, &farm(1)).await, ["test"]);
    assert!(emulator_stats(&east).await["farms"].get(farm(1)).is_none(), "east never saw farm 1");

    // Farms 2 and 3 are east's by discovery: signed for eu-west-1 with the assumed role's key.
    for n in [2, 3] {
        assert_eq!(run(&mut client, n, 1).await, AggregationState::Completed, "farm {n}");
        let keys = keys_of(&east, &farm(n)).await;
        assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with("ASIA")), "assumed keys only: {keys:?}");
    }
    assert!(emulator_stats(&west).await["farms"].get(farm(3)).is_none(), "west never saw farm 3");
    let roles = &emulator_stats(&east).await["assumed_roles"];
    assert_eq!(roles[0]["role_arn"], ROLE, "{roles}");

    // A farm no route serves (and no [default]) is refused before anything is queued.
    let (code, reason, message) = refusal(&mut client, 9, 1).await.expect("refused");
    assert_eq!((code, reason.as_str()), (tonic::Code::FailedPrecondition, "FARM_NOT_ROUTED"), "{message}");
    for endpoint in [&west, &east] {
        assert!(emulator_stats(endpoint).await["farms"].get(farm(9)).is_none(), "no upstream saw farm 9");
    }

    // West lists farm 3 too: both routes claim it, so neither serves it.
    rewrite(&path, &format!("{}\n{}", west_route(&west, &[1, 3]), east_route(&east, None)));
    until_metric(&admin, "dsg_upstream_route_conflicts", 1.0).await;
    let (code, reason, message) = refusal(&mut client, 3, 2).await.expect("refused");
    assert_eq!((code, reason.as_str()), (tonic::Code::FailedPrecondition, "FARM_NOT_ROUTED"));
    assert!(message.contains("west") && message.contains("east"), "{message}");

    // East lists its farms instead of discovering them: farm 3 is west's now.
    rewrite(&path, &format!("{}\n{}", west_route(&west, &[1, 3]), east_route(&east, Some(&[2]))));
    until_metric(&admin, "dsg_upstream_route_conflicts", 0.0).await;
    assert_eq!(run(&mut client, 3, 3).await, AggregationState::Completed);
    assert_eq!(upstream_of(&west, &farm(3)).await["aggregations_started"], 1, "moved to west");
    assert_eq!(upstream_of(&east, &farm(3)).await["aggregations_started"], 1, "east's one is from before");

    // East's first credentials have expired by now: the SDK assumed the role again, and calls
    // signed with the new key are accepted.
    tokio::time::sleep_until(begin + EAST_CREDENTIALS + Duration::from_secs(1)).await;
    assert_eq!(run(&mut client, 2, 2).await, AggregationState::Completed);
    let keys = keys_of(&east, &farm(2)).await;
    assert!(keys.len() >= 2, "a refreshed key signed the later calls: {keys:?}");
    assert!(emulator_stats(&east).await["assumed_roles"].as_array().is_some_and(|r| r.len() >= 2));

    let metrics = parse_metrics(&http("GET", &format!("{admin}/metrics"), None, &[]).await.2);
    let calls = |route: &str| {
        let key = format!(
            "dsg_upstream_calls_total{{operation=\"StartSessionsStatisticsAggregation\",outcome=\"ok\",route=\"{route}\"}}"
        );
        metrics.get(&key).copied().unwrap_or_default()
    };
    assert_eq!((calls("west"), calls("east")), (2.0, 3.0), "{metrics:?}");
    assert_eq!(metrics.get("dsg_upstream_route_conflicts"), Some(&0.0));
}

#[tokio::test]
async fn a_region_throttling_every_start_does_not_hold_up_another_routes_farms() {
    let dir = test_dir("routes-pacing");
    let (_west, west) = spawn_emulator(&[
        "--region",
        "us-west-2",
        "--fault-error",
        "ThrottlingException=1.0",
        "--fault-operations",
        "start",
    ]);
    let (_east, east) = spawn_emulator(&["--region", "eu-west-1", "--aggregation-duration", "300ms"]);
    let path = dir.join("routes.toml");
    let east_plain = listed_route("east", "eu-west-1", &east, &[12]);
    rewrite(&path, &format!("{}\n{east_plain}", west_route(&west, &[11])));
    let path_arg = path.display().to_string();
    // One upstream Start every 50 s per route.
    let flags =
        ["--upstream-routes", path_arg.as_str(), "--upstream-start-rate", "0.02", "--poll-initial-interval", "100ms"];
    let (_gateway, url, _admin) = spawn_replica(&west, &flags);
    let mut client = client_of(&url).await;

    // West's aggregation takes west's one token, is throttled, and waits 50 s for the next.
    client.start_aggregation(start_request(11, 1, 1, &[GroupBy::QueueId])).await.expect("queued");
    eventually(Duration::from_secs(30), || {
        let west = west.clone();
        async move { (upstream_of(&west, &farm(11)).await["start_calls"] == 1).then_some(()) }
    })
    .await;
    // West's retry (after the emulator's Retry-After of 1 s) now waits in its pacer's line.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // East's farm starts on east's own token: it completes while west has still made one call.
    // Sharing one bucket, east's Start would have waited in line behind west's retry, until
    // after west's second call 50 s on.
    assert_eq!(run(&mut client, 12, 1).await, AggregationState::Completed);
    assert_eq!(upstream_of(&east, &farm(12)).await["aggregations_started"], 1);
    assert_eq!(upstream_of(&west, &farm(11)).await["start_calls"], 1, "west waits on its own bucket");
}

#[tokio::test]
async fn check_config_names_the_line_of_a_mistake_in_the_routes_file() {
    let dir = test_dir("routes-check");
    let path = dir.join("routes.toml");
    let check = |path: &std::path::Path| {
        std::process::Command::new(BIN)
            .args(["serve", "--upstream", "aws", "--region", "us-west-2", "--check-config", "--upstream-routes"])
            .arg(path)
            .output()
            .expect("runs")
    };
    let good =
        format!("[default]\n\n{}\n{}", west_route("http://127.0.0.1:1", &[1]), east_route("http://127.0.0.1:2", None));
    std::fs::write(&path, good).expect("writes");
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("routes ok: 2 routes (1 discovering their farms) and a [default]"), "{stdout}");

    let bad = format!(
        "{}\n[[route]]\nname = \"east\"\nregion = \"eu-west-1\"\nfarms = [\"{}\", \"{}\"]\nrole_arn = \"arn:aws:iam::123456789012:role/x\"\n",
        west_route("http://127.0.0.1:1", &[1]),
        farm(2),
        farm(1)
    );
    std::fs::write(&path, bad).expect("writes");
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 10") && stderr.contains("route 'west' (line 5)"), "{stderr}");

    let out = std::process::Command::new(BIN)
        .args(["serve", "--upstream", "emulator", "--check-config", "--upstream-routes"])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream-routes needs --upstream aws"));
}

#[tokio::test]
async fn a_region_unreachable_at_start_up_is_routed_once_it_answers_and_a_bad_edit_changes_nothing() {
    let dir = test_dir("routes-late");
    let (_west, west) = spawn_emulator(&["--region", "us-west-2", "--aggregation-duration", "300ms"]);
    let port = fresh_port();
    let late = format!("http://127.0.0.1:{port}");
    let east =
        format!("[[route]]\nname = \"east\"\nregion = \"eu-west-1\"\nendpoint_url = \"{late}\"\ndiscover = true\n");
    let path = dir.join("routes.toml");
    let good = format!("{}\n{east}", west_route(&west, &[21]));
    rewrite(&path, &good);
    let path_arg = path.display().to_string();
    let flags = [
        "--upstream-routes",
        path_arg.as_str(),
        "--route-discovery-interval",
        "1s",
        "--poll-initial-interval",
        "100ms",
    ];
    // Nothing listens in east yet: the gateway starts anyway, and east's farms are not routed.
    let (_gateway, url, admin) = spawn_replica(&west, &flags);
    let mut client = client_of(&url).await;
    let (_, reason, _) = refusal(&mut client, 22, 1).await.expect("not routed yet");
    assert_eq!(reason, "FARM_NOT_ROUTED");
    let failed = r#"dsg_upstream_route_discoveries_total{route="east",outcome="failed"}"#;
    let metrics = parse_metrics(&http("GET", &format!("{admin}/metrics"), None, &[]).await.2);
    assert!(metrics.get(failed).is_some_and(|n| *n >= 1.0), "{metrics:?}");

    // East comes up: the next discovery routes its farm.
    let mut child = std::process::Command::new(BIN)
        .args(["emulator", "--listen", &format!("127.0.0.1:{port}"), "--region", "eu-west-1"])
        .args(["--aggregation-duration", "300ms", "--farm", &farm(22)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the emulator starts");
    stdout_lines(&mut child, 1);
    let _east = Running(child);
    until_metric(&admin, r#"dsg_upstream_route_farms{route="east"}"#, 1.0).await;
    assert_eq!(run(&mut client, 22, 1).await, AggregationState::Completed);
    assert_eq!(upstream_of(&late, &farm(22)).await["aggregations_started"], 1);

    // An edit that does not parse is refused; the routes in force stay.
    rewrite(&path, &good.replace("discover = true", "discover = maybe"));
    until_metric(&admin, r#"dsg_upstream_routes_reloads_total{outcome="invalid"}"#, 1.0).await;
    assert_eq!(run(&mut client, 21, 2).await, AggregationState::Completed);
    assert_eq!(run(&mut client, 22, 2).await, AggregationState::Completed);
}

#[tokio::test]
async fn an_aggregation_running_when_its_farm_moves_is_read_to_the_end_where_it_started() {
    let dir = test_dir("routes-move-running");
    let (_west, west) = spawn_emulator(&["--region", "us-west-2"]);
    let (_east, east) = spawn_emulator(&["--region", "eu-west-1", "--aggregation-duration", "4s"]);
    let east_route = |farms: &[u64]| listed_route("east", "eu-west-1", &east, farms);
    let path = dir.join("routes.toml");
    rewrite(&path, &format!("{}\n{}", west_route(&west, &[31]), east_route(&[32])));
    let path_arg = path.display().to_string();
    let flags = ["--upstream-routes", path_arg.as_str(), "--poll-initial-interval", "100ms"];
    let (_gateway, url, admin) = spawn_replica(&west, &flags);
    let mut client = client_of(&url).await;

    let answer = client.start_aggregation(start_request(32, 1, 1, &[GroupBy::QueueId])).await.expect("start");
    let id = answer.into_inner().aggregation.expect("aggregation").aggregation_id;
    eventually(Duration::from_secs(30), || {
        let east = east.clone();
        async move { (upstream_of(&east, &farm(32)).await["aggregations_started"] == 1).then_some(()) }
    })
    .await;
    // Farm 32 moves to west while its aggregation runs in east.
    rewrite(&path, &format!("{}\n{}", west_route(&west, &[31, 32]), east_route(&[33])));
    until_metric(&admin, r#"dsg_upstream_routes_reloads_total{outcome="ok"}"#, 1.0).await;
    assert_eq!(until_terminal(&mut client, &id).await.state(), AggregationState::Completed);
    assert!(upstream_of(&east, &farm(32)).await["get_calls"].as_u64().is_some_and(|n| n >= 1));
    assert!(
        emulator_stats(&west).await["farms"].get(farm(32)).is_none(),
        "west was never asked for east's aggregation"
    );
    // New work on farm 32 goes west.
    assert_eq!(run(&mut client, 32, 2).await, AggregationState::Completed);
    assert_eq!(upstream_of(&west, &farm(32)).await["aggregations_started"], 1);
}

#[tokio::test]
async fn on_redis_each_routes_upstream_pacing_is_a_bucket_every_replica_shares() {
    let redis = redis_server();
    let dir = test_dir("routes-redis");
    let (_west, west) = spawn_emulator(&["--region", "us-west-2", "--aggregation-duration", "300ms"]);
    let (_east, east) = spawn_emulator(&["--region", "eu-west-1", "--aggregation-duration", "300ms"]);
    let path = dir.join("routes.toml");
    let east_route = listed_route("east", "eu-west-1", &east, &[42]);
    rewrite(&path, &format!("{}\n{east_route}", west_route(&west, &[41])));
    let (path_arg, url) = (path.display().to_string(), redis.url());
    // A Start every 50 s per route: each bucket stays in Redis while it refills.
    let flags = [
        "--upstream-routes",
        path_arg.as_str(),
        "--store",
        "redis",
        "--redis-url",
        url.as_str(),
        "--upstream-start-rate",
        "0.02",
        "--poll-initial-interval",
        "100ms",
    ];
    let (_gateway, grpc, _admin) = spawn_replica(&west, &flags);
    let mut client = client_of(&grpc).await;
    for n in [41, 42] {
        assert_eq!(run(&mut client, n, 1).await, AggregationState::Completed, "farm {n}");
    }
    let mut conn = redis_conn(&url).await;
    for key in ["dsg:rate:upstream-start:west", "dsg:rate:upstream-start:east"] {
        let exists: bool = ::redis::cmd("EXISTS").arg(key).query_async(&mut conn).await.expect("EXISTS");
        assert!(exists, "{key}: the route's shared bucket");
    }
    let default: bool =
        ::redis::cmd("EXISTS").arg("dsg:rate:upstream-start").query_async(&mut conn).await.expect("EXISTS");
    assert!(!default, "no call went by the default route");
}

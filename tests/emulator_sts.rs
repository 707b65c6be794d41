//! The emulator's STS and its SigV4 checks: the real `aws-sdk-deadline` client assumes a role
//! through the SDK's own role provider against the emulator's STS and its calls, signed with
//! the assumed key, reach the farm (the emulator verifies the signature and records the key);
//! a client signed for another region is refused; credentials from one emulator are accepted by
//! another with the same STS secret (two regions, one account) and refused by one without it.
//! botocore checks the same from the other side (`tests/botocore_sts.py`): its STS parser, its
//! signer, and AWS's error codes for a wrong secret, a forged token and another region.

mod common;

use common::*;
use deadline_stats_gateway::domain::GroupBy;
use deadline_stats_gateway::emulator::sts::StsConfig;
use deadline_stats_gateway::emulator::{EmulatorConfig, EmulatorHandle};
use deadline_stats_gateway::upstream::Upstream;
use deadline_stats_gateway::upstream::sdk::{AssumeRole, SdkUpstream, SdkUpstreamConfig};

const ROLE: &str = "arn:aws:iam::123456789012:role/stats-reader";

async fn emulator_in(region: &str, sts: StsConfig) -> EmulatorHandle {
    let config = EmulatorConfig { region: region.into(), sts, ..EmulatorConfig::default() };
    EmulatorHandle::spawn(config, "127.0.0.1:0".parse().expect("addr")).await.expect("binds")
}

/// The SDK client of `endpoint` for `region`, with the role assumed at `sts`'s STS.
async fn assuming(endpoint: &str, region: &str, sts: &str) -> SdkUpstream {
    let config = SdkUpstreamConfig {
        region: Some(region.into()),
        assume_role: Some(AssumeRole {
            role_arn: ROLE.into(),
            external_id: None,
            session_name: "dsg-test".into(),
            sts_endpoint_url: Some(sts.to_owned()),
        }),
        ..sdk_config(endpoint)
    };
    SdkUpstream::connect(&config).await.expect("SDK client builds")
}

#[tokio::test]
async fn calls_signed_with_a_role_assumed_through_the_sdk_reach_the_farm_and_are_checked() {
    let west = emulator_in("us-west-2", StsConfig::default()).await;
    let client = assuming(&west.endpoint_url(), "us-west-2", &west.endpoint_url()).await;
    let request = request(1, 1, 1, vec![GroupBy::QueueId]);
    client.start(&request).await.expect("the assumed key's signature verifies");
    let stats = west.emulator().stats();
    let keys = &stats.farms[&request.farm_id].access_keys;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = keys.iter().next().expect("a key");
    assert!(key.starts_with("ASIA"), "the assumed role's key, not the base one: {key}");
    assert_eq!(stats.assumed_roles.len(), 1);
    assert_eq!((stats.assumed_roles[0].role_arn.as_str(), &stats.assumed_roles[0].access_key), (ROLE, key));

    // Another region of the same account (the same STS secret) accepts the key; an emulator
    // with another secret does not know it.
    let east = emulator_in("us-east-1", StsConfig::default()).await;
    let in_east = assuming(&east.endpoint_url(), "us-east-1", &west.endpoint_url()).await;
    in_east.start(&request).await.expect("same account, other region");
    let stranger =
        emulator_in("us-east-1", StsConfig { secret: "another account".into(), ..StsConfig::default() }).await;
    let refused = assuming(&stranger.endpoint_url(), "us-east-1", &west.endpoint_url()).await;
    let e = refused.start(&request).await.expect_err("a token it did not issue");
    assert!(format!("{e:?}").contains("UnrecognizedClient"), "{e:?}");
}

#[tokio::test]
async fn an_emulator_given_farms_lists_them_page_by_page_and_knows_no_other() {
    let farms: Vec<String> = (0..130).map(farm).collect();
    let config = EmulatorConfig { farms: farms.clone(), ..EmulatorConfig::default() };
    let emu = EmulatorHandle::spawn(config, "127.0.0.1:0".parse().expect("addr")).await.expect("binds");
    let client = sdk(&emu.endpoint_url()).await;
    let mut listed = client.farms().await.expect("ListFarms");
    listed.sort();
    let mut expected = farms.clone();
    expected.sort();
    assert_eq!(listed, expected, "130 farms over two pages of at most 100");
    client.start(&request(7, 1, 1, vec![GroupBy::QueueId])).await.expect("a farm it holds");
    let unknown = request(1000, 1, 1, vec![GroupBy::QueueId]);
    let e = client.start(&unknown).await.expect_err("a farm it does not hold");
    assert!(format!("{e:?}").contains("does not exist"), "{e:?}");

    // Without a list, the farms seen so far.
    let open = emulator_in("us-west-2", StsConfig::default()).await;
    let client = sdk(&open.endpoint_url()).await;
    assert_eq!(client.farms().await.expect("ListFarms"), Vec::<String>::new());
    client.start(&request(3, 1, 1, vec![GroupBy::QueueId])).await.expect("any farm");
    assert_eq!(client.farms().await.expect("ListFarms"), vec![farm(3)]);
}

#[tokio::test]
async fn a_client_signing_for_another_region_is_refused() {
    let west = emulator_in("us-west-2", StsConfig::default()).await;
    let config = SdkUpstreamConfig { region: Some("eu-west-1".into()), ..sdk_config(&west.endpoint_url()) };
    let client = SdkUpstream::connect(&config).await.expect("builds");
    let e = client.start(&request(2, 1, 1, vec![GroupBy::QueueId])).await.expect_err("another region");
    assert!(format!("{e:?}").contains("InvalidSignature"), "{e:?}");
    assert!(west.emulator().stats().farms.values().all(|f| f.aggregations_started == 0));
}

#[tokio::test]
async fn botocore_reads_the_sts_answers_and_its_signatures_are_verified() {
    let path = tokio::task::spawn_blocking(botocore_path).await.expect("joins");
    let sts = StsConfig { external_id: Some("expected-id".into()), ..StsConfig::default() };
    let emu = emulator_in("us-west-2", sts).await;
    python_check("botocore_sts.py", &[&emu.endpoint_url()], &path).await;
}

#[tokio::test]
async fn an_expired_session_token_is_refused_as_aws_refuses_it() {
    let emu = emulator_in("us-west-2", StsConfig::default()).await;
    let expired = StsConfig::default().issue(std::time::SystemTime::now() - std::time::Duration::from_secs(7200));
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={}/20261207/us-west-2/deadline/aws4_request, SignedHeaders=host, Signature=00",
        expired.access_key
    );
    let url = format!(
        "{}/2023-10-12/farms/{}/sessions-statistics-aggregation?aggregationId={}",
        emu.endpoint_url(),
        farm(1),
        "0".repeat(32)
    );
    let headers = [("authorization", auth.as_str()), ("x-amz-security-token", expired.session_token.as_str())];
    let (status, headers, body) = http("GET", &url, None, &headers).await;
    let kind = headers.get("x-amzn-errortype").and_then(|v| v.to_str().ok());
    assert_eq!((status, kind), (403, Some("ExpiredTokenException")), "{body}");
    assert!(body.contains("expired"), "{body}");
}

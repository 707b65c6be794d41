//! A full cache evicts the least recently used result, never the fresh one.

use super::*;

#[tokio::test]
async fn a_full_cache_evicts_the_least_recently_used_result_not_the_fresh_one() {
    // One result's weight, measured on a gateway of its own.
    let probe = gateway(Duration::from_millis(20), fast_config(HOUR)).await;
    let mut c = probe.client().await;
    let id = id_of(&start(&mut c, start_request(40, 1, 10, &[GroupBy::QueueId])).await);
    wait_terminal(&mut c, &id).await;
    let weight = probe.gateway.stats().store.cached_bytes;
    assert!(weight > 10_000, "a result of 240 rows: {weight} bytes");

    let mut config = fast_config(HOUR);
    config.cache_max_bytes = weight * 2 + weight / 2;
    config.result_grace = Duration::from_millis(300);
    let gw = gateway(Duration::from_millis(20), config).await;
    let mut client = gw.client().await;
    let mut ids = Vec::new();
    for farm in 41..=43 {
        let id = id_of(&start(&mut client, start_request(farm, 1, 10, &[GroupBy::QueueId])).await);
        wait_terminal(&mut client, &id).await;
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    let page = client.get_aggregation(get_request(c, 1000, "", Duration::ZERO)).await.expect("C is served");
    assert_eq!(page.into_inner().statistics.len(), 240, "every row of the fresh result");
    get(&mut client, b).await.expect("B stays");
    let evicted = get(&mut client, a).await.expect_err("A, the least recently used, is evicted");
    assert_eq!(evicted.get_details_error_info().map(|e| e.reason), Some("AGGREGATION_EVICTED".into()));
    let again = start(&mut client, start_request(43, 1, 10, &[GroupBy::QueueId])).await;
    assert_eq!(again.disposition(), Disposition::Cached, "C's identical Start is not run again");
    assert_eq!(gw.upstream(&farm(43)).await["start_calls"], 1);
}

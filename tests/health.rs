//! /healthz, /readyz and /metrics on --metrics-listen.

mod common;

use std::time::Duration;

use common::*;

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn health_readiness_and_metrics_follow_a_study() {
    let http = free_port();
    let (gw, _store) = local_gateway(&["--metrics-listen", &format!("127.0.0.1:{http}")]);
    assert_eq!(http_get(http, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(http, "/readyz"), (200, "ready\n".into()));
    let (_, before) = http_get(http, "/metrics");
    assert_eq!(metric(&before, "dicom_gateway_instances_stored_total"), 0.0);

    send_testdata(gw.port);
    let _ = echoscu(gw.port, "NOT_THE_GATEWAY", "ECHOSCU");
    let mut scu = RawScu::associate(gw.port, AE);
    assert_eq!(
        scu.store(
            1,
            "1.2.3.4.99",
            &ct_dataset("1.2.3.4.1", "1.2.3", "1.2.3.1", 100),
            4096
        ),
        0xA900
    );
    scu.release();

    let (status, after) = http_get(http, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(&after, "dicom_gateway_instances_stored_total"),
        5.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "dicom_gateway_instances_failed_total{status=\"0xA900\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "dicom_gateway_associations_total"),
        6.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "dicom_gateway_associations_rejected_total{reason=\"called AE title not recognized\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "dicom_gateway_associations_active"),
        0.0,
        "{after}"
    );
    assert_eq!(metric(&after, "dicom_gateway_batches_open"), 1.0, "{after}");
    assert_eq!(
        metric(&after, "dicom_gateway_store_seconds_count"),
        5.0,
        "{after}"
    );
    let sent: u64 = TESTDATA_FILES
        .iter()
        .map(|f| {
            let b = std::fs::read(testdata(f)).unwrap();
            (b.len() - dicom_gateway::part10::split_part10(&b).unwrap().1) as u64
        })
        .sum();
    assert!(
        metric(&after, "dicom_gateway_bytes_received_total") >= sent as f64,
        "{after}"
    );
}

#[test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
fn readiness_turns_unready_when_s3_is_unreachable_and_ready_again_when_it_returns() {
    let endpoint = localstack();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bucket = rt.block_on(async { new_bucket(&s3_client(&endpoint).await, "gw-ready").await });
    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    let http = free_port();
    let _gw = Gateway::start(
        &[
            "--s3-bucket",
            &bucket,
            "--s3-force-path-style",
            "--metrics-listen",
            &format!("127.0.0.1:{http}"),
        ],
        &[("AWS_ENDPOINT_URL", &proxy.url())],
    );
    let wait_for = |want: u16| {
        eventually(
            &format!("/readyz to answer {want}"),
            Duration::from_secs(40),
            || match http_get(http, "/readyz") {
                (status, body) if status == want => Ok(body),
                (status, body) => Err(format!("{status} {body}")),
            },
        )
    };
    wait_for(200);
    proxy.down();
    let body = wait_for(503);
    assert!(body.contains("object store"), "{body}");
    assert_eq!(http_get(http, "/healthz").0, 200, "alive while unready");
    proxy.up();
    wait_for(200);
}

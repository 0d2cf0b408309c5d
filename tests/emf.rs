//! End-to-end tests of the CloudWatch embedded metric format records the gateway writes in JSON
//! log mode: real DCMTK clients against the real binary, records read back from its stderr.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The EMF records in a log: the JSON lines with an `_aws` member.
fn emf_records(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.contains("\"_aws\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The sum of `metric` over the records without any dimension but `Service`.
fn total(records: &[Value], metric: &str) -> u64 {
    records
        .iter()
        .filter(|r| {
            r["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == serde_json::json!([["Service"]])
        })
        .filter_map(|r| r[metric].as_u64())
        .sum()
}

/// Every metric a record declares is a member of its root, and the limits hold.
fn assert_valid(record: &Value) {
    let directive = &record["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "DicomGateway");
    assert!(record["_aws"]["Timestamp"].is_u64());
    assert_eq!(record["Service"], "dicom-gateway");
    let metrics = directive["Metrics"].as_array().unwrap();
    assert!(!metrics.is_empty() && metrics.len() <= 100);
    for m in metrics {
        let value = &record[m["Name"].as_str().unwrap()];
        match value {
            Value::Number(_) => {}
            Value::Array(values) => assert!(values.len() <= 100),
            other => panic!("{m}: {other}"),
        }
    }
}

#[test]
fn instances_stored_are_counted_in_a_record_each_interval() {
    let (gw, _store) = local_gateway(&["--log-format", "json", "--emf-interval", "100ms"]);
    send_testdata(gw.port);
    // Five instances, possibly spread over several intervals: wait until the records add up.
    let log = eventually(
        "EMF records adding up to five stored instances",
        Duration::from_secs(20),
        || {
            let log = gw.log_text();
            match total(&emf_records(&log), "InstancesStored") {
                5 => Ok(log),
                n => Err(format!("{n} so far; log:\n{log}")),
            }
        },
    );
    let records = emf_records(&log);
    records.iter().for_each(assert_valid);
    assert_eq!(total(&records, "AssociationsAccepted"), 5);
    assert_eq!(total(&records, "StoreFailures"), 0);
    let latencies: Vec<f64> = records
        .iter()
        .filter_map(|r| r["StoreLatency"].as_array())
        .flatten()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(latencies.len(), 5, "one latency per stored instance");
    assert!(total(&records, "BytesReceived") > 0);
    assert_no_patient_data(&log);
}

#[test]
fn a_rejected_association_is_counted_by_reason_and_the_last_interval_is_written_at_shutdown() {
    // An interval longer than the test: only the record written at shutdown can carry the counts.
    let (mut gw, _store) = local_gateway(&["--log-format", "json", "--emf-interval", "1h"]);
    let out = echoscu(gw.port, "NOT_THE_GATEWAY", "ECHOSCU");
    assert!(!out.status.success(), "{}", text(&out));
    gw.wait_for_log("association rejected");
    send_testdata(gw.port);
    assert!(
        emf_records(&gw.log_text()).is_empty(),
        "nothing before the interval ends"
    );
    let log = gw.stop();
    let records = emf_records(&log);
    records.iter().for_each(assert_valid);
    assert_eq!(total(&records, "InstancesStored"), 5);
    assert_eq!(total(&records, "AssociationsRejected"), 1);
    let by_reason: Vec<&Value> = records
        .iter()
        .filter(|r| r.get("Reason").is_some())
        .collect();
    assert_eq!(by_reason.len(), 1, "{records:#?}");
    assert_eq!(
        by_reason[0]["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
        serde_json::json!([["Service", "Reason"]])
    );
    assert_eq!(by_reason[0]["AssociationsRejected"], 1);
    assert_no_patient_data(&log);
}

#[test]
fn text_logs_carry_no_records() {
    let (mut gw, _store) = local_gateway(&["--emf-interval", "10ms"]);
    send_testdata(gw.port);
    let log = gw.stop();
    assert!(emf_records(&log).is_empty(), "{log}");
}

//! CloudWatch metrics from the log: in JSON log mode the gateway writes, once per interval in which
//! anything happened, CloudWatch embedded metric format (EMF) records to stderr beside its log
//! lines. On ECS the awslogs driver sends every stderr line to the log group, and CloudWatch Logs
//! turns each EMF record into metric data points in the `DicomGateway` namespace: no agent, no
//! `PutMetricData` permission, nothing to install.
//!
//! Record layout, from "Specification: Embedded metric format"
//! (<https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html>):
//! the root object holds `_aws` = `{Timestamp (ms since the epoch), CloudWatchMetrics: [{Namespace,
//! Dimensions: [[keys]], Metrics: [{Name, Unit}]}]}`; every metric name and dimension key is a member
//! of the root (dimension values strings, metric values numbers or arrays of numbers); at most 100
//! metric definitions per directive, at most 100 values per array, at most 30 keys per dimension
//! set; a record is one log event, at most 1 MB. No header is needed when the records arrive as
//! ordinary log events ("Using the PutLogEvents API to send manually-created embedded metric format
//! logs", <https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Generation_PutLogEvents.html>).
//!
//! What is counted comes from [`crate::metrics`] (one count per concept, also on `/metrics`): the
//! emitter subtracts the counters' totals at the start of the interval from those at its end. The
//! metrics (all with the dimension `Service` = `dicom-gateway`):
//!
//! | metric | unit | extra dimension | what |
//! |---|---|---|---|
//! | `InstancesStored` | Count | | instances made durable and acknowledged with Success |
//! | `BytesStored` | Bytes | | bytes of the objects made durable |
//! | `BytesReceived` | Bytes | | data set bytes received (stored or not) |
//! | `StoreLatency` | Milliseconds | | end of data set to durable: a sample of single stores, for p50/p99 |
//! | `StoreFailures` | Count | — and `Status` | instances answered with a failure status (`0xA700` …) |
//! | `AssociationsAccepted` | Count | | |
//! | `AssociationsRejected` | Count | — and `Reason` | the reasons are fixed strings of the gateway |
//! | `ImportJobsEnded` | Count | `Status` | `COMPLETED`, `COMPLETED_WITH_ERRORS`, `FAILED`, as far as this gateway ends jobs ([`crate::metrics::Metrics::job_ended`]) |
//! | `OldestImportAge` | Seconds | | age of the oldest job SUBMITTED or IMPORTING (since its import was started), when there is one |
//! | `SpoolFiles` | Count | | edge mode: spool files waiting for upload at the end of the interval |
//! | `SpoolBytes` | Bytes | | edge mode: their bytes |
//! | `SpoolOldestAge` | Seconds | | edge mode: age of the oldest waiting file (0 when none) |
//! | `SpoolInstancesUploaded` | Count | | edge mode: objects uploaded from the spool to S3 |
//! | `SpoolBytesUploaded` | Bytes | | edge mode: their bytes (the upload rate) |
//! | `SpoolQuarantined` | Count | | edge mode: spool files quarantined (torn or truncated) |
//!
//! Dimension values are root members, one value per record: so each `Reason` and each `Status` gets
//! a record of its own. Nothing about patients is ever in a record: only counts, durations and the
//! gateway's own fixed labels.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::jobs::{Job, JobStatus, JobStore, JobStoreError};
use crate::metrics::{SpoolLevels, Totals, metrics};

/// One record per minute: CloudWatch's standard resolution is one minute, so a shorter interval
/// adds log volume (and cost) without finer graphs, and a longer one leaves minute data points empty.
/// The default of the hidden `--emf-interval` option (`DICOM_GATEWAY_EMF_INTERVAL`), which tests
/// shorten.
pub(crate) const DEFAULT_INTERVAL: &str = "60s";
/// The CloudWatch namespace of the gateway's metrics.
pub(crate) const NAMESPACE: &str = "DicomGateway";
/// The value of the `Service` dimension every metric carries.
pub(crate) const SERVICE: &str = "dicom-gateway";
/// EMF limit: metric definitions per directive.
pub(crate) const MAX_METRICS: usize = 100;
/// EMF limit: values in one metric's array.
pub(crate) const MAX_VALUES: usize = 100;
/// Longest wait for the job store when looking for the oldest running import: a slow store delays
/// one record, never the next interval.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A CloudWatch unit, as the EMF `Unit` member names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Count,
    Bytes,
    Milliseconds,
    Seconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Bytes => "Bytes",
            Unit::Milliseconds => "Milliseconds",
            Unit::Seconds => "Seconds",
        }
    }
}

/// What happened in one interval: the growth of the counters, the latency sample, and the
/// oldest running import seen at its end.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Interval {
    pub counts: Totals,
    pub store_latencies_ms: Vec<f64>,
    pub oldest_import_age: Option<Duration>,
    /// The spool's gauges at its end, in edge mode.
    pub spool: Option<SpoolLevels>,
}

impl Interval {
    /// `end` minus `start`, label by label (a label missing at the start counts from zero).
    pub(crate) fn between(start: &Totals, end: &Totals) -> Totals {
        let diff = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
            b.iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        Totals {
            instances_stored: end.instances_stored.saturating_sub(start.instances_stored),
            bytes_received: end.bytes_received.saturating_sub(start.bytes_received),
            bytes_stored: end.bytes_stored.saturating_sub(start.bytes_stored),
            associations: end.associations.saturating_sub(start.associations),
            rejected: diff(&start.rejected, &end.rejected),
            failed: diff(&start.failed, &end.failed),
            jobs_ended: diff(&start.jobs_ended, &end.jobs_ended),
            spool_uploaded: end.spool_uploaded.saturating_sub(start.spool_uploaded),
            spool_bytes_uploaded: end
                .spool_bytes_uploaded
                .saturating_sub(start.spool_bytes_uploaded),
            spool_quarantined: end
                .spool_quarantined
                .saturating_sub(start.spool_quarantined),
        }
    }

    /// Whether there is anything to report: an idle gateway writes nothing (an idle one whose
    /// spool still waits for S3 does: that is what an alarm on the spool's age needs).
    pub(crate) fn is_empty(&self) -> bool {
        self.counts == Totals::default()
            && self.store_latencies_ms.is_empty()
            && self.oldest_import_age.is_none()
            && self.spool.is_none_or(|s| s.files == 0)
    }

    /// The EMF records of this interval, stamped `timestamp_ms`: none when nothing happened.
    pub(crate) fn records(&self, timestamp_ms: u64) -> Vec<Value> {
        if self.is_empty() {
            return Vec::new();
        }
        let c = &self.counts;
        let mut chunks = self.store_latencies_ms.chunks(MAX_VALUES);
        let mut main = vec![
            Metric::count("InstancesStored", c.instances_stored),
            Metric::new("BytesStored", Unit::Bytes, c.bytes_stored.into()),
            Metric::new("BytesReceived", Unit::Bytes, c.bytes_received.into()),
            Metric::count("StoreFailures", c.failed.values().sum()),
            Metric::count("AssociationsAccepted", c.associations),
            Metric::count("AssociationsRejected", c.rejected.values().sum()),
        ];
        if let Some(first) = chunks.next() {
            main.push(Metric::latencies(first));
        }
        if let Some(age) = self.oldest_import_age {
            main.push(Metric::new(
                "OldestImportAge",
                Unit::Seconds,
                age.as_secs().into(),
            ));
        }
        if let Some(spool) = self.spool {
            main.extend([
                Metric::count("SpoolFiles", spool.files),
                Metric::new("SpoolBytes", Unit::Bytes, spool.bytes.into()),
                Metric::new(
                    "SpoolOldestAge",
                    Unit::Seconds,
                    spool.oldest_age_seconds.into(),
                ),
                Metric::count("SpoolInstancesUploaded", c.spool_uploaded),
                Metric::new(
                    "SpoolBytesUploaded",
                    Unit::Bytes,
                    c.spool_bytes_uploaded.into(),
                ),
                Metric::count("SpoolQuarantined", c.spool_quarantined),
            ]);
        }
        let mut records = vec![record(timestamp_ms, &[], &main)];
        // The rest of the sample: one record per 100 values.
        records.extend(chunks.map(|chunk| record(timestamp_ms, &[], &[Metric::latencies(chunk)])));
        for (reason, n) in &c.rejected {
            records.push(record(
                timestamp_ms,
                &[("Reason", reason)],
                &[Metric::count("AssociationsRejected", *n)],
            ));
        }
        for (status, n) in &c.failed {
            records.push(record(
                timestamp_ms,
                &[("Status", status)],
                &[Metric::count("StoreFailures", *n)],
            ));
        }
        for (status, n) in &c.jobs_ended {
            records.push(record(
                timestamp_ms,
                &[("Status", status)],
                &[Metric::count("ImportJobsEnded", *n)],
            ));
        }
        records
    }
}

/// One metric of a record: its name, unit and value (a number or an array of numbers).
struct Metric {
    name: &'static str,
    unit: Unit,
    value: Value,
}

impl Metric {
    fn new(name: &'static str, unit: Unit, value: Value) -> Self {
        Metric { name, unit, value }
    }

    fn count(name: &'static str, n: u64) -> Self {
        Self::new(name, Unit::Count, n.into())
    }

    /// Store latencies, rounded to 0.01 ms (shorter lines; CloudWatch keeps fewer digits anyway).
    fn latencies(ms: &[f64]) -> Self {
        let values = ms
            .iter()
            .map(|v| json!((v * 100.0).round() / 100.0))
            .collect();
        Self::new("StoreLatency", Unit::Milliseconds, Value::Array(values))
    }
}

/// One EMF record: the `Service` dimension plus `extra` dimensions, and `metrics` (at most
/// [`MAX_METRICS`], each array at most [`MAX_VALUES`] long: the callers keep to that).
fn record(timestamp_ms: u64, extra: &[(&str, &str)], metrics: &[Metric]) -> Value {
    debug_assert!(metrics.len() <= MAX_METRICS);
    let mut root = Map::new();
    let mut keys = vec![Value::from("Service")];
    root.insert("Service".into(), SERVICE.into());
    for (key, value) in extra {
        keys.push(Value::from(*key));
        root.insert((*key).into(), Value::from(*value));
    }
    let definitions: Vec<Value> = metrics
        .iter()
        .map(|m| json!({"Name": m.name, "Unit": m.unit.as_str()}))
        .collect();
    for m in metrics {
        root.insert(m.name.into(), m.value.clone());
    }
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [keys],
                "Metrics": definitions,
            }],
        }),
    );
    Value::Object(root)
}

/// Age of the oldest job whose import was started and has not ended (SUBMITTED, IMPORTING, or
/// IMPORTED and waiting for a gateway to read its outcome), from
/// the time its import was started (`submittedAt`; the close or creation time for a job recorded
/// without it). `None` when there is no such job.
pub(crate) fn oldest_import_age(jobs: &[Job], now: SystemTime) -> Option<Duration> {
    jobs.iter()
        .filter(|j| {
            matches!(
                j.status,
                JobStatus::Submitted | JobStatus::Importing | JobStatus::Imported
            )
        })
        .filter_map(|j| {
            let since = j
                .submitted_at
                .as_deref()
                .or(j.closed_at.as_deref())
                .unwrap_or(&j.created_at);
            humantime::parse_rfc3339_weak(since).ok()
        })
        .map(|t| now.duration_since(t).unwrap_or_default())
        .max()
}

/// Writes the EMF records of every interval to stderr until stopped; then writes the last,
/// partial interval, so what a stopping task did is counted too.
pub(crate) struct Emitter {
    interval: Duration,
    /// The job store to look for running imports in; `None` without imports (nothing is started).
    jobs: Option<Arc<dyn JobStore>>,
}

impl Emitter {
    pub(crate) fn new(interval: Duration, jobs: Option<Arc<dyn JobStore>>) -> Self {
        metrics().store_seconds.start_sampling();
        Emitter { interval, jobs }
    }

    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut start = metrics().totals();
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => false,
                () = stop.cancelled() => true,
            };
            let end = metrics().totals();
            let oldest_import_age = if stopping { None } else { self.probe().await };
            let interval = Interval {
                counts: Interval::between(&start, &end),
                store_latencies_ms: metrics().store_seconds.drain_sample(),
                oldest_import_age,
                spool: metrics().spool_levels(),
            };
            write(&interval.records(now_ms()));
            start = end;
            if stopping {
                return;
            }
        }
    }

    /// The oldest running import's age, or `None` (also when the job store does not answer: the
    /// stuck-job alarm treats a missing value as not breaching; readiness reports the store).
    async fn probe(&self) -> Option<Duration> {
        let jobs = self.jobs.as_ref()?;
        let list = async {
            let mut all = jobs.list_by_status(JobStatus::Submitted).await?;
            all.extend(jobs.list_by_status(JobStatus::Importing).await?);
            all.extend(jobs.list_by_status(JobStatus::Imported).await?);
            Ok::<_, JobStoreError>(all)
        };
        match tokio::time::timeout(PROBE_TIMEOUT, list).await {
            Ok(Ok(all)) => oldest_import_age(&all, SystemTime::now()),
            Ok(Err(e)) => {
                warn!(error = %e, "metrics: could not list running imports");
                None
            }
            Err(_) => {
                warn!("metrics: listing running imports timed out");
                None
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One line per record, each in a single write so that no log line lands inside it (the log
/// writes whole lines to the same stderr).
fn write(records: &[Value]) {
    let stderr = std::io::stderr();
    for r in records {
        let line = format!("{r}\n");
        let _ = stderr.lock().write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> Interval {
        let mut counts = Totals {
            instances_stored: 250,
            bytes_received: 123_456_789,
            associations: 4,
            ..Totals::default()
        };
        counts
            .rejected
            .insert("called AE title not recognized".into(), 2);
        counts
            .rejected
            .insert("association limit reached".into(), 1);
        counts.failed.insert("0xA700".into(), 3);
        counts.jobs_ended.insert("COMPLETED".into(), 1);
        counts.jobs_ended.insert("FAILED".into(), 2);
        Interval {
            counts,
            store_latencies_ms: (0..250).map(|i| f64::from(i) * 0.5 + 1.004).collect(),
            oldest_import_age: Some(Duration::from_secs(3600)),
            spool: None,
        }
    }

    /// Checks one record against the specification; returns its metric names.
    fn check_layout(r: &Value) -> Vec<String> {
        let text = r.to_string();
        assert!(!text.contains('\n'), "one line per record");
        assert!(text.len() < 1_000_000, "an EMF record is at most 1 MB");
        let parsed: Value = serde_json::from_str(&text).expect("valid JSON");
        let root = parsed.as_object().expect("a JSON object");
        let aws = &root["_aws"];
        assert!(aws["Timestamp"].is_u64());
        let directives = aws["CloudWatchMetrics"].as_array().unwrap();
        assert_eq!(directives.len(), 1);
        let d = &directives[0];
        assert_eq!(d["Namespace"], NAMESPACE);
        for set in d["Dimensions"].as_array().unwrap() {
            let set = set.as_array().unwrap();
            assert!(set.len() <= 30);
            assert_eq!(set[0], "Service");
            for key in set {
                let value = root[key.as_str().unwrap()]
                    .as_str()
                    .expect("a string value");
                assert!(value.len() <= 1024);
            }
        }
        let defs = d["Metrics"].as_array().unwrap();
        assert!(!defs.is_empty() && defs.len() <= MAX_METRICS);
        defs.iter()
            .map(|def| {
                let name = def["Name"].as_str().unwrap();
                let unit = def["Unit"].as_str().unwrap();
                assert!(
                    ["Count", "Bytes", "Milliseconds", "Seconds"].contains(&unit),
                    "{unit}"
                );
                match &root[name] {
                    Value::Number(_) => {}
                    Value::Array(values) => {
                        assert!(!values.is_empty() && values.len() <= MAX_VALUES);
                        assert!(values.iter().all(Value::is_number));
                    }
                    other => panic!("{name} is {other}"),
                }
                name.to_string()
            })
            .collect()
    }

    #[test]
    fn nothing_happened_nothing_written() {
        assert!(Interval::default().records(1).is_empty());
    }

    #[test]
    fn records_follow_the_specification() {
        let records = busy().records(1_700_000_000_000);
        // Main, two more latency chunks (250 values), two reasons, one failure status, two job statuses.
        assert_eq!(records.len(), 8, "{records:#?}");
        for r in &records {
            check_layout(r);
            assert_eq!(r["_aws"]["Timestamp"], 1_700_000_000_000u64);
        }
        let main = &records[0];
        assert_eq!(
            check_layout(main),
            [
                "InstancesStored",
                "BytesStored",
                "BytesReceived",
                "StoreFailures",
                "AssociationsAccepted",
                "AssociationsRejected",
                "StoreLatency",
                "OldestImportAge"
            ]
        );
        assert_eq!(main["InstancesStored"], 250);
        assert_eq!(main["BytesReceived"], 123_456_789);
        assert_eq!(main["StoreFailures"], 3);
        assert_eq!(main["AssociationsRejected"], 3);
        assert_eq!(main["OldestImportAge"], 3600);
        assert_eq!(main["StoreLatency"][0], 1.0);
        let units: Vec<&str> = main["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["Unit"].as_str().unwrap())
            .collect();
        assert_eq!(
            units,
            [
                "Count",
                "Bytes",
                "Bytes",
                "Count",
                "Count",
                "Count",
                "Milliseconds",
                "Seconds"
            ]
        );
        let latencies: usize = records
            .iter()
            .filter_map(|r| r["StoreLatency"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(latencies, 250);
        let with = |key: &str, value: &str, metric: &str| {
            records
                .iter()
                .find(|r| r[key] == value)
                .map(|r| {
                    assert_eq!(
                        r["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
                        json!([["Service", key]])
                    );
                    r[metric].clone()
                })
                .unwrap_or(Value::Null)
        };
        assert_eq!(
            with(
                "Reason",
                "called AE title not recognized",
                "AssociationsRejected"
            ),
            2
        );
        assert_eq!(with("Status", "0xA700", "StoreFailures"), 3);
        assert_eq!(with("Status", "FAILED", "ImportJobsEnded"), 2);
    }

    #[test]
    fn edge_mode_adds_the_spool_and_an_idle_gateway_with_a_waiting_spool_still_reports() {
        let mut interval = Interval {
            spool: Some(SpoolLevels {
                files: 0,
                bytes: 0,
                oldest_age_seconds: 0,
            }),
            ..Interval::default()
        };
        assert!(interval.records(1).is_empty(), "idle and empty: nothing");
        interval.spool = Some(SpoolLevels {
            files: 12,
            bytes: 6_000_000,
            oldest_age_seconds: 95,
        });
        interval.counts.spool_uploaded = 3;
        interval.counts.spool_bytes_uploaded = 1_500_000;
        let records = interval.records(7);
        assert_eq!(records.len(), 1);
        let names = check_layout(&records[0]);
        for name in [
            "SpoolFiles",
            "SpoolBytes",
            "SpoolOldestAge",
            "SpoolInstancesUploaded",
            "SpoolBytesUploaded",
            "SpoolQuarantined",
        ] {
            assert!(names.contains(&name.to_string()), "{name}: {names:?}");
        }
        assert_eq!(records[0]["SpoolFiles"], 12);
        assert_eq!(records[0]["SpoolOldestAge"], 95);
        assert_eq!(records[0]["SpoolBytesUploaded"], 1_500_000);
        assert!(
            !check_layout(&busy().records(1)[0]).contains(&"SpoolFiles".to_string()),
            "direct mode has no spool metrics"
        );
    }

    #[test]
    fn only_latencies_is_still_a_record() {
        let interval = Interval {
            store_latencies_ms: vec![2.5],
            ..Interval::default()
        };
        let records = interval.records(5);
        assert_eq!(records.len(), 1);
        check_layout(&records[0]);
        assert_eq!(records[0]["InstancesStored"], 0);
    }

    #[test]
    fn growth_between_totals() {
        let mut start = Totals {
            instances_stored: 10,
            ..Totals::default()
        };
        start.failed.insert("0xA700".into(), 1);
        let mut end = start.clone();
        end.instances_stored = 13;
        end.failed.insert("0xC000".into(), 2);
        end.jobs_ended.insert("COMPLETED".into(), 1);
        let d = Interval::between(&start, &end);
        assert_eq!(d.instances_stored, 3);
        assert_eq!(d.failed, BTreeMap::from([("0xC000".to_string(), 2)]));
        assert_eq!(d.jobs_ended, BTreeMap::from([("COMPLETED".to_string(), 1)]));
    }

    #[test]
    fn oldest_running_import() {
        let now = humantime::parse_rfc3339("2026-11-24T12:00:00Z").unwrap();
        let job = |status, submitted: Option<&str>| {
            let mut j = crate::jobs::tests::closed_job("gw", "2026-11-24T09:00:00.000Z");
            j.status = status;
            j.submitted_at = submitted.map(String::from);
            j
        };
        let jobs = [
            job(JobStatus::Importing, Some("2026-11-24T11:00:00.000Z")),
            job(JobStatus::Submitted, Some("2026-11-24T10:00:00.000Z")),
            // Ended or not started: not running, however old.
            job(JobStatus::Failed, Some("2026-11-20T10:00:00.000Z")),
            job(JobStatus::Closed, None),
        ];
        assert_eq!(
            oldest_import_age(&jobs, now),
            Some(Duration::from_secs(2 * 3600))
        );
        assert_eq!(oldest_import_age(&jobs[2..], now), None);
    }
}

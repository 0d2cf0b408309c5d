//! Prometheus metrics, served on `/metrics` by [`crate::health`].
//!
//! One registry per process, reached through [`metrics()`]: counters are cheap atomics, and every
//! part of the gateway (listener, associations, instances, batches, the import pipeline) reports
//! to the same place without the registry being threaded through every constructor. The metric
//! names follow Prometheus conventions (`dicom_gateway_` prefix, `_total` counters, seconds).
//!
//! This is also the one place where things are counted for CloudWatch: [`crate::emf`] reads the same
//! counters ([`Metrics::totals`]) and turns their growth per interval into embedded metric format
//! records; only store latencies need more than a counter holds, a sample of single observations
//! ([`StoreSeconds`]), collected only while the EMF emitter runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of rejected associations: the rejection reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub reason: String,
}

/// Label of failed instances: the DIMSE status answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabel {
    pub status: String,
}

/// Most store latencies (milliseconds) kept between two drains by the EMF emitter: at 2,000
/// instances/s a minute holds 120,000 observations, and CloudWatch takes at most 100 values per
/// metric per record, so a bounded, evenly spaced sample is sent instead of every value.
pub(crate) const LATENCY_SAMPLE_MAX: usize = 1000;

/// The store-latency histogram (for Prometheus) and an evenly spaced sample of the observations
/// themselves (for CloudWatch percentiles, which a histogram's buckets cannot give).
pub(crate) struct StoreSeconds {
    histogram: Histogram,
    sampling: AtomicBool,
    sample: Mutex<LatencySample>,
}

/// Observations kept in arrival order: every `stride`-th one; when full, every other one is
/// dropped and the stride doubles, so the sample stays evenly spread over the interval.
#[derive(Debug, Default)]
struct LatencySample {
    values_ms: Vec<f64>,
    stride: u64,
    seen: u64,
}

impl LatencySample {
    fn record(&mut self, ms: f64) {
        let stride = self.stride.max(1);
        if self.seen.is_multiple_of(stride) {
            if self.values_ms.len() >= LATENCY_SAMPLE_MAX {
                let mut i = 0;
                self.values_ms.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
                self.stride = stride * 2;
            }
            if self.seen.is_multiple_of(self.stride.max(1)) {
                self.values_ms.push(ms);
            }
        }
        self.seen += 1;
    }
}

impl StoreSeconds {
    fn new() -> Self {
        StoreSeconds {
            // 1 ms to about 1 minute.
            histogram: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            sampling: AtomicBool::new(false),
            sample: Mutex::new(LatencySample::default()),
        }
    }

    /// One store: from the end of the data set to the object being durable.
    pub(crate) fn observe(&self, seconds: f64) {
        self.histogram.observe(seconds);
        if self.sampling.load(Ordering::Relaxed) {
            lock(&self.sample).record(seconds * 1000.0);
        }
    }

    /// Starts keeping the sample (the EMF emitter calls this once; without it nothing is kept).
    pub(crate) fn start_sampling(&self) {
        self.sampling.store(true, Ordering::Relaxed);
    }

    /// The sample since the last call, at most [`LATENCY_SAMPLE_MAX`] values in milliseconds.
    pub(crate) fn drain_sample(&self) -> Vec<f64> {
        std::mem::take(&mut *lock(&self.sample)).values_ms
    }
}

/// Locks `m`, also after a panic elsewhere poisoned it: counts stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Label values seen so far: a `Family` cannot be iterated, and [`Metrics::totals`] needs them.
#[derive(Debug, Default)]
struct SeenLabels {
    reasons: BTreeSet<String>,
    statuses: BTreeSet<String>,
    job_statuses: BTreeSet<String>,
}

/// The edge spool's gauges at one moment (edge mode only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SpoolLevels {
    pub files: u64,
    pub bytes: u64,
    pub oldest_age_seconds: u64,
}

/// The counters' values at one moment, by label where they have one. [`crate::emf`] subtracts two
/// of these to get what happened in an interval.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub instances_stored: u64,
    pub bytes_stored: u64,
    pub bytes_received: u64,
    pub associations: u64,
    /// Rejected associations by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Failed instances by DIMSE status (`0xA700`).
    pub failed: BTreeMap<String, u64>,
    /// Import jobs ended by status (`COMPLETED`, `COMPLETED_WITH_ERRORS`, `FAILED`).
    pub jobs_ended: BTreeMap<String, u64>,
    /// Edge mode: objects uploaded from the spool, their bytes, and spool files quarantined.
    pub spool_uploaded: u64,
    pub spool_bytes_uploaded: u64,
    pub spool_quarantined: u64,
}

/// Every metric the gateway exports, registered once per process.
pub(crate) struct Metrics {
    registry: Registry,
    pub associations_active: Gauge,
    pub associations: Counter,
    pub associations_rejected: Family<ReasonLabel, Counter>,
    pub instances_stored: Counter,
    pub instances_failed: Family<StatusLabel, Counter>,
    pub bytes_received: Counter,
    /// Bytes of the objects made durable (meta group included), as the store confirmed them.
    pub bytes_stored: Counter,
    pub store_seconds: StoreSeconds,
    pub batches_open: Gauge,
    pub batches_closed: Counter,
    pub batches_submitted: Counter,
    pub job_store_errors: Counter,
    pub import_trigger_errors: Counter,
    pub jobs_ended: Family<StatusLabel, Counter>,
    /// Edge mode ([`crate::store::spool`]): spool files waiting for upload, their bytes, and the
    /// age of the oldest (refreshed every second by the uploader).
    pub spool_files: Gauge,
    pub spool_bytes: Gauge,
    pub spool_oldest_age_seconds: Gauge,
    /// Objects the spool's uploader put at their final key, and their bytes (the upload rate).
    pub spool_uploaded: Counter,
    pub spool_bytes_uploaded: Counter,
    /// Failed upload attempts from the spool (each is retried).
    pub spool_upload_errors: Counter,
    /// Spool files moved to quarantine (torn or truncated; never uploaded).
    pub spool_quarantined: Counter,
    /// Whether this process runs in edge mode (the spool gauges mean something).
    spool: AtomicBool,
    seen: Mutex<SeenLabels>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("dicom_gateway");
        let m = Metrics {
            registry: Registry::default(), // replaced below, once every metric is registered
            associations_active: Gauge::default(),
            associations: Counter::default(),
            associations_rejected: Family::default(),
            instances_stored: Counter::default(),
            instances_failed: Family::default(),
            bytes_received: Counter::default(),
            bytes_stored: Counter::default(),
            store_seconds: StoreSeconds::new(),
            batches_open: Gauge::default(),
            batches_closed: Counter::default(),
            batches_submitted: Counter::default(),
            job_store_errors: Counter::default(),
            import_trigger_errors: Counter::default(),
            jobs_ended: Family::default(),
            spool_files: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_oldest_age_seconds: Gauge::default(),
            spool_uploaded: Counter::default(),
            spool_bytes_uploaded: Counter::default(),
            spool_upload_errors: Counter::default(),
            spool_quarantined: Counter::default(),
            spool: AtomicBool::new(false),
            seen: Mutex::new(SeenLabels::default()),
        };
        // Metric handles are shared: the registered clones and the struct's fields are one metric.
        registry.register(
            "associations_active",
            "Associations being served",
            m.associations_active.clone(),
        );
        registry.register(
            "associations",
            "Associations accepted",
            m.associations.clone(),
        );
        registry.register(
            "associations_rejected",
            "Associations rejected, by reason",
            m.associations_rejected.clone(),
        );
        registry.register(
            "instances_stored",
            "Instances made durable and acknowledged with Success",
            m.instances_stored.clone(),
        );
        registry.register(
            "instances_failed",
            "Instances answered with a failure status, by status",
            m.instances_failed.clone(),
        );
        registry.register(
            "bytes_received",
            "Data set bytes received",
            m.bytes_received.clone(),
        );
        registry.register(
            "bytes_stored",
            "Bytes of the objects made durable",
            m.bytes_stored.clone(),
        );
        registry.register(
            "store_seconds",
            "Time from the end of a data set to the object being durable",
            m.store_seconds.histogram.clone(),
        );
        registry.register(
            "batches_open",
            "Batches open (receiving instances)",
            m.batches_open.clone(),
        );
        registry.register("batches_closed", "Batches closed", m.batches_closed.clone());
        registry.register(
            "batches_submitted",
            "Batches whose import was started",
            m.batches_submitted.clone(),
        );
        registry.register(
            "job_store_errors",
            "Failed job store writes (each is retried)",
            m.job_store_errors.clone(),
        );
        registry.register(
            "import_trigger_errors",
            "Failed import starts (each is retried)",
            m.import_trigger_errors.clone(),
        );
        registry.register(
            "jobs_ended",
            "Import jobs this gateway saw end, by final status",
            m.jobs_ended.clone(),
        );
        registry.register(
            "spool_files",
            "Edge mode: spool files waiting for upload",
            m.spool_files.clone(),
        );
        registry.register(
            "spool_bytes",
            "Edge mode: bytes of the spool files waiting for upload",
            m.spool_bytes.clone(),
        );
        registry.register(
            "spool_oldest_age_seconds",
            "Edge mode: age of the oldest spool file waiting for upload",
            m.spool_oldest_age_seconds.clone(),
        );
        registry.register(
            "spool_uploaded",
            "Edge mode: objects uploaded from the spool to their final key",
            m.spool_uploaded.clone(),
        );
        registry.register(
            "spool_bytes_uploaded",
            "Edge mode: bytes uploaded from the spool",
            m.spool_bytes_uploaded.clone(),
        );
        registry.register(
            "spool_upload_errors",
            "Edge mode: failed upload attempts from the spool (each is retried)",
            m.spool_upload_errors.clone(),
        );
        registry.register(
            "spool_quarantined",
            "Edge mode: spool files moved to quarantine (torn or truncated, never uploaded)",
            m.spool_quarantined.clone(),
        );
        Metrics { registry, ..m }
    }

    /// This process spools (edge mode): the spool gauges are reported to CloudWatch too.
    pub(crate) fn spool_on(&self) {
        self.spool.store(true, Ordering::Relaxed);
    }

    /// The spool gauges, in edge mode.
    pub(crate) fn spool_levels(&self) -> Option<SpoolLevels> {
        let value = |g: &Gauge| u64::try_from(g.get()).unwrap_or(0);
        self.spool.load(Ordering::Relaxed).then(|| SpoolLevels {
            files: value(&self.spool_files),
            bytes: value(&self.spool_bytes),
            oldest_age_seconds: value(&self.spool_oldest_age_seconds),
        })
    }

    pub(crate) fn reject(&self, reason: &str) {
        let reason = reason.to_string();
        lock(&self.seen).reasons.insert(reason.clone());
        self.associations_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn failed(&self, status: crate::dimse::Status) {
        let status = status.to_string();
        lock(&self.seen).statuses.insert(status.clone());
        self.instances_failed
            .get_or_create(&StatusLabel { status })
            .inc();
    }

    /// Counts an import job that ended with `status`, once per job, by whoever records the final
    /// status in the gateway (the import start on a permanent error, the outcome reader). It is
    /// `dicom_gateway_jobs_ended_total{status}` on `/metrics` and `ImportJobsEnded` by `Status` in
    /// CloudWatch. `status` is the final status's name (`JobStatus::as_str`): metrics sit below the
    /// job records in the module graph, so callers name it.
    pub(crate) fn job_ended(&self, status: &str) {
        let status = status.to_string();
        lock(&self.seen).job_statuses.insert(status.clone());
        self.jobs_ended.get_or_create(&StatusLabel { status }).inc();
    }

    /// The counters now (see [`Totals`]).
    pub(crate) fn totals(&self) -> Totals {
        let seen = lock(&self.seen);
        let by_reason = |family: &Family<ReasonLabel, Counter>, labels: &BTreeSet<String>| {
            labels
                .iter()
                .map(|reason| {
                    let label = ReasonLabel {
                        reason: reason.clone(),
                    };
                    (reason.clone(), family.get(&label).map_or(0, |c| c.get()))
                })
                .collect()
        };
        let by_status = |family: &Family<StatusLabel, Counter>, labels: &BTreeSet<String>| {
            labels
                .iter()
                .map(|status| {
                    let label = StatusLabel {
                        status: status.clone(),
                    };
                    (status.clone(), family.get(&label).map_or(0, |c| c.get()))
                })
                .collect()
        };
        Totals {
            instances_stored: self.instances_stored.get(),
            bytes_received: self.bytes_received.get(),
            bytes_stored: self.bytes_stored.get(),
            associations: self.associations.get(),
            rejected: by_reason(&self.associations_rejected, &seen.reasons),
            failed: by_status(&self.instances_failed, &seen.statuses),
            jobs_ended: by_status(&self.jobs_ended, &seen.job_statuses),
            spool_uploaded: self.spool_uploaded.get(),
            spool_bytes_uploaded: self.spool_bytes_uploaded.get(),
            spool_quarantined: self.spool_quarantined.get(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub(crate) fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_and_labels() {
        let m = Metrics::new();
        m.associations.inc();
        m.reject("called AE title not recognized");
        m.failed(crate::dimse::Status::OUT_OF_RESOURCES);
        m.store_seconds.observe(0.004);
        let text = m.encode();
        assert!(
            text.contains("dicom_gateway_associations_total 1"),
            "{text}"
        );
        assert!(text.contains("dicom_gateway_associations_rejected_total{reason=\"called AE title not recognized\"} 1"), "{text}");
        assert!(
            text.contains("dicom_gateway_instances_failed_total{status=\"0xA700\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("dicom_gateway_store_seconds_count 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn totals_by_label() {
        let m = Metrics::new();
        m.instances_stored.inc();
        m.reject("association limit reached");
        m.reject("association limit reached");
        m.failed(crate::dimse::Status::OUT_OF_RESOURCES);
        m.job_ended("COMPLETED_WITH_ERRORS");
        let t = m.totals();
        assert_eq!(t.instances_stored, 1);
        assert_eq!(t.rejected["association limit reached"], 2);
        assert_eq!(t.failed["0xA700"], 1);
        assert_eq!(
            t.jobs_ended,
            BTreeMap::from([("COMPLETED_WITH_ERRORS".to_string(), 1)])
        );
        assert!(
            m.encode()
                .contains("dicom_gateway_jobs_ended_total{status=\"COMPLETED_WITH_ERRORS\"} 1")
        );
    }

    #[test]
    fn latency_sample_only_when_asked_and_bounded() {
        let s = StoreSeconds::new();
        s.observe(0.002);
        assert!(s.drain_sample().is_empty(), "not sampling until started");
        s.start_sampling();
        for i in 0..10_000 {
            s.observe(f64::from(i) / 1000.0);
        }
        let sample = s.drain_sample();
        assert!(sample.len() <= LATENCY_SAMPLE_MAX && sample.len() > LATENCY_SAMPLE_MAX / 2);
        // Evenly spread over the whole interval, in arrival order.
        assert_eq!(sample[0], 0.0);
        assert!(*sample.last().unwrap() > 9000.0, "{:?}", sample.last());
        assert!(sample.windows(2).all(|w| w[0] < w[1]));
        let gap = sample[1] - sample[0];
        assert!(sample.windows(2).all(|w| (w[1] - w[0] - gap).abs() < 1e-6));
        assert!(s.drain_sample().is_empty(), "drained");
    }
}

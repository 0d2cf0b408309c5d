//! Prometheus metrics, served on `/metrics` by [`crate::health`].
//!
//! One registry per process, reached through [`metrics()`]: counters are cheap atomics, and every
//! part of the gateway (listener, associations, instances, batches, the import pipeline) reports
//! to the same place without the registry being threaded through every constructor. The metric
//! names follow Prometheus conventions (`dicom_gateway_` prefix, `_total` counters, seconds).

use std::sync::LazyLock;

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

/// Every metric the gateway exports, registered once per process.
pub(crate) struct Metrics {
    registry: Registry,
    pub associations_active: Gauge,
    pub associations: Counter,
    pub associations_rejected: Family<ReasonLabel, Counter>,
    pub instances_stored: Counter,
    pub instances_failed: Family<StatusLabel, Counter>,
    pub bytes_received: Counter,
    pub store_seconds: Histogram,
    pub batches_open: Gauge,
    pub batches_closed: Counter,
    pub batches_submitted: Counter,
    pub job_store_errors: Counter,
    pub import_trigger_errors: Counter,
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
            // 1 ms to about 1 minute.
            store_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            batches_open: Gauge::default(),
            batches_closed: Counter::default(),
            batches_submitted: Counter::default(),
            job_store_errors: Counter::default(),
            import_trigger_errors: Counter::default(),
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
            "store_seconds",
            "Time from the end of a data set to the object being durable",
            m.store_seconds.clone(),
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
        Metrics { registry, ..m }
    }

    pub(crate) fn reject(&self, reason: &str) {
        self.associations_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn failed(&self, status: crate::dimse::Status) {
        self.instances_failed
            .get_or_create(&StatusLabel {
                status: status.to_string(),
            })
            .inc();
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
}

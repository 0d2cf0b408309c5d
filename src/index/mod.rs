//! The instance index: one record per stored object, so an operator can go from a SOP Instance UID
//! to its object key, its job, when and from which AE it arrived, and its import outcome.
//!
//! The index is derived data. The receive path hands each record to a bounded channel
//! ([`IndexSender::record`]) and never waits for a write: a background task ([`run_writer`])
//! appends what the channel holds. A record that finds the channel full is dropped with a WARN,
//! and one a crash loses is rebuilt from the store, whose keys carry job, study, series and SOP
//! Instance UID ([`local::LocalIndex::rebuild`], run at start-up).
//!
//! One seam ([`InstanceIndex`]) with, for now, one implementation: the local journal of JSON
//! lines in `{store}/index/` ([`local::LocalIndex`]). DynamoDB comes with `--job-table` later.

pub(crate) mod local;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Records waiting for the writer; beyond this the receive path drops them (the rebuild recovers
/// them) rather than wait.
pub(crate) const CHANNEL_CAPACITY: usize = 8192;

/// Most records the writer appends in one go.
const WRITE_BATCH: usize = 512;

/// Where an instance stands on its way into HealthImaging: stored, then what the import's
/// per-file results (`SUCCESS/success.ndjson`, `WARNING/warning.ndjson`, `FAILURE/failure.ndjson`
/// under the import's output folder; see docs/aws-facts.md) said about its object. In a record it
/// is flattened: `"outcome":"IMPORTED","imageSetId":…,"isPrimary":…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "outcome",
    rename_all = "SCREAMING_SNAKE_CASE",
    rename_all_fields = "camelCase"
)]
pub(crate) enum InstanceOutcome {
    /// Durable in the object store, not (yet) known to be imported.
    Stored,
    /// Listed in `success.ndjson`: part of image set `image_set_id` (primary or not).
    Imported {
        image_set_id: String,
        is_primary: bool,
    },
    /// Listed in `warning.ndjson`: imported, with each warning as `type (code): message`.
    ImportedWithWarnings {
        image_set_id: String,
        is_primary: bool,
        warnings: Vec<String>,
    },
    /// Listed in `failure.ndjson`: not imported, with the exception HealthImaging gave.
    Failed {
        exception_type: String,
        message: String,
    },
}

impl InstanceOutcome {
    /// The upper-case word records, logs and docs use for this outcome.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            InstanceOutcome::Stored => "STORED",
            InstanceOutcome::Imported { .. } => "IMPORTED",
            InstanceOutcome::ImportedWithWarnings { .. } => "IMPORTED_WITH_WARNINGS",
            InstanceOutcome::Failed { .. } => "FAILED",
        }
    }
}

impl InstanceOutcome {
    /// Whether recording `self` on a record whose outcome is `current` replaces it. A file an
    /// import lists in both its success and its warning file keeps its warnings whatever the
    /// order the files are read in (a resumed reader reads the success file again after its
    /// predecessor recorded the warnings): IMPORTED never replaces IMPORTED_WITH_WARNINGS of the
    /// same image set. Anything else replaces what differs.
    pub(crate) fn replaces(&self, current: &InstanceOutcome) -> bool {
        match (self, current) {
            (
                InstanceOutcome::Imported { image_set_id, .. },
                InstanceOutcome::ImportedWithWarnings {
                    image_set_id: warned,
                    ..
                },
            ) => image_set_id != warned,
            _ => self != current,
        }
    }
}

impl std::fmt::Display for InstanceOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything the index knows about one stored object. Field names follow the job records'.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct InstanceRecord {
    pub sop_instance_uid: String,
    /// `None` when a rebuilt record's object has no readable meta group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sop_class_uid: Option<String>,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub object_key: String,
    pub job_id: String,
    pub size: u64,
    /// `None` when a rebuilt record's object has no Source Application Entity Title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calling_ae_title: Option<String>,
    /// RFC 3339, UTC. For a rebuilt record, the object's modification time.
    pub received_at: String,
    #[serde(flatten)]
    pub outcome: InstanceOutcome,
}

/// The parts of an object key `{jobId}/{study}/{series}/{sop}.dcm`, relative to the store root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyParts<'a> {
    pub job_id: &'a str,
    pub study_instance_uid: &'a str,
    pub series_instance_uid: &'a str,
    pub sop_instance_uid: &'a str,
}

impl<'a> KeyParts<'a> {
    /// Splits a key of the store layout; anything else is `None`.
    pub(crate) fn parse(key: &'a str) -> Option<Self> {
        let mut parts = key.split('/');
        let (job_id, study, series, file) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let sop = file.strip_suffix(".dcm")?;
        if parts.next().is_some() || [job_id, study, series, sop].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(KeyParts {
            job_id,
            study_instance_uid: study,
            series_instance_uid: series,
            sop_instance_uid: sop,
        })
    }

    /// A `stored` record for this key.
    pub(crate) fn record(
        &self,
        key: &str,
        size: u64,
        sop_class_uid: Option<String>,
        calling_ae_title: Option<String>,
        received_at: String,
    ) -> InstanceRecord {
        InstanceRecord {
            sop_instance_uid: self.sop_instance_uid.to_string(),
            sop_class_uid,
            study_instance_uid: self.study_instance_uid.to_string(),
            series_instance_uid: self.series_instance_uid.to_string(),
            object_key: key.to_string(),
            job_id: self.job_id.to_string(),
            size,
            calling_ae_title,
            received_at,
            outcome: InstanceOutcome::Stored,
        }
    }
}

/// What one [`InstanceIndex::record_outcomes`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct OutcomesRecorded {
    /// Outcomes whose object the index has a record of (changed or already so).
    pub matched: u64,
    /// Records whose outcome this call changed (fewer than `matched` when a resumed reader
    /// records again what its predecessor did).
    pub changed: u64,
}

/// Why the index could not be read or written.
#[derive(Debug, Error)]
pub(crate) enum IndexError {
    #[error("instance index I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("instance index record cannot be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where instance records are kept: the seam between the writer and the local journal (and,
/// later, DynamoDB).
#[async_trait]
pub(crate) trait InstanceIndex: Send + Sync + 'static {
    /// Appends records. A record may already be there (a rebuild raced the writer): lookups
    /// return one record per object key.
    async fn append(&self, records: Vec<InstanceRecord>) -> Result<(), IndexError>;

    /// Every record of this SOP Instance UID (one per object key, the last written; several if
    /// it was stored in several jobs), oldest first.
    async fn find(&self, sop_instance_uid: &str) -> Result<Vec<InstanceRecord>, IndexError>;

    /// Records the import outcome of objects of job `job_id`, each given by its object key, where
    /// it [`InstanceOutcome::replaces`] the record's. Idempotent: recording the same outcomes
    /// again (a resumed outcome reader) changes nothing that a lookup returns. A key the index has no record of is skipped, and not counted as
    /// matched: the outcome reader tells incomplete outcomes from a resumed reading by it.
    /// Callers pass bounded chunks.
    async fn record_outcomes(
        &self,
        job_id: &str,
        outcomes: Vec<(String, InstanceOutcome)>,
    ) -> Result<OutcomesRecorded, IndexError>;

    /// The records of job `job_id` whose outcome is FAILED, in object key order.
    async fn failed(&self, job_id: &str) -> Result<Vec<InstanceRecord>, IndexError>;

    /// A short description for log lines and error messages.
    fn describe(&self) -> String;
}

/// The receive path's end of the index: hands a record over without waiting, or drops it.
#[derive(Debug, Clone)]
pub(crate) struct IndexSender(Option<mpsc::Sender<InstanceRecord>>);

impl IndexSender {
    /// A sender and the receiver [`run_writer`] drains.
    pub(crate) fn channel(capacity: usize) -> (IndexSender, mpsc::Receiver<InstanceRecord>) {
        let (tx, rx) = mpsc::channel(capacity);
        (IndexSender(Some(tx)), rx)
    }

    /// A sender that keeps nothing (no index for this store yet, and in tests).
    pub(crate) fn disabled() -> IndexSender {
        IndexSender(None)
    }

    /// Hands the record to the writer; never waits. A full channel drops it with a WARN: the
    /// rebuild at the next start adds it from the store.
    pub(crate) fn record(&self, record: InstanceRecord) {
        let Some(tx) = &self.0 else { return };
        match tx.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(r)) => {
                warn!(sop_instance_uid = %r.sop_instance_uid, job_id = %r.job_id, "instance index writer is behind: record dropped (the index is rebuilt from the store at the next start)");
            }
            Err(mpsc::error::TrySendError::Closed(r)) => {
                debug!(sop_instance_uid = %r.sop_instance_uid, "instance index writer stopped: record dropped");
            }
        }
    }
}

/// The background writer: appends what the channel holds, in batches, until every sender is gone.
/// A failed write is logged and its records dropped (the rebuild recovers them).
pub(crate) async fn run_writer(
    index: Arc<dyn InstanceIndex>,
    mut rx: mpsc::Receiver<InstanceRecord>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let records = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH));
        let n = records.len();
        if let Err(e) = index.append(records).await {
            warn!(error = %e, records = n, index = %index.describe(), "instance index write failed: records dropped (the index is rebuilt from the store at the next start)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2.3/1.2.3.4/1.2.3.4.5.dcm";

    #[test]
    fn imported_never_replaces_imported_with_warnings_of_the_same_image_set() {
        let imported = |id: &str| InstanceOutcome::Imported {
            image_set_id: id.into(),
            is_primary: true,
        };
        let warned = |id: &str| InstanceOutcome::ImportedWithWarnings {
            image_set_id: id.into(),
            is_primary: true,
            warnings: vec!["W (1)".into()],
        };
        let failed = InstanceOutcome::Failed {
            exception_type: "E".into(),
            message: "m".into(),
        };
        assert!(!imported("a").replaces(&warned("a")), "the warnings stay");
        assert!(warned("a").replaces(&imported("a")));
        assert!(imported("b").replaces(&warned("a")), "another image set");
        assert!(!imported("a").replaces(&imported("a")), "nothing to change");
        for outcome in [imported("a"), warned("a"), failed.clone()] {
            assert!(outcome.replaces(&InstanceOutcome::Stored));
        }
        assert!(failed.replaces(&warned("a")) && imported("a").replaces(&failed));
        // Either order of the success and warning files ends with the warnings.
        for order in [[imported("a"), warned("a")], [warned("a"), imported("a")]] {
            let mut current = InstanceOutcome::Stored;
            for given in order {
                if given.replaces(&current) {
                    current = given;
                }
            }
            assert_eq!(current, warned("a"));
        }
    }

    #[test]
    fn keys_of_the_store_layout_split_into_their_uids() {
        let p = KeyParts::parse(KEY).unwrap();
        assert_eq!(p.job_id, "01JD6Y7Z8X9W0V1T2S3R4Q5P6N");
        assert_eq!(p.study_instance_uid, "1.2.3");
        assert_eq!(p.series_instance_uid, "1.2.3.4");
        assert_eq!(p.sop_instance_uid, "1.2.3.4.5");
        for other in [
            "jobs/x.json",
            "a/b/c/d.txt",
            "a/b/c/d/e.dcm",
            "a//c/d.dcm",
            "a/b/c/.dcm",
        ] {
            assert_eq!(KeyParts::parse(other), None, "{other}");
        }
    }

    #[test]
    fn a_record_is_one_json_object_with_the_outcome_as_an_upper_case_word() {
        let r = KeyParts::parse(KEY).unwrap().record(
            KEY,
            42,
            Some("1.2.840.10008.5.1.4.1.1.2".into()),
            Some("CT1".into()),
            "2026-11-24T06:00:00.000Z".into(),
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains('\n'));
        assert!(json.contains(r#""outcome":"STORED""#), "{json}");
        assert!(json.contains(r#""objectKey":"01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2.3"#));
        assert!(json.contains(r#""callingAeTitle":"CT1""#));
        assert_eq!(serde_json::from_str::<InstanceRecord>(&json).unwrap(), r);
    }

    #[test]
    fn an_outcome_is_flattened_into_the_record_with_camel_case_fields() {
        let mut r = KeyParts::parse(KEY).unwrap().record(
            KEY,
            42,
            None,
            None,
            "2026-11-24T06:00:00.000Z".into(),
        );
        r.outcome = InstanceOutcome::ImportedWithWarnings {
            image_set_id: "0123".into(),
            is_primary: false,
            warnings: vec!["InvalidOffsetTable (45330): offsets".into()],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(r#""outcome":"IMPORTED_WITH_WARNINGS""#),
            "{json}"
        );
        assert!(
            json.contains(r#""imageSetId":"0123","isPrimary":false"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<InstanceRecord>(&json).unwrap(), r);
    }

    #[tokio::test]
    async fn a_full_channel_drops_the_record_instead_of_waiting() {
        let (tx, mut rx) = IndexSender::channel(1);
        let r =
            KeyParts::parse(KEY)
                .unwrap()
                .record(KEY, 1, None, None, crate::clock::now_rfc3339());
        tx.record(r.clone());
        tx.record(r.clone()); // full: dropped at once
        assert_eq!(rx.recv().await, Some(r));
        assert!(rx.try_recv().is_err());
        IndexSender::disabled().record(KeyParts::parse(KEY).unwrap().record(
            KEY,
            1,
            None,
            None,
            crate::clock::now_rfc3339(),
        ));
    }
}

//! Object stores: where a Part-10 object becomes durable.
//!
//! One small seam with two implementations: S3 ([`s3::S3Store`]) for deployments and a local
//! directory ([`local::LocalStore`]) as the embedded default. An upload is opened with its final
//! key, fed the object's bytes in order, and either committed (after which the object is durable and
//! visible) or aborted (after which nothing of it is visible). Dropping an upload that was not
//! committed aborts it, so an A-ABORT or a dropped connection can never leave a partial object.
//!
//! In edge mode a third store, the spool ([`spool::Spool`]), stands in front of S3: its commit
//! makes the object durable on local disk ([`Placement::Spooled`]), and its uploader puts it at its
//! final key later, saying so through an [`UploadTicket`].

pub mod local;
pub(crate) mod s3;
pub(crate) mod spool;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::oneshot;

use crate::uid::{UidError, validate_uid};

/// Why the store could not take or confirm an object (answered 0xA700).
#[derive(Debug, Error)]
pub(crate) enum StoreError {
    #[error("local store I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("S3 {operation} failed: {message}")]
    S3 {
        operation: &'static str,
        message: String,
    },
    /// The edge spool holds as much as it may (`--spool-max-bytes`, or the file system's free
    /// space): nothing more is acknowledged until uploads make room.
    #[error("spool full: {0}")]
    SpoolFull(String),
}

/// The key of one stored instance, relative to the store's root or prefix:
/// `{jobId}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm` (the layout in the README).
/// Every segment is validated, so nothing from the wire reaches a path unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectKey(String);

/// Why UIDs from the wire cannot form an object key (answered 0xC000).
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum KeyError {
    #[error("{which} is not a valid UID: {error}")]
    Uid {
        which: &'static str,
        error: UidError,
    },
    #[error("job id is not a ULID")]
    JobId,
}

impl ObjectKey {
    pub(crate) fn new(
        job_id: &str,
        study: &str,
        series: &str,
        sop_instance: &str,
    ) -> Result<Self, KeyError> {
        if job_id.len() != 26 || !job_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyError::JobId);
        }
        for (which, uid) in [
            ("Study Instance UID", study),
            ("Series Instance UID", series),
            ("SOP Instance UID", sop_instance),
        ] {
            validate_uid(uid).map_err(|error| KeyError::Uid { which, error })?;
        }
        Ok(ObjectKey(format!(
            "{job_id}/{study}/{series}/{sop_instance}.dcm"
        )))
    }

    /// A key read back from disk (the edge spool's files name theirs): checked exactly as
    /// [`ObjectKey::new`] checks one built from the wire.
    pub(crate) fn parse(key: &str) -> Result<Self, KeyError> {
        let mut parts = key.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next().and_then(|sop| sop.strip_suffix(".dcm")),
            parts.next(),
        ) {
            (Some(job_id), Some(study), Some(series), Some(sop), None) => {
                ObjectKey::new(job_id, study, series, sop)
            }
            _ => Err(KeyError::JobId),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The job (batch) the object belongs to: the key's first segment.
    pub(crate) fn job_id(&self) -> &str {
        self.0.split('/').next().unwrap_or_default()
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a batch's prefix holds, recomputed from the store (start-up recovery of batches whose
/// gateway stopped before closing them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BatchContents {
    pub instance_count: u64,
    pub total_bytes: u64,
    pub study_instance_uids: Vec<String>,
}

impl BatchContents {
    /// Adds one object found under the batch, given its key relative to the batch
    /// (`{study}/{series}/{sop}.dcm`). Anything else under the prefix is ignored.
    pub(crate) fn add(&mut self, relative_key: &str, size: u64) {
        let parts: Vec<&str> = relative_key.split('/').collect();
        if parts.len() == 3 && parts[2].ends_with(".dcm") {
            self.instance_count += 1;
            self.total_bytes += size;
            if !self.study_instance_uids.iter().any(|s| s == parts[0]) {
                self.study_instance_uids.push(parts[0].to_string());
            }
        }
    }
}

/// One committed object of a batch, as a listing of the store gives it (the repair of the
/// instance index after a crash or a dropped record: [`crate::index::repair`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListedObject {
    /// `{jobId}/{study}/{series}/{sop}.dcm`, relative to the store's root or prefix.
    pub key: String,
    pub size: u64,
    /// When the object was written (S3 `LastModified`, the file's modification time).
    pub modified: Option<std::time::SystemTime>,
}

impl ListedObject {
    /// The listed object at `relative_key` (relative to the batch, as [`BatchContents::add`]
    /// takes it) of batch `job_id`, if the key has the store layout `{study}/{series}/{sop}.dcm`.
    pub(crate) fn of_batch(
        job_id: &str,
        relative_key: &str,
        size: u64,
        modified: Option<std::time::SystemTime>,
    ) -> Option<ListedObject> {
        let parts: Vec<&str> = relative_key.split('/').collect();
        (parts.len() == 3 && parts[2].ends_with(".dcm")).then(|| ListedObject {
            key: format!("{job_id}/{relative_key}"),
            size,
            modified,
        })
    }
}

/// What the store confirmed about a committed object.
#[derive(Debug, Clone)]
pub(crate) struct StoredObject {
    pub size: u64,
}

/// Where a committed object is when its commit returns: the batch counts it only once it is at its
/// final key.
#[derive(Debug)]
pub(crate) enum Placement {
    /// At its final key (direct mode): it counts in its batch now.
    Final,
    /// Durable in the edge spool and acknowledged; the ticket says when it reached its final key.
    Spooled(UploadTicket),
}

/// A committed object and where it is.
#[derive(Debug)]
pub(crate) struct Committed {
    pub stored: StoredObject,
    pub placement: Placement,
}

/// How a spooled object's upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadOutcome {
    /// S3 confirmed the object at its final key.
    Uploaded,
    /// It will never be uploaded: its spool file was torn (moved to quarantine) or removed.
    NotUploaded,
}

/// The promise of a spooled object's upload outcome, kept by whoever counts the object.
#[derive(Debug)]
pub(crate) struct UploadTicket(oneshot::Receiver<UploadOutcome>);

impl UploadTicket {
    /// A ticket and the sender its spool resolves it with.
    pub(crate) fn new() -> (oneshot::Sender<UploadOutcome>, UploadTicket) {
        let (tx, rx) = oneshot::channel();
        (tx, UploadTicket(rx))
    }

    /// The outcome; `None` when the spool stopped first (the gateway is stopping: the object
    /// stays in the spool and is uploaded at the next start).
    pub(crate) async fn outcome(self) -> Option<UploadOutcome> {
        self.0.await.ok()
    }
}

/// Where instances are made durable: the seam between the receive path and S3 or a directory.
#[async_trait]
pub(crate) trait ObjectStore: Send + Sync + 'static {
    /// Opens an upload that will become the object `key` when committed.
    async fn begin(&self, key: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError>;

    /// The import input of a batch: where its objects are (always ends with `/`).
    fn input_s3_uri(&self, job_id: &str) -> String;

    /// A cheap call that succeeds only if the store is reachable and usable (readiness).
    async fn check(&self) -> Result<(), StoreError>;

    /// Counts the committed objects of a batch (uploads in progress are never listed).
    async fn batch_contents(&self, job_id: &str) -> Result<BatchContents, StoreError>;

    /// Whether the committed object `key` is there now (Storage Commitment checks it before
    /// answering "committed"; an upload in progress is not an object).
    async fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError>;

    /// The committed objects of a batch, one per key (uploads in progress are never listed).
    async fn list_objects(&self, job_id: &str) -> Result<Vec<ListedObject>, StoreError>;

    /// At most the first `limit` bytes of the object at `key` (relative to the root or prefix),
    /// for its meta group; `None` when the object is gone or the store does not read objects back.
    async fn read_head(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// A short description for the start-up log line.
    fn describe(&self) -> String;

    /// Objects of batch `job_id` committed but not yet at their final key (the edge spool's
    /// uploads still to do). Recovery closes a batch only when this is zero.
    fn unsettled(&self, _job_id: &str) -> u64 {
        0
    }

    /// Waits until [`ObjectStore::unsettled`] is zero for `job_id`. Direct stores return at once.
    async fn settled(&self, _job_id: &str) {}
}

/// One object being written: streamed in, then committed (durable, visible) or aborted (gone).
#[async_trait]
pub(crate) trait ObjectUpload: Send {
    /// Appends bytes. May wait (back-pressure) while earlier data is being uploaded.
    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError>;

    /// Makes the object durable and visible. Only after this returns Ok may Success be sent.
    async fn commit(self: Box<Self>) -> Result<StoredObject, StoreError>;

    /// [`ObjectUpload::commit`], and where the object then is: at its final key unless the store
    /// is the edge spool, which overrides this.
    async fn commit_placed(self: Box<Self>) -> Result<Committed, StoreError> {
        Ok(Committed {
            stored: self.commit().await?,
            placement: Placement::Final,
        })
    }

    /// Discards everything written; nothing of the object stays visible.
    async fn abort(self: Box<Self>);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

    #[test]
    fn key_layout_follows_the_design() {
        let key = ObjectKey::new(BATCH, "1.2.3", "1.2.3.4", "1.2.3.4.5").unwrap();
        assert_eq!(
            key.as_str(),
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
        );
    }

    #[test]
    fn batch_contents_count_only_instance_objects() {
        let mut c = BatchContents::default();
        c.add("1.2/1.2.3/1.2.3.4.dcm", 10);
        c.add("1.2/1.2.3/1.2.3.5.dcm", 20);
        c.add("1.3/1.3.1/1.3.1.1.dcm", 5);
        c.add("stray.json", 99);
        c.add("1.2/1.2.3/notes.txt", 99);
        assert_eq!(
            c,
            BatchContents {
                instance_count: 3,
                total_bytes: 35,
                study_instance_uids: vec!["1.2".into(), "1.3".into()]
            }
        );
    }

    #[test]
    fn keys_read_back_are_checked_like_keys_from_the_wire() {
        let key = ObjectKey::new(BATCH, "1.2", "1.2.3", "1.2.3.4").unwrap();
        assert_eq!(ObjectKey::parse(key.as_str()), Ok(key.clone()));
        assert_eq!(key.job_id(), BATCH);
        for bad in [
            "",
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2/1.2.3/1.2.3.4",
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2/1.2.3/1.2.3.4.dcm/x",
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2/../1.2.3.4.dcm",
            "../1.2/1.2.3/1.2.3.4.dcm",
        ] {
            assert!(ObjectKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_refuse_anything_that_is_not_a_uid() {
        assert!(matches!(
            ObjectKey::new(BATCH, "../..", "1.2", "1.3"),
            Err(KeyError::Uid {
                which: "Study Instance UID",
                ..
            })
        ));
        assert!(matches!(
            ObjectKey::new(BATCH, "1.2", "1.2/x", "1.3"),
            Err(KeyError::Uid {
                which: "Series Instance UID",
                ..
            })
        ));
        assert!(matches!(
            ObjectKey::new(BATCH, "1.2", "1.2", ""),
            Err(KeyError::Uid {
                which: "SOP Instance UID",
                ..
            })
        ));
        assert_eq!(
            ObjectKey::new("../x", "1.2", "1.2", "1.3"),
            Err(KeyError::JobId)
        );
    }
}

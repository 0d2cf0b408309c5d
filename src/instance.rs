//! One C-STORE data set, streamed from the wire into the object store.
//!
//! The receiver sees the data set as the PDV fragments arrive, and is always in one of three
//! states ([`State`]): *sniffing* the header (fragments are held in a small prefix buffer, capped
//! at [`HEADER_LIMIT`], until the identifying UIDs are known), *uploading* (each fragment goes
//! straight to the store), or *decided* (the outcome is known before the data set ended: a failure,
//! or a duplicate whose stored copy is kept; the rest is consumed without being stored, so the
//! association stays in step and the sender gets a proper status and can send the next instance).

use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;
use tracing::{info, warn};

use crate::batch::{BatchLease, Batcher, DuplicatePolicy, LimitError, ObjectPath, Seen};
use crate::clock::now_rfc3339;
use crate::dimse::{Command, Status};
use crate::index::{IndexSender, KeyParts};
use crate::metrics::metrics;
use crate::part10::FileMeta;
use crate::policy::DatasetEncoding;
use crate::sniff::{HeaderSniffer, RequiredIds, SniffError};
use crate::store::{
    Committed, KeyError, ObjectKey, ObjectStore, ObjectUpload, Placement, StoreError, UploadOutcome,
};
use crate::uid::{UidError, validate_uid};

/// The identifying UIDs must appear within this many bytes of the data set start. Real headers put
/// them in the first few kilobytes; the cap bounds what a hostile or broken sender can make us hold.
pub(crate) const HEADER_LIMIT: usize = 4 * 1024 * 1024;

/// The Error Comment of an instance refused because the edge spool is full (at most 64 characters,
/// the length of LO).
pub(crate) const SPOOL_FULL_COMMENT: &str =
    "spool full: the gateway waits for the cloud; send again later";

/// Why an instance was not stored. Each reason maps to the status its C-STORE is answered with
/// ([`InstanceError::status`]) and a short, patient-data-free Error Comment.
#[derive(Debug, Error)]
pub(crate) enum InstanceError {
    #[error("Affected SOP Class UID: {0}")]
    CommandSopClassUid(UidError),
    #[error("Affected SOP Instance UID: {0}")]
    CommandSopInstanceUid(UidError),
    #[error("Affected SOP Class UID differs from the presentation context")]
    ContextMismatch,
    #[error("data set header: {0}")]
    Header(#[from] SniffError),
    #[error("identifying UIDs not found in the first {} MiB of the data set", HEADER_LIMIT >> 20)]
    HeaderTooLong,
    #[error("SOP Instance UID in data set differs from the command")]
    SopInstanceMismatch,
    #[error("SOP Class UID in data set differs from the command")]
    SopClassMismatch,
    #[error("{which}: {error}")]
    DatasetUid {
        which: &'static str,
        error: UidError,
    },
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("file meta group: {0}")]
    FileMeta(String),
    #[error("duplicate SOP Instance UID (--duplicate-policy reject)")]
    Duplicate,
    /// The instance grew past the per-file limit, or would take its batch past its byte ceiling.
    #[error("{0}")]
    Limit(#[from] LimitError),
    #[error("object store unavailable: {0}")]
    StoreUnavailable(StoreError),
    #[error("object store write failed: {0}")]
    StoreWrite(StoreError),
    #[error("object store did not confirm the object: {0}")]
    StoreCommit(StoreError),
}

impl InstanceError {
    /// The DIMSE status the C-STORE is answered with (PS3.4 Annex B).
    pub(crate) fn status(&self) -> Status {
        use InstanceError::*;
        match self {
            // A limit of what this gateway (and HealthImaging behind it) can take is a resource
            // limit: PS3.4 B.2.3 has no closer status than "Refused: Out of Resources" (A7xx) for
            // a well-formed instance that is too large; the Error Comment says which limit.
            StoreUnavailable(_) | StoreWrite(_) | StoreCommit(_) | Limit(_) => {
                Status::OUT_OF_RESOURCES
            }
            ContextMismatch | SopInstanceMismatch | SopClassMismatch => {
                Status::DATASET_DOES_NOT_MATCH
            }
            Duplicate => Status::DUPLICATE_SOP_INSTANCE,
            CommandSopClassUid(_)
            | CommandSopInstanceUid(_)
            | Header(_)
            | HeaderTooLong
            | DatasetUid { .. }
            | Key(_)
            | FileMeta(_) => Status::CANNOT_UNDERSTAND,
        }
    }

    /// The Error Comment sent to the peer. Store errors say what failed, not how: the details
    /// (bucket, endpoint, errno) are for our log, not for the sender.
    pub(crate) fn comment(&self) -> String {
        match self {
            InstanceError::StoreUnavailable(StoreError::SpoolFull(_))
            | InstanceError::StoreWrite(StoreError::SpoolFull(_))
            | InstanceError::StoreCommit(StoreError::SpoolFull(_)) => SPOOL_FULL_COMMENT.into(),
            InstanceError::StoreUnavailable(_) => "object store unavailable".into(),
            InstanceError::StoreWrite(_) => "object store write failed".into(),
            InstanceError::StoreCommit(_) => "object store did not confirm the object".into(),
            InstanceError::Duplicate => "SOP Instance UID already received in this batch".into(),
            InstanceError::Limit(e) => e.comment(),
            other => other.to_string(),
        }
    }
}

/// An upload in progress and the batch place it will take once durable.
struct Upload {
    upload: Box<dyn ObjectUpload>,
    /// Reserves the object's bytes in its batch as they arrive.
    lease: BatchLease,
    key: ObjectKey,
}

/// Where the receiver is in the data set.
enum State {
    /// Reading the header: fragments are kept in `prefix` until `sniffer` has the UIDs.
    Sniffing {
        sniffer: HeaderSniffer,
        prefix: Vec<u8>,
    },
    /// Fragments stream into the store.
    Uploading(Upload),
    /// The outcome is known before the data set ended; the rest is consumed without being stored.
    /// `Ok` is a duplicate answered Success because its first copy is durable (keep-first).
    Decided(Result<(), InstanceError>),
}

/// Receives one C-STORE data set, fragment by fragment, and makes it durable.
pub(crate) struct InstanceReceiver {
    target: Target,
    state: State,
    /// Data set bytes received so far, for the log of a discarded instance.
    received: u64,
    started: Instant,
}

/// The instance as its command declares it, and where it goes: everything but the receive state
/// (kept apart from it so the store calls can borrow it while the state changes).
struct Target {
    store: Arc<dyn ObjectStore>,
    batcher: Arc<Batcher>,
    /// What to do when this SOP Instance UID is already in the batch.
    duplicates: DuplicatePolicy,
    /// Affected SOP Class UID of the command: checked against the data set, written to the meta group.
    sop_class_uid: String,
    /// Affected SOP Instance UID of the command: checked against the data set, written to the meta group.
    sop_instance_uid: String,
    /// The presentation context's transfer syntax, recorded in the meta group.
    transfer_syntax_uid: String,
    /// The sender, recorded in the meta group and the batch.
    calling_ae_title: String,
    /// Where the record of the stored object goes (never waited for).
    index: IndexSender,
}

/// What an instance needs from its association.
pub(crate) struct InstanceContext<'a> {
    /// The presentation context's abstract syntax: the command's SOP class must match it.
    pub abstract_syntax: &'a str,
    pub transfer_syntax: &'a str,
    pub calling_ae_title: &'a str,
    pub duplicates: DuplicatePolicy,
    pub index: IndexSender,
}

impl InstanceReceiver {
    /// Starts receiving the data set of `command`. A command that cannot be stored (invalid UIDs,
    /// a SOP class other than its context's) starts decided: its data set is consumed and refused.
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        batcher: Arc<Batcher>,
        command: &Command,
        context: InstanceContext<'_>,
    ) -> Self {
        let sop_class_uid = command.affected_sop_class_uid.clone().unwrap_or_default();
        let sop_instance_uid = command
            .affected_sop_instance_uid
            .clone()
            .unwrap_or_default();
        let state = if let Err(e) = validate_uid(&sop_class_uid) {
            State::Decided(Err(InstanceError::CommandSopClassUid(e)))
        } else if let Err(e) = validate_uid(&sop_instance_uid) {
            State::Decided(Err(InstanceError::CommandSopInstanceUid(e)))
        } else if sop_class_uid != context.abstract_syntax {
            State::Decided(Err(InstanceError::ContextMismatch))
        } else {
            State::Sniffing {
                sniffer: HeaderSniffer::new(DatasetEncoding::of_transfer_syntax(
                    context.transfer_syntax,
                )),
                prefix: Vec::new(),
            }
        };
        let receiver = InstanceReceiver {
            target: Target {
                store,
                batcher,
                duplicates: context.duplicates,
                sop_class_uid,
                sop_instance_uid,
                transfer_syntax_uid: context.transfer_syntax.to_string(),
                calling_ae_title: context.calling_ae_title.to_string(),
                index: context.index,
            },
            state,
            received: 0,
            started: Instant::now(),
        };
        if let State::Decided(Err(e)) = &receiver.state {
            receiver.target.log_failure(e);
        }
        receiver
    }

    /// Takes the next fragment of the data set.
    pub(crate) async fn feed(&mut self, data: &[u8]) {
        self.received += data.len() as u64;
        metrics().bytes_received.inc_by(data.len() as u64);
        match &mut self.state {
            State::Decided(_) => {}
            State::Uploading(up) => {
                // Reserved before written: the batch never holds bytes it did not count.
                if let Err(e) = up.lease.grow(data.len() as u64) {
                    self.fail(e.into()).await;
                } else if let Err(e) = up.upload.write(data).await {
                    self.fail(InstanceError::StoreWrite(e)).await;
                }
            }
            State::Sniffing { sniffer, prefix } => match sniffer.feed(data) {
                Err(e) => self.fail(e.into()).await,
                Ok(done) => {
                    prefix.extend_from_slice(data);
                    if done {
                        self.start_upload().await;
                    } else if prefix.len() > HEADER_LIMIT {
                        self.fail(InstanceError::HeaderTooLong).await;
                    }
                }
            },
        }
    }

    /// Leaves the sniffing state: checks the UIDs, takes the batch lease and opens the upload with
    /// the meta group and the held prefix written. Does nothing in any other state.
    async fn start_upload(&mut self) {
        let state = std::mem::replace(&mut self.state, State::Decided(Ok(())));
        let State::Sniffing { sniffer, prefix } = state else {
            self.state = state;
            return;
        };
        self.state = match self.target.open_upload(sniffer, prefix).await {
            Ok(Some(upload)) => State::Uploading(upload),
            Ok(None) => State::Decided(Ok(())),
            Err(e) => {
                self.target.log_failure(&e);
                State::Decided(Err(e))
            }
        };
    }

    /// Decides the instance failed: an upload in progress is aborted (its lease is dropped with
    /// it, so the instance never counts), and the rest of the data set will be consumed.
    async fn fail(&mut self, error: InstanceError) {
        self.target.log_failure(&error);
        if let State::Uploading(up) = std::mem::replace(&mut self.state, State::Decided(Err(error)))
        {
            up.upload.abort().await;
        }
    }

    /// The data set is complete: make the object durable. `Ok` means Success may be answered.
    pub(crate) async fn finish(mut self) -> Result<(), InstanceError> {
        let outcome = match std::mem::replace(&mut self.state, State::Decided(Ok(()))) {
            State::Decided(outcome) => outcome,
            State::Uploading(up) => self.target.commit(up, self.started).await,
            // The data set ended before the sniffer passed Series Instance UID: a small data set,
            // or one whose header is incomplete (then the sniffer says what is missing).
            State::Sniffing { sniffer, prefix } => {
                match self.target.open_upload(sniffer, prefix).await {
                    Ok(Some(up)) => self.target.commit(up, self.started).await,
                    Ok(None) => Ok(()),
                    Err(e) => {
                        self.target.log_failure(&e);
                        Err(e)
                    }
                }
            }
        };
        if let Err(e) = &outcome {
            metrics().failed(e.status());
        }
        outcome
    }

    /// The association ended mid-instance: discard everything.
    pub(crate) async fn abort(self) {
        if let State::Uploading(up) = self.state {
            up.upload.abort().await;
        }
        if self.received > 0 {
            info!(sop_instance_uid = %self.target.sop_instance_uid, received = self.received, "incomplete instance discarded");
        }
    }
}

impl Target {
    /// The upload for the sniffed header, or `None` for a duplicate whose stored copy is kept.
    async fn open_upload(
        &self,
        sniffer: HeaderSniffer,
        prefix: Vec<u8>,
    ) -> Result<Option<Upload>, InstanceError> {
        let ids = sniffer.finish().and_then(|ids| ids.require())?;
        self.check_ids(&ids)?;
        let mut lease = self.batcher.lease(ObjectPath {
            study_instance_uid: ids.study_instance_uid.clone(),
            series_instance_uid: ids.series_instance_uid.clone(),
            sop_instance_uid: ids.sop_instance_uid.clone(),
        });
        match (self.duplicates, lease.seen()) {
            (DuplicatePolicy::Reject, Seen::InFlight | Seen::Stored) => {
                return Err(InstanceError::Duplicate);
            }
            // Only a copy that is already durable may stand in for this one: a copy still in
            // flight could yet fail, and then Success would have been sent for nothing stored.
            (DuplicatePolicy::KeepFirst, Seen::Stored) => {
                info!(sop_instance_uid = %self.sop_instance_uid, job_id = %lease.job_id(), "duplicate SOP Instance UID: the stored copy is kept (--duplicate-policy keep-first)");
                return Ok(None);
            }
            _ => {}
        }
        let key = ObjectKey::new(
            lease.job_id(),
            &ids.study_instance_uid,
            &ids.series_instance_uid,
            &ids.sop_instance_uid,
        )?;
        let meta = FileMeta {
            sop_class_uid: &self.sop_class_uid,
            sop_instance_uid: &self.sop_instance_uid,
            transfer_syntax_uid: &self.transfer_syntax_uid,
            source_ae_title: &self.calling_ae_title,
        }
        .encode()
        .map_err(|e| InstanceError::FileMeta(e.to_string()))?;
        lease.grow((meta.len() + prefix.len()) as u64)?;
        let mut upload = self
            .store
            .begin(&key)
            .await
            .map_err(InstanceError::StoreUnavailable)?;
        let written = match upload.write(&meta).await {
            Ok(()) => upload.write(&prefix).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            upload.abort().await; // the lease is dropped with it: the instance never counts
            return Err(InstanceError::StoreWrite(e));
        }
        Ok(Some(Upload { upload, lease, key }))
    }

    fn check_ids(&self, ids: &RequiredIds) -> Result<(), InstanceError> {
        if ids.sop_instance_uid != self.sop_instance_uid {
            return Err(InstanceError::SopInstanceMismatch);
        }
        if ids
            .sop_class_uid
            .as_ref()
            .is_some_and(|class| *class != self.sop_class_uid)
        {
            return Err(InstanceError::SopClassMismatch);
        }
        for (which, uid) in [
            ("Study Instance UID", &ids.study_instance_uid),
            ("Series Instance UID", &ids.series_instance_uid),
        ] {
            validate_uid(uid).map_err(|error| InstanceError::DatasetUid { which, error })?;
        }
        Ok(())
    }

    fn log_failure(&self, error: &InstanceError) {
        warn!(sop_instance_uid = %self.sop_instance_uid, status = %error.status(), reason = %error, "instance not stored");
    }

    /// Makes the upload durable and counts it in its batch.
    async fn commit(&self, up: Upload, started: Instant) -> Result<(), InstanceError> {
        if let Err(e) = up.lease.check_deadline() {
            up.upload.abort().await; // the lease is dropped with it: the instance never counts
            let error = InstanceError::Limit(e);
            self.log_failure(&error);
            return Err(error);
        }
        let committing = Instant::now();
        match up.upload.commit_placed().await {
            Ok(Committed { stored, placement }) => {
                metrics().instances_stored.inc();
                metrics().bytes_stored.inc_by(stored.size);
                metrics()
                    .store_seconds
                    .observe(committing.elapsed().as_secs_f64());
                // Durable: the index may now say so. Handed over, never waited for; before the
                // lease is committed, so that the batch cannot close (and wait for its job's
                // records, crate::index::repair) before this record is counted.
                if let Some(parts) = KeyParts::parse(up.key.as_str()) {
                    self.index.record(parts.record(
                        up.key.as_str(),
                        stored.size,
                        Some(self.sop_class_uid.clone()),
                        Some(self.calling_ae_title.clone()),
                        now_rfc3339(),
                    ));
                }
                match placement {
                    Placement::Final => up.lease.commit(stored.size, &self.calling_ae_title),
                    // Acknowledged from the edge spool: the batch counts the instance once the
                    // uploader confirms it in S3, and until then cannot be finalised.
                    Placement::Spooled(ticket) => {
                        let lease = up.lease.spooled();
                        let (size, ae) = (stored.size, self.calling_ae_title.clone());
                        tokio::spawn(async move {
                            match ticket.outcome().await {
                                Some(UploadOutcome::Uploaded) => lease.uploaded(size, &ae),
                                Some(UploadOutcome::NotUploaded) => lease.not_uploaded(),
                                // The gateway is stopping: the batch stays unfinished, for
                                // recovery at the next start.
                                None => drop(lease),
                            }
                        });
                    }
                }
                info!(
                    sop_instance_uid = %self.sop_instance_uid,
                    size = stored.size,
                    key = %up.key,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "instance stored"
                );
                Ok(())
            }
            Err(e) => {
                let error = InstanceError::StoreCommit(e);
                self.log_failure(&error);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchEvent, BatchLimits};
    use crate::dimse::command_field;
    use crate::sniff::tests::sample_dataset;
    use crate::store::local::LocalStore;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    /// A receiver for the sample data set's command, on a local store in `dir`.
    async fn receiver(
        dir: &std::path::Path,
        sop_instance_uid: &str,
    ) -> (
        InstanceReceiver,
        tokio::sync::mpsc::UnboundedReceiver<BatchEvent>,
    ) {
        receiver_with(dir, sop_instance_uid, BatchLimits::default()).await
    }

    /// [`receiver`] with a batcher of the given limits.
    async fn receiver_with(
        dir: &std::path::Path,
        sop_instance_uid: &str,
        limits: BatchLimits,
    ) -> (
        InstanceReceiver,
        tokio::sync::mpsc::UnboundedReceiver<BatchEvent>,
    ) {
        let store = Arc::new(LocalStore::open(dir).await.unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let batcher = Batcher::new(limits, |id| format!("/{id}/"), tx);
        let command = Command::parse(&crate::dimse::request(
            command_field::C_STORE_RQ,
            1,
            CT,
            Some(sop_instance_uid),
            true,
        ))
        .unwrap();
        let context = InstanceContext {
            abstract_syntax: CT,
            transfer_syntax: dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN,
            calling_ae_title: "CT1",
            index: IndexSender::disabled(),
            duplicates: DuplicatePolicy::Overwrite,
        };
        (InstanceReceiver::new(store, batcher, &command, context), rx)
    }

    fn stored_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        fn walk(d: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "dcm") {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, &mut out);
        out
    }

    #[tokio::test]
    async fn a_data_set_in_fragments_goes_from_sniffing_to_uploading_to_stored() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample_dataset(true, false);
        let (mut r, _events) = receiver(dir.path(), "1.2.3.4.5.6.7").await;
        for chunk in data.chunks(1000) {
            r.feed(chunk).await;
        }
        assert!(matches!(r.state, State::Uploading(_)));
        r.finish().await.unwrap();
        let files = stored_files(dir.path());
        assert_eq!(files.len(), 1);
        assert!(files[0].ends_with("1.2.3.4.100/1.2.3.4.100.1/1.2.3.4.5.6.7.dcm"));
        let bytes = std::fs::read(&files[0]).unwrap();
        assert!(bytes.ends_with(&data), "data set stored as received");
    }

    #[tokio::test]
    async fn a_data_set_ending_while_sniffing_is_refused_at_finish() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample_dataset(true, false);
        // Cut inside Series Instance UID: the header never completes.
        let series = b"1.2.3.4.100.1";
        let end = data
            .windows(series.len())
            .position(|w| w == series)
            .unwrap();
        let (mut r, _events) = receiver(dir.path(), "1.2.3.4.5.6.7").await;
        r.feed(&data[..end]).await;
        assert!(matches!(r.state, State::Sniffing { .. }));
        let e = r.finish().await.unwrap_err();
        assert_eq!(e.status(), Status::CANNOT_UNDERSTAND, "{e}");
        assert!(stored_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_mismatched_data_set_is_decided_at_once_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, _events) = receiver(dir.path(), "9.9.9").await;
        r.feed(&sample_dataset(true, false)).await;
        assert!(matches!(
            r.state,
            State::Decided(Err(InstanceError::SopInstanceMismatch))
        ));
        let e = r.finish().await.unwrap_err();
        assert_eq!(e.status(), Status::DATASET_DOES_NOT_MATCH);
        assert!(stored_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn an_instance_growing_past_the_per_file_limit_is_refused_while_it_streams() {
        let dir = tempfile::tempdir().unwrap();
        // The sample's header, then 200 kB of Data Set Trailing Padding (FFFC,FFFC) streaming after it.
        let mut data = sample_dataset(true, false);
        let header = data.len() as u64;
        data.extend([0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0]);
        data.extend(200_000u32.to_le_bytes());
        data.extend(std::iter::repeat_n(0u8, 200_000));
        let limit = header + 100_000;
        let (mut r, _events) = receiver_with(
            dir.path(),
            "1.2.3.4.5.6.7",
            BatchLimits {
                max_instance_bytes: limit,
                ..BatchLimits::default()
            },
        )
        .await;
        let mut chunks = data.chunks(1000);
        for chunk in chunks.by_ref() {
            r.feed(chunk).await;
            if matches!(r.state, State::Decided(_)) {
                break;
            }
        }
        assert!(
            matches!(
                r.state,
                State::Decided(Err(InstanceError::Limit(
                    LimitError::InstanceTooLarge { .. }
                )))
            ),
            "refused before the data set ended"
        );
        assert!(
            chunks.len() > 0,
            "the rest of the data set is still to come"
        );
        for chunk in chunks {
            r.feed(chunk).await; // consumed, not stored
        }
        let e = r.finish().await.unwrap_err();
        assert_eq!(e.status(), Status::OUT_OF_RESOURCES);
        assert_eq!(
            e.comment(),
            format!("instance larger than the per-file limit of {limit} bytes")
        );
        assert!(e.comment().len() <= 64);
        assert!(stored_files(dir.path()).is_empty());
        let incoming = dir.path().join(crate::store::local::INCOMING_DIR);
        assert_eq!(
            std::fs::read_dir(incoming).unwrap().count(),
            0,
            "the upload was aborted"
        );
    }

    #[test]
    fn every_failure_has_the_status_of_its_kind() {
        let uid_error = validate_uid("1.2.x").unwrap_err();
        let io = || StoreError::Io(std::io::Error::other("disk full"));
        for (error, status) in [
            (
                InstanceError::CommandSopClassUid(uid_error),
                Status::CANNOT_UNDERSTAND,
            ),
            (InstanceError::HeaderTooLong, Status::CANNOT_UNDERSTAND),
            (
                InstanceError::ContextMismatch,
                Status::DATASET_DOES_NOT_MATCH,
            ),
            (
                InstanceError::SopInstanceMismatch,
                Status::DATASET_DOES_NOT_MATCH,
            ),
            (InstanceError::Duplicate, Status::DUPLICATE_SOP_INSTANCE),
            (
                InstanceError::StoreUnavailable(io()),
                Status::OUT_OF_RESOURCES,
            ),
            (InstanceError::StoreWrite(io()), Status::OUT_OF_RESOURCES),
            (InstanceError::StoreCommit(io()), Status::OUT_OF_RESOURCES),
            (
                InstanceError::Limit(LimitError::InstanceTooLarge { limit: 1 }),
                Status::OUT_OF_RESOURCES,
            ),
            (
                InstanceError::Limit(LimitError::BatchFull { limit: 1 }),
                Status::OUT_OF_RESOURCES,
            ),
        ] {
            assert_eq!(error.status(), status, "{error}");
        }
    }

    #[test]
    fn a_full_spool_says_so_in_the_error_comment() {
        let full = || StoreError::SpoolFull("9 of 10 bytes".into());
        for e in [
            InstanceError::StoreUnavailable(full()),
            InstanceError::StoreWrite(full()),
            InstanceError::StoreCommit(full()),
        ] {
            assert_eq!(e.status(), Status::OUT_OF_RESOURCES);
            assert_eq!(e.comment(), SPOOL_FULL_COMMENT);
        }
        assert!(SPOOL_FULL_COMMENT.len() <= 64, "an LO value");
        assert!(SPOOL_FULL_COMMENT.starts_with("spool full"));
    }

    #[test]
    fn store_details_stay_out_of_the_error_comment() {
        let e = InstanceError::StoreCommit(StoreError::Io(std::io::Error::other("errno 28")));
        assert_eq!(e.comment(), "object store did not confirm the object");
        assert!(
            e.to_string().contains("errno 28"),
            "the log keeps the detail"
        );
        assert_eq!(
            InstanceError::SopClassMismatch.comment(),
            "SOP Class UID in data set differs from the command"
        );
    }
}

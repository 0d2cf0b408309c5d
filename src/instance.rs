//! One C-STORE data set, streamed from the wire into the object store.
//!
//! The receiver sees the data set as the PDV fragments arrive. Until the header sniffer has found
//! the identifying UIDs (normally within the first fragment), fragments are held in a small prefix
//! buffer, capped at [`HEADER_LIMIT`]; from then on each fragment goes straight to the upload. Once
//! the receiver has failed (bad UIDs, store error), it keeps consuming the rest of the data set
//! without storing it, so the association stays in step and the sender gets a proper status for
//! this instance and can send the next one.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use crate::batch::DuplicatePolicy;
use crate::batch::{BatchLease, Batcher, Seen};
use crate::dimse::{Command, status};
use crate::metrics::metrics;
use crate::part10::FileMeta;
use crate::policy::DatasetEncoding;
use crate::sniff::{HeaderSniffer, RequiredIds};
use crate::store::{ObjectKey, ObjectStore, ObjectUpload};
use crate::uid::validate_uid;

/// The identifying UIDs must appear within this many bytes of the data set start. Real headers put
/// them in the first few kilobytes; the cap bounds what a hostile or broken sender can make us hold.
pub const HEADER_LIMIT: usize = 4 * 1024 * 1024;

/// The status to answer a C-STORE with, and a short, patient-data-free reason for failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    pub comment: Option<String>,
}

impl Outcome {
    fn failure(status: u16, comment: impl Into<String>) -> Self {
        Outcome {
            status,
            comment: Some(comment.into()),
        }
    }
}

struct Upload {
    upload: Box<dyn ObjectUpload>,
    lease: BatchLease,
    key: ObjectKey,
    study_instance_uid: String,
}

pub struct InstanceReceiver {
    store: Arc<dyn ObjectStore>,
    batcher: Arc<Batcher>,
    sop_class_uid: String,
    sop_instance_uid: String,
    transfer_syntax_uid: String,
    calling_ae_title: String,
    sniffer: Option<HeaderSniffer>,
    prefix: Vec<u8>,
    upload: Option<Upload>,
    /// The outcome, once known before the data set ends (a failure, or a kept-first duplicate);
    /// the rest of the data set is then consumed without being stored.
    decided: Option<Outcome>,
    received: u64,
    started: Instant,
    duplicates: DuplicatePolicy,
}

impl InstanceReceiver {
    /// Starts receiving the data set of `command`, negotiated with `transfer_syntax_uid`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        batcher: Arc<Batcher>,
        command: &Command,
        transfer_syntax_uid: &str,
        calling_ae_title: &str,
        duplicates: DuplicatePolicy,
    ) -> Self {
        let sop_class_uid = command.affected_sop_class_uid.clone().unwrap_or_default();
        let sop_instance_uid = command
            .affected_sop_instance_uid
            .clone()
            .unwrap_or_default();
        let failure = if let Err(e) = validate_uid(&sop_class_uid) {
            Some(Outcome::failure(
                status::CANNOT_UNDERSTAND,
                format!("Affected SOP Class UID: {e}"),
            ))
        } else if let Err(e) = validate_uid(&sop_instance_uid) {
            Some(Outcome::failure(
                status::CANNOT_UNDERSTAND,
                format!("Affected SOP Instance UID: {e}"),
            ))
        } else {
            None
        };
        InstanceReceiver {
            store,
            batcher,
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid: transfer_syntax_uid.to_string(),
            calling_ae_title: calling_ae_title.to_string(),
            sniffer: Some(HeaderSniffer::new(DatasetEncoding::of_transfer_syntax(
                transfer_syntax_uid,
            ))),
            prefix: Vec::new(),
            upload: None,
            decided: failure,
            received: 0,
            started: Instant::now(),
            duplicates,
        }
    }

    /// Marks the instance failed up front (e.g. a command that does not fit its context); the data
    /// set is still consumed.
    pub fn fail_with(&mut self, status: u16, comment: &str) {
        if self.decided.is_none() {
            self.decided = Some(Outcome::failure(status, comment));
        }
    }

    /// Takes the next fragment of the data set.
    pub async fn feed(&mut self, data: &[u8]) {
        self.received += data.len() as u64;
        metrics().bytes_received.inc_by(data.len() as u64);
        if self.decided.is_some() {
            return;
        }
        if let Some(up) = self.upload.as_mut() {
            if let Err(e) = up.upload.write(data).await {
                self.fail(
                    Outcome::failure(status::OUT_OF_RESOURCES, "object store write failed"),
                    &e.to_string(),
                )
                .await;
            }
            return;
        }
        let Some(sniffer) = self.sniffer.as_mut() else {
            return;
        };
        match sniffer.feed(data) {
            Err(e) => {
                let reason = format!("data set header: {e}");
                self.fail(
                    Outcome::failure(status::CANNOT_UNDERSTAND, &reason),
                    &reason,
                )
                .await;
            }
            Ok(done) => {
                self.prefix.extend_from_slice(data);
                if done {
                    self.start_upload().await;
                } else if self.prefix.len() > HEADER_LIMIT {
                    let reason = format!(
                        "identifying UIDs not found in the first {} MiB of the data set",
                        HEADER_LIMIT >> 20
                    );
                    self.fail(
                        Outcome::failure(status::CANNOT_UNDERSTAND, &reason),
                        &reason,
                    )
                    .await;
                }
            }
        }
    }

    /// Checks the sniffed UIDs and opens the upload with the prefix written.
    async fn start_upload(&mut self) {
        let Some(sniffer) = self.sniffer.take() else {
            return;
        };
        let ids = match sniffer.finish().and_then(|ids| ids.require()) {
            Ok(ids) => ids,
            Err(e) => {
                let reason = format!("data set header: {e}");
                return self
                    .fail(
                        Outcome::failure(status::CANNOT_UNDERSTAND, &reason),
                        &reason,
                    )
                    .await;
            }
        };
        if let Err(outcome) = self.check_ids(&ids) {
            let reason = outcome.comment.clone().unwrap_or_default();
            return self.fail(outcome, &reason).await;
        }
        let lease = self.batcher.lease(&ids.sop_instance_uid);
        match (self.duplicates, lease.seen()) {
            (DuplicatePolicy::Reject, Seen::InFlight | Seen::Stored) => {
                let outcome = Outcome::failure(
                    status::DUPLICATE_SOP_INSTANCE,
                    "SOP Instance UID already received in this batch",
                );
                return self
                    .fail(
                        outcome,
                        "duplicate SOP Instance UID (--duplicate-policy reject)",
                    )
                    .await;
            }
            // Only a copy that is already durable may stand in for this one: a copy still in
            // flight could yet fail, and then Success would have been sent for nothing stored.
            (DuplicatePolicy::KeepFirst, Seen::Stored) => {
                info!(sop_instance_uid = %self.sop_instance_uid, job_id = %lease.batch_id(), "duplicate SOP Instance UID: the stored copy is kept (--duplicate-policy keep-first)");
                self.decided = Some(Outcome {
                    status: status::SUCCESS,
                    comment: None,
                });
                self.prefix = Vec::new();
                return;
            }
            _ => {}
        }
        let key = match ObjectKey::new(
            lease.batch_id(),
            &ids.study_instance_uid,
            &ids.series_instance_uid,
            &ids.sop_instance_uid,
        ) {
            Ok(key) => key,
            Err(e) => {
                let reason = e.to_string();
                return self
                    .fail(
                        Outcome::failure(status::CANNOT_UNDERSTAND, &reason),
                        &reason,
                    )
                    .await;
            }
        };
        let meta = FileMeta {
            sop_class_uid: &self.sop_class_uid,
            sop_instance_uid: &self.sop_instance_uid,
            transfer_syntax_uid: &self.transfer_syntax_uid,
            source_ae_title: &self.calling_ae_title,
        };
        let meta = match meta.encode() {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("file meta group: {e}");
                return self
                    .fail(
                        Outcome::failure(status::CANNOT_UNDERSTAND, &reason),
                        &reason,
                    )
                    .await;
            }
        };
        let mut upload = match self.store.begin(&key).await {
            Ok(u) => u,
            Err(e) => {
                return self
                    .fail(
                        Outcome::failure(status::OUT_OF_RESOURCES, "object store unavailable"),
                        &e.to_string(),
                    )
                    .await;
            }
        };
        let prefix = std::mem::take(&mut self.prefix);
        let written = match upload.write(&meta).await {
            Ok(()) => upload.write(&prefix).await,
            Err(e) => Err(e),
        };
        self.upload = Some(Upload {
            upload,
            lease,
            key,
            study_instance_uid: ids.study_instance_uid,
        });
        if let Err(e) = written {
            self.fail(
                Outcome::failure(status::OUT_OF_RESOURCES, "object store write failed"),
                &e.to_string(),
            )
            .await;
        }
    }

    fn check_ids(&self, ids: &RequiredIds) -> Result<(), Outcome> {
        if ids.sop_instance_uid != self.sop_instance_uid {
            return Err(Outcome::failure(
                status::DATASET_DOES_NOT_MATCH,
                "SOP Instance UID in data set differs from the command",
            ));
        }
        if let Some(class) = &ids.sop_class_uid {
            if *class != self.sop_class_uid {
                return Err(Outcome::failure(
                    status::DATASET_DOES_NOT_MATCH,
                    "SOP Class UID in data set differs from the command",
                ));
            }
        }
        for (which, uid) in [
            ("Study Instance UID", &ids.study_instance_uid),
            ("Series Instance UID", &ids.series_instance_uid),
        ] {
            if let Err(e) = validate_uid(uid) {
                return Err(Outcome::failure(
                    status::CANNOT_UNDERSTAND,
                    format!("{which}: {e}"),
                ));
            }
        }
        Ok(())
    }

    async fn fail(&mut self, outcome: Outcome, detail: &str) {
        warn!(sop_instance_uid = %self.sop_instance_uid, status = format_args!("{:#06X}", outcome.status), reason = %detail, "instance not stored");
        self.decided = Some(outcome);
        self.prefix = Vec::new();
        self.sniffer = None;
        if let Some(up) = self.upload.take() {
            up.upload.abort().await; // the lease is dropped with it: the instance never counts
        }
    }

    /// The data set is complete: make the object durable and return the status to answer with.
    pub async fn finish(mut self) -> Outcome {
        if self.decided.is_none() && self.upload.is_none() {
            // Small data set: it ended before the sniffer passed Series Instance UID.
            self.start_upload().await;
        }
        if let Some(outcome) = self.decided.take() {
            if outcome.status != status::SUCCESS {
                metrics().failed(outcome.status);
            }
            return outcome;
        }
        let Some(up) = self.upload.take() else {
            return Outcome::failure(status::CANNOT_UNDERSTAND, "empty data set");
        };
        let committing = Instant::now();
        match up.upload.commit().await {
            Ok(stored) => {
                metrics().instances_stored.inc();
                metrics()
                    .store_seconds
                    .observe(committing.elapsed().as_secs_f64());
                up.lease
                    .commit(stored.size, &up.study_instance_uid, &self.calling_ae_title);
                info!(
                    sop_instance_uid = %self.sop_instance_uid,
                    size = stored.size,
                    key = %up.key,
                    duration_ms = self.started.elapsed().as_millis() as u64,
                    "instance stored"
                );
                Outcome {
                    status: status::SUCCESS,
                    comment: None,
                }
            }
            Err(e) => {
                metrics().failed(status::OUT_OF_RESOURCES);
                warn!(sop_instance_uid = %self.sop_instance_uid, status = "0xA700", reason = %e, "instance not stored");
                Outcome::failure(
                    status::OUT_OF_RESOURCES,
                    "object store did not confirm the object",
                )
            }
        }
    }

    /// The association ended mid-instance: discard everything.
    pub async fn abort(mut self) {
        if let Some(up) = self.upload.take() {
            up.upload.abort().await;
        }
        if self.received > 0 {
            info!(sop_instance_uid = %self.sop_instance_uid, received = self.received, "incomplete instance discarded");
        }
    }
}

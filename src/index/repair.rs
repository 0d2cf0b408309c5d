//! Keeping the index whole without scanning the store: a job's objects are listed, and the index
//! repaired from their keys, only when something may have been lost for that job.
//!
//! - When a batch closes, [`run_gate`] holds its `Closed` event back from the job recorder until
//!   the [`Tally`] says every record of the job was written. If one was lost (a full channel, a
//!   failed write) or the writer is too slow ([`GATE_WAIT`]), [`Repairer::repair`] adds what the
//!   index lacks. So a job recorded CLOSED has all its instances indexed, and recovery need not
//!   look at CLOSED jobs.
//! - A gateway that dies loses the records in its channel; its jobs are left OPEN, and recovery,
//!   which lists their objects to close them, repairs their records first ([`crate::recovery`]).
//!
//! A repair only adds records for keys the index lacks ([`InstanceIndex::add_absent`]), so it
//! never undoes an import outcome recorded meanwhile. It never holds up an import for long: a
//! close waits at most [`GATE_WAIT`] and one repair attempt; a repair that fails for a reason that
//! may pass goes on in the background, and the batch goes on to its import. (During such an
//! outage, a crash before the background repair succeeds can leave records missing: logged.)

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{IndexError, InstanceIndex, InstanceRecord, KeyParts, META_READ_LIMIT, Settled, Tally};
use crate::batch::BatchEvent;
use crate::store::{ListedObject, ObjectStore, StoreError};

/// How long a closing batch waits for the writer to write its job's records before it repairs the
/// index from the store instead. The writer writes a batch's records as its instances arrive, so
/// at the close only the last few are usually pending.
pub(crate) const GATE_WAIT: Duration = Duration::from_secs(30);

/// Attempts of one repair, the first at once and the others in the background, with a backoff
/// from [`REPAIR_BACKOFF`] doubling up to [`REPAIR_BACKOFF_CAP`]: over ten minutes in all, long
/// enough for a brief DynamoDB or network outage to pass.
const REPAIR_ATTEMPTS: u32 = 12;
const REPAIR_BACKOFF: Duration = Duration::from_secs(2);
const REPAIR_BACKOFF_CAP: Duration = Duration::from_secs(120);

/// Why a repair did not complete.
#[derive(Debug, Error)]
pub(crate) enum RepairError {
    #[error("cannot list the job's objects: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl RepairError {
    /// Listing failures (S3 or disk) are tried again; the index says for its own.
    fn is_retriable(&self) -> bool {
        match self {
            RepairError::Store(_) => true,
            RepairError::Index(e) => e.is_retriable(),
        }
    }
}

/// Adds to the index the records of a job's stored objects that it lacks.
pub(crate) struct Repairer {
    index: Arc<dyn InstanceIndex>,
    store: Arc<dyn ObjectStore>,
    /// The writer's per-job counts; `None` where nothing is written through this process's
    /// writer (recovery of another process's jobs needs none).
    tally: Option<Arc<Tally>>,
}

impl Repairer {
    pub(crate) fn new(
        index: Arc<dyn InstanceIndex>,
        store: Arc<dyn ObjectStore>,
        tally: Option<Arc<Tally>>,
    ) -> Self {
        Repairer {
            index,
            store,
            tally,
        }
    }

    /// One pass: lists the job's objects, asks the index which keys it lacks, and adds a record
    /// for each (from the key, the listing's size and time, and the meta group where the store
    /// reads objects back). Returns how many records were added.
    pub(crate) async fn repair_once(&self, job_id: &str) -> Result<u64, RepairError> {
        let objects = self.store.list_objects(job_id).await?;
        let keys = objects.iter().map(|o| o.key.clone()).collect();
        let missing: std::collections::HashSet<String> = self
            .index
            .missing(job_id, keys)
            .await?
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let mut records = Vec::with_capacity(missing.len());
        for object in objects.iter().filter(|o| missing.contains(&o.key)) {
            if let Some(record) = self.record_of(object).await? {
                records.push(record);
            }
        }
        Ok(self.index.add_absent(records).await?)
    }

    /// A STORED record for a listed object; `None` if its key is not of the store layout.
    async fn record_of(
        &self,
        object: &ListedObject,
    ) -> Result<Option<InstanceRecord>, RepairError> {
        let Some(parts) = KeyParts::parse(&object.key) else {
            return Ok(None);
        };
        let meta = self
            .store
            .read_head(&object.key, META_READ_LIMIT)
            .await?
            .and_then(|head| super::meta_of(&head));
        let (sop_class_uid, calling_ae_title) = match meta {
            Some((class, ae)) => (Some(class), ae),
            None => (None, None),
        };
        let received_at = object
            .modified
            .map(crate::clock::rfc3339)
            .unwrap_or_else(crate::clock::now_rfc3339);
        Ok(Some(parts.record(
            &object.key,
            object.size,
            sop_class_uid,
            calling_ae_title,
            received_at,
        )))
    }

    /// [`Repairer::repair_once`], at once; should that fail for a reason that may pass (DynamoDB
    /// or S3 unreachable, throttling), it is tried again in the background ([`REPAIR_ATTEMPTS`],
    /// backoff up to [`REPAIR_BACKOFF_CAP`]) so that the caller, a closing batch or recovery, is
    /// not held up for long. A failure for good is a WARN: the job goes on to its import, and
    /// `instances show` may miss some of its instances.
    pub(crate) async fn repair(self: &Arc<Self>, job_id: &str) {
        match self.repair_once(job_id).await {
            Ok(added) => self.repaired(job_id, added),
            Err(e) if e.is_retriable() => {
                warn!(job_id, error = %e, "instance index repair failed; trying again in the background");
                let (this, job_id) = (self.clone(), job_id.to_string());
                tokio::spawn(async move { this.repair_later(&job_id).await });
            }
            Err(e) => self.given_up(job_id, 1, &e),
        }
    }

    /// The background retries of [`Repairer::repair`].
    async fn repair_later(&self, job_id: &str) {
        for attempt in 2..=REPAIR_ATTEMPTS {
            let delay = REPAIR_BACKOFF
                .saturating_mul(1 << (attempt - 2))
                .min(REPAIR_BACKOFF_CAP);
            tokio::time::sleep(delay).await;
            match self.repair_once(job_id).await {
                Ok(added) => return self.repaired(job_id, added),
                Err(e) if e.is_retriable() && attempt < REPAIR_ATTEMPTS => {
                    debug!(job_id, attempt, error = %e, "instance index repair failed again; will retry");
                }
                Err(e) => return self.given_up(job_id, attempt, &e),
            }
        }
    }

    fn repaired(&self, job_id: &str, added: u64) {
        if added == 0 {
            debug!(job_id, "instance index: nothing missing");
        } else {
            info!(job_id, added, index = %self.index.describe(), "instance index repaired from the stored objects");
        }
    }

    fn given_up(&self, job_id: &str, attempts: u32, e: &RepairError) {
        warn!(job_id, attempts, error = %e, index = %self.index.describe(), "instance index repair failed; `dicom-gateway instances show` may miss instances of this job");
    }

    /// For a batch that closed: waits until its job's records are written, and repairs the index
    /// if any was lost or the wait ran out.
    pub(crate) async fn settle_closed(self: &Arc<Self>, job_id: &str) {
        let Some(tally) = &self.tally else {
            return;
        };
        match tally.wait_settled(job_id, GATE_WAIT).await {
            Settled::Written => debug!(job_id, "instance index: every record of the job written"),
            Settled::Lost(lost) => {
                info!(
                    job_id,
                    lost,
                    "instance index: records of the job were dropped; repairing from the stored objects"
                );
                self.repair(job_id).await;
            }
            Settled::TimedOut => {
                warn!(job_id, waited = ?GATE_WAIT, "instance index writer is behind; repairing the job's records from the stored objects");
                self.repair(job_id).await;
            }
        }
    }
}

/// Passes the batcher's events on to the job recorder, holding each `Closed` until its job is
/// indexed ([`Repairer::settle_closed`]); `Opened` goes on at once. Ends, after the closes in
/// progress, when the batcher's channel closes.
pub(crate) async fn run_gate(
    repairer: Arc<Repairer>,
    mut events: mpsc::UnboundedReceiver<BatchEvent>,
    out: mpsc::UnboundedSender<BatchEvent>,
) {
    let mut closing = JoinSet::new();
    while let Some(event) = events.recv().await {
        match event {
            BatchEvent::Closed(summary) => {
                let (repairer, out) = (repairer.clone(), out.clone());
                closing.spawn(async move {
                    repairer.settle_closed(&summary.job_id).await;
                    let _ = out.send(BatchEvent::Closed(summary));
                });
            }
            other => {
                let _ = out.send(other);
            }
        }
        while closing.try_join_next().is_some() {}
    }
    while closing.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchSummary, CloseReason};
    use crate::index::local::LocalIndex;
    use crate::index::{IndexSender, InstanceOutcome, run_writer};
    use crate::part10::FileMeta;
    use crate::store::ObjectKey;
    use crate::store::local::LocalStore;

    const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    /// Stores a small Part-10 object of SOP Instance UID `sop` in `JOB` through the store.
    async fn store_object(store: &LocalStore, sop: &str) -> String {
        let key = ObjectKey::new(JOB, "1.2", "1.2.3", sop).unwrap();
        let mut bytes = FileMeta {
            sop_class_uid: CT,
            sop_instance_uid: sop,
            transfer_syntax_uid: "1.2.840.10008.1.2.1",
            source_ae_title: "MR7",
        }
        .encode()
        .unwrap();
        bytes.extend_from_slice(&[0u8; 32]);
        let mut upload = store.begin(&key).await.unwrap();
        upload.write(&bytes).await.unwrap();
        upload.commit().await.unwrap();
        key.to_string()
    }

    fn summary() -> BatchSummary {
        BatchSummary {
            job_id: JOB.into(),
            created_at: "2026-11-24T06:00:00.000Z".into(),
            closed_at: "2026-11-24T06:01:00.000Z".into(),
            close_reason: CloseReason::Idle,
            instance_count: 2,
            total_bytes: 2,
            study_instance_uids: vec!["1.2".into()],
            calling_ae_titles: vec!["MR7".into()],
            input_s3_uri: "/x/".into(),
        }
    }

    #[tokio::test]
    async fn a_repair_adds_only_what_the_index_lacks_and_keeps_outcomes() {
        let root = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(root.path()).await.unwrap());
        let index = Arc::new(LocalIndex::new(root.path().join("elsewhere")));
        let indexed = store_object(&store, "1.2.3.1").await;
        let lost = store_object(&store, "1.2.3.2").await;
        index
            .append(vec![KeyParts::parse(&indexed).unwrap().record(
                &indexed,
                1,
                None,
                None,
                "2026-11-24T06:00:00.000Z".into(),
            )])
            .await
            .unwrap();
        let failed = InstanceOutcome::Failed {
            exception_type: "ValidationException".into(),
            message: "bad".into(),
        };
        index
            .record_outcomes(JOB, vec![(indexed.clone(), failed.clone())])
            .await
            .unwrap();
        let repairer = Repairer::new(index.clone(), store.clone(), None);
        assert_eq!(repairer.repair_once(JOB).await.unwrap(), 1);
        let found = index.find("1.2.3.2").await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].object_key, lost);
        assert_eq!(
            found[0].sop_class_uid.as_deref(),
            Some(CT),
            "from the meta group"
        );
        assert_eq!(found[0].calling_ae_title.as_deref(), Some("MR7"));
        assert_eq!(found[0].outcome, InstanceOutcome::Stored);
        assert_eq!(
            index.find("1.2.3.1").await.unwrap()[0].outcome,
            failed,
            "the outcome of an indexed object stays"
        );
        assert_eq!(repairer.repair_once(JOB).await.unwrap(), 0);
        assert_eq!(
            repairer
                .repair_once("01JD6Y7Z8X9W0V1T2S3R4Q5P6M")
                .await
                .unwrap(),
            0,
            "a job without objects"
        );
    }

    #[tokio::test]
    async fn the_gate_holds_a_close_until_its_job_is_indexed_and_repairs_a_dropped_record() {
        let root = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(root.path()).await.unwrap());
        let index: Arc<dyn InstanceIndex> = Arc::new(LocalIndex::new(root.path()));
        // A channel of one, with no writer yet: the second record is dropped.
        let (sender, rx, tally) = IndexSender::channel(1);
        for sop in ["1.2.3.1", "1.2.3.2"] {
            let key = store_object(&store, sop).await;
            sender.record(KeyParts::parse(&key).unwrap().record(
                &key,
                1,
                Some(CT.into()),
                Some("MR7".into()),
                crate::clock::now_rfc3339(),
            ));
        }
        let repairer = Arc::new(Repairer::new(index.clone(), store, Some(tally.clone())));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (out_tx, mut out) = mpsc::unbounded_channel();
        let gate = tokio::spawn(run_gate(repairer, events_rx, out_tx));
        events_tx
            .send(BatchEvent::Opened {
                job_id: JOB.into(),
                created_at: "t".into(),
                input_s3_uri: "/x/".into(),
            })
            .unwrap();
        events_tx.send(BatchEvent::Closed(summary())).unwrap();
        assert!(
            matches!(out.recv().await, Some(BatchEvent::Opened { .. })),
            "at once"
        );
        tokio::task::yield_now().await;
        assert!(out.try_recv().is_err(), "the close waits for the writer");
        let writer = tokio::spawn(run_writer(index.clone(), rx, tally));
        assert!(matches!(out.recv().await, Some(BatchEvent::Closed(_))));
        for sop in ["1.2.3.1", "1.2.3.2"] {
            assert_eq!(
                index.find(sop).await.unwrap().len(),
                1,
                "{sop} indexed at the close"
            );
        }
        drop(events_tx);
        gate.await.unwrap();
        assert!(out.recv().await.is_none(), "the gate ends with the batcher");
        drop(sender);
        writer.await.unwrap();
    }
}

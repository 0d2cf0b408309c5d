//! The instance index: one record per stored object, so an operator can go from a SOP Instance UID
//! to its object key, its job, when and from which AE it arrived, and its import outcome.
//!
//! The index is derived data. The receive path hands each record to a bounded channel
//! ([`IndexSender::record`]) and never waits for a write: a background task ([`run_writer`])
//! appends what the channel holds. Nothing is lost for good, and nothing is scanned in bulk:
//!
//! - **CLOSED means indexed.** Per job, a [`Tally`] counts the records handed over, written and
//!   lost (a full channel, a failed write). A closing batch is held back from the job store until
//!   its job's records are all settled ([`repair::run_gate`]); if any was lost, or the writer is
//!   too slow, the job's objects are listed and the index is repaired from their keys
//!   ([`repair::Repairer`]), which carry job, study, series and SOP Instance UID.
//! - **A crash** loses what the channel held, for jobs the dead gateway left OPEN (a CLOSED one
//!   was indexed before it was recorded): recovery, which lists the objects of those jobs anyway
//!   to close them, repairs their records before adopting them ([`crate::recovery`]).
//! - The local store also keeps its start-up rebuild ([`local::LocalIndex::rebuild`]), which
//!   covers objects of any job.
//!
//! One seam ([`InstanceIndex`]), two implementations: the local journal of JSON lines in
//! `{store}/index/` ([`local::LocalIndex`]), and a DynamoDB table beside the job table for
//! deployments ([`dynamodb::DynamoIndex`]).

pub mod dynamodb;
pub(crate) mod local;
pub(crate) mod repair;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

/// Records waiting for the writer; beyond this the receive path drops them (the rebuild recovers
/// them) rather than wait.
pub(crate) const CHANNEL_CAPACITY: usize = 8192;

/// Most records the writer appends in one go.
const WRITE_BATCH: usize = 512;

/// How long the writer lets records gather after the first one before it appends them. One append
/// per record (a file opened and written, or a DynamoDB request, for each instance) costs CPU the
/// receive path shares on a small machine; records arriving during this window go in the same
/// append. Derived data can be this much later.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// Most bytes read from the start of an object to find its meta group when its record is rebuilt.
pub(crate) const META_READ_LIMIT: u64 = 64 * 1024;

/// SOP Class UID and Source Application Entity Title from the start of a Part-10 object, if its
/// whole meta group is there.
pub(crate) fn meta_of(head: &[u8]) -> Option<(String, Option<String>)> {
    let group_len = u32::from_le_bytes(head.get(140..144)?.try_into().ok()?) as usize;
    if 144usize.checked_add(group_len)? > head.len() {
        return None;
    }
    let (meta, _) = crate::part10::split_part10(head)?;
    let clean = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
    Some((
        clean(&meta.media_storage_sop_class_uid),
        meta.source_application_entity_title
            .as_deref()
            .map(clean)
            .filter(|s| !s.is_empty()),
    ))
}

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
pub enum InstanceOutcome {
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
    pub fn replaces(&self, current: &InstanceOutcome) -> bool {
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
pub struct InstanceRecord {
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
pub struct OutcomesRecorded {
    /// Outcomes whose object the index has a record of (changed or already so).
    pub matched: u64,
    /// Records whose outcome this call changed (fewer than `matched` when a resumed reader
    /// records again what its predecessor did).
    pub changed: u64,
}

/// Why the index could not be read or written.
#[derive(Debug, Error)]
pub enum IndexError {
    #[error("instance index I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("instance index record cannot be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("DynamoDB {operation} on the instance table failed: {message}")]
    Dynamo {
        operation: &'static str,
        message: String,
        /// Whether the same call may succeed later ([`crate::aws::is_retriable`]).
        retriable: bool,
    },
    #[error("instance table item is not a record this version knows: {0}")]
    Malformed(String),
}

impl IndexError {
    /// Whether trying again later may help: throttling, timeouts, a busy disk may pass; access
    /// denied, a missing table or an item this version cannot read will not.
    pub(crate) fn is_retriable(&self) -> bool {
        match self {
            IndexError::Io(e) => e.kind() != std::io::ErrorKind::PermissionDenied,
            IndexError::Dynamo { retriable, .. } => *retriable,
            IndexError::Encode(_) | IndexError::Malformed(_) => false,
        }
    }
}

/// Where instance records are kept: the seam between the writer and the local journal or the
/// DynamoDB table.
///
/// Public (like [`crate::jobs`]) so that the LocalStack tests can drive the DynamoDB index
/// directly; `record_outcomes` and `failed` are for the outcome reader and `jobs show --failed`.
#[async_trait]
pub trait InstanceIndex: Send + Sync + 'static {
    /// Appends records. A record may already be there (a rebuild raced the writer): lookups
    /// return one record per object key.
    async fn append(&self, records: Vec<InstanceRecord>) -> Result<(), IndexError>;

    /// Every record of this SOP Instance UID (one per object key, the last written; several if
    /// it was stored in several jobs), oldest first.
    async fn find(&self, sop_instance_uid: &str) -> Result<Vec<InstanceRecord>, IndexError>;

    /// [`InstanceIndex::find`] for many SOP Instance UIDs at once (the commitment worker asks for
    /// every undecided instance of a pass in one go): each UID's records as `find` gives them. A
    /// UID without records may be absent from the map. The default asks `find` per UID; an
    /// implementation that reads everything per lookup (the local index) overrides it with one read.
    async fn find_many(
        &self,
        sop_instance_uids: &[String],
    ) -> Result<HashMap<String, Vec<InstanceRecord>>, IndexError> {
        let mut out = HashMap::with_capacity(sop_instance_uids.len());
        for uid in sop_instance_uids {
            if !out.contains_key(uid) {
                out.insert(uid.clone(), self.find(uid).await?);
            }
        }
        Ok(out)
    }

    /// Records the import outcome of objects of job `job_id`, each given by its object key, where
    /// it [`InstanceOutcome::replaces`] the record's. Idempotent: recording the same outcomes
    /// again (a resumed outcome reader) changes nothing that a lookup returns. A key the index has
    /// no record of is skipped, and not counted as matched: the outcome reader tells incomplete
    /// outcomes from a resumed reading by it. Callers pass bounded chunks.
    async fn record_outcomes(
        &self,
        job_id: &str,
        outcomes: Vec<(String, InstanceOutcome)>,
    ) -> Result<OutcomesRecorded, IndexError>;

    /// The records of job `job_id` whose outcome is FAILED, in object key order.
    async fn failed(&self, job_id: &str) -> Result<Vec<InstanceRecord>, IndexError>;

    /// Of `keys`, object keys of job `job_id`'s objects, those the index has no record of (the
    /// repair after a crash or a dropped record, [`repair::Repairer`]).
    async fn missing(&self, job_id: &str, keys: Vec<String>) -> Result<Vec<String>, IndexError>;

    /// Adds each record whose object key the index has no record of, and never replaces one: a
    /// repair that races the outcome reader must not turn IMPORTED back into STORED. Returns how
    /// many were added.
    async fn add_absent(&self, records: Vec<InstanceRecord>) -> Result<u64, IndexError>;

    /// A short description for log lines and error messages.
    fn describe(&self) -> String;
}

/// What became of one job's records so far: handed to the writer, written, or lost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct JobTally {
    handed: u64,
    written: u64,
    /// Dropped (a full channel, a stopped or failing writer), or skipped because the job's
    /// closing gave up waiting for them and repaired the index instead.
    lost: u64,
    /// The closing of the job stopped waiting and repaired the index from the store: the writer
    /// skips the job's records still in the channel (see [`Tally::wait_settled`]).
    abandoned: bool,
}

impl JobTally {
    fn settled(&self) -> bool {
        self.written + self.lost >= self.handed
    }
}

/// How a job's records ended up when its batch closed ([`Tally::wait_settled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Every record handed over was written.
    Written,
    /// Every record was settled, and this many were lost: the index needs a repair.
    Lost(u64),
    /// The writer did not get through the job's records in time: the index needs a repair, and
    /// the writer skips what it still holds of the job.
    TimedOut,
}

/// Per job, the records the receive path handed to the writer and what became of them, so that a
/// closing batch can wait until its records are written. Entries live from a job's first record
/// until its batch closed and its records are settled.
#[derive(Default)]
pub(crate) struct Tally {
    jobs: Mutex<HashMap<String, JobTally>>,
    changed: Notify,
}

impl Tally {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, JobTally>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handed(&self, job_id: &str) {
        let mut jobs = self.lock();
        match jobs.get_mut(job_id) {
            Some(t) => t.handed += 1,
            None => {
                jobs.insert(
                    job_id.to_string(),
                    JobTally {
                        handed: 1,
                        ..Default::default()
                    },
                );
            }
        }
    }

    /// Adds `n` written (or lost) records of each job of `counts`, and drops the entries of
    /// abandoned jobs that are now settled.
    fn settle(&self, counts: &HashMap<String, u64>, written: bool) {
        {
            let mut jobs = self.lock();
            for (job_id, n) in counts {
                if let Some(t) = jobs.get_mut(job_id) {
                    if written {
                        t.written += n;
                    } else {
                        t.lost += n;
                    }
                    if t.abandoned && t.settled() {
                        jobs.remove(job_id);
                    }
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// Takes out of `records` those of jobs whose closing stopped waiting for them (the repair
    /// wrote them, and a later write would be an unconditional one), counting them as lost.
    fn drop_abandoned(&self, records: &mut Vec<InstanceRecord>) {
        let mut skipped = HashMap::new();
        {
            let jobs = self.lock();
            if !jobs.values().any(|t| t.abandoned) {
                return;
            }
            records.retain(|r| {
                let abandoned = jobs.get(&r.job_id).is_some_and(|t| t.abandoned);
                if abandoned {
                    *skipped.entry(r.job_id.clone()).or_insert(0) += 1;
                }
                !abandoned
            });
        }
        if !skipped.is_empty() {
            self.settle(&skipped, false);
        }
    }

    /// Waits until every record handed over for `job_id` is written or lost, or `timeout` passes.
    /// Called once per job, when its batch has closed (so no record of it is handed over any
    /// more); the job's entry is dropped, or marked abandoned on a timeout.
    pub(crate) async fn wait_settled(&self, job_id: &str, timeout: Duration) -> Settled {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            // Created before the check: notify_waiters wakes it even if it is not polled yet.
            let changed = self.changed.notified();
            {
                let mut jobs = self.lock();
                let Some(t) = jobs.get(job_id).copied() else {
                    return Settled::Written; // nothing was handed over
                };
                if t.settled() {
                    jobs.remove(job_id);
                    return match t.lost {
                        0 => Settled::Written,
                        n => Settled::Lost(n),
                    };
                }
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                let mut jobs = self.lock();
                if let Some(t) = jobs.get_mut(job_id) {
                    t.abandoned = true;
                }
                return Settled::TimedOut;
            }
        }
    }
}

/// How far the index is behind the receive path, so that Storage Commitment can tell an instance
/// that was never stored from one whose record is not written yet (or was lost until the next
/// start's rebuild).
#[derive(Debug, Default)]
pub(crate) struct IndexProgress {
    /// Records handed to the writer.
    sent: AtomicU64,
    /// Records the writer is done with (written, or dropped by a failed write), in channel order.
    settled: AtomicU64,
    /// A record was dropped (full channel, failed write, writer gone): the index lacks it until
    /// the next start's rebuild.
    lost: AtomicBool,
    /// The start-up rebuild finished: the index has every object stored before this start.
    rebuilt: AtomicBool,
}

impl IndexProgress {
    /// The position of the receive path now: every record handed over so far is before it.
    pub(crate) fn mark(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Whether the index has every record handed over before `mark`, and every object stored
    /// before this start: rebuilt, nothing lost, the writer past `mark`.
    pub(crate) fn caught_up_to(&self, mark: u64) -> bool {
        self.rebuilt.load(Ordering::SeqCst)
            && !self.lost.load(Ordering::SeqCst)
            && self.settled.load(Ordering::SeqCst) >= mark
    }

    /// A progress with nothing sent and the rebuild done (tests without a writer).
    #[cfg(test)]
    pub(crate) fn caught_up() -> Arc<IndexProgress> {
        let p = IndexProgress::default();
        p.set_rebuilt();
        Arc::new(p)
    }

    /// The start-up rebuild finished.
    pub(crate) fn set_rebuilt(&self) {
        self.rebuilt.store(true, Ordering::SeqCst);
    }

    fn set_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }
}

/// The writer's end of the index channel: the records, and the progress it reports.
#[derive(Debug)]
pub(crate) struct IndexReceiver {
    rx: mpsc::Receiver<InstanceRecord>,
    progress: Arc<IndexProgress>,
}

impl IndexReceiver {
    #[cfg(test)]
    pub(crate) async fn recv(&mut self) -> Option<InstanceRecord> {
        self.rx.recv().await
    }

    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Result<InstanceRecord, mpsc::error::TryRecvError> {
        self.rx.try_recv()
    }
}

/// Records per job, for the tally.
fn counts_by_job(records: &[InstanceRecord]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for r in records {
        *counts.entry(r.job_id.clone()).or_insert(0) += 1;
    }
    counts
}

/// The receive path's end of the index: hands a record over without waiting, or drops it.
#[derive(Clone)]
pub(crate) struct IndexSender(
    Option<(mpsc::Sender<InstanceRecord>, Arc<Tally>, Arc<IndexProgress>)>,
);

impl std::fmt::Debug for IndexSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "IndexSender"
        } else {
            "IndexSender(disabled)"
        })
    }
}

impl IndexSender {
    /// A sender, the receiver [`run_writer`] drains, and the tally both keep.
    pub(crate) fn channel(capacity: usize) -> (IndexSender, IndexReceiver, Arc<Tally>) {
        let (tx, rx) = mpsc::channel(capacity);
        let tally = Arc::new(Tally::default());
        let progress = Arc::new(IndexProgress::default());
        (
            IndexSender(Some((tx, tally.clone(), progress.clone()))),
            IndexReceiver { rx, progress },
            tally,
        )
    }

    /// How far the writer is behind this sender (`None` when disabled).
    pub(crate) fn progress(&self) -> Option<Arc<IndexProgress>> {
        self.0.as_ref().map(|(_, _, p)| p.clone())
    }

    /// A sender that keeps nothing (in tests).
    #[cfg(test)]
    pub(crate) fn disabled() -> IndexSender {
        IndexSender(None)
    }

    /// Hands the record to the writer; never waits. A full channel drops it with a WARN: the
    /// closing of its batch repairs the index from the store.
    pub(crate) fn record(&self, record: InstanceRecord) {
        let Some((tx, tally, progress)) = &self.0 else {
            return;
        };
        tally.handed(&record.job_id);
        let lost = match tx.try_send(record) {
            // Counted before the C-STORE response goes out (the caller answers after this).
            Ok(()) => {
                progress.sent.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Err(mpsc::error::TrySendError::Full(r)) => {
                warn!(sop_instance_uid = %r.sop_instance_uid, job_id = %r.job_id, "instance index writer is behind: record dropped (repaired from the store when the batch closes)");
                r
            }
            Err(mpsc::error::TrySendError::Closed(r)) => {
                debug!(sop_instance_uid = %r.sop_instance_uid, "instance index writer stopped: record dropped");
                r
            }
        };
        progress.set_lost();
        tally.settle(&HashMap::from([(lost.job_id, 1)]), false);
    }
}

/// The background writer: appends what the channel holds, in batches, until every sender is gone.
/// A failed write is logged and its records counted lost (the closing of their batch repairs
/// them from the store).
pub(crate) async fn run_writer(
    index: Arc<dyn InstanceIndex>,
    rx: IndexReceiver,
    tally: Arc<Tally>,
) {
    let IndexReceiver { mut rx, progress } = rx;
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        gather(&mut rx, &mut batch).await;
        let mut records = std::mem::replace(&mut batch, Vec::with_capacity(WRITE_BATCH));
        // The writer is done with every record taken, written or not (an abandoned job's records
        // were written by its repair).
        let taken = records.len() as u64;
        tally.drop_abandoned(&mut records);
        if records.is_empty() {
            progress.settled.fetch_add(taken, Ordering::SeqCst);
            continue;
        }
        let counts = counts_by_job(&records);
        let n = records.len();
        match index.append(records).await {
            Ok(()) => tally.settle(&counts, true),
            Err(e) => {
                progress.set_lost();
                warn!(error = %e, records = n, index = %index.describe(), "instance index write failed: records dropped (repaired from the store when their batch closes)");
                tally.settle(&counts, false);
            }
        }
        progress.settled.fetch_add(taken, Ordering::SeqCst);
    }
}

/// Adds to `batch` what arrives within [`GATHER`], up to [`WRITE_BATCH`] records, or until every
/// sender is gone.
async fn gather(rx: &mut mpsc::Receiver<InstanceRecord>, batch: &mut Vec<InstanceRecord>) {
    let until = tokio::time::Instant::now() + GATHER;
    while batch.len() < WRITE_BATCH {
        let room = WRITE_BATCH - batch.len();
        match tokio::time::timeout_at(until, rx.recv_many(batch, room)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
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

    fn record_of_job(job: &str, sop: &str) -> InstanceRecord {
        let key = format!("{job}/1.2/1.2.3/{sop}.dcm");
        KeyParts::parse(&key)
            .unwrap()
            .record(&key, 1, None, None, crate::clock::now_rfc3339())
    }

    const OTHER_JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6M";

    #[tokio::test(start_paused = true)]
    async fn a_closing_job_waits_until_the_writer_wrote_its_records() {
        let root = tempfile::tempdir().unwrap();
        let index: Arc<dyn InstanceIndex> = Arc::new(local::LocalIndex::new(root.path()));
        let (tx, rx, tally) = IndexSender::channel(16);
        let job = KeyParts::parse(KEY).unwrap().job_id.to_string();
        tx.record(record_of_job(&job, "1.2.3.1"));
        tx.record(record_of_job(&job, "1.2.3.2"));
        tx.record(record_of_job(OTHER_JOB, "1.2.3.3"));
        // Nothing written yet: the wait ends when the writer has written the job's records.
        let waiting = {
            let tally = tally.clone();
            let job = job.clone();
            tokio::spawn(async move { tally.wait_settled(&job, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let writer = tokio::spawn(run_writer(index.clone(), rx, tally.clone()));
        assert_eq!(waiting.await.unwrap(), Settled::Written);
        assert_eq!(index.find("1.2.3.2").await.unwrap().len(), 1);
        assert!(
            !tally.lock().contains_key(&job),
            "the entry goes with the close"
        );
        assert_eq!(
            tally.wait_settled(OTHER_JOB, Duration::from_secs(1)).await,
            Settled::Written
        );
        assert_eq!(
            tally
                .wait_settled("01JD6Y7Z8X9W0V1T2S3R4Q5P60", Duration::from_secs(1))
                .await,
            Settled::Written,
            "a job without records has nothing to wait for"
        );
        drop(tx);
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_records_are_counted_so_the_close_repairs_them() {
        let (tx, _rx, tally) = IndexSender::channel(1);
        let job = KeyParts::parse(KEY).unwrap().job_id.to_string();
        tx.record(record_of_job(&job, "1.2.3.1"));
        tx.record(record_of_job(&job, "1.2.3.2")); // full: lost
        // The first is still in the channel, with no writer: the wait runs out.
        assert_eq!(
            tally.wait_settled(&job, Duration::from_secs(30)).await,
            Settled::TimedOut
        );
        let (tx, rx, tally) = IndexSender::channel(1);
        tx.record(record_of_job(&job, "1.2.3.1"));
        tx.record(record_of_job(&job, "1.2.3.2")); // full: lost
        let root = tempfile::tempdir().unwrap();
        let writer = tokio::spawn(run_writer(
            Arc::new(local::LocalIndex::new(root.path())),
            rx,
            tally.clone(),
        ));
        assert_eq!(
            tally.wait_settled(&job, Duration::from_secs(30)).await,
            Settled::Lost(1)
        );
        drop(tx);
        writer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_timed_out_close_the_writer_skips_the_jobs_records() {
        let root = tempfile::tempdir().unwrap();
        let index: Arc<dyn InstanceIndex> = Arc::new(local::LocalIndex::new(root.path()));
        let (tx, rx, tally) = IndexSender::channel(16);
        let job = KeyParts::parse(KEY).unwrap().job_id.to_string();
        tx.record(record_of_job(&job, "1.2.3.1"));
        tx.record(record_of_job(OTHER_JOB, "1.2.3.2"));
        assert_eq!(
            tally.wait_settled(&job, Duration::from_secs(1)).await,
            Settled::TimedOut
        );
        assert!(tally.lock()[&job].abandoned);
        drop(tx);
        run_writer(index.clone(), rx, tally.clone()).await;
        assert_eq!(
            index.find("1.2.3.1").await.unwrap(),
            vec![],
            "skipped: the repair wrote it"
        );
        assert_eq!(index.find("1.2.3.2").await.unwrap().len(), 1);
        assert!(
            !tally.lock().contains_key(&job),
            "a settled abandoned job leaves the tally"
        );
    }

    #[tokio::test]
    async fn a_full_channel_drops_the_record_instead_of_waiting() {
        let (tx, mut rx, _tally) = IndexSender::channel(1);
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

    /// Counts the appends it is asked for.
    #[derive(Default)]
    struct CountingIndex {
        appends: std::sync::Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl InstanceIndex for CountingIndex {
        async fn append(&self, records: Vec<InstanceRecord>) -> Result<(), IndexError> {
            self.appends.lock().unwrap().push(records.len());
            Ok(())
        }
        async fn find(&self, _: &str) -> Result<Vec<InstanceRecord>, IndexError> {
            Ok(Vec::new())
        }
        async fn record_outcomes(
            &self,
            _: &str,
            _: Vec<(String, InstanceOutcome)>,
        ) -> Result<OutcomesRecorded, IndexError> {
            Ok(OutcomesRecorded::default())
        }
        async fn failed(&self, _: &str) -> Result<Vec<InstanceRecord>, IndexError> {
            Ok(Vec::new())
        }
        async fn missing(&self, _: &str, _: Vec<String>) -> Result<Vec<String>, IndexError> {
            Ok(Vec::new())
        }
        async fn add_absent(&self, _: Vec<InstanceRecord>) -> Result<u64, IndexError> {
            Ok(0)
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn records_arriving_within_the_gathering_window_go_in_one_append() {
        let index = Arc::new(CountingIndex::default());
        let (tx, rx, tally) = IndexSender::channel(64);
        let progress = tx.progress().unwrap();
        let writer = tokio::spawn(run_writer(index.clone(), rx, tally));
        let record = || {
            KeyParts::parse(KEY)
                .unwrap()
                .record(KEY, 1, None, None, "t".into())
        };
        tx.record(record());
        tokio::time::sleep(GATHER / 2).await;
        tx.record(record());
        tx.record(record());
        // Past the window: a new append.
        tokio::time::sleep(GATHER * 2).await;
        tx.record(record());
        drop(tx);
        writer.await.unwrap();
        assert_eq!(*index.appends.lock().unwrap(), vec![3, 1]);
        assert!(
            progress.caught_up_to(4) || !progress.caught_up_to(0),
            "4 settled"
        );
    }
}

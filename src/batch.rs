//! Grouping stored instances into batches, one future HealthImaging import job each.
//!
//! The batch id is part of every object key, so an instance must know its batch *before* its upload
//! starts. It takes a [`BatchLease`] on the open batch; the lease is committed once the object is
//! durable (the instance then counts) or dropped if the store failed (it never counts). A batch
//! that reaches a limit stops handing out leases, and is only finalised, i.e. handed to the job
//! recorder as closed, once every lease on it is settled. So a closed batch's summary describes
//! exactly the durable objects under its prefix, and no object lands in a batch after it closed.
//!
//! In edge mode an instance is acknowledged once it is in the local spool, before it is in S3: its
//! lease becomes a [`SpooledLease`], which records the job OPEN (the instance is acknowledged) but
//! keeps the lease in flight until the uploader confirms the object at its final key. A batch stuck
//! behind an outage therefore closes to new instances at its limits, as any batch does (new
//! instances go into the next batch: the sender is never held up), but is finalised only once
//! every one of its instances is in S3.
//!
//! # Limits
//!
//! A batch must be an import job HealthImaging accepts. Its quotas, from "AWS HealthImaging
//! endpoints and quotas" (<https://docs.aws.amazon.com/healthimaging/latest/devguide/endpoints-quotas.html>,
//! and the General Reference copy <https://docs.aws.amazon.com/general/latest/gr/healthimaging.html>):
//! 5,000 files per import job, 10 GB for all files of a job, 4 GB per DICOM P10 file (the General
//! Reference copy says 10 GB: we default to the lower figure and make it configurable), and 10,000
//! nested folders per job ("You can include up to 10,000 nested folders for a single import job",
//! <https://docs.aws.amazon.com/healthimaging/latest/devguide/understanding-import-jobs.html>).
//!
//! - **Files are objects.** The job imports the objects under its prefix, one per key
//!   `{jobId}/{study}/{series}/{sop}.dcm`. A batch therefore counts *places*, one per key that holds
//!   a durable object or an instance in flight. A repeat under the same key replaces the object and
//!   takes no new place; a repeat of a SOP Instance UID under another Study or Series Instance UID
//!   is a second object and takes a second place. A lease on a new key is only handed out while
//!   places are below `max_instances`, so a batch never holds more objects than that.
//! - **Folders.** Every study and every (study, series) under the job's prefix is a folder. A lease
//!   whose key would add folders beyond `max_folders` closes the batch and opens the next one.
//! - **Bytes.** An instance's size is known only once it is complete, and it cannot change batches
//!   once its upload started (the job id is in its key). So a lease *reserves* bytes as they arrive
//!   ([`BatchLease::grow`]), and the batch counts `committed + reserved` bytes:
//!   - at `max_bytes` (`--batch-max-bytes`) the batch closes to new leases;
//!   - instances already in it go on, but a growth that would take `committed + reserved` past
//!     `byte_ceiling` (`--job-max-bytes`, HealthImaging's 10 GB) is refused: that instance fails
//!     with 0xA700 and its sender may send it again, into the next batch.
//!
//!   **Invariant:** for every batch, at every moment, `committed + reserved <= byte_ceiling`, so
//!   the closed batch's total bytes never exceed it, however many associations stream into it.
//!   The headroom `byte_ceiling - max_bytes` (1 GB with the defaults 9 GB and 10 GB) is what the
//!   instances in flight when the batch closed may still add before one of them is refused; a
//!   refusal needs more than that in flight at once, and costs the sender a retry, where
//!   exceeding the quota would have failed the whole import after every instance got Success.
//!   A replacement under the same key is counted twice while it streams (the old object stays
//!   until the new one is durable), which errs on the safe side.
//! - **Per file.** A lease growing past `max_instance_bytes` (`--max-instance-size`) is refused,
//!   so an oversized instance is stopped while it streams instead of being stored and then failed
//!   by the import.
//! - Idle time without a new instance, age, and shutdown close a batch too.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info};

/// HealthImaging's "Maximum number of files in a DICOM import job" (endpoints-quotas, see the
/// module documentation). Adjustable by AWS, but `--batch-max-instances` stays at or below it.
pub(crate) const HEALTHIMAGING_MAX_FILES: u32 = 5000;
/// HealthImaging's "Maximum size (in GB) of all files in a DICOM import job": 10 GB, not adjustable.
pub(crate) const HEALTHIMAGING_MAX_JOB_BYTES: u64 = 10_000_000_000;
/// HealthImaging's "Maximum size (in GB) of each DICOM P10 file in a DICOM import job": 4 GB in the
/// developer guide, 10 GB in the General Reference copy of the quotas; the lower one is the default.
pub(crate) const HEALTHIMAGING_MAX_FILE_BYTES: u64 = 4_000_000_000;
/// HealthImaging's "Maximum number of nested folders in a DICOM import job": 10,000.
pub(crate) const HEALTHIMAGING_MAX_NESTED_FOLDERS: usize = 10_000;

/// What the batcher reports to the job recorder ([`crate::import::Pipeline`]), in order.
#[derive(Debug, Clone)]
pub(crate) enum BatchEvent {
    /// A batch opened: its job is recorded OPEN, so a crash before it closes can be recovered.
    Opened {
        job_id: String,
        created_at: String,
        input_s3_uri: String,
    },
    /// A batch closed with at least one durable instance: its job is recorded CLOSED and imported.
    Closed(BatchSummary),
}

/// What to do with a SOP Instance UID received again within the same batch (`--duplicate-policy`).
/// The batch is where a repeat is detected, so the rule lives beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DuplicatePolicy {
    /// Store the new copy in place of the earlier one (HealthImaging's own rule: the latest wins).
    Overwrite,
    /// Keep the stored copy; answer Success without storing the new one.
    KeepFirst,
    /// Answer 0x0111 (duplicate SOP instance); the stored copy stays.
    Reject,
}

/// When a batch closes, and what it refuses (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub idle: Duration,
    pub max_age: Duration,
    /// Most objects (places) in a batch.
    pub max_instances: u32,
    /// Committed plus reserved bytes at which a batch closes to new leases.
    pub max_bytes: u64,
    /// Committed plus reserved bytes a batch never exceeds: a growth past it is refused.
    pub byte_ceiling: u64,
    /// Largest object one instance may become: a growth past it is refused.
    pub max_instance_bytes: u64,
    /// Most study and series folders under a batch's prefix.
    pub max_folders: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            idle: Duration::from_secs(30),
            max_age: Duration::from_secs(300),
            max_instances: HEALTHIMAGING_MAX_FILES,
            max_bytes: 9_000_000_000,
            byte_ceiling: HEALTHIMAGING_MAX_JOB_BYTES,
            max_instance_bytes: HEALTHIMAGING_MAX_FILE_BYTES,
            max_folders: HEALTHIMAGING_MAX_NESTED_FOLDERS,
        }
    }
}

/// Why a lease may not grow: the instance it belongs to is refused while it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub(crate) enum LimitError {
    #[error("instance larger than {limit} bytes, the limit per file (--max-instance-size)")]
    InstanceTooLarge { limit: u64 },
    #[error(
        "import batch full: it would exceed {limit} bytes (--job-max-bytes); send the instance again"
    )]
    BatchFull { limit: u64 },
    /// The instance took longer than its batch may stay open (twice `--batch-max-age`): past that,
    /// recovery on another gateway may take the batch over, and an object it did not count would
    /// never be imported.
    #[error(
        "the instance outlived its batch (open for more than twice --batch-max-age); send it again"
    )]
    BatchExpired,
}

impl LimitError {
    /// The Error Comment for the sender: it fits the 64 characters of LO and names no option.
    pub(crate) fn comment(&self) -> String {
        match self {
            LimitError::InstanceTooLarge { limit } => {
                format!("instance larger than the per-file limit of {limit} bytes")
            }
            LimitError::BatchFull { .. } => "import batch full; send the instance again".into(),
            LimitError::BatchExpired => "import batch expired; send the instance again".into(),
        }
    }
}

/// Why a batch closed, recorded in its summary and its job (`closeReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloseReason {
    Idle,
    MaxAge,
    MaxInstances,
    MaxBytes,
    /// The next instance would have added folders beyond HealthImaging's nested-folder quota.
    MaxFolders,
    Shutdown,
    /// Closed by start-up recovery from what is stored under its prefix, after its gateway died.
    Recovered,
}

impl CloseReason {
    /// The name recorded in job records (`closeReason`), the same as its serde form.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::MaxAge => "max-age",
            CloseReason::MaxInstances => "max-instances",
            CloseReason::MaxBytes => "max-bytes",
            CloseReason::MaxFolders => "max-folders",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Recovered => "recovered",
        }
    }

    /// The reason a job record names, if it names one this version knows (by its serde name, so
    /// the list of reasons is written once).
    pub(crate) fn parse(name: &str) -> Option<CloseReason> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }
}

/// A closed batch: what the job store records and the import is started from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BatchSummary {
    pub job_id: String,
    pub created_at: String,
    pub closed_at: String,
    pub close_reason: CloseReason,
    /// Durable objects under the batch's prefix (HealthImaging's files).
    pub instance_count: u32,
    pub total_bytes: u64,
    pub study_instance_uids: Vec<String>,
    pub calling_ae_titles: Vec<String>,
    /// The import input: the batch's prefix, `s3://bucket/prefix/jobId/` (on the local store, its
    /// directory).
    pub input_s3_uri: String,
}

/// What the batch already holds of a SOP Instance UID when a lease is taken (under any key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// First time in this batch.
    New,
    /// Another copy is being received right now.
    InFlight,
    /// A copy is already durable in this batch.
    Stored,
}

/// Where one instance goes within its batch: the identifying UIDs that make its object key
/// `{jobId}/{study}/{series}/{sop}.dcm`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ObjectPath {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
}

impl ObjectPath {
    /// The folders this object lies in below the job's prefix: its study and its series.
    fn folders(&self) -> [String; 2] {
        [
            self.study_instance_uid.clone(),
            format!("{}/{}", self.study_instance_uid, self.series_instance_uid),
        ]
    }
}

/// One object key of a batch: the durable object there, if any, and the copies in flight to it.
#[derive(Debug, Default)]
struct ObjectState {
    committed_size: Option<u64>,
    in_flight: u32,
}

/// One SOP Instance UID of a batch, under all its keys: for duplicate detection ([`Seen`]).
#[derive(Debug, Default)]
struct SopState {
    /// Keys holding a durable object of this SOP instance.
    stored: u32,
    in_flight: u32,
}

impl SopState {
    fn seen(&self) -> Seen {
        match (self.stored, self.in_flight) {
            (0, 0) => Seen::New,
            (0, _) => Seen::InFlight,
            _ => Seen::Stored,
        }
    }
}

/// One batch, open or closing, as the batcher tracks it.
struct Batch {
    /// The batch's ULID, which is also its job id and the folder of its objects.
    job_id: String,
    /// Whether its job was reported opened (with its first acknowledged instance).
    announced: bool,
    /// Per object key: a place each, taken by the first lease on the key.
    objects: HashMap<ObjectPath, ObjectState>,
    /// Per SOP Instance UID, whatever its key.
    sops: HashMap<String, SopState>,
    /// Study and series folders of the places, with how many places lie in each.
    folders: HashMap<String, u32>,
    created: SystemTime,
    opened_at: Instant,
    last_activity: Instant,
    /// Leases not yet settled.
    in_flight: u32,
    /// Keys holding a durable object.
    committed: u32,
    /// Bytes of the durable objects.
    bytes: u64,
    /// Bytes received so far by the leases in flight.
    reserved: u64,
    studies: BTreeSet<String>,
    calling_aes: BTreeSet<String>,
}

impl Batch {
    /// The folders `path` would add to the batch.
    fn new_folders(&self, path: &ObjectPath) -> usize {
        path.folders()
            .iter()
            .filter(|f| !self.folders.contains_key(*f))
            .count()
    }

    /// Frees the place of `path` once nothing is stored or in flight there any more.
    fn release_if_empty(&mut self, path: &ObjectPath) {
        let empty = self
            .objects
            .get(path)
            .is_some_and(|o| o.committed_size.is_none() && o.in_flight == 0);
        if !empty {
            return;
        }
        self.objects.remove(path);
        for folder in path.folders() {
            if let Some(n) = self.folders.get_mut(&folder) {
                *n -= 1;
                if *n == 0 {
                    self.folders.remove(&folder);
                }
            }
        }
    }
}

/// The batcher's state under its lock: the open batch and those waiting for their leases.
#[derive(Default)]
struct State {
    open: Option<Batch>,
    /// Batches that reached a limit but still have leases in flight, with why they closed.
    closing: HashMap<String, (Batch, CloseReason)>,
}

impl State {
    /// The batch `job_id`, open or closing, and whether it is the open one.
    fn batch_mut(&mut self, job_id: &str) -> Option<(&mut Batch, bool)> {
        if self.open.as_ref().is_some_and(|b| b.job_id == job_id) {
            self.open.as_mut().map(|b| (b, true))
        } else {
            self.closing.get_mut(job_id).map(|(b, _)| (b, false))
        }
    }
}

/// Hands out leases and closes batches. One per process, shared by all associations.
pub(crate) struct Batcher {
    state: Mutex<State>,
    limits: BatchLimits,
    /// Maps a job id to its import input ([`crate::store::ObjectStore::input_s3_uri`]).
    input_s3_uri: Box<dyn Fn(&str) -> String + Send + Sync>,
    events: mpsc::UnboundedSender<BatchEvent>,
    settled: Notify,
}

/// A reserved place in a batch for one instance in flight, and the bytes it received so far.
pub(crate) struct BatchLease {
    job_id: String,
    path: ObjectPath,
    seen: Seen,
    /// Bytes reserved in the batch for this instance (what it received so far).
    reserved: u64,
    /// When the batch has been open for twice `max_age`; the instance must be durable before.
    /// `--orphan-age` is at least that, so no other gateway's recovery takes the batch over
    /// while this instance can still count in it.
    deadline: Instant,
    batcher: Option<Arc<Batcher>>,
}

impl BatchLease {
    /// The job (batch) this instance belongs to: the first segment of its object key.
    pub(crate) fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Whether this SOP Instance UID was already in the batch when the lease was taken.
    pub(crate) fn seen(&self) -> Seen {
        self.seen
    }

    /// The instance received `n` more bytes of its object: reserve them in the batch. Refused,
    /// reserving nothing, if the instance would exceed the per-file limit or the batch its byte
    /// ceiling; the instance must then be abandoned (dropping the lease frees what it reserved).
    pub(crate) fn grow(&mut self, n: u64) -> Result<(), LimitError> {
        let Some(batcher) = &self.batcher else {
            return Ok(());
        };
        self.check_deadline()?;
        let size = self.reserved.saturating_add(n);
        if size > batcher.limits.max_instance_bytes {
            return Err(LimitError::InstanceTooLarge {
                limit: batcher.limits.max_instance_bytes,
            });
        }
        batcher.reserve(&self.job_id, n)?;
        self.reserved = size;
        Ok(())
    }

    /// Refused once the batch has been open too long for this instance to still count in it
    /// (checked as bytes arrive and just before the object is committed).
    pub(crate) fn check_deadline(&self) -> Result<(), LimitError> {
        if Instant::now() >= self.deadline {
            return Err(LimitError::BatchExpired);
        }
        Ok(())
    }

    /// The instance is durable: count it in its batch.
    pub(crate) fn commit(mut self, size: u64, calling_ae_title: &str) {
        if let Some(b) = self.batcher.take() {
            b.settle(
                &self.job_id,
                &self.path,
                self.reserved,
                Some((size, calling_ae_title)),
            );
        }
    }

    /// Edge mode: the instance is acknowledged from the spool but not yet in S3. Its job is
    /// recorded OPEN (if this is its first acknowledged instance); the lease stays in flight, so
    /// the batch cannot be finalised before the upload is confirmed.
    pub(crate) fn spooled(self) -> SpooledLease {
        if let Some(b) = &self.batcher {
            b.announce(&self.job_id);
        }
        SpooledLease(Some(self))
    }
}

/// A lease whose instance is acknowledged and in the edge spool, on its way to its final key. It
/// must be resolved: [`SpooledLease::uploaded`] counts the instance, [`SpooledLease::not_uploaded`]
/// frees its place. Dropped unresolved (the gateway stopping with the upload still to do), it
/// settles nothing: its batch is never finalised by this process, so its job stays OPEN and
/// recovery closes it at the next start, once the spool has uploaded the rest; a partial batch
/// is never imported.
pub(crate) struct SpooledLease(Option<BatchLease>);

impl SpooledLease {
    /// S3 confirmed the object: count it in its batch.
    pub(crate) fn uploaded(mut self, size: u64, calling_ae_title: &str) {
        if let Some(lease) = self.0.take() {
            lease.commit(size, calling_ae_title);
        }
    }

    /// The object will never reach S3 (its spool file was torn and is quarantined): it never
    /// counts, and its batch may close without it.
    pub(crate) fn not_uploaded(mut self) {
        drop(self.0.take());
    }
}

impl Drop for SpooledLease {
    fn drop(&mut self) {
        if let Some(mut lease) = self.0.take() {
            lease.batcher = None; // neither counted nor freed: see the type's documentation
        }
    }
}

impl Drop for BatchLease {
    fn drop(&mut self) {
        if let Some(b) = self.batcher.take() {
            b.settle(&self.job_id, &self.path, self.reserved, None);
        }
    }
}

impl Batcher {
    /// `input_s3_uri` maps a job id to its import input; openings and closings are reported
    /// on `events`.
    pub(crate) fn new(
        limits: BatchLimits,
        input_s3_uri: impl Fn(&str) -> String + Send + Sync + 'static,
        events: mpsc::UnboundedSender<BatchEvent>,
    ) -> Arc<Self> {
        Arc::new(Batcher {
            state: Mutex::new(State::default()),
            limits,
            input_s3_uri: Box::new(input_s3_uri),
            events,
            settled: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a place for the object at `path` in the open batch, opening a new batch when
    /// the open one reached a limit or `path` would take it past its folder limit. A key already
    /// in the batch takes no new place: its object will be replaced, or the lease dropped.
    pub(crate) fn lease(self: &Arc<Self>, path: ObjectPath) -> BatchLease {
        let now = Instant::now();
        let mut st = self.lock();
        let reason = st.open.as_ref().and_then(|b| {
            self.limit_reached(b, now).or_else(|| {
                let adds = if b.objects.contains_key(&path) {
                    0
                } else {
                    b.new_folders(&path)
                };
                (b.folders.len() + adds > self.limits.max_folders)
                    .then_some(CloseReason::MaxFolders)
            })
        });
        if let Some(reason) = reason {
            self.close_open(&mut st, reason);
        }
        let batch = st.open.get_or_insert_with(|| {
            let job_id = ulid::Ulid::generate().to_string();
            let created = SystemTime::now();
            info!(job_id = %job_id, "batch opened");
            crate::metrics::metrics().batches_open.inc();
            Batch {
                job_id,
                announced: false,
                objects: HashMap::new(),
                sops: HashMap::new(),
                folders: HashMap::new(),
                created,
                opened_at: now,
                last_activity: now,
                in_flight: 0,
                committed: 0,
                bytes: 0,
                reserved: 0,
                studies: BTreeSet::new(),
                calling_aes: BTreeSet::new(),
            }
        });
        let sop = batch.sops.entry(path.sop_instance_uid.clone()).or_default();
        let seen = sop.seen();
        sop.in_flight += 1;
        if !batch.objects.contains_key(&path) {
            for folder in path.folders() {
                *batch.folders.entry(folder).or_default() += 1;
            }
        }
        batch.objects.entry(path.clone()).or_default().in_flight += 1;
        batch.in_flight += 1;
        batch.last_activity = now;
        BatchLease {
            job_id: batch.job_id.clone(),
            path,
            seen,
            reserved: 0,
            deadline: batch.opened_at + self.limits.max_age.saturating_mul(2),
            batcher: Some(self.clone()),
        }
    }

    fn limit_reached(&self, b: &Batch, now: Instant) -> Option<CloseReason> {
        if b.objects.len() >= self.limits.max_instances as usize {
            Some(CloseReason::MaxInstances)
        } else if b.bytes + b.reserved >= self.limits.max_bytes {
            Some(CloseReason::MaxBytes)
        } else if now.duration_since(b.opened_at) >= self.limits.max_age {
            Some(CloseReason::MaxAge)
        } else if b.in_flight == 0 && now.duration_since(b.last_activity) >= self.limits.idle {
            Some(CloseReason::Idle)
        } else {
            None
        }
    }

    /// Reserves `n` more bytes in batch `job_id` for a lease, unless that would take the batch past
    /// its byte ceiling. The open batch closes to new leases once it reaches `max_bytes`.
    fn reserve(&self, job_id: &str, n: u64) -> Result<(), LimitError> {
        let mut st = self.lock();
        let Some((batch, is_open)) = st.batch_mut(job_id) else {
            return Ok(()); // unreachable: a batch with a lease in flight is open or closing
        };
        let total = batch.bytes + batch.reserved;
        if total.saturating_add(n) > self.limits.byte_ceiling {
            return Err(LimitError::BatchFull {
                limit: self.limits.byte_ceiling,
            });
        }
        batch.reserved += n;
        if is_open && total + n >= self.limits.max_bytes {
            self.close_open(&mut st, CloseReason::MaxBytes);
        }
        Ok(())
    }

    /// Reports batch `job_id` opened, once: its first instance was acknowledged.
    fn announce(&self, job_id: &str) {
        let mut st = self.lock();
        if let Some((batch, _)) = st.batch_mut(job_id) {
            self.announce_batch(batch);
        }
    }

    fn announce_batch(&self, batch: &mut Batch) {
        if !batch.announced {
            batch.announced = true;
            let _ = self.events.send(BatchEvent::Opened {
                job_id: batch.job_id.clone(),
                created_at: crate::clock::rfc3339(batch.created),
                input_s3_uri: (self.input_s3_uri)(&batch.job_id),
            });
        }
    }

    fn settle(
        &self,
        job_id: &str,
        path: &ObjectPath,
        reserved: u64,
        committed: Option<(u64, &str)>,
    ) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some((batch, is_open)) = st.batch_mut(job_id) else {
            return;
        };
        batch.in_flight -= 1;
        batch.reserved = batch.reserved.saturating_sub(reserved);
        batch.last_activity = now;
        let sop = batch.sops.entry(path.sop_instance_uid.clone()).or_default();
        sop.in_flight = sop.in_flight.saturating_sub(1);
        let object = batch.objects.entry(path.clone()).or_default();
        object.in_flight = object.in_flight.saturating_sub(1);
        match committed {
            Some((size, ae)) => {
                match object.committed_size.replace(size) {
                    None => {
                        sop.stored += 1;
                        batch.committed += 1;
                        batch.bytes += size;
                    }
                    // A repeat under the same key replaced the object: it counts once.
                    Some(old) => batch.bytes = batch.bytes - old + size,
                }
                if !batch.studies.contains(&path.study_instance_uid) {
                    batch.studies.insert(path.study_instance_uid.clone());
                }
                let ae = ae.trim();
                if !batch.calling_aes.contains(ae) {
                    batch.calling_aes.insert(ae.to_string());
                }
            }
            None => {
                if sop.stored == 0 && sop.in_flight == 0 {
                    batch.sops.remove(&path.sop_instance_uid);
                }
                batch.release_if_empty(path);
            }
        }
        // The job is recorded OPEN with its first durable (in edge mode: acknowledged) instance:
        // a batch whose instances all failed leaves no record for recovery to misread.
        if committed.is_some() {
            self.announce_batch(batch);
        }
        if is_open {
            if batch.bytes + batch.reserved >= self.limits.max_bytes {
                self.close_open(&mut st, CloseReason::MaxBytes);
            }
        } else if batch.in_flight == 0
            && let Some((b, reason)) = st.closing.remove(job_id)
        {
            self.finalize(b, reason);
        }
    }

    fn close_open(&self, st: &mut State, reason: CloseReason) {
        if let Some(b) = st.open.take() {
            crate::metrics::metrics().batches_open.dec();
            crate::metrics::metrics().batches_closed.inc();
            if b.in_flight == 0 {
                self.finalize(b, reason);
            } else {
                debug!(job_id = %b.job_id, in_flight = b.in_flight, "batch closing; waiting for instances in flight");
                st.closing.insert(b.job_id.clone(), (b, reason));
            }
        }
    }

    fn finalize(&self, b: Batch, reason: CloseReason) {
        self.settled.notify_waiters();
        if b.committed == 0 {
            debug!(job_id = %b.job_id, "batch closed empty (no instance stored); not recorded");
            return;
        }
        let summary = BatchSummary {
            input_s3_uri: (self.input_s3_uri)(&b.job_id),
            job_id: b.job_id,
            created_at: crate::clock::rfc3339(b.created),
            closed_at: crate::clock::now_rfc3339(),
            close_reason: reason,
            instance_count: b.committed,
            total_bytes: b.bytes,
            study_instance_uids: b.studies.into_iter().collect(),
            calling_ae_titles: b.calling_aes.into_iter().collect(),
        };
        info!(job_id = %summary.job_id, reason = ?reason, instances = summary.instance_count, bytes = summary.total_bytes, studies = summary.study_instance_uids.len(), "batch closed");
        // The receiver lives as long as the process; if it is gone we are shutting down anyway.
        let _ = self.events.send(BatchEvent::Closed(summary));
    }

    /// Closes the open batch if its idle time or age is up. Called periodically.
    pub(crate) fn tick(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        let reason = st.open.as_ref().and_then(|b| self.limit_reached(b, now));
        if let Some(reason) = reason {
            self.close_open(&mut st, reason);
        }
    }

    /// Closes the open batch (shutdown) and waits until every closing batch is finalised, i.e.
    /// until every lease is settled, or `deadline` passes.
    pub(crate) async fn close_all(&self, deadline: Duration) {
        self.close_open(&mut self.lock(), CloseReason::Shutdown);
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.settled.notified();
            if self.lock().closing.is_empty() {
                return;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                tracing::warn!("batches still have instances in flight at the shutdown deadline");
                return;
            }
        }
    }

    /// Runs [`Batcher::tick`] every second until `stop` is cancelled.
    pub(crate) async fn run_timer(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => self.tick(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object of a fresh SOP Instance UID in study 1.1, series 1.1.1.
    fn uid() -> ObjectPath {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        path(
            "1.1",
            "1.1.1",
            &format!(
                "1.2.3.{}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        )
    }

    fn path(study: &str, series: &str, sop: &str) -> ObjectPath {
        ObjectPath {
            study_instance_uid: study.into(),
            series_instance_uid: series.into(),
            sop_instance_uid: sop.into(),
        }
    }

    /// Closed batches only (openings are checked in their own test).
    struct Closed(mpsc::UnboundedReceiver<BatchEvent>);

    impl Closed {
        fn try_recv(&mut self) -> Result<BatchSummary, ()> {
            loop {
                match self.0.try_recv() {
                    Ok(BatchEvent::Closed(s)) => return Ok(s),
                    Ok(BatchEvent::Opened { .. }) => continue,
                    Err(_) => return Err(()),
                }
            }
        }
    }

    fn batcher(limits: BatchLimits) -> (Arc<Batcher>, Closed) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Batcher::new(limits, |id| format!("s3://b/p/{id}/"), tx),
            Closed(rx),
        )
    }

    /// A lease that has received `size` bytes and is committed with them.
    fn store(b: &Arc<Batcher>, p: ObjectPath, size: u64) -> String {
        let mut l = b.lease(p);
        l.grow(size).unwrap();
        let id = l.job_id().to_string();
        l.commit(size, "AE");
        id
    }

    #[test]
    fn opening_a_batch_is_reported_with_its_location() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let b = Batcher::new(limits(), |id| format!("s3://b/p/{id}/"), tx);
        let lease = b.lease(uid());
        let job = lease.job_id().to_string();
        drop(lease);
        assert!(
            rx.try_recv().is_err(),
            "nothing durable yet: no job to record"
        );
        let lease = b.lease(uid());
        assert_eq!(lease.job_id(), job, "same open batch");
        lease.commit(10, "CT1");
        match rx.try_recv().unwrap() {
            BatchEvent::Opened {
                job_id,
                input_s3_uri,
                ..
            } => {
                assert_eq!(job_id, job);
                assert_eq!(input_s3_uri, format!("s3://b/p/{job_id}/"));
            }
            other => panic!("{other:?}"),
        }
        b.lease(uid()).commit(10, "CT1");
        assert!(rx.try_recv().is_err(), "one opening per batch");
    }

    fn limits() -> BatchLimits {
        BatchLimits {
            idle: Duration::from_secs(3600),
            max_age: Duration::from_secs(3600),
            max_instances: 3,
            max_bytes: 1000,
            byte_ceiling: 1500,
            max_instance_bytes: 1200,
            max_folders: 100,
        }
    }

    #[test]
    fn a_spooled_instance_opens_its_job_but_holds_its_batch_until_uploaded() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let b = Batcher::new(limits(), |id| format!("s3://b/p/{id}/"), tx);
        let mut lease = b.lease(uid());
        lease.grow(10).unwrap();
        let job = lease.job_id().to_string();
        let spooled = lease.spooled();
        assert!(
            matches!(rx.try_recv(), Ok(BatchEvent::Opened { job_id, .. }) if job_id == job),
            "acknowledged: the job is recorded OPEN at once"
        );
        b.close_open(&mut b.lock(), CloseReason::MaxAge);
        assert_ne!(b.lease(uid()).job_id(), job, "closed to new instances");
        assert!(rx.try_recv().is_err(), "not finalised before the upload");
        let failed = {
            let mut l = b.lease(uid());
            l.grow(5).unwrap();
            l
        };
        let failed_job = failed.job_id().to_string();
        let failed = failed.spooled();
        let _ = rx.try_recv(); // the second batch opened
        spooled.uploaded(10, "CT1");
        let s = match rx.try_recv() {
            Ok(BatchEvent::Closed(s)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!((s.job_id, s.instance_count, s.total_bytes), (job, 1, 10));
        assert_eq!(s.close_reason, CloseReason::MaxAge);
        failed.not_uploaded();
        b.close_open(&mut b.lock(), CloseReason::Shutdown);
        assert!(
            rx.try_recv().is_err(),
            "a batch whose only instance was quarantined closes empty: {failed_job} is not recorded CLOSED"
        );
    }

    #[test]
    fn a_spooled_lease_dropped_at_shutdown_leaves_its_batch_unfinished() {
        let (b, mut rx) = batcher(limits());
        let mut lease = b.lease(uid());
        lease.grow(10).unwrap();
        let other = b.lease(uid());
        other.commit(3, "AE");
        drop(lease.spooled()); // the uploader stopped before S3 confirmed it
        b.close_open(&mut b.lock(), CloseReason::Shutdown);
        assert!(
            rx.try_recv().is_err(),
            "never finalised with 1 of 2 instances: recovery closes it after the next start's upload"
        );
        assert_eq!(b.lock().closing.len(), 1);
    }

    #[test]
    fn an_instance_that_outlives_twice_the_batch_age_is_refused() {
        let (b, _rx) = batcher(BatchLimits {
            max_age: Duration::ZERO,
            ..limits()
        });
        let mut lease = b.lease(uid());
        assert!(matches!(lease.grow(1), Err(LimitError::BatchExpired)));
        assert!(matches!(
            lease.check_deadline(),
            Err(LimitError::BatchExpired)
        ));
        let (b, _rx) = batcher(limits());
        let mut lease = b.lease(uid());
        assert!(lease.grow(1).is_ok() && lease.check_deadline().is_ok());
    }

    #[test]
    fn closes_at_the_instance_limit_and_counts_only_committed() {
        let (b, mut rx) = batcher(limits());
        let l1 = b.lease(uid());
        let l2 = b.lease(uid());
        let l3 = b.lease(path("1.2", "1.2.1", "1.2.3.99"));
        let first = l1.job_id().to_string();
        assert_eq!(l3.job_id(), first);
        l1.commit(10, "AE1");
        drop(l2); // store failed: it never counts, and its place is free again
        let l4 = b.lease(path("1.2", "1.2.1", "1.2.3.98"));
        assert_eq!(l4.job_id(), first, "a failed instance frees its place");
        let l5 = b.lease(uid());
        assert_ne!(l5.job_id(), first, "a full batch hands out no more leases");
        assert!(
            rx.try_recv().is_err(),
            "not finalised while leases are in flight"
        );
        l3.commit(20, "AE2 ");
        assert!(rx.try_recv().is_err());
        l4.commit(30, "AE1");
        let s = rx.try_recv().unwrap();
        assert_eq!(s.job_id, first);
        assert_eq!(s.instance_count, 3);
        assert_eq!(s.total_bytes, 60);
        assert_eq!(s.study_instance_uids, vec!["1.1", "1.2"]);
        assert_eq!(s.calling_ae_titles, vec!["AE1", "AE2"]);
        assert_eq!(s.close_reason, CloseReason::MaxInstances);
        assert_eq!(s.input_s3_uri, format!("s3://b/p/{first}/"));
        drop(l5);
    }

    #[test]
    fn closes_when_bytes_reach_the_limit() {
        let (b, mut rx) = batcher(limits());
        let id = store(&b, uid(), 1000);
        let s = rx.try_recv().unwrap();
        assert_eq!((s.job_id, s.close_reason), (id, CloseReason::MaxBytes));
    }

    #[test]
    fn idle_close_waits_for_instances_in_flight() {
        let (b, mut rx) = batcher(BatchLimits {
            idle: Duration::ZERO,
            ..limits()
        });
        let l1 = b.lease(uid());
        b.tick();
        assert!(
            rx.try_recv().is_err(),
            "an instance in flight keeps the batch open"
        );
        l1.commit(1, "AE");
        b.tick();
        assert_eq!(rx.try_recv().unwrap().close_reason, CloseReason::Idle);
    }

    #[test]
    fn age_closes_even_with_instances_in_flight_which_then_finish_into_it() {
        let (b, mut rx) = batcher(BatchLimits {
            max_age: Duration::ZERO,
            ..limits()
        });
        let l1 = b.lease(uid());
        b.tick();
        let l2 = b.lease(uid());
        assert_ne!(l1.job_id(), l2.job_id());
        l1.commit(5, "AE");
        let s = rx.try_recv().unwrap();
        assert_eq!((s.instance_count, s.close_reason), (1, CloseReason::MaxAge));
        drop(l2);
    }

    #[test]
    fn empty_batches_are_not_recorded() {
        let (b, mut rx) = batcher(BatchLimits {
            idle: Duration::ZERO,
            ..limits()
        });
        drop(b.lease(uid()));
        b.tick();
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn shutdown_closes_the_open_batch_after_its_leases_settle() {
        let (b, mut rx) = batcher(limits());
        let l1 = b.lease(uid());
        let b2 = b.clone();
        let closer = tokio::spawn(async move { b2.close_all(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err());
        l1.commit(7, "AE");
        closer.await.unwrap();
        assert_eq!(rx.try_recv().unwrap().close_reason, CloseReason::Shutdown);
    }

    #[test]
    fn a_repeat_under_the_same_key_counts_once_and_replaces_its_bytes() {
        let (b, mut rx) = batcher(limits());
        let x = path("1.1", "1.1.1", "1.9.1");
        let first = b.lease(x.clone());
        assert_eq!(first.seen(), Seen::New);
        let concurrent = b.lease(x.clone());
        assert_eq!(concurrent.seen(), Seen::InFlight);
        first.commit(100, "AE");
        let again = b.lease(x.clone());
        assert_eq!(again.seen(), Seen::Stored);
        concurrent.commit(120, "AE");
        drop(again); // e.g. kept-first: not stored
        let other_id = store(&b, path("1.1", "1.1.1", "1.9.2"), 10);
        b.close_open(&mut b.lock(), CloseReason::Shutdown);
        let s = rx.try_recv().unwrap();
        assert_eq!(s.job_id, other_id);
        assert_eq!(s.instance_count, 2, "two objects");
        assert_eq!(s.total_bytes, 130, "the second copy replaced the first");
    }

    #[test]
    fn a_repeat_under_a_new_series_is_a_second_object_with_its_own_place_and_bytes() {
        let (b, mut rx) = batcher(BatchLimits {
            max_instances: 2,
            ..limits()
        });
        let id = store(&b, path("1.1", "1.1.1", "1.9.1"), 100);
        let moved = b.lease(path("1.1", "1.1.2", "1.9.1"));
        assert_eq!(moved.seen(), Seen::Stored, "a repeat of the SOP instance");
        assert_eq!(moved.job_id(), id);
        let full = b.lease(uid());
        assert_ne!(full.job_id(), id, "two objects fill a batch of two places");
        moved.commit(120, "AE");
        let s = rx.try_recv().unwrap();
        assert_eq!(s.job_id, id);
        assert_eq!(s.instance_count, 2, "one SOP instance, two objects");
        assert_eq!(s.total_bytes, 220, "both objects' bytes");
        drop(full);
    }

    #[test]
    fn a_failed_first_copy_frees_its_place_unless_another_copy_is_in_flight() {
        let (b, mut rx) = batcher(BatchLimits {
            max_instances: 2,
            ..limits()
        });
        let a = b.lease(path("1.1", "1.1.1", "1.8.1"));
        let a2 = b.lease(path("1.1", "1.1.1", "1.8.1"));
        drop(a); // the first copy failed while a second is in flight
        let c = b.lease(path("1.1", "1.1.1", "1.8.2"));
        let id = c.job_id().to_string();
        assert!(
            b.lease(path("1.1", "1.1.1", "1.8.3")).job_id() != id,
            "two places taken: 1.8.1 (in flight) and 1.8.2"
        );
        a2.commit(5, "AE");
        c.commit(5, "AE");
        let s = rx.try_recv().unwrap();
        assert_eq!((s.job_id, s.instance_count), (id, 2));
    }

    #[test]
    fn bytes_in_flight_close_the_batch_to_new_leases() {
        let (b, mut rx) = batcher(limits());
        let mut a = b.lease(uid());
        let id = a.job_id().to_string();
        a.grow(600).unwrap();
        let mut c = b.lease(uid());
        assert_eq!(c.job_id(), id, "600 of 1000 bytes: still open");
        c.grow(400).unwrap();
        let d = b.lease(uid());
        assert_ne!(
            d.job_id(),
            id,
            "in-flight bytes reached the limit: nothing stored yet, but the batch is closed"
        );
        a.commit(600, "AE");
        c.commit(400, "AE");
        let s = rx.try_recv().unwrap();
        assert_eq!(
            (s.job_id, s.total_bytes, s.close_reason),
            (id, 1000, CloseReason::MaxBytes)
        );
        drop(d);
    }

    #[test]
    fn concurrent_leases_cannot_push_a_batch_past_its_byte_ceiling() {
        let (b, mut rx) = batcher(limits());
        // Three instances start in the same batch while it is empty.
        let mut leases: Vec<Option<BatchLease>> = (0..3).map(|_| Some(b.lease(uid()))).collect();
        let id = leases[0].as_ref().unwrap().job_id().to_string();
        assert!(leases.iter().flatten().all(|l| l.job_id() == id));
        // They stream in turns of 100 bytes until each has 600: 1800 would exceed the 1500 ceiling.
        // A refused instance is abandoned at once (its upload aborted, its lease dropped).
        let mut refused = 0;
        for _ in 0..6 {
            for slot in leases.iter_mut() {
                if let Some(l) = slot
                    && let Err(e) = l.grow(100)
                {
                    assert_eq!(e, LimitError::BatchFull { limit: 1500 });
                    refused += 1;
                    *slot = None;
                }
            }
        }
        assert_eq!(refused, 1, "exactly one instance is refused");
        for l in leases.into_iter().flatten() {
            let size = l.reserved;
            assert_eq!(size, 600);
            l.commit(size, "AE");
        }
        let s = rx.try_recv().unwrap();
        assert_eq!(s.job_id, id);
        assert_eq!((s.instance_count, s.total_bytes), (2, 1200));
        // A resend of the refused instance lands in the next batch.
        assert_ne!(store(&b, uid(), 600), id);
    }

    #[test]
    fn an_instance_growing_past_the_per_file_limit_is_refused_and_frees_its_bytes() {
        let (b, mut rx) = batcher(BatchLimits {
            byte_ceiling: 10_000,
            max_bytes: 10_000,
            ..limits()
        });
        let mut big = b.lease(uid());
        big.grow(1200).unwrap();
        assert_eq!(
            big.grow(1),
            Err(LimitError::InstanceTooLarge { limit: 1200 })
        );
        let id = big.job_id().to_string();
        drop(big);
        assert_eq!(store(&b, uid(), 1200), id, "the batch is unaffected");
        b.close_open(&mut b.lock(), CloseReason::Shutdown);
        let s = rx.try_recv().unwrap();
        assert_eq!((s.instance_count, s.total_bytes), (1, 1200));
    }

    #[test]
    fn a_batch_closes_before_an_instance_would_exceed_the_folder_limit() {
        let (b, mut rx) = batcher(BatchLimits {
            max_instances: 100,
            max_folders: 5,
            ..limits()
        });
        // Study 1.1 with two series, study 1.2 with one: 5 folders.
        let id = store(&b, path("1.1", "1.1.1", "1.5.1"), 1);
        store(&b, path("1.1", "1.1.2", "1.5.2"), 1);
        assert_eq!(store(&b, path("1.2", "1.2.1", "1.5.3"), 1), id);
        // More instances in existing folders still fit.
        assert_eq!(store(&b, path("1.2", "1.2.1", "1.5.4"), 1), id);
        // A new series would be the sixth folder: the batch closes first.
        let next = store(&b, path("1.2", "1.2.2", "1.5.5"), 1);
        assert_ne!(next, id);
        let s = rx.try_recv().unwrap();
        assert_eq!(
            (s.job_id, s.instance_count, s.close_reason),
            (id, 4, CloseReason::MaxFolders)
        );
    }

    #[test]
    fn a_failed_instance_releases_the_folders_it_opened() {
        let (b, _rx) = batcher(BatchLimits {
            max_instances: 100,
            max_folders: 2,
            ..limits()
        });
        let id = store(&b, path("1.1", "1.1.1", "1.6.1"), 1);
        drop(b.lease(path("1.1", "1.1.2", "1.6.2"))); // would be a third folder: new batch
        let failed = b.lease(path("1.3", "1.3.1", "1.6.3"));
        let second = failed.job_id().to_string();
        assert_ne!(second, id);
        drop(failed);
        assert_eq!(
            store(&b, path("1.4", "1.4.1", "1.6.4"), 1),
            second,
            "the failed instance's folders were released"
        );
    }

    #[test]
    fn close_reasons_round_trip_through_their_names() {
        use CloseReason::*;
        for r in [
            Idle,
            MaxAge,
            MaxInstances,
            MaxBytes,
            MaxFolders,
            Shutdown,
            Recovered,
        ] {
            assert_eq!(CloseReason::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::Value::String(r.as_str().into())
            );
        }
        assert_eq!(CloseReason::parse("left-early"), None, "unknown names");
    }
}

//! Grouping stored instances into batches, one future HealthImaging import job each.
//!
//! The batch id is part of every object key, so an instance must know its batch *before* its upload
//! starts. It takes a [`BatchLease`] on the open batch; the lease is committed once the object is
//! durable (the instance then counts) or dropped if the store failed (it never counts). A batch
//! that reaches a limit stops handing out leases, and is only finalised, i.e. handed to the job
//! recorder as closed, once every lease on it is settled. So a closed batch's summary describes
//! exactly the durable objects under its prefix, and no object lands in a batch after it closed.
//!
//! Limits: idle time without a new instance, age, instance count, total bytes, and
//! shutdown. Instance count counts leases, so a batch can never exceed it. Bytes are only known once
//! an object is complete, so instances already in flight when the byte limit is reached still join
//! the batch; the default leaves HealthImaging's 10 GB quota headroom for that (see `--batch-max-bytes`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info};

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

/// When a batch closes (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub idle: Duration,
    pub max_age: Duration,
    pub max_instances: u32,
    pub max_bytes: u64,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            idle: Duration::from_secs(30),
            max_age: Duration::from_secs(300),
            max_instances: 5000,
            max_bytes: 9_000_000_000,
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
            CloseReason::Shutdown => "shutdown",
            CloseReason::Recovered => "recovered",
        }
    }

    /// The reason a job record names, if it names one this version knows.
    pub(crate) fn parse(name: &str) -> Option<CloseReason> {
        use CloseReason::*;
        [Idle, MaxAge, MaxInstances, MaxBytes, Shutdown, Recovered]
            .into_iter()
            .find(|r| r.as_str() == name)
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
    pub instance_count: u32,
    pub total_bytes: u64,
    pub study_instance_uids: Vec<String>,
    pub calling_ae_titles: Vec<String>,
    /// The import input: the batch's prefix, `s3://bucket/prefix/jobId/` (on the local store, its
    /// directory).
    pub input_s3_uri: String,
}

/// What the batch already holds of a SOP Instance UID when a lease is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// First time in this batch.
    New,
    /// Another copy is being received right now.
    InFlight,
    /// A copy is already durable in this batch.
    Stored,
}

/// What a batch holds of one SOP Instance UID: its durable copy's size, and copies in flight.
#[derive(Debug, Default)]
struct InstanceState {
    committed_size: Option<u64>,
    in_flight: u32,
}

/// One batch, open or closing, as the batcher tracks it.
struct Batch {
    /// The batch's ULID, which is also its job id and the folder of its objects.
    job_id: String,
    /// Per SOP Instance UID, so a repeated instance counts once and its bytes are replaced.
    instances: HashMap<String, InstanceState>,
    created: SystemTime,
    opened_at: Instant,
    last_activity: Instant,
    leased: u32,
    in_flight: u32,
    committed: u32,
    bytes: u64,
    studies: BTreeSet<String>,
    calling_aes: BTreeSet<String>,
}

/// The batcher's state under its lock: the open batch and those waiting for their leases.
#[derive(Default)]
struct State {
    open: Option<Batch>,
    /// Batches that reached a limit but still have leases in flight, with why they closed.
    closing: HashMap<String, (Batch, CloseReason)>,
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

/// A reserved place in a batch for one instance in flight.
pub(crate) struct BatchLease {
    job_id: String,
    sop_instance_uid: String,
    seen: Seen,
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

    /// The instance is durable: count it in its batch.
    pub(crate) fn commit(mut self, size: u64, study_instance_uid: &str, calling_ae_title: &str) {
        if let Some(b) = self.batcher.take() {
            b.settle(
                &self.job_id,
                &self.sop_instance_uid,
                Some((size, study_instance_uid, calling_ae_title)),
            );
        }
    }
}

impl Drop for BatchLease {
    fn drop(&mut self) {
        if let Some(b) = self.batcher.take() {
            b.settle(&self.job_id, &self.sop_instance_uid, None);
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

    /// Reserves a place for one instance in the open batch, opening a new batch when needed. A
    /// SOP Instance UID already in the batch takes no new place: it will replace or be dropped.
    pub(crate) fn lease(self: &Arc<Self>, sop_instance_uid: &str) -> BatchLease {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(reason) = st.open.as_ref().and_then(|b| self.limit_reached(b, now)) {
            self.close_open(&mut st, reason);
        }
        let batch = st.open.get_or_insert_with(|| {
            let job_id = ulid::Ulid::generate().to_string();
            let created = SystemTime::now();
            info!(job_id = %job_id, "batch opened");
            crate::metrics::metrics().batches_open.inc();
            let _ = self.events.send(BatchEvent::Opened {
                job_id: job_id.clone(),
                created_at: humantime::format_rfc3339_millis(created).to_string(),
                input_s3_uri: (self.input_s3_uri)(&job_id),
            });
            Batch {
                job_id,
                instances: HashMap::new(),
                created,
                opened_at: now,
                last_activity: now,
                leased: 0,
                in_flight: 0,
                committed: 0,
                bytes: 0,
                studies: BTreeSet::new(),
                calling_aes: BTreeSet::new(),
            }
        });
        let state = batch
            .instances
            .entry(sop_instance_uid.to_string())
            .or_default();
        let seen = match (state.committed_size, state.in_flight) {
            (Some(_), _) => Seen::Stored,
            (None, 0) => Seen::New,
            (None, _) => Seen::InFlight,
        };
        state.in_flight += 1;
        if seen == Seen::New {
            batch.leased += 1;
        }
        batch.in_flight += 1;
        batch.last_activity = now;
        BatchLease {
            job_id: batch.job_id.clone(),
            sop_instance_uid: sop_instance_uid.to_string(),
            seen,
            batcher: Some(self.clone()),
        }
    }

    fn limit_reached(&self, b: &Batch, now: Instant) -> Option<CloseReason> {
        if b.leased >= self.limits.max_instances {
            Some(CloseReason::MaxInstances)
        } else if b.bytes >= self.limits.max_bytes {
            Some(CloseReason::MaxBytes)
        } else if now.duration_since(b.opened_at) >= self.limits.max_age {
            Some(CloseReason::MaxAge)
        } else if b.in_flight == 0 && now.duration_since(b.last_activity) >= self.limits.idle {
            Some(CloseReason::Idle)
        } else {
            None
        }
    }

    fn settle(&self, job_id: &str, sop_instance_uid: &str, committed: Option<(u64, &str, &str)>) {
        let now = Instant::now();
        let mut st = self.lock();
        let is_open = st.open.as_ref().is_some_and(|b| b.job_id == job_id);
        let batch = if is_open {
            st.open.as_mut()
        } else {
            st.closing.get_mut(job_id).map(|(b, _)| b)
        };
        let Some(batch) = batch else { return };
        batch.in_flight -= 1;
        batch.last_activity = now;
        let state = batch
            .instances
            .entry(sop_instance_uid.to_string())
            .or_default();
        state.in_flight = state.in_flight.saturating_sub(1);
        match committed {
            Some((size, study, ae)) => {
                match state.committed_size.replace(size) {
                    None => {
                        batch.committed += 1;
                        batch.bytes += size;
                    }
                    // A repeated instance replaced the earlier copy: it counts once.
                    Some(old) => batch.bytes = batch.bytes - old + size,
                }
                if !batch.studies.contains(study) {
                    batch.studies.insert(study.to_string());
                }
                let ae = ae.trim();
                if !batch.calling_aes.contains(ae) {
                    batch.calling_aes.insert(ae.to_string());
                }
            }
            None => {
                if state.committed_size.is_none() && state.in_flight == 0 {
                    batch.instances.remove(sop_instance_uid);
                    batch.leased -= 1;
                }
            }
        }
        if is_open {
            if let Some(b) = st.open.as_ref()
                && b.bytes >= self.limits.max_bytes
            {
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
            created_at: humantime::format_rfc3339_millis(b.created).to_string(),
            closed_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
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

    /// A fresh SOP Instance UID for each lease.
    fn uid() -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        format!(
            "1.2.3.{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
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

    #[test]
    fn opening_a_batch_is_reported_with_its_location() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let b = Batcher::new(limits(), |id| format!("s3://b/p/{id}/"), tx);
        let lease = b.lease(&uid());
        match rx.try_recv().unwrap() {
            BatchEvent::Opened {
                job_id,
                input_s3_uri,
                ..
            } => {
                assert_eq!(job_id, lease.job_id());
                assert_eq!(input_s3_uri, format!("s3://b/p/{job_id}/"));
            }
            other => panic!("{other:?}"),
        }
        drop(b.lease(&uid()));
        assert!(rx.try_recv().is_err(), "one opening per batch");
    }

    fn limits() -> BatchLimits {
        BatchLimits {
            idle: Duration::from_secs(3600),
            max_age: Duration::from_secs(3600),
            max_instances: 3,
            max_bytes: 1000,
        }
    }

    #[test]
    fn closes_at_the_instance_limit_and_counts_only_committed() {
        let (b, mut rx) = batcher(limits());
        let l1 = b.lease(&uid());
        let l2 = b.lease(&uid());
        let l3 = b.lease(&uid());
        let first = l1.job_id().to_string();
        assert_eq!(l3.job_id(), first);
        l1.commit(10, "1.1", "AE1");
        drop(l2); // store failed: it never counts, and its place is free again
        let l4 = b.lease(&uid());
        assert_eq!(l4.job_id(), first, "a failed instance frees its place");
        let l5 = b.lease(&uid());
        assert_ne!(l5.job_id(), first, "a full batch hands out no more leases");
        assert!(
            rx.try_recv().is_err(),
            "not finalised while leases are in flight"
        );
        l3.commit(20, "1.2", "AE2 ");
        assert!(rx.try_recv().is_err());
        l4.commit(30, "1.2", "AE1");
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
        let l1 = b.lease(&uid());
        let id = l1.job_id().to_string();
        l1.commit(1000, "1.1", "AE");
        let s = rx.try_recv().unwrap();
        assert_eq!((s.job_id, s.close_reason), (id, CloseReason::MaxBytes));
    }

    #[test]
    fn idle_close_waits_for_instances_in_flight() {
        let (b, mut rx) = batcher(BatchLimits {
            idle: Duration::ZERO,
            ..limits()
        });
        let l1 = b.lease(&uid());
        b.tick();
        assert!(
            rx.try_recv().is_err(),
            "an instance in flight keeps the batch open"
        );
        l1.commit(1, "1.1", "AE");
        b.tick();
        assert_eq!(rx.try_recv().unwrap().close_reason, CloseReason::Idle);
    }

    #[test]
    fn age_closes_even_with_instances_in_flight_which_then_finish_into_it() {
        let (b, mut rx) = batcher(BatchLimits {
            max_age: Duration::ZERO,
            ..limits()
        });
        let l1 = b.lease(&uid());
        b.tick();
        let l2 = b.lease(&uid());
        assert_ne!(l1.job_id(), l2.job_id());
        l1.commit(5, "1.1", "AE");
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
        drop(b.lease(&uid()));
        b.tick();
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn shutdown_closes_the_open_batch_after_its_leases_settle() {
        let (b, mut rx) = batcher(limits());
        let l1 = b.lease(&uid());
        let b2 = b.clone();
        let closer = tokio::spawn(async move { b2.close_all(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err());
        l1.commit(7, "1.1", "AE");
        closer.await.unwrap();
        assert_eq!(rx.try_recv().unwrap().close_reason, CloseReason::Shutdown);
    }

    #[test]
    fn a_repeated_instance_counts_once_and_replaces_its_bytes() {
        let (b, mut rx) = batcher(limits());
        let first = b.lease("1.9.1");
        assert_eq!(first.seen(), Seen::New);
        let concurrent = b.lease("1.9.1");
        assert_eq!(concurrent.seen(), Seen::InFlight);
        first.commit(100, "1.1", "AE");
        let again = b.lease("1.9.1");
        assert_eq!(again.seen(), Seen::Stored);
        concurrent.commit(120, "1.1", "AE");
        drop(again); // e.g. kept-first: not stored
        let other = b.lease("1.9.2");
        let other_id = other.job_id().to_string();
        other.commit(10, "1.1", "AE");
        b.tick();
        drop(b.lease(&uid())); // nothing
        b.close_open(&mut b.lock(), CloseReason::Shutdown);
        let s = rx.try_recv().unwrap();
        assert_eq!(s.job_id, other_id);
        assert_eq!(s.instance_count, 2, "two distinct instances");
        assert_eq!(s.total_bytes, 130, "the second copy replaced the first");
    }

    #[test]
    fn a_failed_first_copy_frees_its_place_unless_another_copy_is_in_flight() {
        let (b, mut rx) = batcher(BatchLimits {
            max_instances: 2,
            ..limits()
        });
        let a = b.lease("1.8.1");
        let a2 = b.lease("1.8.1");
        drop(a); // the first copy failed while a second is in flight
        let c = b.lease("1.8.2");
        let id = c.job_id().to_string();
        assert!(
            b.lease("1.8.3").job_id() != id,
            "two places taken: 1.8.1 (in flight) and 1.8.2"
        );
        a2.commit(5, "1.1", "AE");
        c.commit(5, "1.1", "AE");
        let s = rx.try_recv().unwrap();
        assert_eq!((s.job_id, s.instance_count), (id, 2));
    }
}

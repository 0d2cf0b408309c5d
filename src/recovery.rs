//! Finishing what a stopped gateway left behind, so no acknowledged instance is stranded.
//!
//! A gateway can die between any two steps of the import path: with its batch still OPEN
//! (SIGKILL, out of memory, a lost host), or after recording a job CLOSED but before starting its
//! import. [`Recovery`] runs beside the listener, at start-up and then periodically (every
//! `--recovery-interval`, jittered), so the gateways that remain finish what a dead one left
//! without anyone restarting: it closes orphaned OPEN batches from the objects under their prefix,
//! then starts the imports of CLOSED jobs through the [`Pipeline`], which is safe because starting
//! is idempotent (the execution name and the HealthImaging `ClientToken` are the job id).
//!
//! Several gateways may run it at the same moment. Adopting an orphan is a conditional write
//! ([`JobStore::adopt`]: still OPEN, still owned by the dead gateway), so exactly one adopts it;
//! the others see that they lost and leave it alone.
//!
//! In edge mode a batch left OPEN may still have acknowledged instances in this gateway's spool,
//! replayed at start-up and not yet in S3 ([`ObjectStore::unsettled`]). Such a batch is left OPEN
//! until the spool has uploaded them: counted from S3 before that, it would be imported partial.
//! The next pass comes as soon as the spool has settled the batches it waits for, not only after
//! `--recovery-interval`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::CloseReason;
use crate::clock::now_rfc3339;
use crate::import::{Pipeline, random_below};
use crate::index::repair::Repairer;
use crate::jobs::{Job, JobStatus, JobStore, JobStoreError, Transition};
use crate::store::ObjectStore;

/// Whether recovery should start the import of a job found CLOSED. Jobs this gateway closed before
/// this process started are started at once (it crashed between recording and starting them), and
/// so are orphans it has just adopted (closed under its name with reason `recovered`); any other
/// job only once it has been CLOSED for `grace`, so a live pipeline's own submission (this
/// process's, or another gateway's) is not raced; if it is, the idempotent start makes the race
/// harmless.
pub(crate) fn should_resubmit(
    job: &Job,
    gateway_id: &str,
    process_started: SystemTime,
    now: SystemTime,
    grace: Duration,
) -> bool {
    if job.status != JobStatus::Closed {
        return false;
    }
    let closed = job
        .closed_at
        .as_deref()
        .or(Some(job.created_at.as_str()))
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    let Some(closed) = closed else {
        return true; // no usable timestamp: better an idempotent start than a job stuck forever
    };
    if job.gateway_id.as_deref() == Some(gateway_id)
        && (closed < process_started || job.close_reason == Some(CloseReason::Recovered))
    {
        return true;
    }
    now.duration_since(closed).is_ok_and(|age| age >= grace)
}

/// Whether an OPEN job was left behind by a gateway that stopped without closing its batch
/// (SIGKILL, out of memory, lost host). This gateway's own OPEN jobs from before this process
/// started are orphans at once; another gateway's only once open for `orphan_age`
/// (`--orphan-age`, at least twice `--batch-max-age`: see [`crate::config::RecoveryConfig`]).
pub(crate) fn is_orphaned_open(
    job: &Job,
    gateway_id: &str,
    process_started: SystemTime,
    now: SystemTime,
    orphan_age: Duration,
) -> bool {
    if job.status != JobStatus::Open {
        return false;
    }
    let Ok(created) = humantime::parse_rfc3339_weak(&job.created_at) else {
        return false;
    };
    if job.gateway_id.as_deref() == Some(gateway_id) {
        created < process_started
    } else {
        now.duration_since(created)
            .is_ok_and(|age| age >= orphan_age)
    }
}

/// Recovery of the jobs a stopped gateway (this one, or another of the fleet) left behind.
pub(crate) struct Recovery {
    /// Starts the imports of recovered jobs, exactly as for a batch that closed normally.
    pipeline: Arc<Pipeline>,
    jobs: Arc<dyn JobStore>,
    /// Where an orphaned batch's objects are counted.
    store: Arc<dyn ObjectStore>,
    /// Adds the index records a dead gateway's channel lost, for the objects of its orphans.
    index: Arc<Repairer>,
    /// This gateway's name: its own jobs from an earlier run are recovered at once.
    gateway_id: String,
    /// When this process started: its own OPEN jobs from before then are orphans.
    process_started: SystemTime,
    /// How long another gateway's batch may stay OPEN before it counts as orphaned.
    orphan_age: Duration,
    /// Orphans the last pass left OPEN because the spool still uploads some of their instances.
    waiting: Mutex<Vec<String>>,
}

impl Recovery {
    pub(crate) fn new(
        pipeline: Arc<Pipeline>,
        jobs: Arc<dyn JobStore>,
        store: Arc<dyn ObjectStore>,
        index: Arc<Repairer>,
        gateway_id: String,
        orphan_age: Duration,
    ) -> Self {
        Recovery {
            pipeline,
            jobs,
            store,
            index,
            gateway_id,
            process_started: SystemTime::now(),
            orphan_age,
            waiting: Mutex::new(Vec::new()),
        }
    }

    /// Batches to look at again as soon as the store has settled them: those the edge spool
    /// replayed at start-up (their OPEN record may be written only now, after the first pass).
    pub(crate) fn wait_for(&self, job_ids: Vec<String>) {
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for job_id in job_ids {
            if !waiting.contains(&job_id) {
                waiting.push(job_id);
            }
        }
    }

    /// Resolves once the store has settled every batch the last pass left waiting (never, when
    /// none waits: the pass then comes at its interval).
    async fn waiting_settled(&self) {
        let waiting = std::mem::take(
            &mut *self
                .waiting
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if waiting.is_empty() {
            return std::future::pending().await;
        }
        for job_id in &waiting {
            self.store.settled(job_id).await;
        }
    }

    /// Closes batches whose gateway stopped while they were open: their counts are recomputed
    /// from the objects under the batch's prefix (every listed object was acknowledged, since
    /// uploads in progress are never visible), the instance index gets the records the dead
    /// gateway lost for them ([`Repairer::repair`]), and this gateway adopts them, unless another
    /// gateway's recovery adopted one first. Returns how many this gateway adopted.
    async fn close_orphans(&self) -> Result<usize, JobStoreError> {
        let now = SystemTime::now();
        let orphans: Vec<Job> = self
            .jobs
            .list_by_status(JobStatus::Open)
            .await?
            .into_iter()
            .filter(|j| {
                is_orphaned_open(
                    j,
                    &self.gateway_id,
                    self.process_started,
                    now,
                    self.orphan_age,
                )
            })
            .collect();
        let mut adopted = 0;
        let mut waiting = Vec::new();
        for job in &orphans {
            let unsettled = self.store.unsettled(&job.job_id);
            if unsettled > 0 {
                info!(job_id = %job.job_id, instances = unsettled, "recovery: the batch left open still has acknowledged instances in the spool; it is closed once they are uploaded");
                waiting.push(job.job_id.clone());
                continue;
            }
            let contents = match self.store.batch_contents(&job.job_id).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(job_id = %job.job_id, error = %e, "recovery: cannot list the batch's objects; will retry at the next recovery");
                    continue;
                }
            };
            if contents.instance_count == 0 {
                let t = Transition {
                    message: Some(
                        "the batch was left open by a gateway that stopped, and holds no instance"
                            .into(),
                    ),
                    ..Default::default()
                };
                // Conditional like every transition: of several gateways, one records it.
                if self
                    .jobs
                    .transition(&job.job_id, JobStatus::Failed, t)
                    .await
                    .is_ok()
                {
                    info!(job_id = %job.job_id, "recovery: empty batch left open by a stopped gateway recorded FAILED");
                    adopted += 1;
                }
                continue;
            }
            // Before the adoption, so that CLOSED still means indexed: the dead gateway's
            // channel lost the records it held. Several gateways may repair the same orphan at
            // once; a repair only adds what is missing.
            self.index.repair(&job.job_id).await;
            let mut closed = job.clone();
            closed.status = JobStatus::Closed;
            closed.closed_at = Some(now_rfc3339());
            closed.close_reason = Some(CloseReason::Recovered);
            closed.instance_count = Some(contents.instance_count);
            closed.total_bytes = Some(contents.total_bytes);
            closed.study_instance_uids = contents.study_instance_uids;
            closed.gateway_id = Some(self.gateway_id.clone());
            if self.jobs.adopt(&closed, job.gateway_id.as_deref()).await? {
                adopted += 1;
                info!(job_id = %job.job_id, previous_gateway = %job.gateway_id.as_deref().unwrap_or("unknown"), instances = contents.instance_count, "recovery: batch left open by a stopped gateway adopted and closed from its stored objects");
            } else {
                debug!(job_id = %job.job_id, "recovery: another gateway adopted the batch first");
            }
        }
        self.wait_for(waiting);
        Ok(adopted)
    }

    /// One recovery pass: closes batches left OPEN by a stopped gateway, then starts the imports
    /// of jobs left CLOSED (see [`should_resubmit`]). Returns how many jobs it acted on.
    pub(crate) async fn run(&self, grace: Duration) -> Result<usize, JobStoreError> {
        let adopted = self.close_orphans().await?;
        if !self.pipeline.imports() {
            return Ok(adopted);
        }
        let now = SystemTime::now();
        let closed = self.jobs.list_by_status(JobStatus::Closed).await?;
        let due: Vec<Job> = closed
            .into_iter()
            .filter(|j| should_resubmit(j, &self.gateway_id, self.process_started, now, grace))
            .collect();
        for job in &due {
            info!(job_id = %job.job_id, "recovery: job was CLOSED but never submitted; starting its import");
            self.pipeline.submit(job).await;
        }
        Ok(adopted + due.len())
    }

    /// Runs a pass at once, then one every `interval` (each pause drawn between half and one and
    /// a half times `interval`, so a fleet started together does not list the job store in
    /// lockstep), until `stop` is cancelled. A failed pass is logged and tried again at the next.
    pub(crate) async fn run_periodically(
        &self,
        interval: Duration,
        grace: Duration,
        stop: CancellationToken,
    ) {
        loop {
            match self.run(grace).await {
                Ok(0) => debug!("recovery: nothing left behind"),
                Ok(n) => info!(
                    jobs = n,
                    "recovery: finished jobs left behind by a stopped gateway"
                ),
                Err(e) => {
                    warn!(error = %e, retry_in = ?interval, "recovery: cannot read the job store; will retry at the next recovery")
                }
            }
            let pause = interval / 2 + random_below(interval);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.waiting_settled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::closed_job;
    use crate::store::{BatchContents, ObjectKey, ObjectUpload, StoreError};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A store whose spool still holds `pending` instances of every batch, and whose S3 holds two.
    struct Spooling {
        pending: AtomicU64,
        changed: tokio::sync::Notify,
        /// How often recovery asked.
        asked: AtomicU64,
    }

    #[async_trait::async_trait]
    impl ObjectStore for Spooling {
        async fn begin(&self, _: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError> {
            Err(StoreError::Io(std::io::Error::other("not used")))
        }
        fn input_s3_uri(&self, job_id: &str) -> String {
            format!("s3://b/import/{job_id}/")
        }
        async fn check(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn batch_contents(&self, _: &str) -> Result<BatchContents, StoreError> {
            let mut c = BatchContents::default();
            c.add("1.2/1.2.3/1.2.3.4.dcm", 10);
            c.add("1.2/1.2.3/1.2.3.5.dcm", 10);
            Ok(c)
        }
        async fn exists(&self, _: &ObjectKey) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn list_objects(
            &self,
            _: &str,
        ) -> Result<Vec<crate::store::ListedObject>, StoreError> {
            Ok(Vec::new())
        }
        async fn read_head(&self, _: &str, _: u64) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }
        fn describe(&self) -> String {
            "spooling".into()
        }
        fn unsettled(&self, _: &str) -> u64 {
            self.asked.fetch_add(1, Ordering::SeqCst);
            self.pending.load(Ordering::SeqCst)
        }
        async fn settled(&self, job_id: &str) {
            loop {
                let changed = self.changed.notified();
                if self.unsettled(job_id) == 0 {
                    return;
                }
                changed.await;
            }
        }
    }

    #[tokio::test]
    async fn an_orphan_with_instances_still_in_the_spool_is_closed_only_once_they_are_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let jobs: Arc<dyn JobStore> = Arc::new(crate::jobs::local::LocalJournal::new(dir.path()));
        let job = Job::opened(
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N",
            "2026-11-23T10:00:00.000Z",
            "s3://b/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/",
            "me",
        );
        jobs.record_open(&job).await.unwrap();
        let store = Arc::new(Spooling {
            pending: AtomicU64::new(1),
            changed: tokio::sync::Notify::new(),
            asked: AtomicU64::new(0),
        });
        let pipeline = Pipeline::new(jobs.clone(), None, "me".into(), Duration::from_millis(10));
        let index: Arc<dyn crate::index::InstanceIndex> =
            Arc::new(crate::index::local::LocalIndex::new(dir.path()));
        let repairer = Arc::new(crate::index::repair::Repairer::new(
            index,
            store.clone(),
            None,
        ));
        let recovery = Arc::new(Recovery::new(
            pipeline,
            jobs.clone(),
            store.clone(),
            repairer,
            "me".into(),
            Duration::from_secs(3600),
        ));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (recovery, stop) = (recovery.clone(), stop.clone());
            // An interval far beyond the test: only the spool settling can bring the next pass.
            async move {
                recovery
                    .run_periodically(Duration::from_secs(3600), Duration::ZERO, stop)
                    .await
            }
        });
        let status = async || jobs.get(&job.job_id).await.unwrap().unwrap();
        // The first pass asked the spool, and so left the job alone (it asks before anything else).
        while store.asked.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(status().await.status, JobStatus::Open, "not closed partial");
        store.pending.store(0, Ordering::SeqCst);
        store.changed.notify_waiters();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let j = status().await;
                if j.status == JobStatus::Closed {
                    return j;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("closed as soon as the spool settled, not at the next interval");
        assert_eq!(closed.instance_count, Some(2));
        assert_eq!(closed.close_reason, Some(CloseReason::Recovered));
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn recovery_decision() {
        let started = humantime::parse_rfc3339("2026-11-23T10:09:30Z").unwrap();
        let now = humantime::parse_rfc3339("2026-11-23T10:10:00Z").unwrap();
        let grace = Duration::from_secs(300);
        let due = |job: &Job| should_resubmit(job, "me", started, now, grace);
        assert!(
            due(&closed_job("me", "2026-11-23T10:09:29.000Z")),
            "our own CLOSED job from before this process: at once"
        );
        assert!(
            !due(&closed_job("me", "2026-11-23T10:09:31.000Z")),
            "our own job closed by this process: its pipeline is on it"
        );
        let mut adopted = closed_job("me", "2026-11-23T10:09:59.000Z");
        adopted.close_reason = Some(CloseReason::Recovered);
        assert!(due(&adopted), "an orphan we just adopted: at once");
        assert!(
            due(&closed_job("me", "2026-11-23T10:04:00.000Z")),
            "our own job, closed long ago by this process: yes"
        );
        assert!(
            !due(&closed_job("other", "2026-11-23T10:09:00.000Z")),
            "another gateway's recent job: not yet"
        );
        assert!(
            due(&closed_job("other", "2026-11-23T10:01:00.000Z")),
            "another gateway's old job: yes"
        );
        let mut submitted = closed_job("me", "2026-11-23T10:00:00.000Z");
        submitted.status = JobStatus::Submitted;
        assert!(!due(&submitted), "only CLOSED jobs");
    }

    #[test]
    fn orphaned_open_batches() {
        let started = humantime::parse_rfc3339("2026-11-23T10:10:00Z").unwrap();
        let now = humantime::parse_rfc3339("2026-11-23T10:10:05Z").unwrap();
        let hour = Duration::from_secs(3600);
        let open =
            |gw: &str, created: &str| Job::opened("01JD6Y7Z8X9W0V1T2S3R4Q5P6N", created, "/x/", gw);
        let orphaned = |job: &Job, age: Duration| is_orphaned_open(job, "me", started, now, age);
        assert!(
            orphaned(&open("me", "2026-11-23T10:09:00.000Z"), hour),
            "ours, from before this process"
        );
        assert!(
            !orphaned(&open("me", "2026-11-23T10:10:03.000Z"), hour),
            "ours, opened by this process"
        );
        assert!(
            !orphaned(&open("other", "2026-11-23T10:00:00.000Z"), hour),
            "another gateway's, possibly live"
        );
        assert!(
            orphaned(&open("other", "2026-11-23T09:00:00.000Z"), hour),
            "another gateway's, open for over the orphan age"
        );
        assert!(
            orphaned(
                &open("other", "2026-11-23T10:00:00.000Z"),
                Duration::from_secs(600)
            ),
            "a shorter --orphan-age"
        );
        let mut closed = open("me", "2026-11-23T09:00:00.000Z");
        closed.status = JobStatus::Closed;
        assert!(!orphaned(&closed, hour));
    }
}

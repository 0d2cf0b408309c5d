//! Finishing what a stopped gateway left behind, so no acknowledged instance is stranded.
//!
//! A gateway can die between any two steps of the import path: with its batch still OPEN
//! (SIGKILL, out of memory, a lost host), or after recording a job CLOSED but before starting its
//! import. [`Recovery`] runs at start-up beside the listener: it closes orphaned OPEN batches from
//! the objects under their prefix, then starts the imports of CLOSED jobs through the
//! [`Pipeline`], which is safe because starting is idempotent (the execution name and the
//! HealthImaging `ClientToken` are the job id).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::batch::CloseReason;
use crate::import::{Pipeline, now_rfc3339};
use crate::jobs::{Job, JobStatus, JobStore, JobStoreError, Transition};
use crate::store::ObjectStore;

/// Whether start-up recovery should start the import of a job found CLOSED. Jobs closed by this
/// gateway are started at once (this gateway crashed between recording and starting them); jobs of
/// other gateways only once they have been CLOSED for `grace`, so a live gateway's own in-progress
/// submission is not raced (and if it is, the idempotent start makes the race harmless).
pub(crate) fn should_resubmit(
    job: &Job,
    gateway_id: &str,
    now: SystemTime,
    grace: Duration,
) -> bool {
    if job.status != JobStatus::Closed {
        return false;
    }
    if job.gateway_id.as_deref() == Some(gateway_id) {
        return true;
    }
    let closed = job
        .closed_at
        .as_deref()
        .or(Some(job.created_at.as_str()))
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    match closed {
        Some(t) => now.duration_since(t).is_ok_and(|age| age >= grace),
        None => true, // no usable timestamp: better an idempotent start than a job stuck forever
    }
}

/// How long another gateway's batch may stay OPEN before recovery takes it over. Far above any
/// allowed `--batch-max-age` (at most 30 minutes), so a live gateway's open batch is never touched.
pub(crate) const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// Whether an OPEN job was left behind by a gateway that stopped without closing its batch
/// (SIGKILL, out of memory, lost host). This gateway's own OPEN jobs from before this process
/// started are orphans at once; another gateway's only after [`ORPHAN_AGE`].
pub(crate) fn is_orphaned_open(
    job: &Job,
    gateway_id: &str,
    process_started: SystemTime,
    now: SystemTime,
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
            .is_ok_and(|age| age >= ORPHAN_AGE)
    }
}

/// Start-up recovery of the jobs a stopped gateway (this one, or another of the fleet) left behind.
pub(crate) struct Recovery {
    /// Starts the imports of recovered jobs, exactly as for a batch that closed normally.
    pipeline: Arc<Pipeline>,
    jobs: Arc<dyn JobStore>,
    /// Where an orphaned batch's objects are counted.
    store: Arc<dyn ObjectStore>,
    /// This gateway's name: its own jobs from an earlier run are recovered at once.
    gateway_id: String,
    /// When this process started: its own OPEN jobs from before then are orphans.
    process_started: SystemTime,
}

impl Recovery {
    pub(crate) fn new(
        pipeline: Arc<Pipeline>,
        jobs: Arc<dyn JobStore>,
        store: Arc<dyn ObjectStore>,
        gateway_id: String,
    ) -> Self {
        Recovery {
            pipeline,
            jobs,
            store,
            gateway_id,
            process_started: SystemTime::now(),
        }
    }

    /// Closes batches whose gateway stopped while they were open: their counts are recomputed
    /// from the objects under the batch's prefix (every listed object was acknowledged, since
    /// uploads in progress are never visible), and this gateway adopts them. Returns how many.
    async fn close_orphans(&self) -> Result<usize, JobStoreError> {
        let now = SystemTime::now();
        let orphans: Vec<Job> = self
            .jobs
            .list_by_status(JobStatus::Open)
            .await?
            .into_iter()
            .filter(|j| is_orphaned_open(j, &self.gateway_id, self.process_started, now))
            .collect();
        for job in &orphans {
            let contents = match self.store.batch_contents(&job.job_id).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(job_id = %job.job_id, error = %e, "recovery: cannot list the batch's objects; will retry at the next start");
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
                let _ = self
                    .jobs
                    .transition(&job.job_id, JobStatus::Failed, t)
                    .await;
                info!(job_id = %job.job_id, "recovery: empty batch left open by a stopped gateway recorded FAILED");
                continue;
            }
            let mut closed = job.clone();
            closed.status = JobStatus::Closed;
            closed.closed_at = Some(now_rfc3339());
            closed.close_reason = Some(CloseReason::Recovered);
            closed.instance_count = Some(contents.instance_count);
            closed.total_bytes = Some(contents.total_bytes);
            closed.study_instance_uids = contents.study_instance_uids;
            closed.gateway_id = Some(self.gateway_id.clone());
            self.jobs.record_closed(&closed).await?;
            info!(job_id = %job.job_id, instances = contents.instance_count, "recovery: batch left open by a stopped gateway closed from its stored objects");
        }
        Ok(orphans.len())
    }

    /// Start-up recovery: closes batches left OPEN by a stopped gateway, then starts the imports
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
            .filter(|j| should_resubmit(j, &self.gateway_id, now, grace))
            .collect();
        for job in &due {
            info!(job_id = %job.job_id, "recovery: job was CLOSED but never submitted; starting its import");
            self.pipeline.submit(job).await;
        }
        Ok(adopted + due.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::closed_job;

    #[test]
    fn recovery_decision() {
        let now = humantime::parse_rfc3339("2026-11-23T10:10:00Z").unwrap();
        let grace = Duration::from_secs(300);
        assert!(
            should_resubmit(
                &closed_job("me", "2026-11-23T10:09:59.000Z"),
                "me",
                now,
                grace
            ),
            "our own CLOSED job: at once"
        );
        assert!(
            !should_resubmit(
                &closed_job("other", "2026-11-23T10:09:00.000Z"),
                "me",
                now,
                grace
            ),
            "another gateway's recent job: not yet"
        );
        assert!(
            should_resubmit(
                &closed_job("other", "2026-11-23T10:01:00.000Z"),
                "me",
                now,
                grace
            ),
            "another gateway's old job: yes"
        );
        let mut submitted = closed_job("me", "2026-11-23T10:00:00.000Z");
        submitted.status = JobStatus::Submitted;
        assert!(
            !should_resubmit(&submitted, "me", now, grace),
            "only CLOSED jobs"
        );
    }

    #[test]
    fn orphaned_open_batches() {
        let started = humantime::parse_rfc3339("2026-11-23T10:10:00Z").unwrap();
        let now = humantime::parse_rfc3339("2026-11-23T10:10:05Z").unwrap();
        let open =
            |gw: &str, created: &str| Job::opened("01JD6Y7Z8X9W0V1T2S3R4Q5P6N", created, "/x/", gw);
        assert!(
            is_orphaned_open(&open("me", "2026-11-23T10:09:00.000Z"), "me", started, now),
            "ours, from before this process"
        );
        assert!(
            !is_orphaned_open(&open("me", "2026-11-23T10:10:03.000Z"), "me", started, now),
            "ours, opened by this process"
        );
        assert!(
            !is_orphaned_open(
                &open("other", "2026-11-23T10:00:00.000Z"),
                "me",
                started,
                now
            ),
            "another gateway's, possibly live"
        );
        assert!(
            is_orphaned_open(
                &open("other", "2026-11-23T09:00:00.000Z"),
                "me",
                started,
                now
            ),
            "another gateway's, open for over an hour"
        );
        let mut closed = open("me", "2026-11-23T09:00:00.000Z");
        closed.status = JobStatus::Closed;
        assert!(!is_orphaned_open(&closed, "me", started, now));
    }
}

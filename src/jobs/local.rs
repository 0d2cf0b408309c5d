//! The embedded job store: one JSON file per job in a directory (`{store}/jobs/` by default).
//!
//! Each write replaces the whole file atomically (temp file, fsync, rename, directory fsync), and
//! transitions are checked under a lock, so the journal keeps the forward-only rule. The lock is
//! both in-process and an advisory `flock` on `{dir}/.lock`, so several gateway processes on one
//! host may share the directory (recovery adopts each orphan exactly once); deployments with
//! gateways on several hosts use DynamoDB.

use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::{Mutex, MutexGuard};

use crate::durable::replace_file;

use super::{ImportOutcome, Job, JobStatus, JobStore, JobStoreError, OutcomeClaim, Transition};

/// Job records as JSON files in a directory: the embedded default, no cloud needed.
pub(crate) struct LocalJournal {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl LocalJournal {
    pub(crate) const DIR_NAME: &'static str = "jobs";

    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        LocalJournal {
            dir: dir.into(),
            lock: Mutex::new(()),
        }
    }

    /// Takes the journal's lock: this process's mutex, then the directory's `flock`, held until
    /// the returned guard is dropped.
    async fn lock(&self) -> Result<(MutexGuard<'_, ()>, DirLock), JobStoreError> {
        let guard = self.lock.lock().await;
        let dir = self.dir.clone();
        let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            std::fs::create_dir_all(&dir)?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(".lock"))?;
            #[cfg(unix)]
            {
                use std::os::fd::AsRawFd;
                // SAFETY: flock on a file descriptor this function owns; it blocks until the
                // lock is free (other processes hold it only for one read-modify-write).
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(file)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok((guard, DirLock { _file: file }))
    }

    pub(crate) fn path_of(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.json"))
    }

    async fn read(&self, job_id: &str) -> Result<Option<Job>, JobStoreError> {
        match tokio::fs::read(self.path_of(job_id)).await {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn write(&self, job: &Job) -> Result<(), JobStoreError> {
        let mut json = serde_json::to_vec_pretty(job)?;
        json.push(b'\n');
        replace_file(self.path_of(&job.job_id), json).await?;
        Ok(())
    }

    async fn all(&self) -> Result<Vec<Job>, JobStoreError> {
        let mut jobs = Vec::new();
        let mut rd = match tokio::fs::read_dir(&self.dir).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(jobs),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = rd.next_entry().await? {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(job) = serde_json::from_slice::<Job>(&tokio::fs::read(&path).await?)
            {
                jobs.push(job);
            }
        }
        jobs.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.job_id.cmp(&b.job_id))
        });
        Ok(jobs)
    }
}

/// The journal directory's `flock`, released when the file is closed (dropped).
struct DirLock {
    _file: std::fs::File,
}

#[async_trait]
impl JobStore for LocalJournal {
    async fn record_open(&self, job: &Job) -> Result<(), JobStoreError> {
        let _guard = self.lock().await?;
        if self.read(&job.job_id).await?.is_none() {
            self.write(job).await?;
        }
        Ok(())
    }

    async fn record_closed(&self, job: &Job) -> Result<(), JobStoreError> {
        let _guard = self.lock().await?;
        match self.read(&job.job_id).await? {
            Some(current) if current.status != JobStatus::Open => Ok(()),
            _ => self.write(job).await,
        }
    }

    async fn adopt(
        &self,
        closed: &Job,
        previous_owner: Option<&str>,
    ) -> Result<bool, JobStoreError> {
        let _guard = self.lock().await?;
        match self.read(&closed.job_id).await? {
            Some(current)
                if current.status == JobStatus::Open
                    && current.gateway_id.as_deref() == previous_owner =>
            {
                self.write(closed).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn transition(
        &self,
        job_id: &str,
        to: JobStatus,
        t: Transition,
    ) -> Result<(), JobStoreError> {
        let _guard = self.lock().await?;
        let mut job = self
            .read(job_id)
            .await?
            .ok_or_else(|| JobStoreError::NotFound(job_id.to_string()))?;
        if !job.status.can_move_to(to) {
            return Err(JobStoreError::NotForward {
                job_id: job_id.to_string(),
                current: job.status.to_string(),
                wanted: to,
            });
        }
        job.status = to;
        job.execution_arn = t.execution_arn.or(job.execution_arn);
        job.submitted_at = t.submitted_at.or(job.submitted_at);
        job.message = t.message.or(job.message);
        job.output_s3_uri = t.output_s3_uri.or(job.output_s3_uri);
        job.datastore_id = t.datastore_id.or(job.datastore_id);
        self.write(&job).await
    }

    async fn claim_outcome(
        &self,
        job_id: &str,
        claim: &OutcomeClaim,
        now: &str,
    ) -> Result<bool, JobStoreError> {
        let _guard = self.lock.lock().await;
        let Some(mut job) = self.read(job_id).await? else {
            return Ok(false);
        };
        if !job.outcome_claimable_by(&claim.gateway_id, now) {
            return Ok(false);
        }
        job.claim = Some(claim.clone());
        job.outcome_claimed_at
            .get_or_insert_with(|| now.to_string());
        self.write(&job).await?;
        Ok(true)
    }

    async fn release_outcome(&self, job_id: &str, gateway_id: &str) -> Result<(), JobStoreError> {
        let _guard = self.lock.lock().await;
        match self.read(job_id).await? {
            Some(mut job)
                if job
                    .claim
                    .as_ref()
                    .is_some_and(|c| c.gateway_id == gateway_id) =>
            {
                job.claim = None;
                self.write(&job).await
            }
            _ => Ok(()),
        }
    }

    async fn record_outcome(
        &self,
        job_id: &str,
        gateway_id: &str,
        outcome: &ImportOutcome,
    ) -> Result<(), JobStoreError> {
        let _guard = self.lock.lock().await;
        let mut job = self
            .read(job_id)
            .await?
            .ok_or_else(|| JobStoreError::NotFound(job_id.to_string()))?;
        if job.status != JobStatus::Imported {
            return Err(JobStoreError::NotForward {
                job_id: job_id.to_string(),
                current: job.status.to_string(),
                wanted: outcome.status,
            });
        }
        if job.claim.as_ref().map(|c| c.gateway_id.as_str()) != Some(gateway_id) {
            return Err(JobStoreError::ClaimLost(job_id.to_string()));
        }
        job.apply_outcome(outcome);
        self.write(&job).await
    }

    async fn get(&self, job_id: &str) -> Result<Option<Job>, JobStoreError> {
        if job_id.is_empty()
            || !job_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Ok(None);
        }
        self.read(job_id).await
    }

    async fn list_by_status(&self, status: JobStatus) -> Result<Vec<Job>, JobStoreError> {
        Ok(self
            .all()
            .await?
            .into_iter()
            .filter(|j| j.status == status)
            .collect())
    }

    async fn list_recent(&self, limit: usize) -> Result<Vec<Job>, JobStoreError> {
        let mut jobs = self.all().await?;
        jobs.reverse();
        jobs.truncate(limit);
        Ok(jobs)
    }

    async fn check(&self) -> Result<(), JobStoreError> {
        tokio::fs::create_dir_all(&self.dir).await?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("local job journal {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn journal_keeps_statuses_moving_forward() {
        let dir = tempfile::tempdir().unwrap();
        let j = LocalJournal::new(dir.path().join("jobs"));
        let open = Job::opened(
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N",
            "2026-11-23T10:00:00.000Z",
            "/x/",
            "gw",
        );
        j.record_open(&open).await.unwrap();
        let mut closed = open.clone();
        closed.status = JobStatus::Closed;
        closed.instance_count = Some(4);
        j.record_closed(&closed).await.unwrap();
        j.record_open(&open).await.unwrap(); // late duplicate: ignored
        assert_eq!(
            j.get(&open.job_id).await.unwrap().unwrap().status,
            JobStatus::Closed
        );
        assert_eq!(j.list_by_status(JobStatus::Closed).await.unwrap().len(), 1);
        j.transition(
            &open.job_id,
            JobStatus::Submitted,
            Transition {
                execution_arn: Some("arn:x".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let err = j
            .transition(&open.job_id, JobStatus::Closed, Transition::default())
            .await
            .unwrap_err();
        assert!(matches!(err, JobStoreError::NotForward { .. }), "{err}");
        j.record_closed(&closed).await.unwrap(); // a retried close does not move it back
        let job = j.get(&open.job_id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Submitted);
        assert_eq!(job.execution_arn.as_deref(), Some("arn:x"));
        assert_eq!(job.instance_count, Some(4));
        assert_eq!(j.list_recent(10).await.unwrap().len(), 1);
        assert!(j.get("../etc/passwd").await.unwrap().is_none());
    }

    /// Two journals on one directory stand for two gateway processes sharing it: however their
    /// adoptions interleave, exactly one of them adopts the orphan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exactly_one_of_two_gateways_adopts_an_orphan() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..20 {
            let job_id = format!("01JD6Y7Z8X9W0V1T2S3R4Q5P{round:02}");
            let open = Job::opened(&job_id, "2026-11-23T10:00:00.000Z", "/x/", "gw-dead");
            LocalJournal::new(dir.path())
                .record_open(&open)
                .await
                .unwrap();
            let adopt = |gw: &'static str| {
                let (dir, mut closed) = (dir.path().to_path_buf(), open.clone());
                closed.status = JobStatus::Closed;
                closed.gateway_id = Some(gw.into());
                tokio::spawn(async move {
                    LocalJournal::new(dir)
                        .adopt(&closed, Some("gw-dead"))
                        .await
                        .unwrap()
                })
            };
            let (a, b) = (adopt("gw-a"), adopt("gw-b"));
            let (a, b) = (a.await.unwrap(), b.await.unwrap());
            assert!(a ^ b, "round {round}: a adopted {a}, b adopted {b}");
            let job = LocalJournal::new(dir.path())
                .get(&job_id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(job.status, JobStatus::Closed);
            let winner = if a { "gw-a" } else { "gw-b" };
            assert_eq!(job.gateway_id.as_deref(), Some(winner));
        }
        let j = LocalJournal::new(dir.path());
        let mut other = Job::opened("01JD6Y7Z8X9W0V1T2S3R4Q5PZZ", "t", "/x/", "gw-live");
        j.record_open(&other).await.unwrap();
        other.status = JobStatus::Closed;
        assert!(
            !j.adopt(&other, Some("gw-dead")).await.unwrap(),
            "only from the owner recovery saw"
        );
    }

    #[tokio::test]
    async fn one_gateway_claims_and_ends_an_imported_job() {
        let dir = tempfile::tempdir().unwrap();
        let j = LocalJournal::new(dir.path().join("jobs"));
        let mut job = Job::opened("J1", "2026-11-23T10:00:00.000Z", "/x/", "gw-a");
        job.status = JobStatus::Imported;
        j.record_open(&job).await.unwrap();
        let claim = |gw: &str, until: &str| OutcomeClaim {
            gateway_id: gw.into(),
            expires_at: until.into(),
        };
        let now = "2026-11-23T10:01:00.000Z";
        assert!(
            j.claim_outcome("J1", &claim("gw-a", "2026-11-23T10:03:00.000Z"), now)
                .await
                .unwrap()
        );
        assert!(
            !j.claim_outcome("J1", &claim("gw-b", "2026-11-23T10:03:00.000Z"), now)
                .await
                .unwrap(),
            "gw-a holds it"
        );
        assert!(
            !j.claim_outcome("nope", &claim("gw-b", "x"), now)
                .await
                .unwrap()
        );
        let outcome = ImportOutcome {
            status: JobStatus::Completed,
            counts: None,
            image_set_ids: Vec::new(),
            message: None,
            ended_at: now.into(),
        };
        let err = j.record_outcome("J1", "gw-b", &outcome).await.unwrap_err();
        assert!(matches!(err, JobStoreError::ClaimLost(_)), "{err}");
        assert_eq!(
            j.get("J1")
                .await
                .unwrap()
                .unwrap()
                .outcome_claimed_at
                .as_deref(),
            Some(now),
            "the first claim's time"
        );
        j.release_outcome("J1", "gw-b").await.unwrap();
        assert!(
            j.get("J1").await.unwrap().unwrap().claim.is_some(),
            "not gw-b's to release"
        );
        // gw-a died: once its claim expired, gw-b takes over and ends the job.
        let later = "2026-11-23T10:04:00.000Z";
        assert!(
            j.claim_outcome("J1", &claim("gw-b", "2026-11-23T10:06:00.000Z"), later)
                .await
                .unwrap()
        );
        j.record_outcome("J1", "gw-b", &outcome).await.unwrap();
        let done = j.get("J1").await.unwrap().unwrap();
        assert_eq!(done.status, JobStatus::Completed);
        assert_eq!(done.claim, None);
        assert_eq!(
            done.outcome_claimed_at.as_deref(),
            Some(now),
            "kept across a takeover"
        );
        let err = j.record_outcome("J1", "gw-b", &outcome).await.unwrap_err();
        assert!(matches!(err, JobStoreError::NotForward { .. }), "{err}");
        assert!(
            !j.claim_outcome("J1", &claim("gw-b", "2026-11-23T10:09:00.000Z"), later)
                .await
                .unwrap(),
            "a finished job cannot be claimed"
        );
    }
}

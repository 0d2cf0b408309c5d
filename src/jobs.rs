//! Where closed batches are recorded: the job store seam.
//!
//! A closed batch becomes a job record. The local journal (the embedded default) writes one JSON
//! file per job under `{store}/jobs/`; with S3 and no job table the summary is logged, so an operator
//! still sees every batch. Recording runs in its own task and retries with backoff: a slow or
//! unavailable job store never slows or fails a C-STORE.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::batch::BatchSummary;

#[derive(Debug, Error)]
pub enum JobStoreError {
    #[error("job journal I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("job record cannot be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Records a closed batch. Must be idempotent: a retry after an unclear failure writes it again.
    async fn record_closed(&self, batch: &BatchSummary) -> Result<(), JobStoreError>;
    fn describe(&self) -> String;
}

/// One JSON file per job in a directory, written atomically (temp file, fsync, rename).
pub struct LocalJournal {
    dir: PathBuf,
}

impl LocalJournal {
    pub const DIR_NAME: &'static str = "jobs";

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalJournal { dir: dir.into() }
    }

    pub fn path_of(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.json"))
    }
}

#[async_trait]
impl JobStore for LocalJournal {
    async fn record_closed(&self, batch: &BatchSummary) -> Result<(), JobStoreError> {
        let mut json = serde_json::to_vec_pretty(&serde_json::json!({ "status": "CLOSED", "job": batch }))?;
        json.push(b'\n');
        let dir = self.dir.clone();
        let dest = self.path_of(&batch.job_id);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let temp = dest.with_extension("json.tmp");
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&temp, &dest)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("local job journal {}", self.dir.display())
    }
}

/// Logs closed batches (S3 deployments without a job table).
pub struct LogJobStore;

#[async_trait]
impl JobStore for LogJobStore {
    async fn record_closed(&self, batch: &BatchSummary) -> Result<(), JobStoreError> {
        info!(job = %serde_json::to_string(batch)?, "batch summary (no job table configured)");
        Ok(())
    }

    fn describe(&self) -> String {
        "log only (no job table configured)".into()
    }
}

/// Records every closed batch, retrying with exponential backoff (capped at `max_backoff`) until it
/// succeeds. Returns when the channel closes and everything received has been recorded or, after
/// the channel closed, has failed `final_attempts` more times.
pub async fn run_recorder(store: std::sync::Arc<dyn JobStore>, mut closed: mpsc::UnboundedReceiver<BatchSummary>, max_backoff: Duration) {
    while let Some(batch) = closed.recv().await {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1u32;
        loop {
            match store.record_closed(&batch).await {
                Ok(()) => {
                    info!(job_id = %batch.job_id, "job recorded");
                    break;
                }
                Err(e) if closed.is_closed() && attempt >= 5 => {
                    warn!(job_id = %batch.job_id, error = %e, "giving up recording job at shutdown; its objects are stored under {}", batch.input_location);
                    break;
                }
                Err(e) => {
                    warn!(job_id = %batch.job_id, attempt, error = %e, retry_in = ?delay, "recording job failed; will retry");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max_backoff);
                    attempt += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::CloseReason;

    fn summary() -> BatchSummary {
        BatchSummary {
            job_id: "01JD6Y7Z8X9W0V1T2S3R4Q5P6N".into(),
            created_at: "2026-11-23T10:00:00.000Z".into(),
            closed_at: "2026-11-23T10:00:30.000Z".into(),
            close_reason: CloseReason::Idle,
            instance_count: 2,
            total_bytes: 1234,
            study_instance_uids: vec!["1.2.3".into()],
            calling_ae_titles: vec!["STORESCU".into()],
            input_location: "/data/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/".into(),
        }
    }

    #[tokio::test]
    async fn journal_writes_one_json_file_per_job() {
        let dir = tempfile::tempdir().unwrap();
        let journal = LocalJournal::new(dir.path().join("jobs"));
        journal.record_closed(&summary()).await.unwrap();
        journal.record_closed(&summary()).await.unwrap(); // idempotent
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(journal.path_of("01JD6Y7Z8X9W0V1T2S3R4Q5P6N")).unwrap()).unwrap();
        assert_eq!(v["status"], "CLOSED");
        assert_eq!(v["job"]["instanceCount"], 2);
        assert_eq!(v["job"]["studyInstanceUids"][0], "1.2.3");
        assert_eq!(v["job"]["closeReason"], "idle");
        assert_eq!(std::fs::read_dir(dir.path().join("jobs")).unwrap().count(), 1);
    }
}

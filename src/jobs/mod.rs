//! Job records: one per batch, one future HealthImaging import job each.
//!
//! A job's status only moves forward: OPEN → CLOSED → SUBMITTED → IMPORTING → IMPORTED →
//! COMPLETED | COMPLETED_WITH_ERRORS | FAILED. Every store applies a transition only if the current
//! status comes before the new one (a DynamoDB condition expression, or a check under a lock for the
//! local journal), so retries, a second gateway, or the state machine racing the gateway can never
//! move a job backwards. IMPORTED (HealthImaging finished, outcome not yet read) is left by exactly
//! one gateway: the one holding the job's [`OutcomeClaim`] (see [`crate::outcome`]). Two implementations sit behind [`JobStore`]: DynamoDB ([`dynamodb::DynamoJobStore`])
//! for deployments and a journal of JSON files ([`local::LocalJournal`]) as the embedded default.

pub mod dynamodb;
pub(crate) mod local;
pub(crate) mod report;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::batch::BatchSummary;
pub use crate::batch::CloseReason;

/// Where a job is in its life. The names (OPEN, ..., COMPLETED_WITH_ERRORS) are the same in job
/// records, in the state machine and on the command line (`jobs list --status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    Open,
    Closed,
    Submitted,
    Importing,
    /// HealthImaging finished the import; its outcome (job-output-manifest.json) is not read yet.
    Imported,
    Completed,
    CompletedWithErrors,
    Failed,
}

impl JobStatus {
    pub(crate) const ALL: [JobStatus; 8] = [
        Self::Open,
        Self::Closed,
        Self::Submitted,
        Self::Importing,
        Self::Imported,
        Self::Completed,
        Self::CompletedWithErrors,
        Self::Failed,
    ];

    fn rank(self) -> u8 {
        match self {
            Self::Open => 0,
            Self::Closed => 1,
            Self::Submitted => 2,
            Self::Importing => 3,
            Self::Imported => 4,
            Self::Completed | Self::CompletedWithErrors | Self::Failed => 5,
        }
    }

    pub fn is_terminal(self) -> bool {
        self.rank() == 5
    }

    /// Whether a job in `self` may move to `next`. Only forward, never out of a final status.
    pub(crate) fn can_move_to(self, next: JobStatus) -> bool {
        next.rank() > self.rank()
    }

    /// The statuses a job may be in for a move to `self` (for conditional updates).
    pub(crate) fn predecessors(self) -> Vec<JobStatus> {
        Self::ALL
            .into_iter()
            .filter(|s| s.can_move_to(self))
            .collect()
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Closed => "CLOSED",
            Self::Submitted => "SUBMITTED",
            Self::Importing => "IMPORTING",
            Self::Imported => "IMPORTED",
            Self::Completed => "COMPLETED",
            Self::CompletedWithErrors => "COMPLETED_WITH_ERRORS",
            Self::Failed => "FAILED",
        }
    }

    /// The status named exactly `s` (as stored in job records).
    pub(crate) fn parse(s: &str) -> Option<JobStatus> {
        <Self as clap::ValueEnum>::from_str(s, false).ok()
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything recorded about one job. Field names are the DynamoDB attribute names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub job_id: String,
    pub status: JobStatus,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<CloseReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub study_instance_uids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calling_ae_titles: Vec<String>,
    /// The batch's objects: the import input (`s3://bucket/prefix/jobId/`; on the local store, its
    /// directory). The same name as HealthImaging's `inputS3Uri` and the state machine's input.
    pub input_s3_uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_s3_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// When the state machine saw HealthImaging's import end (it records IMPORTED after, retrying
    /// for over an hour if need be; the wait for the results counts from
    /// [`Job::outcome_claimed_at`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_ended_at: Option<String>,
    /// Files the import looked at (`numberOfScannedFiles` of its job-output-manifest.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned_count: Option<u64>,
    /// Files imported (`numberOfImportedFiles`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_count: Option<u64>,
    /// Files HealthImaging refused: `customerErrorCount` + `serverErrorCount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_count: Option<u64>,
    /// Files refused for what they contain (`numberOfFilesWithCustomerError`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_error_count: Option<u64>,
    /// Files refused by a HealthImaging fault (`numberOfFilesWithServerError`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_error_count: Option<u64>,
    /// Image sets the import created or updated (`numberOfGeneratedImageSets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_set_count: Option<u64>,
    /// The first [`IMAGE_SET_IDS_KEPT`] image sets of the manifest's `imageSetsSummary` (all of
    /// them for a typical batch; `imageSetCount` has the total).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_set_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<String>,
    /// Which gateway is reading this IMPORTED job's outcome, and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<OutcomeClaim>,
    /// When a gateway first claimed this IMPORTED job's outcome (kept when the claim is released
    /// or taken over): the outcome reader's waits count from here rather than from
    /// `importEndedAt`, which can be long past (or missing) when the job becomes IMPORTED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_claimed_at: Option<String>,
}

/// How many image set ids a job keeps: a job record stays small (a DynamoDB item is at most
/// 400 KB) whatever the size of the import; per-instance image sets are the instance index's.
pub const IMAGE_SET_IDS_KEPT: usize = 100;

/// The right to finish one IMPORTED job, held by one gateway until it expires, so that exactly one
/// gateway of the fleet records the outcome and a gateway that dies midway is replaced by the
/// next one to look once the claim has expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutcomeClaim {
    pub gateway_id: String,
    /// RFC 3339 UTC with milliseconds (`2026-11-23T10:00:00.000Z`), the form every writer uses, so
    /// that comparing the strings (as DynamoDB's condition does) compares the times.
    pub expires_at: String,
}

impl Job {
    /// Whether `gateway_id` may take the outcome claim at `now` (same form as
    /// [`OutcomeClaim::expires_at`]): the job is IMPORTED and unclaimed, already claimed by this
    /// gateway, or its claim has expired. The stores apply exactly this rule atomically.
    pub(crate) fn outcome_claimable_by(&self, gateway_id: &str, now: &str) -> bool {
        self.status == JobStatus::Imported
            && match &self.claim {
                None => true,
                Some(c) => c.gateway_id == gateway_id || c.expires_at.as_str() < now,
            }
    }
}

impl Job {
    /// Sets what `outcome` records: the status, counts, image set ids, message and end time; the
    /// claim is dropped.
    pub(crate) fn apply_outcome(&mut self, outcome: &ImportOutcome) {
        self.status = outcome.status;
        if let Some(c) = outcome.counts {
            self.scanned_count = c.scanned;
            self.imported_count = Some(c.imported);
            self.failed_count = Some(c.failed());
            self.customer_error_count = Some(c.customer_errors);
            self.server_error_count = Some(c.server_errors);
            self.image_set_count = c.image_sets;
        }
        if !outcome.image_set_ids.is_empty() {
            self.image_set_ids = outcome.image_set_ids.clone();
        }
        self.message = outcome.message.clone().or(self.message.take());
        self.ended_at = Some(outcome.ended_at.clone());
        self.claim = None;
    }
}

/// The file counts of a finished import, from its job-output-manifest.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ImportCounts {
    pub scanned: Option<u64>,
    pub imported: u64,
    pub customer_errors: u64,
    pub server_errors: u64,
    pub image_sets: Option<u64>,
}

impl ImportCounts {
    /// Files HealthImaging refused, for whatever reason.
    pub(crate) fn failed(&self) -> u64 {
        self.customer_errors.saturating_add(self.server_errors)
    }
}

/// What ends an IMPORTED job: its final status, with the counts when the manifest was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImportOutcome {
    /// COMPLETED, COMPLETED_WITH_ERRORS or FAILED.
    pub status: JobStatus,
    pub counts: Option<ImportCounts>,
    pub image_set_ids: Vec<String>,
    pub message: Option<String>,
    pub ended_at: String,
}

impl Job {
    /// A job for a batch that has just opened.
    pub fn opened(job_id: &str, created_at: &str, input_s3_uri: &str, gateway_id: &str) -> Job {
        Job {
            job_id: job_id.to_string(),
            status: JobStatus::Open,
            created_at: created_at.to_string(),
            closed_at: None,
            close_reason: None,
            instance_count: None,
            total_bytes: None,
            study_instance_uids: Vec::new(),
            calling_ae_titles: Vec::new(),
            input_s3_uri: input_s3_uri.to_string(),
            output_s3_uri: None,
            datastore_id: None,
            execution_arn: None,
            import_job_id: None,
            submitted_at: None,
            ended_at: None,
            import_ended_at: None,
            scanned_count: None,
            imported_count: None,
            failed_count: None,
            customer_error_count: None,
            server_error_count: None,
            image_set_count: None,
            image_set_ids: Vec::new(),
            message: None,
            gateway_id: Some(gateway_id.to_string()),
            claim: None,
            outcome_claimed_at: None,
        }
    }

    /// The job for a closed batch.
    pub(crate) fn closed(batch: &BatchSummary, gateway_id: &str) -> Job {
        let mut job = Job::opened(
            &batch.job_id,
            &batch.created_at,
            &batch.input_s3_uri,
            gateway_id,
        );
        job.status = JobStatus::Closed;
        job.closed_at = Some(batch.closed_at.clone());
        job.close_reason = Some(batch.close_reason);
        job.instance_count = Some(batch.instance_count as u64);
        job.total_bytes = Some(batch.total_bytes);
        job.study_instance_uids = batch.study_instance_uids.clone();
        job.calling_ae_titles = batch.calling_ae_titles.clone();
        job
    }
}

/// Why a job store call failed; `NotForward` means another writer already moved the job on.
#[derive(Debug, Error)]
pub enum JobStoreError {
    #[error("job journal I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("job record cannot be encoded or decoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("DynamoDB {operation} failed: {message}")]
    Dynamo {
        operation: &'static str,
        message: String,
        /// Whether the same call may succeed later ([`crate::aws::is_retriable`]).
        retriable: bool,
    },
    #[error("job {job_id} is {current}; it cannot move to {wanted}")]
    NotForward {
        job_id: String,
        current: String,
        wanted: JobStatus,
    },
    #[error("job {0} does not exist")]
    NotFound(String),
    #[error("job {0} is IMPORTED but its outcome is claimed by another gateway")]
    ClaimLost(String),
    #[error("job record is malformed: {0}")]
    Malformed(String),
}

/// What a transition sets besides the status.
#[derive(Debug, Clone, Default)]
pub(crate) struct Transition {
    pub execution_arn: Option<String>,
    pub submitted_at: Option<String>,
    pub message: Option<String>,
    pub output_s3_uri: Option<String>,
    pub datastore_id: Option<String>,
}

/// Where job records live (DynamoDB or the local journal), with forward-only status moves.
#[async_trait]
pub(crate) trait JobStore: Send + Sync + 'static {
    /// Records a batch that has just opened. A job that already exists is left alone.
    async fn record_open(&self, job: &Job) -> Result<(), JobStoreError>;

    /// Records a closed batch with its counts: moves OPEN to CLOSED, or creates the job as CLOSED if
    /// the OPEN record never made it. A job already CLOSED or beyond is left alone.
    async fn record_closed(&self, job: &Job) -> Result<(), JobStoreError>;

    /// Adopts a batch its gateway left OPEN: replaces the record with `closed` (CLOSED, counted
    /// from the stored objects, owned by the adopting gateway), but only if the job is still OPEN
    /// and still owned by `previous_owner`. Returns whether this call did it: when several gateways
    /// run recovery at once, exactly one adopts each orphan.
    async fn adopt(
        &self,
        closed: &Job,
        previous_owner: Option<&str>,
    ) -> Result<bool, JobStoreError>;

    /// Moves a job forward to `to`, setting the fields in `t`. Fails with
    /// [`JobStoreError::NotForward`] when the job is already at `to` or beyond.
    async fn transition(
        &self,
        job_id: &str,
        to: JobStatus,
        t: Transition,
    ) -> Result<(), JobStoreError>;

    /// Takes (or renews) the outcome claim of an IMPORTED job, if
    /// [`Job::outcome_claimable_by`] holds at `now`, atomically, and sets
    /// [`Job::outcome_claimed_at`] to `now` if it is not set yet. `Ok(false)`: another gateway
    /// holds it, or the job is no longer IMPORTED.
    async fn claim_outcome(
        &self,
        job_id: &str,
        claim: &OutcomeClaim,
        now: &str,
    ) -> Result<bool, JobStoreError>;

    /// Gives up `gateway_id`'s outcome claim on a job (its results are not readable yet), so that
    /// any gateway may try next time instead of waiting for the claim to expire. A claim that is
    /// not this gateway's is left alone.
    async fn release_outcome(&self, job_id: &str, gateway_id: &str) -> Result<(), JobStoreError>;

    /// Ends an IMPORTED job with its outcome and drops the claim, only if the job is still
    /// IMPORTED and `gateway_id` holds its claim: [`JobStoreError::NotForward`] when it has ended
    /// already, [`JobStoreError::ClaimLost`] when another gateway took over.
    async fn record_outcome(
        &self,
        job_id: &str,
        gateway_id: &str,
        outcome: &ImportOutcome,
    ) -> Result<(), JobStoreError>;

    async fn get(&self, job_id: &str) -> Result<Option<Job>, JobStoreError>;

    /// Jobs in `status`, oldest first.
    async fn list_by_status(&self, status: JobStatus) -> Result<Vec<Job>, JobStoreError>;

    /// The most recent jobs (by creation), newest first.
    async fn list_recent(&self, limit: usize) -> Result<Vec<Job>, JobStoreError>;

    /// A cheap call that succeeds only if the store is reachable and usable (readiness).
    async fn check(&self) -> Result<(), JobStoreError>;

    fn describe(&self) -> String;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A job of `gateway`, CLOSED at `closed_at`, for the tests of the modules that act on jobs.
    pub(crate) fn closed_job(gateway: &str, closed_at: &str) -> Job {
        let mut job = Job::opened(
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N",
            "2026-11-23T10:00:00.000Z",
            "s3://bucket/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/",
            gateway,
        );
        job.status = JobStatus::Closed;
        job.closed_at = Some(closed_at.into());
        job
    }

    use JobStatus::*;

    #[test]
    fn status_only_moves_forward() {
        assert!(Open.can_move_to(Closed));
        assert!(Closed.can_move_to(Submitted));
        assert!(
            Closed.can_move_to(Importing),
            "the state machine may record IMPORTING before the gateway records SUBMITTED"
        );
        assert!(Submitted.can_move_to(Importing));
        assert!(Importing.can_move_to(Imported));
        assert!(Imported.can_move_to(Completed));
        assert!(Imported.can_move_to(CompletedWithErrors));
        assert!(Imported.can_move_to(Failed));
        assert!(!Imported.can_move_to(Importing));
        assert!(!Imported.is_terminal(), "the outcome is still to be read");
        assert!(Submitted.can_move_to(Failed));
        assert!(!Closed.can_move_to(Open));
        assert!(!Submitted.can_move_to(Submitted));
        assert!(!Importing.can_move_to(Submitted));
        for end in [Completed, CompletedWithErrors, Failed] {
            assert!(end.is_terminal());
            for s in JobStatus::ALL {
                assert!(!end.can_move_to(s), "{end} is final");
            }
        }
    }

    #[test]
    fn predecessors_are_the_earlier_statuses() {
        assert_eq!(Closed.predecessors(), vec![Open]);
        assert_eq!(Submitted.predecessors(), vec![Open, Closed]);
        assert_eq!(
            Failed.predecessors(),
            vec![Open, Closed, Submitted, Importing, Imported]
        );
        assert_eq!(
            Imported.predecessors(),
            vec![Open, Closed, Submitted, Importing]
        );
        assert!(Open.predecessors().is_empty());
    }

    #[test]
    fn names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            let value = clap::ValueEnum::to_possible_value(&s).unwrap();
            assert_eq!(value.get_name(), s.as_str());
        }
        assert_eq!(JobStatus::parse("DONE"), None);
        assert_eq!(
            JobStatus::parse("completed"),
            None,
            "records hold exact names"
        );
        assert_eq!(
            <JobStatus as clap::ValueEnum>::value_variants(),
            JobStatus::ALL.as_slice()
        );
    }

    #[test]
    fn only_an_imported_job_unclaimed_or_with_an_expired_claim_can_be_claimed() {
        let now = "2026-11-23T10:05:00.000Z";
        let mut job = Job::opened("J", "2026-11-23T10:00:00.000Z", "/x/", "gw-a");
        job.status = Importing;
        assert!(!job.outcome_claimable_by("gw-a", now), "not finished yet");
        job.status = Imported;
        assert!(job.outcome_claimable_by("gw-a", now), "unclaimed");
        job.claim = Some(OutcomeClaim {
            gateway_id: "gw-b".into(),
            expires_at: "2026-11-23T10:05:00.001Z".into(),
        });
        assert!(!job.outcome_claimable_by("gw-a", now), "gw-b's claim runs");
        assert!(
            job.outcome_claimable_by("gw-b", now),
            "its holder renews it"
        );
        assert!(
            job.outcome_claimable_by("gw-a", "2026-11-23T10:05:00.002Z"),
            "an expired claim (its holder died midway) is taken over"
        );
        job.status = Completed;
        job.claim = None;
        assert!(!job.outcome_claimable_by("gw-a", now), "already finished");
    }

    #[test]
    fn an_outcome_sets_the_counts_and_drops_the_claim() {
        let mut job = Job::opened("J", "2026-11-23T10:00:00.000Z", "/x/", "gw-a");
        job.status = Imported;
        job.claim = Some(OutcomeClaim {
            gateway_id: "gw-a".into(),
            expires_at: "2026-11-23T10:07:00.000Z".into(),
        });
        job.apply_outcome(&ImportOutcome {
            status: CompletedWithErrors,
            counts: Some(ImportCounts {
                scanned: Some(5),
                imported: 3,
                customer_errors: 1,
                server_errors: 1,
                image_sets: Some(2),
            }),
            image_set_ids: vec!["a".into(), "b".into()],
            message: Some("2 file(s) failed".into()),
            ended_at: "2026-11-23T10:06:00.000Z".into(),
        });
        assert_eq!(job.status, CompletedWithErrors);
        assert_eq!(
            (job.scanned_count, job.imported_count, job.failed_count),
            (Some(5), Some(3), Some(2))
        );
        assert_eq!(
            (
                job.customer_error_count,
                job.server_error_count,
                job.image_set_count
            ),
            (Some(1), Some(1), Some(2))
        );
        assert_eq!(job.image_set_ids, vec!["a", "b"]);
        assert_eq!(job.claim, None);
        let json = serde_json::to_value(&job).unwrap();
        for name in [
            "scannedCount",
            "importedCount",
            "failedCount",
            "customerErrorCount",
            "serverErrorCount",
            "imageSetCount",
            "imageSetIds",
            "endedAt",
        ] {
            assert!(json.get(name).is_some(), "{name} in {json}");
        }
    }

    #[test]
    fn a_closed_job_carries_the_batch_counts() {
        let batch = BatchSummary {
            job_id: "01JD6Y7Z8X9W0V1T2S3R4Q5P6N".into(),
            created_at: "2026-11-23T10:00:00.000Z".into(),
            closed_at: "2026-11-23T10:00:30.000Z".into(),
            close_reason: CloseReason::MaxInstances,
            instance_count: 3,
            total_bytes: 99,
            study_instance_uids: vec!["1.2".into()],
            calling_ae_titles: vec!["CT1".into()],
            input_s3_uri: "s3://b/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/".into(),
        };
        let job = Job::closed(&batch, "gw-1");
        assert_eq!(job.status, Closed);
        assert_eq!(job.instance_count, Some(3));
        assert_eq!(job.close_reason, Some(CloseReason::MaxInstances));
        assert_eq!(job.gateway_id.as_deref(), Some("gw-1"));
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(
            json["inputS3Uri"],
            "s3://b/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/"
        );
        assert_eq!(json["status"], "CLOSED");
        assert_eq!(json["closeReason"], "max-instances");
        assert!(json.get("executionArn").is_none());
    }
}

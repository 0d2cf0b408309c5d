//! From closed batch to HealthImaging import: recording jobs and starting the import state machine.
//!
//! The [`Pipeline`] receives batch events from the [`crate::batch::Batcher`] and, off the receive
//! path, records each batch in the job store (OPEN when it opens, CLOSED with its counts when it
//! closes), then starts the import through the [`ImportTrigger`] and records SUBMITTED. Each step is
//! retried with exponential backoff until it succeeds; none of it can fail a C-STORE, because the
//! instances were acknowledged when they became durable, before any of this.
//!
//! Starting is idempotent: the Step Functions execution is named after the job id (a second start
//! answers `ExecutionAlreadyExists`, which counts as success) and the state machine passes the job
//! id as HealthImaging's `ClientToken`. That makes start-up recovery safe: jobs left CLOSED by a
//! crash between recording and starting are simply started again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::json;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::batch::BatchEvent;
use crate::jobs::{Job, JobStatus, JobStore, JobStoreError, Transition};
use crate::metrics::metrics;
use prometheus_client::metrics::counter::Counter;

#[derive(Debug, Error)]
pub(crate) enum ImportError {
    #[error("Step Functions StartExecution failed: {0}")]
    StartExecution(String),
    #[error("Step Functions DescribeStateMachine failed: {0}")]
    Describe(String),
}

/// What a started import is recorded with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Started {
    pub execution_arn: String,
    pub output_s3_uri: String,
    pub datastore_id: String,
}

#[async_trait]
pub(crate) trait ImportTrigger: Send + Sync + 'static {
    /// Starts the import of `job`. Starting the same job twice must be harmless.
    async fn start(&self, job: &Job) -> Result<Started, ImportError>;
    /// A cheap call that succeeds only if the trigger is reachable and usable (readiness).
    async fn check(&self) -> Result<(), ImportError>;
    fn describe(&self) -> String;
}

/// The settings the import state machine needs, passed in each execution's input.
#[derive(Debug, Clone)]
pub(crate) struct ImportSettings {
    pub datastore_id: String,
    pub data_access_role_arn: String,
    /// Bucket and key prefix for HealthImaging's output (`{resultsPrefix}{jobId}/`).
    pub results_bucket: String,
    pub results_prefix: String,
    pub table_name: String,
    pub poll_interval: Duration,
    pub max_polls: u32,
}

/// Least time between two import starts of one gateway. Each execution calls
/// `StartDICOMImportJob`, which HealthImaging throttles at 1 request per second with a burst of 2
/// per account ("AWS HealthImaging throttling limits",
/// https://docs.aws.amazon.com/healthimaging/latest/devguide/throttling-limits.html; see
/// docs/aws-facts.md §2). A recovery burst of many CLOSED jobs is spread out here, and the state
/// machine's jittered retries absorb what several gateways together still send.
pub(crate) const START_INTERVAL: Duration = Duration::from_secs(1);

/// Spaces out events so that no two are closer than an interval (a one-token bucket).
#[derive(Debug)]
pub(crate) struct Pacer {
    interval: Duration,
    /// When the next event may happen.
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    pub(crate) fn new(interval: Duration) -> Self {
        Pacer {
            interval,
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for this caller's turn. Callers are served in order (the lock is fair).
    pub(crate) async fn wait(&self) {
        let mut next = self.next.lock().await;
        tokio::time::sleep_until(*next).await;
        *next = tokio::time::Instant::now() + self.interval;
    }
}

/// Starts the import state machine in `infra/` (Step Functions `StartExecution`).
pub(crate) struct StepFunctionsTrigger {
    client: aws_sdk_sfn::Client,
    state_machine_arn: String,
    settings: ImportSettings,
    /// At most one start per [`START_INTERVAL`] from this gateway.
    pacer: Pacer,
}

impl StepFunctionsTrigger {
    pub(crate) fn new(
        client: aws_sdk_sfn::Client,
        state_machine_arn: String,
        settings: ImportSettings,
    ) -> Self {
        StepFunctionsTrigger {
            client,
            state_machine_arn,
            settings,
            pacer: Pacer::new(START_INTERVAL),
        }
    }
}

/// The output location of a job's import: `s3://{bucket}/{resultsPrefix}{jobId}/`.
pub(crate) fn output_s3_uri(settings: &ImportSettings, job_id: &str) -> String {
    format!(
        "s3://{}/{}{job_id}/",
        settings.results_bucket, settings.results_prefix
    )
}

/// The execution input: everything the state machine needs, so its definition stays generic.
pub(crate) fn execution_input(job: &Job, settings: &ImportSettings) -> serde_json::Value {
    json!({
        "jobId": job.job_id,
        "datastoreId": settings.datastore_id,
        "dataAccessRoleArn": settings.data_access_role_arn,
        "inputS3Uri": job.input_s3_uri,
        "outputS3Uri": output_s3_uri(settings, &job.job_id),
        "tableName": settings.table_name,
        "pollIntervalSeconds": settings.poll_interval.as_secs().max(1),
        "maxPolls": settings.max_polls,
    })
}

/// The ARN of execution `name` of a state machine. A `#TestCase` suffix (LocalStack's mocked
/// service integrations) is dropped.
pub(crate) fn execution_arn(state_machine_arn: &str, name: &str) -> String {
    let base = state_machine_arn
        .split('#')
        .next()
        .unwrap_or(state_machine_arn);
    format!(
        "{}:{name}",
        base.replacen(":stateMachine:", ":execution:", 1)
    )
}

#[async_trait]
impl ImportTrigger for StepFunctionsTrigger {
    async fn start(&self, job: &Job) -> Result<Started, ImportError> {
        self.pacer.wait().await;
        let input = execution_input(job, &self.settings);
        let started = Started {
            execution_arn: execution_arn(&self.state_machine_arn, &job.job_id),
            output_s3_uri: output_s3_uri(&self.settings, &job.job_id),
            datastore_id: self.settings.datastore_id.clone(),
        };
        let r = self
            .client
            .start_execution()
            .state_machine_arn(&self.state_machine_arn)
            .name(&job.job_id)
            .input(input.to_string())
            .send()
            .await;
        match r {
            Ok(out) => Ok(Started {
                execution_arn: out.execution_arn().to_string(),
                ..started
            }),
            // The same job was started before: the idempotent name makes that a success.
            Err(e) if crate::aws::code(&e) == Some("ExecutionAlreadyExists") => Ok(started),
            Err(e) => Err(ImportError::StartExecution(crate::aws::describe(&e))),
        }
    }

    async fn check(&self) -> Result<(), ImportError> {
        let arn = self
            .state_machine_arn
            .split('#')
            .next()
            .unwrap_or(&self.state_machine_arn);
        self.client
            .describe_state_machine()
            .state_machine_arn(arn)
            .send()
            .await
            .map_err(|e| ImportError::Describe(crate::aws::describe(&e)))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("Step Functions state machine {}", self.state_machine_arn)
    }
}

/// Records batches and starts their imports. One per process.
pub(crate) struct Pipeline {
    jobs: Arc<dyn JobStore>,
    trigger: Option<Arc<dyn ImportTrigger>>,
    /// This gateway's name in the job records it writes.
    gateway_id: String,
    /// Longest pause between retries of a job store or trigger call.
    max_backoff: Duration,
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Pipeline {
    pub(crate) fn new(
        jobs: Arc<dyn JobStore>,
        trigger: Option<Arc<dyn ImportTrigger>>,
        gateway_id: String,
        max_backoff: Duration,
    ) -> Arc<Self> {
        Arc::new(Pipeline {
            jobs,
            trigger,
            gateway_id,
            max_backoff,
        })
    }

    /// Whether closed jobs are imported (a trigger is configured) or stay CLOSED.
    pub(crate) fn imports(&self) -> bool {
        self.trigger.is_some()
    }

    /// Retries `op` with exponential backoff until it succeeds (or the task is dropped at shutdown).
    async fn retry<T, E: std::fmt::Display, F, Fut>(
        &self,
        what: &str,
        job_id: &str,
        errors: &Counter,
        mut op: F,
    ) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1u32;
        loop {
            match op().await {
                Ok(v) => return v,
                Err(e) => {
                    errors.inc();
                    warn!(job_id, attempt, error = %e, retry_in = ?delay, "{what} failed; will retry");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_backoff);
                    attempt += 1;
                }
            }
        }
    }

    /// Handles batch events until the channel closes, then waits for the work in progress.
    pub(crate) async fn run(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<BatchEvent>) {
        let mut tasks = JoinSet::new();
        while let Some(event) = events.recv().await {
            let me = self.clone();
            tasks.spawn(async move { me.handle(event).await });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn handle(&self, event: BatchEvent) {
        match event {
            BatchEvent::Opened {
                job_id,
                created_at,
                input_s3_uri,
            } => {
                let job = Job::opened(&job_id, &created_at, &input_s3_uri, &self.gateway_id);
                self.retry(
                    "recording the opened job",
                    &job_id,
                    &metrics().job_store_errors,
                    || self.jobs.record_open(&job),
                )
                .await;
            }
            BatchEvent::Closed(batch) => {
                let job = Job::closed(&batch, &self.gateway_id);
                self.retry(
                    "recording the closed job",
                    &job.job_id,
                    &metrics().job_store_errors,
                    || self.jobs.record_closed(&job),
                )
                .await;
                info!(job_id = %job.job_id, instances = batch.instance_count, "job recorded as CLOSED");
                self.submit(&job).await;
            }
        }
    }

    /// Starts the import of a CLOSED job and records SUBMITTED. Without a trigger, does nothing:
    /// the job stays CLOSED (the embedded default).
    pub(crate) async fn submit(&self, job: &Job) {
        let Some(trigger) = &self.trigger else { return };
        let started = self
            .retry(
                "starting the import",
                &job.job_id,
                &metrics().import_trigger_errors,
                || trigger.start(job),
            )
            .await;
        let transition = Transition {
            execution_arn: Some(started.execution_arn.clone()),
            submitted_at: Some(now_rfc3339()),
            output_s3_uri: Some(started.output_s3_uri.clone()),
            datastore_id: Some(started.datastore_id.clone()),
            message: None,
        };
        let recorded = self
            .retry(
                "recording SUBMITTED",
                &job.job_id,
                &metrics().job_store_errors,
                || async {
                    match self
                        .jobs
                        .transition(&job.job_id, JobStatus::Submitted, transition.clone())
                        .await
                    {
                        // The state machine got there first (IMPORTING or beyond): nothing to record.
                        Err(JobStoreError::NotForward { .. }) => Ok(false),
                        other => other.map(|()| true),
                    }
                },
            )
            .await;
        metrics().batches_submitted.inc();
        info!(job_id = %job.job_id, execution_arn = %started.execution_arn, recorded, "import started");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ImportSettings {
        ImportSettings {
            datastore_id: "ds123".into(),
            data_access_role_arn: "arn:aws:iam::123456789012:role/access".into(),
            results_bucket: "bucket".into(),
            results_prefix: "results/".into(),
            table_name: "jobs".into(),
            poll_interval: Duration::from_secs(30),
            max_polls: 240,
        }
    }

    fn closed_job(gateway: &str, closed_at: &str) -> Job {
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

    #[test]
    fn execution_input_carries_everything_the_state_machine_needs() {
        let job = closed_job("gw", "2026-11-23T10:00:30.000Z");
        let input = execution_input(&job, &settings());
        assert_eq!(input["jobId"], job.job_id);
        assert_eq!(
            input["inputS3Uri"],
            "s3://bucket/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/"
        );
        assert_eq!(
            input["outputS3Uri"],
            "s3://bucket/results/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/"
        );
        assert!(
            input.get("resultsKeyPrefix").is_none(),
            "the gateway, not the state machine, reads the results (src/outcome.rs)"
        );
        assert_eq!(input["datastoreId"], "ds123");
        assert_eq!(input["tableName"], "jobs");
        assert_eq!(input["pollIntervalSeconds"], 30);
        assert_eq!(input["maxPolls"], 240);
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_starts_by_its_interval() {
        let pacer = Arc::new(Pacer::new(Duration::from_secs(1)));
        let t0 = tokio::time::Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..3 {
            let p = pacer.clone();
            tasks.spawn(async move {
                p.wait().await;
                tokio::time::Instant::now()
            });
        }
        let mut times: Vec<Duration> = tasks.join_all().await.iter().map(|t| *t - t0).collect();
        times.sort();
        assert_eq!(
            times,
            vec![
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(2)
            ]
        );
    }

    #[test]
    fn execution_arns_follow_the_state_machine() {
        assert_eq!(
            execution_arn("arn:aws:states:us-east-1:123:stateMachine:import", "J1"),
            "arn:aws:states:us-east-1:123:execution:import:J1"
        );
        assert_eq!(
            execution_arn(
                "arn:aws:states:us-east-1:123:stateMachine:import#HappyPath",
                "J1"
            ),
            "arn:aws:states:us-east-1:123:execution:import:J1"
        );
    }
}

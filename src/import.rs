//! From closed batch to HealthImaging import: recording jobs and starting the import state machine.
//!
//! The [`Pipeline`] receives batch events from the [`crate::batch::Batcher`] and, off the receive
//! path, records each batch in the job store (OPEN when it opens, CLOSED with its counts when it
//! closes), then starts the import through the [`ImportTrigger`] and records SUBMITTED. None of it
//! can fail a C-STORE, because the instances were acknowledged when they became durable, before any
//! of this.
//!
//! Each step is retried ([`Pipeline::retry`]) with exponential backoff and full jitter, so a fleet
//! that lost the same dependency at the same moment does not retry in lockstep. Errors are
//! classified ([`RetryLogic`]): transient ones (throttling, 5xx, timeouts, lost connections) are
//! retried until they pass; a permanent one (access denied, validation, a missing table or state
//! machine) is logged once at ERROR, and then, per step:
//! - recording OPEN: given up (recording CLOSED creates the job if the OPEN record never made it);
//! - recording CLOSED: kept trying at the longest backoff, quietly: it is the batch's only record,
//!   and a corrected IAM policy or table must let it through without a restart;
//! - starting the import: given up; the job stays CLOSED (its instances are acknowledged) and
//!   periodic recovery tries again every `--recovery-interval`, so a corrected policy or state
//!   machine takes effect without a restart and without a tight loop;
//! - recording SUBMITTED: given up; the job stays CLOSED and periodic recovery starts it again
//!   (idempotently) later.
//!
//! Starting is idempotent: the Step Functions execution is named after the job id (a second start
//! answers `ExecutionAlreadyExists`, which counts as success) and the state machine passes the job
//! id as HealthImaging's `ClientToken`. That makes start-up recovery safe: jobs left CLOSED by a
//! crash between recording and starting are simply started again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::batch::BatchEvent;
use crate::clock::now_rfc3339;
use crate::jobs::{Job, JobStatus, JobStore, JobStoreError, Transition};
use crate::metrics::metrics;
use prometheus_client::metrics::counter::Counter;

/// Why an import could not be started or checked (retried by the pipeline).
#[derive(Debug, Error)]
pub(crate) enum ImportError {
    #[error("Step Functions StartExecution failed: {message}")]
    StartExecution {
        message: String,
        /// Whether the same call may succeed later ([`crate::aws::is_retriable`]).
        retriable: bool,
    },
    #[error("Step Functions DescribeStateMachine failed: {0}")]
    Describe(String),
}

/// Tells the retry loop whether an error may go away by itself (the seam of vector's
/// `RetryLogic`): each error type of a retried step says so for its own failures.
pub(crate) trait RetryLogic {
    fn is_retriable(&self) -> bool;
}

impl RetryLogic for ImportError {
    fn is_retriable(&self) -> bool {
        match self {
            ImportError::StartExecution { retriable, .. } => *retriable,
            ImportError::Describe(_) => true,
        }
    }
}

impl RetryLogic for JobStoreError {
    fn is_retriable(&self) -> bool {
        match self {
            JobStoreError::Dynamo { retriable, .. } => *retriable,
            // A full disk or a busy file system can clear; a directory the gateway may not write
            // to will not.
            JobStoreError::Io(e) => e.kind() != std::io::ErrorKind::PermissionDenied,
            JobStoreError::Encode(_)
            | JobStoreError::NotForward { .. }
            | JobStoreError::NotFound(_)
            | JobStoreError::ClaimLost(_)
            | JobStoreError::Malformed(_) => false,
        }
    }
}

/// What a retried step does once it meets a permanent error (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnPermanent {
    /// Returns the error to the caller.
    GiveUp,
    /// Keeps trying at the longest backoff, logging further failures at DEBUG only.
    KeepTrying,
}

/// First pause of a retry loop; it doubles with each failure up to the pipeline's `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// A random duration in `[0, max)`: the jitter of retries and of periodic recovery. The random bits
/// are a fresh ULID's 80 random bits (from `rand`'s OS-seeded thread generator): the `ulid` crate is
/// already here for job ids, so jitter needs no new dependency.
pub(crate) fn random_below(max: Duration) -> Duration {
    // 53 random bits: exactly representable, so the fraction is in [0, 1).
    let bits = (ulid::Ulid::generate().random() & ((1u128 << 53) - 1)) as u64;
    let fraction = bits as f64 / (1u64 << 53) as f64;
    max.mul_f64(fraction)
}

/// The pause before retry number `attempt` (1 for the first retry): "full jitter", a random
/// duration between zero and the exponential backoff `min(cap, base * 2^(attempt-1))`, as the
/// AWS SDKs' standard retry mode does ("Retry behavior",
/// https://docs.aws.amazon.com/sdkref/latest/guide/feature-retry-behavior.html: exponential backoff
/// with jitter) and as Step Functions' `JitterStrategy: FULL` does (docs/aws-facts.md item 2).
pub(crate) fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let exponential = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    random_below(exponential.min(cap))
}

/// What a started import is recorded with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Started {
    pub execution_arn: String,
    pub output_s3_uri: String,
    pub datastore_id: String,
}

/// Starts imports: the seam between the gateway and whatever runs them (Step Functions).
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
            Err(e) => Err(ImportError::StartExecution {
                message: crate::aws::describe(&e),
                retriable: crate::aws::is_retriable(&e),
            }),
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
    /// Jobs whose import this process is starting now.
    in_flight: Mutex<HashSet<String>>,
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
            in_flight: Mutex::new(HashSet::new()),
        })
    }

    /// Whether closed jobs are imported (a trigger is configured) or stay CLOSED.
    pub(crate) fn imports(&self) -> bool {
        self.trigger.is_some()
    }

    /// Runs `op` until it succeeds, pausing between attempts with exponential backoff and full
    /// jitter ([`full_jitter`]). Transient errors ([`RetryLogic`]) are retried until they pass (or
    /// the task is dropped at shutdown). A permanent error is logged once at ERROR; then
    /// `on_permanent` says whether it is returned or the step keeps trying at the longest backoff.
    async fn retry<T, E, F, Fut>(
        &self,
        what: &str,
        job_id: &str,
        errors: &Counter,
        on_permanent: OnPermanent,
        mut op: F,
    ) -> Result<T, E>
    where
        E: std::fmt::Display + RetryLogic,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut attempt = 1u32;
        let mut reported_permanent = false;
        loop {
            let e = match op().await {
                Ok(v) => {
                    if reported_permanent {
                        info!(
                            job_id,
                            attempt, "{what} succeeded after the permanent error"
                        );
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            errors.inc();
            let delay = if e.is_retriable() {
                let delay = full_jitter(FIRST_BACKOFF, self.max_backoff, attempt);
                warn!(job_id, attempt, error = %e, retry_in = ?delay, "{what} failed; will retry");
                delay
            } else if on_permanent == OnPermanent::GiveUp {
                error!(job_id, attempt, error = %e, "{what} failed with a permanent error; not retrying");
                return Err(e);
            } else {
                let delay = self.max_backoff / 2 + random_below(self.max_backoff / 2);
                if reported_permanent {
                    debug!(job_id, attempt, error = %e, retry_in = ?delay, "{what} still failing");
                } else {
                    reported_permanent = true;
                    error!(job_id, attempt, error = %e, "{what} failed with a permanent error; retrying every ~{:?} until it is fixed", self.max_backoff);
                }
                delay
            };
            tokio::time::sleep(delay).await;
            attempt = attempt.saturating_add(1);
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
                // Given up on a permanent error: recording CLOSED creates the job if need be.
                let _ = self
                    .retry(
                        "recording the opened job",
                        &job_id,
                        &metrics().job_store_errors,
                        OnPermanent::GiveUp,
                        || self.jobs.record_open(&job),
                    )
                    .await;
            }
            BatchEvent::Closed(batch) => {
                let job = Job::closed(&batch, &self.gateway_id);
                let recorded = self
                    .retry(
                        "recording the closed job",
                        &job.job_id,
                        &metrics().job_store_errors,
                        OnPermanent::KeepTrying,
                        || self.jobs.record_closed(&job),
                    )
                    .await;
                if recorded.is_err() {
                    return; // unreachable with KeepTrying
                }
                info!(job_id = %job.job_id, instances = batch.instance_count, "job recorded as CLOSED");
                self.submit(&job).await;
            }
        }
    }

    /// Starts the import of a CLOSED job and records SUBMITTED. Without a trigger, does nothing:
    /// the job stays CLOSED (the embedded default). A job already being submitted by this process
    /// (periodic recovery meeting a job the pipeline is still retrying) is left to that submission.
    pub(crate) async fn submit(&self, job: &Job) {
        let Some(trigger) = &self.trigger else { return };
        let Some(_in_flight) = InFlight::claim(&self.in_flight, &job.job_id) else {
            debug!(job_id = %job.job_id, "import already being started by this gateway");
            return;
        };
        let started = match self
            .retry(
                "starting the import",
                &job.job_id,
                &metrics().import_trigger_errors,
                OnPermanent::GiveUp,
                || trigger.start(job),
            )
            .await
        {
            Ok(started) => started,
            Err(e) => {
                // Refused (access denied, a missing state machine, invalid input). The job stays
                // CLOSED: its instances are acknowledged, and the cause is usually a policy or a
                // stack update an operator fixes; periodic recovery starts it again every
                // --recovery-interval (jittered), so a fix takes effect without a restart.
                error!(job_id = %job.job_id, error = %e, "the import could not be started; the job stays CLOSED and recovery tries again every --recovery-interval");
                return;
            }
        };
        let transition = Transition {
            execution_arn: Some(started.execution_arn.clone()),
            submitted_at: Some(now_rfc3339()),
            output_s3_uri: Some(started.output_s3_uri.clone()),
            datastore_id: Some(started.datastore_id.clone()),
            message: None,
        };
        // Given up on a permanent error: the state machine records IMPORTING and beyond itself,
        // and a job left CLOSED is started again (idempotently) by periodic recovery.
        let recorded = self
            .retry(
                "recording SUBMITTED",
                &job.job_id,
                &metrics().job_store_errors,
                OnPermanent::GiveUp,
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
            .await
            .unwrap_or(false);
        metrics().batches_submitted.inc();
        info!(job_id = %job.job_id, execution_arn = %started.execution_arn, recorded, "import started");
    }
}

/// A job id in the pipeline's set of submissions in progress, removed when dropped.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    job_id: String,
}

impl<'a> InFlight<'a> {
    /// Adds `job_id` to `set`; `None` when it is already there.
    fn claim(set: &'a Mutex<HashSet<String>>, job_id: &str) -> Option<Self> {
        let mut ids = set.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.insert(job_id.to_string()).then(|| InFlight {
            set,
            job_id: job_id.to_string(),
        })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut ids = self
            .set
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.remove(&self.job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::closed_job;

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
    fn full_jitter_stays_under_the_exponential_backoff_and_its_cap() {
        let (base, cap) = (Duration::from_millis(250), Duration::from_secs(30));
        for attempt in 1..40 {
            let bound = base.saturating_mul(1 << (attempt - 1).min(20)).min(cap);
            for _ in 0..50 {
                assert!(full_jitter(base, cap, attempt) < bound, "attempt {attempt}");
            }
        }
        let draws: HashSet<Duration> = (0..50).map(|_| full_jitter(base, cap, 10)).collect();
        assert!(draws.len() > 40, "random, not in lockstep: {draws:?}");
    }

    #[test]
    fn errors_say_whether_a_retry_can_help() {
        let dynamo = |retriable| JobStoreError::Dynamo {
            operation: "PutItem",
            message: "x".into(),
            retriable,
        };
        assert!(dynamo(true).is_retriable());
        assert!(!dynamo(false).is_retriable());
        assert!(JobStoreError::Io(std::io::ErrorKind::StorageFull.into()).is_retriable());
        assert!(!JobStoreError::Io(std::io::ErrorKind::PermissionDenied.into()).is_retriable());
        assert!(!JobStoreError::Malformed("x".into()).is_retriable());
        let start = |retriable| ImportError::StartExecution {
            message: "x".into(),
            retriable,
        };
        assert!(start(true).is_retriable());
        assert!(!start(false).is_retriable());
    }

    /// A trigger that answers with the errors it is given, then starts.
    struct Scripted {
        errors: Mutex<Vec<ImportError>>,
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl ImportTrigger for Scripted {
        async fn start(&self, job: &Job) -> Result<Started, ImportError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let next = self.errors.lock().unwrap().pop();
            match next {
                Some(e) => Err(e),
                None => Ok(Started {
                    execution_arn: format!("arn:aws:states:us-east-1:1:execution:m:{}", job.job_id),
                    output_s3_uri: "s3://b/results/".into(),
                    datastore_id: "ds".into(),
                }),
            }
        }
        async fn check(&self) -> Result<(), ImportError> {
            Ok(())
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    /// A pipeline over a local journal holding one CLOSED job, and the trigger's script
    /// (errors are answered last first).
    async fn pipeline_with(
        errors: Vec<ImportError>,
    ) -> (
        Arc<Pipeline>,
        Arc<Scripted>,
        Arc<dyn JobStore>,
        Job,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let jobs: Arc<dyn JobStore> = Arc::new(crate::jobs::local::LocalJournal::new(dir.path()));
        let job = closed_job("gw", "2026-11-23T10:00:30.000Z");
        jobs.record_closed(&job).await.unwrap();
        let trigger = Arc::new(Scripted {
            errors: Mutex::new(errors),
            calls: Default::default(),
        });
        let pipeline = Pipeline::new(
            jobs.clone(),
            Some(trigger.clone()),
            "gw".into(),
            Duration::from_millis(20),
        );
        (pipeline, trigger, jobs, job, dir)
    }

    #[tokio::test]
    async fn transient_start_errors_are_retried_until_the_import_starts() {
        let throttled = || ImportError::StartExecution {
            message: "ThrottlingException: slow down".into(),
            retriable: true,
        };
        let (pipeline, trigger, jobs, job, _dir) =
            pipeline_with(vec![throttled(), throttled(), throttled()]).await;
        pipeline.submit(&job).await;
        assert_eq!(trigger.calls.load(std::sync::atomic::Ordering::SeqCst), 4);
        let job = jobs.get(&job.job_id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Submitted);
    }

    #[tokio::test]
    async fn a_permanent_start_error_is_not_retried_and_leaves_the_job_closed_for_recovery() {
        let denied = ImportError::StartExecution {
            message: "AccessDeniedException: not authorized to perform states:StartExecution"
                .into(),
            retriable: false,
        };
        let (pipeline, trigger, jobs, job, _dir) = pipeline_with(vec![denied]).await;
        pipeline.submit(&job).await;
        assert_eq!(
            trigger.calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "not retried"
        );
        let job = jobs.get(&job.job_id).await.unwrap().unwrap();
        assert_eq!(
            job.status,
            JobStatus::Closed,
            "acknowledged instances are never given up: recovery starts the job again"
        );
    }

    #[tokio::test]
    async fn a_job_being_submitted_is_not_submitted_twice_at_once() {
        let throttled = || ImportError::StartExecution {
            message: "ThrottlingException".into(),
            retriable: true,
        };
        let (pipeline, trigger, _jobs, job, _dir) =
            pipeline_with(vec![throttled(), throttled()]).await;
        tokio::join!(pipeline.submit(&job), pipeline.submit(&job));
        assert_eq!(
            trigger.calls.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "one submission: two failures and a start"
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

//! From IMPORTED to a final status: reading a finished import's results in S3 and recording them.
//!
//! This comes after [`crate::import`] in the data flow, and runs in the gateway rather than in the
//! state machine because a manifest can outgrow Step Functions: a state's input or output is capped
//! at 256 KiB and `States.DataLimitExceeded` cannot be caught ("Step Functions service quotas",
//! https://docs.aws.amazon.com/step-functions/latest/dg/service-quotas.html; "Handling errors in
//! Step Functions workflows", https://docs.aws.amazon.com/step-functions/latest/dg/concepts-error-handling.html;
//! docs/aws-facts.md §1), while `imageSetsSummary` has one entry per image set. So the state
//! machine only records IMPORTED with the import's `OutputS3Uri`, and the [`OutcomeReader`] of any
//! gateway of the fleet then, in this order:
//!
//! 1. lists IMPORTED jobs every poll interval;
//! 2. takes the job's [`OutcomeClaim`] with a conditional write (unclaimed, its own, or expired), so
//!    exactly one gateway works on a job, and one that dies midway is replaced once its claim
//!    expires. From the moment it is taken, the claim is renewed every third of its life until
//!    the work of steps 3 and 4 is done ([`OutcomeReader::holding_claim`]), so that no other
//!    gateway takes over a live reader however long the reading takes; the first claim of a job
//!    also records when it was taken ([`Job::outcome_claimed_at`]). A manifest not readable yet
//!    releases the claim for the next look;
//! 3. streams `job-output-manifest.json` from S3 into a parser that keeps only the counts and the
//!    first image set ids, in memory bounded whatever the manifest's size ([`parse_manifest`]);
//! 4. when the manifest was read and the gateway has an instance index, streams
//!    `SUCCESS/success.ndjson`, `WARNING/warning.ndjson` and `FAILURE/failure.ndjson` line by line
//!    ([`instances::read_results`]) and records each object's outcome on its index record, in
//!    chunks bounded in count and bytes ([`crate::index::InstanceIndex::record_outcomes`]); then
//!    compares what was recorded with the manifest's counts ([`InstanceTally::gaps`]);
//! 5. ends the job COMPLETED, COMPLETED_WITH_ERRORS or FAILED ([`outcome_of`]) with the manifest's
//!    counts, in one write conditional on IMPORTED and on holding the claim. When step 4 recorded
//!    fewer (or more) outcomes than the manifest counts, skipped lines (malformed, or naming no
//!    object of the job) or found objects the index has no record of, the job's message says so:
//!    `incomplete per-instance outcomes: 4498 of 4500 failed file(s) recorded, ...`. The
//!    status stays what the manifest's counts give: the files' fate is known, only the index
//!    lacks some of it.
//!
//! A crash (or a lost claim) anywhere before 5 leaves the job IMPORTED: the next claimant does 3 to 5
//! again. That is safe because step 4 only sets each record's outcome to what the files say (setting
//! it again changes nothing), and the job's counts come from the manifest alone and are written
//! once, by the single write of step 5 that moves the job out of IMPORTED. Per-instance outcomes
//! that cannot be read or recorded (S3, index), like a manifest not yet readable, are retried at
//! each look until [`MANIFEST_WAIT`] after the job's first claim ([`waited`]); then the job ends
//! anyway, its message saying that they are incomplete. The wait counts from the first claim, not
//! from the import's end (`importEndedAt`), so that a job recorded IMPORTED late (the state
//! machine retries that write for over an hour) still gets its full wait of attempts rather than
//! ending at the first transient error.
//!
//! Result files are opened through [`ImportResults`], which hands out a blocking [`ResultStream`]
//! for any file of an import's output folder, read in `spawn_blocking`.

pub(crate) mod instances;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::rfc3339;
use crate::index::{IndexError, InstanceIndex};
use crate::jobs::{
    IMAGE_SET_IDS_KEPT, ImportCounts, ImportOutcome, Job, JobStatus, JobStore, JobStoreError,
    OutcomeClaim,
};
use instances::{FileTally, InputPrefix, ReadError, ResultFile, read_results};

/// The summary HealthImaging writes in an import's output folder ("Understanding import jobs",
/// https://docs.aws.amazon.com/healthimaging/latest/devguide/understanding-import-jobs.html).
pub(crate) const MANIFEST: &str = "job-output-manifest.json";

/// How long a claim lasts: far longer than reading a manifest takes (a holder that needs longer
/// renews it), short enough that a job whose gateway died midway is soon finished by another.
pub(crate) const CLAIM_TTL: Duration = Duration::from_secs(30);

/// How long after a job's first claim a missing or unreadable manifest is waited for before the
/// job is recorded FAILED (and per-instance outcomes that cannot be recorded, before the job ends
/// without them). HealthImaging writes the manifest before it reports the job COMPLETED; this
/// covers S3, network or index trouble on the gateway's side.
pub(crate) const MANIFEST_WAIT: Duration = Duration::from_secs(600);

/// Chunks of a result file buffered between the S3 body and its parser.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Read buffer of the manifest parser.
const PARSE_BUFFER: usize = 16 * 1024;

/// The output folder of one import: `s3://{bucket}/{prefix}` where the prefix ends in
/// `{datastoreId}-DicomImport-{importJobId}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResultsLocation {
    pub bucket: String,
    /// Ends with `/`.
    pub prefix: String,
}

impl ResultsLocation {
    /// The folder of `job`'s import, from the `OutputS3Uri` that `GetDICOMImportJob` reported (the
    /// state machine records it with IMPORTED). The documented example shows the manifest's folder
    /// as the requested output prefix plus `{datastoreId}-DicomImport-{jobId}/`; whether the API
    /// value already ends so is not documented, so the suffix is appended when missing
    /// (docs/aws-facts.md §1).
    pub(crate) fn of(job: &Job) -> Result<ResultsLocation, LocationError> {
        let uri = job
            .output_s3_uri
            .as_deref()
            .ok_or(LocationError::NoOutputUri)?;
        let import_job_id = job
            .import_job_id
            .as_deref()
            .ok_or(LocationError::NoImportJobId)?;
        let rest = uri
            .strip_prefix("s3://")
            .ok_or_else(|| LocationError::NotS3 { uri: uri.into() })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(LocationError::NoBucket { uri: uri.into() });
        }
        let mut prefix = prefix.to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        if !prefix.ends_with(&format!("-DicomImport-{import_job_id}/")) {
            let datastore_id = job
                .datastore_id
                .as_deref()
                .ok_or_else(|| LocationError::NoDatastoreId { uri: uri.into() })?;
            prefix.push_str(&format!("{datastore_id}-DicomImport-{import_job_id}/"));
        }
        Ok(ResultsLocation {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub(crate) fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Why a job's record does not say where its import's results are.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum LocationError {
    #[error("the job has no outputS3Uri")]
    NoOutputUri,
    #[error("the job has no importJobId")]
    NoImportJobId,
    #[error("outputS3Uri {uri} is not an s3:// URI")]
    NotS3 { uri: String },
    #[error("outputS3Uri {uri} names no bucket")]
    NoBucket { uri: String },
    #[error("outputS3Uri {uri} lacks the import's folder and the job has no datastoreId")]
    NoDatastoreId { uri: String },
}

/// Why a result file could not be opened.
#[derive(Debug, Error)]
pub(crate) enum ResultsError {
    #[error("S3 GetObject s3://{bucket}/{key} failed: {message}")]
    GetObject {
        bucket: String,
        key: String,
        message: String,
    },
}

/// Where import results are read from (S3; a fake in tests).
#[async_trait]
pub(crate) trait ImportResults: Send + Sync + 'static {
    /// Opens result file `name` (e.g. [`MANIFEST`], `FAILURE/failure.ndjson`) of the import at
    /// `at` for streaming; `Ok(None)` when it does not exist (yet).
    async fn open(
        &self,
        at: &ResultsLocation,
        name: &str,
    ) -> Result<Option<ResultStream>, ResultsError>;
}

/// Reads import results with S3 GetObject. The gateway's task role has `s3:GetObject` and
/// `s3:ListBucket` on the results prefix: with ListBucket, a manifest not written yet answers 404
/// NoSuchKey rather than 403 AccessDenied (GetObject API reference, Permissions,
/// https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html).
pub(crate) struct S3Results {
    client: aws_sdk_s3::Client,
}

impl S3Results {
    pub(crate) fn new(client: aws_sdk_s3::Client) -> Self {
        S3Results { client }
    }
}

#[async_trait]
impl ImportResults for S3Results {
    async fn open(
        &self,
        at: &ResultsLocation,
        name: &str,
    ) -> Result<Option<ResultStream>, ResultsError> {
        let key = at.key(name);
        match self
            .client
            .get_object()
            .bucket(&at.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ResultStream::from_body(out.body))),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(e) => Err(ResultsError::GetObject {
                bucket: at.bucket.clone(),
                key,
                message: crate::aws::describe(&e),
            }),
        }
    }
}

/// A result file as a blocking [`Read`], fed chunk by chunk from its asynchronous body through a
/// channel of [`CHUNKS_IN_FLIGHT`] chunks: at most a few chunks are in memory, whatever the file's
/// size. Read it in `spawn_blocking` (its reads block the thread).
pub(crate) struct ResultStream {
    chunks: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl ResultStream {
    /// The stream of chunks sent on the other end of `chunks`; it ends when the sender is dropped.
    pub(crate) fn from_chunks(chunks: mpsc::Receiver<std::io::Result<Bytes>>) -> Self {
        ResultStream {
            chunks,
            current: Bytes::new(),
        }
    }

    /// A stream of `bytes`.
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Ok(bytes.into()));
        ResultStream::from_chunks(rx)
    }

    /// Streams an S3 object's body: a task pulls its chunks as the reader consumes them, and
    /// stops when the reader is dropped.
    fn from_body(mut body: aws_sdk_s3::primitives::ByteStream) -> Self {
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        tokio::spawn(async move {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(std::io::Error::other);
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    break;
                }
            }
        });
        ResultStream::from_chunks(rx)
    }
}

impl Read for ResultStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => self.current = chunk?,
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// What the gateway keeps of a job-output-manifest.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ManifestSummary {
    pub counts: ImportCounts,
    /// The first [`IMAGE_SET_IDS_KEPT`] ids of `imageSetsSummary` (none when it is missing).
    pub image_set_ids: Vec<String>,
}

/// Why a manifest gave no counts.
#[derive(Debug, Error)]
pub(crate) enum ManifestError {
    /// Reading failed (S3, network): it may work later.
    #[error("reading {MANIFEST} failed: {0}")]
    Read(String),
    /// The manifest is complete (S3 objects are written whole) but not what HealthImaging
    /// documents: reading it again gives the same.
    #[error("{MANIFEST} is not a usable import manifest: {0}")]
    Malformed(String),
}

/// The manifest as far as the gateway reads it; every other field is skipped as it streams by.
#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(rename = "jobSummary")]
    job_summary: Option<JobSummaryDoc>,
}

/// `jobSummary`, with the fields documented in "Understanding import jobs" (docs/aws-facts.md §1).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobSummaryDoc {
    number_of_scanned_files: Option<u64>,
    number_of_imported_files: Option<u64>,
    number_of_files_with_customer_error: Option<u64>,
    number_of_files_with_server_error: Option<u64>,
    number_of_generated_image_sets: Option<u64>,
    #[serde(default)]
    image_sets_summary: ImageSetsSummary,
}

/// `imageSetsSummary` read entry by entry: counted, the first [`IMAGE_SET_IDS_KEPT`] ids kept, the
/// rest skipped without being held.
#[derive(Default)]
struct ImageSetsSummary {
    entries: Option<u64>,
    first_ids: Vec<String>,
}

/// One entry of `imageSetsSummary`; its other fields are skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageSetEntry {
    image_set_id: Option<String>,
}

impl<'de> Deserialize<'de> for ImageSetsSummary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Visits the array without collecting it.
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = ImageSetsSummary;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of image set summaries")
            }
            fn visit_unit<E>(self) -> Result<ImageSetsSummary, E> {
                Ok(ImageSetsSummary::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ImageSetsSummary, A::Error> {
                let mut first_ids = Vec::new();
                let mut entries = 0u64;
                loop {
                    let more = if first_ids.len() < IMAGE_SET_IDS_KEPT {
                        seq.next_element::<ImageSetEntry>()?.map(|e| {
                            // Written as a DynamoDB string set, which refuses empty and repeated
                            // members: a ValidationException would never clear.
                            if let Some(id) = e.image_set_id.filter(|id| !id.is_empty())
                                && !first_ids.contains(&id)
                            {
                                first_ids.push(id);
                            }
                        })
                    } else {
                        seq.next_element::<IgnoredAny>()?.map(|_| ())
                    };
                    if more.is_none() {
                        break;
                    }
                    entries += 1;
                }
                Ok(ImageSetsSummary {
                    entries: Some(entries),
                    first_ids,
                })
            }
        }
        d.deserialize_any(Entries)
    }
}

/// Reads the counts of a job-output-manifest.json from `reader`, in memory bounded by a read
/// buffer, the [`IMAGE_SET_IDS_KEPT`] ids and the longest single key or kept value, whatever the
/// manifest's size: values not kept (notably the rest of `imageSetsSummary`) are skipped as they
/// stream by (`serde::de::IgnoredAny`). Blocking: run it in `spawn_blocking` over a
/// [`ResultStream`].
pub(crate) fn parse_manifest(reader: impl Read) -> Result<ManifestSummary, ManifestError> {
    let reader = std::io::BufReader::with_capacity(PARSE_BUFFER, reader);
    let doc: ManifestDoc = serde_json::from_reader(reader).map_err(|e| {
        if e.is_io() {
            ManifestError::Read(e.to_string())
        } else {
            ManifestError::Malformed(e.to_string())
        }
    })?;
    let summary = doc
        .job_summary
        .ok_or_else(|| ManifestError::Malformed("it has no jobSummary".into()))?;
    let required = [
        ("numberOfImportedFiles", summary.number_of_imported_files),
        (
            "numberOfFilesWithCustomerError",
            summary.number_of_files_with_customer_error,
        ),
        (
            "numberOfFilesWithServerError",
            summary.number_of_files_with_server_error,
        ),
    ];
    let missing: Vec<&str> = required
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(name, _)| *name)
        .collect();
    let (Some(imported), Some(customer_errors), Some(server_errors)) =
        (required[0].1, required[1].1, required[2].1)
    else {
        return Err(ManifestError::Malformed(format!(
            "jobSummary has no {}",
            missing.join(", ")
        )));
    };
    Ok(ManifestSummary {
        counts: ImportCounts {
            scanned: summary.number_of_scanned_files,
            imported,
            customer_errors,
            server_errors,
            image_sets: summary
                .number_of_generated_image_sets
                .or(summary.image_sets_summary.entries),
        },
        image_set_ids: summary.image_sets_summary.first_ids,
    })
}

/// What one attempt to read an import's results gave.
#[derive(Debug)]
pub(crate) enum Reading {
    Read(ManifestSummary),
    /// Not there, or not readable now (S3 error, broken stream): worth another try.
    NotYet(String),
    /// Never usable as it is (malformed manifest, no location to read): no point in waiting.
    Unusable(String),
}

/// Opens and parses the manifest of the import at `at`.
pub(crate) async fn read_manifest(results: &dyn ImportResults, at: &ResultsLocation) -> Reading {
    let stream = match results.open(at, MANIFEST).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return Reading::NotYet(format!("{MANIFEST} is not in {}", at.uri())),
        Err(e) => return Reading::NotYet(e.to_string()),
    };
    match tokio::task::spawn_blocking(move || parse_manifest(stream)).await {
        Ok(Ok(summary)) => Reading::Read(summary),
        Ok(Err(e @ ManifestError::Read(_))) => Reading::NotYet(e.to_string()),
        Ok(Err(e @ ManifestError::Malformed(_))) => Reading::Unusable(e.to_string()),
        Err(e) => Reading::NotYet(format!("the manifest parser stopped: {e}")),
    }
}

/// The outcome a reading gives `job` at `now`, or `None` to try again later: a manifest not
/// (yet) readable is waited for as `give_up` says ([`waited`]). `results` names the output folder
/// in messages.
pub(crate) fn outcome_of(
    job: &Job,
    results: &str,
    reading: Reading,
    now: SystemTime,
    give_up: GiveUp,
) -> Option<ImportOutcome> {
    let failed = |message: String| ImportOutcome {
        status: JobStatus::Failed,
        counts: None,
        image_set_ids: Vec::new(),
        message: Some(message),
        ended_at: rfc3339(now),
    };
    let import = job.import_job_id.as_deref().unwrap_or("-");
    match reading {
        Reading::Read(summary) => {
            let c = summary.counts;
            let (status, message) = if c.imported == 0 {
                let scanned = c.scanned.unwrap_or(c.failed());
                (
                    JobStatus::Failed,
                    Some(format!(
                        "HealthImaging import job {import} imported none of {scanned} file(s): {} customer error(s), {} server error(s); see FAILURE/failure.ndjson under {results}",
                        c.customer_errors, c.server_errors
                    )),
                )
            } else if c.failed() > 0 {
                (
                    JobStatus::CompletedWithErrors,
                    Some(format!(
                        "{} file(s) failed to import ({} customer error(s), {} server error(s)); see FAILURE/failure.ndjson under {results}",
                        c.failed(),
                        c.customer_errors,
                        c.server_errors
                    )),
                )
            } else {
                (JobStatus::Completed, None)
            };
            Some(ImportOutcome {
                status,
                counts: Some(c),
                image_set_ids: summary.image_set_ids,
                message,
                ended_at: rfc3339(now),
            })
        }
        Reading::Unusable(why) => Some(failed(format!(
            "HealthImaging import job {import} COMPLETED, but its outcome cannot be read: {why}"
        ))),
        Reading::NotYet(why) => match give_up {
            GiveUp::After(wait) if waited(job, now, give_up) => Some(failed(format!(
                "HealthImaging import job {import} COMPLETED, but {MANIFEST} could not be read within {} of the first attempt: {why}",
                humantime::format_duration(wait)
            ))),
            _ => None,
        },
    }
}

/// Whether results not (yet) readable have been waited for long enough at `now`: never with
/// [`GiveUp::Never`]; with [`GiveUp::After`], its wait after the job's first claim by an outcome
/// reader ([`Job::outcome_claimed_at`]), so that every job gets its wait of attempts (one a poll
/// interval) however late it became IMPORTED. The import's end (`importEndedAt`) would not do:
/// the state machine records IMPORTED after it, retrying for over an hour when the job store is
/// unreachable, and older records lack it. A job without a readable first claim time (the reader
/// always sets it) is not waited for.
fn waited(job: &Job, now: SystemTime, give_up: GiveUp) -> bool {
    let GiveUp::After(wait) = give_up else {
        return false;
    };
    let first = job
        .outcome_claimed_at
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    first.is_none_or(|t| now.duration_since(t).is_ok_and(|d| d >= wait))
}

/// What recording one job's per-instance outcomes gave, file by file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InstanceTally {
    pub success: FileTally,
    pub warning: FileTally,
    pub failure: FileTally,
    /// Outcomes of each file whose object the index has a record of.
    pub success_matched: u64,
    pub warning_matched: u64,
    pub failure_matched: u64,
    /// Index records whose outcome this reading changed (fewer than those matched when a resumed
    /// reader records again what its predecessor did).
    pub changed: u64,
}

impl InstanceTally {
    fn of_mut(&mut self, file: ResultFile) -> &mut FileTally {
        match file {
            ResultFile::Success => &mut self.success,
            ResultFile::Warning => &mut self.warning,
            ResultFile::Failure => &mut self.failure,
        }
    }

    fn of(&self, file: ResultFile) -> FileTally {
        match file {
            ResultFile::Success => self.success,
            ResultFile::Warning => self.warning,
            ResultFile::Failure => self.failure,
        }
    }

    fn matched_mut(&mut self, file: ResultFile) -> &mut u64 {
        match file {
            ResultFile::Success => &mut self.success_matched,
            ResultFile::Warning => &mut self.warning_matched,
            ResultFile::Failure => &mut self.failure_matched,
        }
    }

    fn matched(&self) -> u64 {
        self.success_matched + self.warning_matched + self.failure_matched
    }

    fn sum(&self, field: impl Fn(&FileTally) -> u64) -> u64 {
        ResultFile::ALL.iter().map(|f| field(&self.of(*f))).sum()
    }

    /// What this reading left out, against the manifest's `counts`: empty when the index now
    /// holds an outcome for exactly as many imported and failed files as the manifest counts,
    /// and no line was skipped. Whether a file imported with warnings is listed in the success
    /// file too is not documented (docs/aws-facts.md): the imported files are accounted for when
    /// the success file alone, or the success and warning files together, match the count. A
    /// resumed reading reads every file from its start, so it counts the same as a reading that
    /// ran through.
    pub(crate) fn gaps(&self, counts: &ImportCounts) -> Vec<String> {
        let mut gaps = Vec::new();
        let (success, warning) = (self.success_matched, self.warning_matched);
        if success != counts.imported && success + warning != counts.imported {
            gaps.push(format!(
                "{success} success and {warning} warning outcome(s) recorded for {} imported file(s)",
                counts.imported
            ));
        }
        if self.failure_matched != counts.failed() {
            gaps.push(format!(
                "{} of {} failed file(s) recorded",
                self.failure_matched,
                counts.failed()
            ));
        }
        let foreign = self.sum(|t| t.foreign);
        if foreign > 0 {
            gaps.push(format!(
                "{foreign} result line(s) name no object of the job's input prefix"
            ));
        }
        let malformed = self.sum(|t| t.malformed);
        if malformed > 0 {
            gaps.push(format!("{malformed} result line(s) malformed"));
        }
        let unmatched = self.sum(|t| t.outcomes).saturating_sub(self.matched());
        if unmatched > 0 {
            gaps.push(format!(
                "{unmatched} object(s) without a record in the instance index"
            ));
        }
        gaps
    }
}

/// Why per-instance outcomes could not be recorded this time.
#[derive(Debug, Error)]
pub(crate) enum InstancesError {
    #[error(transparent)]
    Open(#[from] ResultsError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the result file reader stopped: {0}")]
    Reader(#[from] tokio::task::JoinError),
    #[error("recording outcomes in {index} failed: {source}")]
    Index {
        index: String,
        #[source]
        source: IndexError,
    },
}

/// How the work done under a claim ended.
enum Held<T> {
    Done(T),
    /// Another gateway holds the claim now (ours expired before a renewal).
    Lost,
    /// The gateway is stopping.
    Stopped,
}

/// What the work under a claim decided for the job.
enum Decision {
    /// Nothing to record yet: release the claim, leave the job IMPORTED for a later look.
    NotYet,
    /// End the job with this outcome.
    End(ImportOutcome),
}

/// What the per-instance step leaves for the job.
enum InstancesStep {
    /// Every file the manifest counts has its outcome recorded: end the job.
    Done,
    /// Not all recorded, and not worth (or no longer worth) another try: end the job, saying why.
    Incomplete(String),
    /// Try again at a later look: release the claim, leave the job IMPORTED.
    Retry,
}

/// Whether a gateway ends a job whose results stay unreadable, or leaves it to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// After this long from the job's first claim ([`waited`]): a gateway that imports, whose
    /// role reads the results prefix, so that failing to read them means they are not coming.
    After(Duration),
    /// Never: a gateway without imports (a fleet member on the shared job table) may lack what
    /// reading the results takes (`s3:GetObject` on the results prefix, the key); it releases the
    /// job for one that imports rather than end it for something on its own side.
    Never,
}

/// How often the reader looks, how long it claims, and whether it gives up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutcomeTiming {
    pub interval: Duration,
    pub claim_ttl: Duration,
    pub give_up: GiveUp,
}

impl OutcomeTiming {
    /// Looking every `interval` (the import poll interval, or the recovery interval without
    /// imports), with the default claim.
    pub(crate) fn every(interval: Duration, give_up: GiveUp) -> Self {
        OutcomeTiming {
            interval: interval.max(Duration::from_secs(1)),
            claim_ttl: CLAIM_TTL,
            give_up,
        }
    }
}

/// Finishes IMPORTED jobs, on every gateway that imports or shares the DynamoDB job table; the
/// claim makes exactly one of them do each job.
pub(crate) struct OutcomeReader {
    jobs: Arc<dyn JobStore>,
    results: Arc<dyn ImportResults>,
    /// Where per-instance outcomes are recorded; `None`: this gateway keeps no index.
    index: Option<Arc<dyn InstanceIndex>>,
    /// This gateway's name in claims.
    gateway_id: String,
    timing: OutcomeTiming,
}

impl OutcomeReader {
    pub(crate) fn new(
        jobs: Arc<dyn JobStore>,
        results: Arc<dyn ImportResults>,
        index: Option<Arc<dyn InstanceIndex>>,
        gateway_id: String,
        timing: OutcomeTiming,
    ) -> Arc<Self> {
        Arc::new(OutcomeReader {
            jobs,
            results,
            index,
            gateway_id,
            timing,
        })
    }

    /// Looks for IMPORTED jobs every interval until `stop`, then returns once the job in hand is
    /// done or given back (no new claim is taken after `stop`). Dropping the task midway is safe
    /// too: the claim expires and the job is finished by the next gateway to look.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.timing.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pass(&stop).await {
                warn!(error = %e, "import outcome: cannot list IMPORTED jobs; will retry");
            }
        }
    }

    /// One look at the IMPORTED jobs: finishes those this gateway can claim, until `stop`.
    /// Returns how many it ended.
    pub(crate) async fn pass(&self, stop: &CancellationToken) -> Result<usize, JobStoreError> {
        let mut ended = 0;
        for job in self.jobs.list_by_status(JobStatus::Imported).await? {
            if stop.is_cancelled() {
                break;
            }
            // A cheap check first; the claim's conditional write is what decides.
            if !job.outcome_claimable_by(&self.gateway_id, &rfc3339(SystemTime::now())) {
                continue;
            }
            match self.finish(&job, stop).await {
                Ok(true) => ended += 1,
                Ok(false) => {}
                Err(e) => {
                    warn!(job_id = %job.job_id, error = %e, "import outcome: recording failed; will retry")
                }
            }
        }
        Ok(ended)
    }

    /// Claims `job`, reads its results, records its instances' outcomes and ends it (see the
    /// module doc for the order), renewing the claim from the moment it is taken until the work
    /// is done. `Ok(false)`: not this gateway's to end, or not yet.
    async fn finish(&self, job: &Job, stop: &CancellationToken) -> Result<bool, JobStoreError> {
        // The claim's life counts from before the call that takes it, so the renewals do too.
        let claimed = tokio::time::Instant::now();
        let now = SystemTime::now();
        if !self
            .jobs
            .claim_outcome(&job.job_id, &self.claim(now), &rfc3339(now))
            .await?
        {
            return Ok(false);
        }
        // The store has set the time of the first claim unless the job had one; the listed copy
        // may predate that.
        let mut job = job.clone();
        job.outcome_claimed_at.get_or_insert_with(|| rfc3339(now));
        let decision = match self
            .holding_claim(&job.job_id, claimed, stop, self.decide(&job))
            .await
        {
            Held::Done(decision) => decision,
            Held::Lost => {
                info!(job_id = %job.job_id, "import outcome: claim taken over by another gateway");
                return Ok(false);
            }
            Held::Stopped => {
                info!(job_id = %job.job_id, "import outcome: stopping; the job is left for the next look");
                Decision::NotYet
            }
        };
        let outcome = match decision {
            Decision::End(outcome) => outcome,
            Decision::NotYet => {
                // Let whichever gateway looks next try, rather than keep others out until the
                // claim expires (this gateway may stop meanwhile).
                self.jobs
                    .release_outcome(&job.job_id, &self.gateway_id)
                    .await?;
                return Ok(false);
            }
        };
        match self
            .jobs
            .record_outcome(&job.job_id, &self.gateway_id, &outcome)
            .await
        {
            Ok(()) => {
                crate::metrics::metrics().job_ended(outcome.status.as_str());
                let counts = outcome.counts;
                info!(
                    job_id = %job.job_id,
                    status = %outcome.status,
                    imported = counts.map(|c| c.imported),
                    failed = counts.map(|c| c.failed()),
                    message = outcome.message.as_deref().unwrap_or(""),
                    "import outcome recorded"
                );
                Ok(true)
            }
            // Another gateway took over (our claim expired) or ended it: nothing left to do.
            Err(JobStoreError::NotForward { .. } | JobStoreError::ClaimLost(_)) => {
                info!(job_id = %job.job_id, "import outcome: recorded by another gateway");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Steps 3 and 4 of the module doc, under the claim: reads the manifest and, with it, records
    /// the instances' outcomes; says whether the job ends now, and how.
    async fn decide(&self, job: &Job) -> Decision {
        let location = ResultsLocation::of(job);
        let (results, reading) = match &location {
            Ok(at) => (at.uri(), read_manifest(self.results.as_ref(), at).await),
            Err(why) => (
                job.output_s3_uri.clone().unwrap_or_else(|| "-".into()),
                Reading::Unusable(why.to_string()),
            ),
        };
        if let Reading::NotYet(why) = &reading {
            debug!(job_id = %job.job_id, reason = %why, "import outcome: manifest not readable yet");
        }
        let Some(mut outcome) = outcome_of(
            job,
            &results,
            reading,
            SystemTime::now(),
            self.timing.give_up,
        ) else {
            return Decision::NotYet;
        };
        // Per-instance outcomes exist only beside a manifest that was read.
        if let (Some(index), Ok(at), Some(counts)) = (&self.index, &location, outcome.counts) {
            match self
                .instance_outcomes(index.as_ref(), job, at, &counts)
                .await
            {
                InstancesStep::Done => {}
                InstancesStep::Incomplete(why) => {
                    let note = format!("incomplete per-instance outcomes: {why}");
                    outcome.message = Some(match outcome.message.take() {
                        Some(m) => format!("{m}; {note}"),
                        None => note,
                    });
                }
                InstancesStep::Retry => return Decision::NotYet,
            }
            // The job ends now, after its instances.
            outcome.ended_at = rfc3339(SystemTime::now());
        }
        Decision::End(outcome)
    }

    /// This gateway's claim, from `now` for the claim's life.
    fn claim(&self, now: SystemTime) -> OutcomeClaim {
        OutcomeClaim {
            gateway_id: self.gateway_id.clone(),
            expires_at: rfc3339(now + self.timing.claim_ttl),
        }
    }

    /// Step 4 of the module doc: records the outcome of every object of `job` the result files at
    /// `at` name, and checks them against the manifest's `counts`.
    async fn instance_outcomes(
        &self,
        index: &dyn InstanceIndex,
        job: &Job,
        at: &ResultsLocation,
        counts: &ImportCounts,
    ) -> InstancesStep {
        let prefix = match InputPrefix::of(job) {
            Ok(prefix) => prefix,
            Err(why) => {
                warn!(job_id = %job.job_id, reason = %why, "import outcome: per-instance outcomes cannot be mapped to objects");
                return InstancesStep::Incomplete(why.to_string());
            }
        };
        match self.record_instances(index, &job.job_id, at, &prefix).await {
            Ok(tally) => {
                info!(
                    job_id = %job.job_id,
                    imported = tally.success.outcomes,
                    imported_with_warnings = tally.warning.outcomes,
                    failed = tally.failure.outcomes,
                    records_matched = tally.matched(),
                    records_changed = tally.changed,
                    index = %index.describe(),
                    "import outcome: per-instance outcomes recorded"
                );
                for file in ResultFile::ALL {
                    let t = tally.of(file);
                    if t.foreign > 0 {
                        warn!(
                            job_id = %job.job_id,
                            file = file.name(),
                            lines = t.foreign,
                            input_prefix = %job.input_s3_uri,
                            "import outcome: result lines name files outside the job's input prefix or key layout; not recorded"
                        );
                    }
                    if t.malformed > 0 {
                        warn!(
                            job_id = %job.job_id,
                            file = file.name(),
                            lines = t.malformed,
                            first_line = t.first_malformed,
                            "import outcome: result lines that are not what HealthImaging documents; skipped"
                        );
                    }
                }
                let gaps = tally.gaps(counts);
                if gaps.is_empty() {
                    InstancesStep::Done
                } else {
                    let why = gaps.join(", ");
                    warn!(job_id = %job.job_id, gaps = %why, "import outcome: the per-instance outcomes do not account for every file the manifest counts");
                    InstancesStep::Incomplete(why)
                }
            }
            Err(e) => {
                if waited(job, SystemTime::now(), self.timing.give_up) {
                    warn!(job_id = %job.job_id, error = %e, "import outcome: per-instance outcomes could not be recorded; the job ends without them");
                    InstancesStep::Incomplete(e.to_string())
                } else {
                    warn!(job_id = %job.job_id, error = %e, "import outcome: per-instance outcomes could not be recorded; will retry");
                    InstancesStep::Retry
                }
            }
        }
    }

    /// Streams the three result files at `at` and records their outcomes on the index, a chunk at
    /// a time: the blocking line reader hands chunks over a channel of one, so at most a few
    /// chunks are in memory.
    async fn record_instances(
        &self,
        index: &dyn InstanceIndex,
        job_id: &str,
        at: &ResultsLocation,
        prefix: &InputPrefix,
    ) -> Result<InstanceTally, InstancesError> {
        let mut tally = InstanceTally::default();
        for file in ResultFile::ALL {
            let Some(stream) = self.results.open(at, file.name()).await? else {
                debug!(
                    job_id,
                    file = file.name(),
                    "import outcome: no such result file"
                );
                continue;
            };
            let (tx, mut rx) = mpsc::channel(1);
            let prefix = prefix.clone();
            let reader = tokio::task::spawn_blocking(move || {
                read_results(stream, file, &prefix, |chunk| {
                    tx.blocking_send(chunk).is_ok()
                })
            });
            // An early return drops `rx`: the reader's next hand-over fails and it stops.
            while let Some(chunk) = rx.recv().await {
                let recorded = index.record_outcomes(job_id, chunk).await.map_err(|e| {
                    InstancesError::Index {
                        index: index.describe(),
                        source: e,
                    }
                })?;
                *tally.matched_mut(file) += recorded.matched;
                tally.changed += recorded.changed;
            }
            *tally.of_mut(file) = reader.await??;
        }
        Ok(tally)
    }

    /// Runs `work` while renewing this gateway's claim on `job_id`, taken at `claimed`, every
    /// third of its life from then, so that the claim never expires under a live reader. Gives up
    /// when the claim is lost or `stop` is cancelled (dropping `work`).
    async fn holding_claim<T>(
        &self,
        job_id: &str,
        claimed: tokio::time::Instant,
        stop: &CancellationToken,
        work: impl Future<Output = T>,
    ) -> Held<T> {
        let period = (self.timing.claim_ttl / 3).max(Duration::from_millis(10));
        let mut renew = tokio::time::interval_at(claimed + period, period);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Held::Done(out),
                _ = stop.cancelled() => return Held::Stopped,
                _ = renew.tick() => {
                    let now = SystemTime::now();
                    match self.jobs.claim_outcome(job_id, &self.claim(now), &rfc3339(now)).await {
                        Ok(true) => {}
                        Ok(false) => return Held::Lost,
                        // The claim still runs for two thirds of its life: the next renewal may
                        // work, and the final write checks the claim anyway.
                        Err(e) => warn!(job_id, error = %e, "import outcome: renewing the claim failed; will retry"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

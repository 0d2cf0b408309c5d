use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::jobs::local::LocalJournal;

/// Counts this thread's live heap bytes, so a test can show what parsing holds at its peak.
pub(super) mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, counting per thread.
    pub struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: same contract as the caller's.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                add(layout.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as the caller's.
            unsafe { System.dealloc(ptr, layout) };
            add(-(layout.size() as isize));
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: same contract as the caller's.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                add(new_size as isize - layout.size() as isize);
            }
            p
        }
    }

    /// Runs `f` on this thread; returns its result and the most heap it held above the start.
    pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(start));
        let out = f();
        let peak = PEAK.with(Cell::get);
        (out, (peak - start).max(0) as usize)
    }
}

#[global_allocator]
static HEAP: heap::Counting = heap::Counting;

/// A manifest as HealthImaging documents it, with `image_sets` entries in `imageSetsSummary`.
fn manifest(image_sets: usize, imported: u64, customer: u64, server: u64) -> Vec<u8> {
    let mut out = format!(
        r#"{{"jobSummary":{{"jobId":"import-job-0001","datastoreId":"0123456789abcdef0123456789abcdef","inputS3Uri":"s3://b/import/J/","outputS3Uri":"s3://b/results/J/0123456789abcdef0123456789abcdef-DicomImport-import-job-0001/","successOutputS3Uri":"s3://b/results/J/x/SUCCESS/","failureOutputS3Uri":"s3://b/results/J/x/FAILURE/","numberOfScannedFiles":{},"numberOfImportedFiles":{imported},"numberOfFilesWithCustomerError":{customer},"numberOfFilesWithServerError":{server},"numberOfGeneratedImageSets":{image_sets},"imageSetsSummary":["#,
        imported + customer + server
    );
    for i in 0..image_sets {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"imageSetId":"{i:032x}","imageSetVersion":1,"isPrimary":true,"numberOfMatchedSOPInstances":1}}"#
        ));
    }
    out.push_str("]}}");
    out.into_bytes()
}

#[test]
fn the_counts_are_read_from_the_job_summary() {
    let m = parse_manifest(&manifest(2, 5, 1, 1)[..]).unwrap();
    assert_eq!(
        m.counts,
        ImportCounts {
            scanned: Some(7),
            imported: 5,
            customer_errors: 1,
            server_errors: 1,
            image_sets: Some(2),
        }
    );
    assert_eq!(m.counts.failed(), 2);
    assert_eq!(
        m.image_set_ids,
        vec![format!("{:032x}", 0), format!("{:032x}", 1)]
    );
}

#[test]
fn repeated_and_empty_image_set_ids_are_kept_once_or_not_at_all() {
    // They become a DynamoDB string set, which refuses both.
    let json = br#"{"jobSummary":{"numberOfImportedFiles":3,"numberOfFilesWithCustomerError":0,
        "numberOfFilesWithServerError":0,"imageSetsSummary":[{"imageSetId":"a"},
        {"imageSetId":"a"},{"imageSetId":""},{"imageSetId":"b"}]}}"#;
    let m = parse_manifest(&json[..]).unwrap();
    assert_eq!(m.image_set_ids, vec!["a".to_string(), "b".to_string()]);
}

#[test]
fn a_manifest_without_image_sets_summary_still_gives_the_counts() {
    let json = br#"{"jobSummary":{"numberOfScannedFiles":3,"numberOfImportedFiles":3,
        "numberOfFilesWithCustomerError":0,"numberOfFilesWithServerError":0}}"#;
    let m = parse_manifest(&json[..]).unwrap();
    assert_eq!(m.counts.imported, 3);
    assert_eq!(m.counts.image_sets, None, "neither the count nor the list");
    assert!(m.image_set_ids.is_empty());
    let null_list =
        br#"{"jobSummary":{"numberOfImportedFiles":1,"numberOfFilesWithCustomerError":0,
        "numberOfFilesWithServerError":0,"imageSetsSummary":null}}"#;
    assert_eq!(parse_manifest(&null_list[..]).unwrap().counts.scanned, None);
}

#[test]
fn missing_or_malformed_parts_are_named() {
    let no_summary = parse_manifest(&br#"{"somethingElse":[1,2,3]}"#[..]).unwrap_err();
    assert!(
        matches!(&no_summary, ManifestError::Malformed(m) if m.contains("no jobSummary")),
        "{no_summary}"
    );
    let no_counts =
        parse_manifest(&br#"{"jobSummary":{"numberOfImportedFiles":2}}"#[..]).unwrap_err();
    assert!(
        matches!(&no_counts, ManifestError::Malformed(m)
            if m.contains("numberOfFilesWithCustomerError, numberOfFilesWithServerError")),
        "{no_counts}"
    );
    let whole = manifest(3, 3, 0, 0);
    let truncated = parse_manifest(&whole[..whole.len() - 10]).unwrap_err();
    assert!(
        matches!(truncated, ManifestError::Malformed(_)),
        "{truncated}"
    );
    let not_json = parse_manifest(&b"<Error>AccessDenied</Error>"[..]).unwrap_err();
    assert!(
        matches!(not_json, ManifestError::Malformed(_)),
        "{not_json}"
    );
}

/// A reader whose stream breaks after `ok` bytes, as a dropped connection would.
struct Breaks<'a> {
    ok: &'a [u8],
}

impl Read for Breaks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.ok.is_empty() {
            return Err(std::io::Error::other("connection reset"));
        }
        let n = buf.len().min(self.ok.len());
        buf[..n].copy_from_slice(&self.ok[..n]);
        self.ok = &self.ok[n..];
        Ok(n)
    }
}

#[test]
fn a_broken_stream_is_a_read_error_worth_retrying() {
    let whole = manifest(10, 10, 0, 0);
    let err = parse_manifest(Breaks { ok: &whole[..100] }).unwrap_err();
    assert!(matches!(err, ManifestError::Read(_)), "{err}");
}

#[test]
fn a_huge_image_sets_summary_is_skipped_not_held() {
    // 6,000 image sets: over the 256 KiB that Step Functions allows a state, the case of the issue.
    let big = manifest(6_000, 6_000, 0, 0);
    assert!(big.len() > 256 * 1024, "{} bytes", big.len());
    // Ten times that: if the parser held the list, its peak would grow with it.
    let huge = manifest(60_000, 60_000, 0, 0);
    let (m_big, peak_big) = heap::peak_of(|| parse_manifest(&big[..]).unwrap());
    let (m_huge, peak_huge) = heap::peak_of(|| parse_manifest(&huge[..]).unwrap());
    assert!(
        peak_big >= PARSE_BUFFER,
        "the meter sees the read buffer ({peak_big} bytes)"
    );
    assert_eq!(m_big.counts.imported, 6_000);
    assert_eq!(m_big.counts.image_sets, Some(6_000));
    assert_eq!(m_huge.counts.image_sets, Some(60_000));
    assert_eq!(m_big.image_set_ids.len(), IMAGE_SET_IDS_KEPT);
    assert_eq!(m_huge.image_set_ids.len(), IMAGE_SET_IDS_KEPT);
    // The read buffer, the kept ids and their Vec, small change: far below the manifests' sizes.
    let bound = PARSE_BUFFER + IMAGE_SET_IDS_KEPT * 64 + 16 * 1024;
    assert!(
        peak_big < bound && peak_huge < bound,
        "peak heap {peak_big} and {peak_huge} bytes for manifests of {} and {} bytes",
        big.len(),
        huge.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_stream_is_read_chunk_by_chunk_with_few_in_flight() {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let body = manifest(6_000, 5_999, 1, 0);
    let chunks: Vec<Bytes> = body.chunks(8 * 1024).map(Bytes::copy_from_slice).collect();
    let feeder = tokio::spawn(async move {
        let mut most_queued = 0;
        for chunk in chunks {
            tx.send(Ok(chunk)).await.unwrap();
            most_queued = most_queued.max(CHUNKS_IN_FLIGHT - tx.capacity());
        }
        most_queued
    });
    let stream = ResultStream::from_chunks(rx);
    let parsed = tokio::task::spawn_blocking(move || parse_manifest(stream))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parsed.counts.customer_errors, 1);
    assert!(feeder.await.unwrap() <= CHUNKS_IN_FLIGHT);

    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tx.send(Ok(Bytes::from_static(b"{\"jobSummary\":{")))
        .await
        .unwrap();
    tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
    drop(tx);
    let err = tokio::task::spawn_blocking(move || parse_manifest(ResultStream::from_chunks(rx)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ManifestError::Read(_)), "{err}");
}

fn imported_job(output: &str) -> Job {
    let mut job = Job::opened(
        "J1",
        "2026-11-23T10:00:00.000Z",
        "s3://b/import/J1/",
        "gw-a",
    );
    job.status = JobStatus::Imported;
    job.output_s3_uri = Some(output.into());
    job.import_job_id = Some("import-job-0001".into());
    job.datastore_id = Some("ds".into());
    job.import_ended_at = Some("2026-11-23T10:05:00.000Z".into());
    job
}

#[test]
fn the_results_folder_is_the_output_uri_with_the_import_folder_once() {
    let with = imported_job("s3://b/results/J1/ds-DicomImport-import-job-0001/");
    let without = imported_job("s3://b/results/J1/");
    let no_slash = imported_job("s3://b/results/J1/ds-DicomImport-import-job-0001");
    for job in [&with, &without, &no_slash] {
        let at = ResultsLocation::of(job).unwrap();
        assert_eq!(at.bucket, "b");
        assert_eq!(at.prefix, "results/J1/ds-DicomImport-import-job-0001/");
        assert_eq!(
            at.key(MANIFEST),
            "results/J1/ds-DicomImport-import-job-0001/job-output-manifest.json"
        );
    }
    let root = ResultsLocation::of(&imported_job("s3://b")).unwrap();
    assert_eq!(root.prefix, "ds-DicomImport-import-job-0001/");
    assert!(ResultsLocation::of(&imported_job("/tmp/results/")).is_err());
    let mut no_import = with.clone();
    no_import.import_job_id = None;
    assert!(ResultsLocation::of(&no_import).is_err());
}

fn at(t: &str) -> SystemTime {
    humantime::parse_rfc3339(t).unwrap()
}

fn read(imported: u64, customer: u64, server: u64) -> Reading {
    Reading::Read(parse_manifest(&manifest(1, imported, customer, server)[..]).unwrap())
}

#[test]
fn the_counts_decide_the_final_status() {
    let job = imported_job("s3://b/results/J1/");
    let now = at("2026-11-23T10:06:00Z");
    let wait = GiveUp::After(Duration::from_secs(600));
    let o = outcome_of(&job, "s3://b/r/", read(2, 0, 0), now, wait).unwrap();
    assert_eq!((o.status, o.message), (JobStatus::Completed, None));
    assert_eq!(o.ended_at, "2026-11-23T10:06:00.000Z");
    let o = outcome_of(&job, "s3://b/r/", read(1, 1, 0), now, wait).unwrap();
    assert_eq!(o.status, JobStatus::CompletedWithErrors);
    assert!(
        o.message
            .as_deref()
            .is_some_and(|m| m.starts_with("1 file(s) failed to import")
                && m.contains("FAILURE/failure.ndjson under s3://b/r/")),
        "{o:?}"
    );
    let o = outcome_of(&job, "s3://b/r/", read(0, 1, 1), now, wait).unwrap();
    assert_eq!(o.status, JobStatus::Failed);
    assert!(
        o.message
            .as_deref()
            .is_some_and(|m| m.contains("imported none of 2 file(s)"))
    );
    assert_eq!(o.counts.map(|c| c.failed()), Some(2), "the counts are kept");
}

#[test]
fn a_missing_manifest_is_waited_for_then_failed_and_a_malformed_one_fails_at_once() {
    let mut job = imported_job("s3://b/results/J1/");
    // The wait counts from the first claim, not from the import's end (long before here).
    job.import_ended_at = Some("2026-11-23T08:05:00.036593+00:00".into());
    job.outcome_claimed_at = Some("2026-11-23T10:05:00.036Z".into());
    let wait = GiveUp::After(Duration::from_secs(600));
    let not_yet = || Reading::NotYet("job-output-manifest.json is not in s3://b/r/".into());
    assert!(
        outcome_of(
            &job,
            "s3://b/r/",
            not_yet(),
            at("2026-11-23T10:14:59Z"),
            wait
        )
        .is_none()
    );
    let o = outcome_of(
        &job,
        "s3://b/r/",
        not_yet(),
        at("2026-11-23T10:15:01Z"),
        wait,
    )
    .unwrap();
    assert_eq!(o.status, JobStatus::Failed);
    assert!(
        o.message.as_deref().is_some_and(
            |m| m.contains("could not be read within 10m") && m.contains("is not in s3://b/r/")
        ),
        "{o:?}"
    );
    let o = outcome_of(
        &job,
        "s3://b/r/",
        Reading::Unusable("job-output-manifest.json is not a usable import manifest: x".into()),
        at("2026-11-23T10:05:01Z"),
        wait,
    )
    .unwrap();
    assert_eq!(o.status, JobStatus::Failed);
    assert!(
        o.message
            .as_deref()
            .is_some_and(|m| m.contains("cannot be read: job-output"))
    );
}

/// Results held in memory, as S3 would serve them; counts the manifest reads.
#[derive(Default)]
struct FakeResults {
    files: Mutex<HashMap<String, Vec<u8>>>,
    reads: Mutex<usize>,
}

#[async_trait]
impl ImportResults for FakeResults {
    async fn open(
        &self,
        at: &ResultsLocation,
        name: &str,
    ) -> Result<Option<ResultStream>, ResultsError> {
        *self.reads.lock().unwrap() += 1;
        let file = self.files.lock().unwrap().get(&at.key(name)).cloned();
        Ok(file.map(ResultStream::from_bytes))
    }
}

/// The timing of a gateway that imports, giving a job up `manifest_wait` after its first claim.
fn timing(manifest_wait: Duration) -> OutcomeTiming {
    OutcomeTiming {
        interval: Duration::from_secs(1),
        claim_ttl: CLAIM_TTL,
        give_up: GiveUp::After(manifest_wait),
    }
}

#[tokio::test]
async fn of_two_gateways_exactly_one_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Arc<dyn JobStore> = Arc::new(LocalJournal::new(dir.path()));
    let mut job = imported_job("s3://b/results/J1/");
    job.import_ended_at = Some(rfc3339(SystemTime::now()));
    jobs.record_open(&job).await.unwrap();
    let results = Arc::new(FakeResults::default());
    results.files.lock().unwrap().insert(
        "results/J1/ds-DicomImport-import-job-0001/job-output-manifest.json".into(),
        manifest(6_000, 6_000, 0, 0),
    );
    let a = OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        None,
        "gw-a".into(),
        timing(MANIFEST_WAIT),
    );
    let b = OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        None,
        "gw-b".into(),
        timing(MANIFEST_WAIT),
    );
    let go = CancellationToken::new();
    let (ended_a, ended_b) = tokio::join!(a.pass(&go), b.pass(&go));
    assert_eq!(ended_a.unwrap() + ended_b.unwrap(), 1);
    assert_eq!(*results.reads.lock().unwrap(), 1, "only the claimant reads");
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.imported_count, Some(6_000));
    assert_eq!(done.image_set_count, Some(6_000));
    assert_eq!(done.image_set_ids.len(), IMAGE_SET_IDS_KEPT);
    assert_eq!(done.claim, None);
    assert_eq!(
        a.pass(&CancellationToken::new()).await.unwrap()
            + b.pass(&CancellationToken::new()).await.unwrap(),
        0,
        "nothing left"
    );
}

#[tokio::test]
async fn a_claim_left_by_a_dead_gateway_is_taken_over_once_expired() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Arc<dyn JobStore> = Arc::new(LocalJournal::new(dir.path()));
    let mut job = imported_job("s3://b/results/J1/ds-DicomImport-import-job-0001/");
    job.import_ended_at = Some(rfc3339(SystemTime::now()));
    job.claim = Some(OutcomeClaim {
        gateway_id: "gw-dead".into(),
        expires_at: rfc3339(SystemTime::now() + Duration::from_secs(60)),
    });
    jobs.record_open(&job).await.unwrap();
    let results = Arc::new(FakeResults::default());
    results.files.lock().unwrap().insert(
        "results/J1/ds-DicomImport-import-job-0001/job-output-manifest.json".into(),
        manifest(1, 1, 1, 0),
    );
    let b = OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        None,
        "gw-b".into(),
        timing(MANIFEST_WAIT),
    );
    assert_eq!(
        b.pass(&CancellationToken::new()).await.unwrap(),
        0,
        "the claim still runs"
    );
    assert_eq!(*results.reads.lock().unwrap(), 0);

    let mut expired = jobs.get("J1").await.unwrap().unwrap();
    expired.claim = Some(OutcomeClaim {
        gateway_id: "gw-dead".into(),
        expires_at: rfc3339(SystemTime::now() - Duration::from_secs(1)),
    });
    std::fs::write(
        dir.path().join("J1.json"),
        serde_json::to_vec(&expired).unwrap(),
    )
    .unwrap();
    assert_eq!(b.pass(&CancellationToken::new()).await.unwrap(), 1);
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::CompletedWithErrors);
    assert_eq!((done.imported_count, done.failed_count), (Some(1), Some(1)));
}

#[tokio::test]
async fn a_manifest_that_never_comes_ends_the_job_failed_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Arc<dyn JobStore> = Arc::new(LocalJournal::new(dir.path()));
    let mut job = imported_job("s3://b/results/J1/");
    job.import_ended_at = Some(rfc3339(SystemTime::now()));
    jobs.record_open(&job).await.unwrap();
    let results = Arc::new(FakeResults::default());
    let patient = OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        None,
        "gw-a".into(),
        timing(MANIFEST_WAIT),
    );
    assert_eq!(patient.pass(&CancellationToken::new()).await.unwrap(), 0);
    let waiting = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(
        waiting.status,
        JobStatus::Imported,
        "still waiting for the manifest"
    );
    assert_eq!(waiting.claim, None, "released for whoever looks next");
    assert!(waiting.outcome_claimed_at.is_some(), "the wait has begun");
    // Past the wait, the next gateway to look records why the job failed.
    let done_waiting = OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        None,
        "gw-b".into(),
        timing(Duration::ZERO),
    );
    assert_eq!(
        done_waiting.pass(&CancellationToken::new()).await.unwrap(),
        1
    );
    let failed = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert!(
        failed
            .message
            .as_deref()
            .is_some_and(|m| m.contains("job-output-manifest.json could not be read")),
        "{failed:?}"
    );
}

#[tokio::test]
async fn a_gateway_without_imports_never_gives_a_job_up_and_leaves_it_to_one_that_imports() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Arc<dyn JobStore> = Arc::new(LocalJournal::new(dir.path()));
    let mut job = imported_job("s3://b/results/J1/");
    // Long past any wait.
    job.outcome_claimed_at = Some(rfc3339(SystemTime::now() - Duration::from_secs(86_400)));
    jobs.record_open(&job).await.unwrap();
    let results = Arc::new(FakeResults::default());
    let fleet_member = OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        None,
        "gw-b".into(),
        OutcomeTiming {
            give_up: GiveUp::Never,
            ..timing(Duration::ZERO)
        },
    );
    for _ in 0..2 {
        assert_eq!(
            fleet_member.pass(&CancellationToken::new()).await.unwrap(),
            0
        );
        let left = jobs.get("J1").await.unwrap().unwrap();
        assert_eq!((left.status, &left.claim), (JobStatus::Imported, &None));
    }
    // A gateway that imports makes the decision.
    let importer = OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        None,
        "gw-a".into(),
        timing(MANIFEST_WAIT),
    );
    assert_eq!(importer.pass(&CancellationToken::new()).await.unwrap(), 1);
    assert_eq!(
        jobs.get("J1").await.unwrap().unwrap().status,
        JobStatus::Failed
    );
    // And once the results are there, the fleet member ends a job as any gateway would.
    let mut next = imported_job("s3://b/results/J2/");
    next.job_id = "J2".into();
    jobs.record_open(&next).await.unwrap();
    results.files.lock().unwrap().insert(
        "results/J2/ds-DicomImport-import-job-0001/job-output-manifest.json".into(),
        manifest(1, 1, 0, 0),
    );
    assert_eq!(
        fleet_member.pass(&CancellationToken::new()).await.unwrap(),
        1
    );
}

// ---- per-instance outcomes ---------------------------------------------------------------------

use crate::index::local::LocalIndex;
use crate::index::{IndexError, InstanceOutcome, InstanceRecord, KeyParts, OutcomesRecorded};
use instances::tests::own_result_lines;

/// Where [`imported_job`]'s results are.
const RESULTS: &str = "results/J1/ds-DicomImport-import-job-0001/";

/// Lines per result file, as in the issue.
const LINES: usize = 5_000;

/// The key of object `{series}.{i}` of job J1.
fn object(series: &str, i: usize) -> String {
    format!("J1/1.2/{series}/{series}.{i}.dcm")
}

/// Stored records of objects `{series}.{i}` of job J1, `i` in `range`.
fn stored(series: &str, range: std::ops::Range<usize>) -> Vec<InstanceRecord> {
    range
        .map(|i| object(series, i))
        .map(|key| {
            KeyParts::parse(&key)
                .unwrap()
                .record(&key, 10, None, None, rfc3339(SystemTime::now()))
        })
        .collect()
}

/// A job store with job J1 IMPORTED (input `s3://b/import/J1/`), an empty local index, and
/// results holding `manifest` and `files`.
async fn imported_with(
    dir: &std::path::Path,
    manifest: Vec<u8>,
    files: Vec<(ResultFile, Vec<u8>)>,
) -> (Arc<dyn JobStore>, LocalIndex, Arc<FakeResults>) {
    let jobs: Arc<dyn JobStore> = Arc::new(LocalJournal::new(dir.join("jobs")));
    let mut job = imported_job("s3://b/results/J1/");
    job.input_s3_uri = "s3://b/import/J1/".into();
    job.import_ended_at = Some(rfc3339(SystemTime::now()));
    jobs.record_open(&job).await.unwrap();
    let results = Arc::new(FakeResults::default());
    {
        let mut stored = results.files.lock().unwrap();
        stored.insert(format!("{RESULTS}{MANIFEST}"), manifest);
        for (file, body) in files {
            stored.insert(format!("{RESULTS}{}", file.name()), body);
        }
    }
    (jobs, LocalIndex::new(dir), results)
}

/// [`imported_with`] a study of job J1 in the index: [`LINES`] instances of series 1.2.3 the
/// success file names, as many of 1.2.4 the warning file names, as many of 1.2.5 the failure
/// file names, and one of 1.2.6 no file names; the manifest counts them.
async fn imported_study(
    dir: &std::path::Path,
) -> (Arc<dyn JobStore>, LocalIndex, Arc<FakeResults>) {
    let n = LINES as u64;
    let files = [
        (ResultFile::Success, "1.2.3"),
        (ResultFile::Warning, "1.2.4"),
        (ResultFile::Failure, "1.2.5"),
    ]
    .into_iter()
    .map(|(file, series)| {
        (
            file,
            own_result_lines(file, LINES, "s3://b/import/J1/", series),
        )
    })
    .collect();
    let (jobs, index, results) = imported_with(dir, manifest(1, 2 * n, n, 0), files).await;
    let mut records = stored("1.2.3", 0..LINES);
    records.extend(stored("1.2.4", 0..LINES));
    records.extend(stored("1.2.5", 0..LINES));
    records.extend(stored("1.2.6", 0..1));
    index.append(records).await.unwrap();
    (jobs, index, results)
}

fn reader(
    jobs: &Arc<dyn JobStore>,
    results: &Arc<FakeResults>,
    index: Arc<dyn InstanceIndex>,
    gateway: &str,
    timing: OutcomeTiming,
) -> Arc<OutcomeReader> {
    OutcomeReader::new(
        jobs.clone(),
        results.clone(),
        Some(index),
        gateway.into(),
        timing,
    )
}

/// Checks the outcome every instance of [`imported_study`] ended with.
async fn assert_study_outcomes(index: &LocalIndex) {
    let outcome = |sop: &str| {
        let index = index.clone();
        let sop = sop.to_string();
        async move {
            let found = index.find(&sop).await.unwrap();
            assert_eq!(found.len(), 1, "{found:?}");
            found[0].outcome.clone()
        }
    };
    assert_eq!(
        outcome("1.2.3.2").await,
        InstanceOutcome::Imported {
            image_set_id: format!("{:032x}", 2),
            is_primary: true
        }
    );
    assert_eq!(
        outcome("1.2.4.4999").await,
        InstanceOutcome::ImportedWithWarnings {
            image_set_id: format!("{:032x}", 4999),
            is_primary: true,
            warnings: vec!["InvalidOffsetTable (45330): offset table of 4999".into()],
        }
    );
    assert_eq!(
        outcome("1.2.5.0").await,
        InstanceOutcome::Failed {
            exception_type: "ValidationException".into(),
            message: "file 0 is not valid".into()
        }
    );
    assert_eq!(
        outcome("1.2.6.0").await,
        InstanceOutcome::Stored,
        "in no file"
    );
    let failed = index.failed("J1").await.unwrap();
    assert_eq!(failed.len(), LINES);
    assert!(
        failed
            .iter()
            .all(|r| r.series_instance_uid == "1.2.5" && r.outcome.name() == "FAILED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_result_files_of_5000_lines_set_each_instance_outcome_and_the_job_its_manifest_counts()
 {
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    let a = reader(
        &jobs,
        &results,
        Arc::new(index.clone()),
        "gw-a",
        timing(MANIFEST_WAIT),
    );
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 1);
    assert_study_outcomes(&index).await;
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::CompletedWithErrors);
    assert_eq!(
        (done.imported_count, done.failed_count),
        (Some(10_000), Some(5_000)),
    );
    assert_eq!(
        done.message.as_deref().map(|m| m.contains("incomplete")),
        Some(false),
        "every file the manifest counts has its outcome: {done:?}"
    );
    assert_eq!(done.claim, None);
}

#[tokio::test]
async fn outcomes_lost_on_the_way_are_noted_on_the_job_and_its_status_kept() {
    let dir = tempfile::tempdir().unwrap();
    let success = [
        "s3://b/import/J1/1.2/1.2.3/1.2.3.0.dcm",
        "s3://b/import/J1/1.2/1.2.3/1.2.3.1.dcm", // the index has no record of it
        "s3://b/elsewhere/J1/1.2/1.2.3/1.2.3.2.dcm", // not the job's input prefix
    ]
    .iter()
    .map(|f| format!(r#"{{"inputFile":"{f}","importResponse":{{"imageSetId":"a"}}}}"#))
    .collect::<Vec<_>>()
    .join("\n");
    let failure = format!(
        "{}\nnot a result line\n",
        r#"{"inputFile":"s3://b/import/J1/1.2/1.2.5/1.2.5.0.dcm","exception":{"exceptionType":"E"}}"#
    );
    let (jobs, index, results) = imported_with(
        dir.path(),
        manifest(1, 3, 2, 0),
        vec![
            (ResultFile::Success, success.into_bytes()),
            (ResultFile::Failure, failure.into_bytes()),
        ],
    )
    .await;
    let mut records = stored("1.2.3", 0..1);
    records.extend(stored("1.2.5", 0..1));
    index.append(records).await.unwrap();
    let a = reader(
        &jobs,
        &results,
        Arc::new(index.clone()),
        "gw-a",
        timing(MANIFEST_WAIT),
    );
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 1);
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(
        done.status,
        JobStatus::CompletedWithErrors,
        "what the manifest's counts say"
    );
    let message = done.message.unwrap();
    assert!(
        message.ends_with(
            "; incomplete per-instance outcomes: 1 success and 0 warning outcome(s) recorded for \
             3 imported file(s), 1 of 2 failed file(s) recorded, 1 result line(s) name no object \
             of the job's input prefix, 1 result line(s) malformed, 1 object(s) without a record \
             in the instance index"
        ),
        "{message}"
    );
    assert_eq!(
        index.find("1.2.3.0").await.unwrap()[0].outcome.name(),
        "IMPORTED",
        "what could be recorded is"
    );
}

/// What an [`InterceptedIndex`] does before each `record_outcomes` it passes to the local index.
enum OnRecord {
    /// Fails the calls `failing` holds (counted from 1).
    Fail {
        calls: std::sync::atomic::AtomicUsize,
        failing: std::ops::RangeInclusive<usize>,
    },
    /// The first call waits at the gate.
    Wait(Gate),
}

/// The local index, with `record_outcomes` intercepted as [`OnRecord`] says.
struct InterceptedIndex {
    inner: LocalIndex,
    on_record: OnRecord,
}

impl InterceptedIndex {
    /// The gate of an index made by [`gated`].
    fn gate(&self) -> &Gate {
        match &self.on_record {
            OnRecord::Wait(gate) => gate,
            OnRecord::Fail { .. } => panic!("not a gated index"),
        }
    }
}

#[async_trait]
impl InstanceIndex for InterceptedIndex {
    async fn append(&self, records: Vec<InstanceRecord>) -> Result<(), IndexError> {
        self.inner.append(records).await
    }
    async fn find(&self, sop_instance_uid: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        self.inner.find(sop_instance_uid).await
    }
    async fn record_outcomes(
        &self,
        job_id: &str,
        outcomes: Vec<(String, InstanceOutcome)>,
    ) -> Result<OutcomesRecorded, IndexError> {
        match &self.on_record {
            OnRecord::Fail { calls, failing } => {
                let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if failing.contains(&call) {
                    return Err(std::io::Error::other("disk gone").into());
                }
            }
            OnRecord::Wait(gate) => gate.pass().await,
        }
        self.inner.record_outcomes(job_id, outcomes).await
    }
    async fn failed(&self, job_id: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        self.inner.failed(job_id).await
    }
    async fn missing(&self, job_id: &str, keys: Vec<String>) -> Result<Vec<String>, IndexError> {
        self.inner.missing(job_id, keys).await
    }
    async fn add_absent(&self, records: Vec<InstanceRecord>) -> Result<u64, IndexError> {
        self.inner.add_absent(records).await
    }
    fn describe(&self) -> String {
        match self.on_record {
            OnRecord::Fail { .. } => "a flaky index".into(),
            OnRecord::Wait(_) => "a gated index".into(),
        }
    }
}

/// An index whose `record_outcomes` fails on the calls `failing` holds (counted from 1).
fn flaky(index: LocalIndex, failing: std::ops::RangeInclusive<usize>) -> Arc<InterceptedIndex> {
    Arc::new(InterceptedIndex {
        inner: index,
        on_record: OnRecord::Fail {
            calls: Default::default(),
            failing,
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_stopped_midway_is_resumed_by_the_next_without_counting_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    // The warning file's first chunk fails: success outcomes are recorded, the rest not (as if
    // the gateway had died there).
    let chunks_per_file = LINES.div_ceil(instances::CHUNK);
    let flaky = flaky(index.clone(), chunks_per_file + 1..=chunks_per_file + 1);
    let a = reader(
        &jobs,
        &results,
        flaky.clone(),
        "gw-a",
        timing(MANIFEST_WAIT),
    );
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 0);
    let waiting = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(
        waiting.status,
        JobStatus::Imported,
        "left for the next look"
    );
    assert_eq!(waiting.claim, None, "released for whoever looks next");
    assert_eq!(waiting.imported_count, None, "no counts before the end");
    assert_eq!(
        index.find("1.2.3.0").await.unwrap()[0].outcome.name(),
        "IMPORTED"
    );
    assert_eq!(
        index.find("1.2.5.0").await.unwrap()[0].outcome.name(),
        "STORED"
    );
    let lines_before = index.read_job("J1").unwrap().len();

    // Another gateway resumes: the same outcomes again, the rest, then the job's end, once.
    let b = reader(&jobs, &results, flaky, "gw-b", timing(MANIFEST_WAIT));
    assert_eq!(b.pass(&CancellationToken::new()).await.unwrap(), 1);
    assert_study_outcomes(&index).await;
    assert_eq!(
        index.read_job("J1").unwrap().len(),
        lines_before + 2 * LINES,
        "the imported records are not written again, the others once"
    );
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::CompletedWithErrors);
    assert_eq!(
        (done.imported_count, done.failed_count),
        (Some(10_000), Some(5_000))
    );
    assert!(
        !done.message.as_deref().unwrap_or("").contains("incomplete"),
        "the resumed reading accounts for every file: {done:?}"
    );
    assert_eq!(
        a.pass(&CancellationToken::new()).await.unwrap(),
        0,
        "ended once"
    );
}

#[tokio::test]
async fn a_file_in_both_the_success_and_the_warning_file_keeps_its_warnings_across_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let input = "s3://b/import/J1/";
    let (jobs, index, results) = imported_with(
        dir.path(),
        manifest(1, 1, 0, 0),
        vec![
            (
                ResultFile::Success,
                own_result_lines(ResultFile::Success, 1, input, "1.2.3"),
            ),
            (
                ResultFile::Warning,
                own_result_lines(ResultFile::Warning, 1, input, "1.2.3"),
            ),
            (ResultFile::Failure, b"not a result line\n".to_vec()),
        ],
    )
    .await;
    index.append(stored("1.2.3", 0..1)).await.unwrap();
    let warned = || async { index.find("1.2.3.0").await.unwrap()[0].outcome.name() };
    // The first reader records the success, then the warning, and ends the job; made IMPORTED
    // again, it is read by a second reader that records the success again and then fails at the
    // warning file, as one resuming a reader that died there would.
    let a = reader(
        &jobs,
        &results,
        Arc::new(index.clone()),
        "gw-a",
        timing(MANIFEST_WAIT),
    );
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 1);
    assert_eq!(warned().await, "IMPORTED_WITH_WARNINGS");
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert!(
        done.message.as_deref().is_some_and(
            |m| m.ends_with("incomplete per-instance outcomes: 1 result line(s) malformed")
        ),
        "listed in both files, the file is accounted for once: {done:?}"
    );
    let mut again = done.clone();
    again.status = JobStatus::Imported;
    again.message = None;
    std::fs::write(
        dir.path().join("jobs/J1.json"),
        serde_json::to_vec(&again).unwrap(),
    )
    .unwrap();
    let b = reader(
        &jobs,
        &results,
        flaky(index.clone(), 2..=2),
        "gw-b",
        timing(MANIFEST_WAIT),
    );
    assert_eq!(b.pass(&CancellationToken::new()).await.unwrap(), 0);
    assert_eq!(
        warned().await,
        "IMPORTED_WITH_WARNINGS",
        "the success file read again does not take the warnings away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_that_keeps_failing_past_the_wait_ends_the_job_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    let a = reader(
        &jobs,
        &results,
        flaky(index, 1..=usize::MAX),
        "gw-a",
        timing(Duration::ZERO),
    );
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 1);
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::CompletedWithErrors);
    assert_eq!(done.imported_count, Some(10_000));
    assert!(
        done.message.as_deref().is_some_and(|m| m.contains(
            "incomplete per-instance outcomes: recording outcomes in a flaky index failed: instance index I/O failed: disk gone"
        )),
        "{done:?}"
    );
}

#[tokio::test]
async fn a_job_recorded_imported_late_gets_the_whole_wait_counted_from_its_first_claim() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Arc<dyn JobStore> = Arc::new(LocalJournal::new(dir.path().join("jobs")));
    let mut job = imported_job("s3://b/results/J1/");
    job.input_s3_uri = "s3://b/import/J1/".into();
    // The state machine took over an hour to record IMPORTED: the import ended long ago.
    job.import_ended_at = Some(rfc3339(SystemTime::now() - Duration::from_secs(2 * 3600)));
    jobs.record_open(&job).await.unwrap();
    let results = Arc::new(FakeResults::default());
    results.files.lock().unwrap().extend([
        (format!("{RESULTS}{MANIFEST}"), manifest(1, 1, 0, 0)),
        (
            format!("{RESULTS}{}", ResultFile::Success.name()),
            own_result_lines(ResultFile::Success, 1, "s3://b/import/J1/", "1.2.3"),
        ),
    ]);
    let index = LocalIndex::new(dir.path());
    index.append(stored("1.2.3", 0..1)).await.unwrap();
    // A transient index error at the first attempt: tried again, not given up on.
    let a = reader(
        &jobs,
        &results,
        flaky(index.clone(), 1..=1),
        "gw-a",
        timing(MANIFEST_WAIT),
    );
    let before = rfc3339(SystemTime::now());
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 0);
    let waiting = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(
        (waiting.status, &waiting.claim),
        (JobStatus::Imported, &None)
    );
    let first = waiting.outcome_claimed_at.clone().unwrap();
    assert!(first >= before, "{first} is the first claim, now");
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 1);
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!((done.status, done.message), (JobStatus::Completed, None));
    assert_eq!(
        done.outcome_claimed_at,
        Some(first),
        "kept from the first claim"
    );

    // Past the wait from the first claim, a failing index ends the job without its outcomes.
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    let mut job = jobs.get("J1").await.unwrap().unwrap();
    job.outcome_claimed_at = Some(rfc3339(
        SystemTime::now() - MANIFEST_WAIT - Duration::from_secs(1),
    ));
    std::fs::write(
        dir.path().join("jobs/J1.json"),
        serde_json::to_vec(&job).unwrap(),
    )
    .unwrap();
    let a = reader(
        &jobs,
        &results,
        flaky(index, 1..=usize::MAX),
        "gw-a",
        timing(MANIFEST_WAIT),
    );
    assert_eq!(a.pass(&CancellationToken::new()).await.unwrap(), 1);
    let done = jobs.get("J1").await.unwrap().unwrap();
    assert!(
        done.message
            .as_deref()
            .is_some_and(|m| m.contains("incomplete per-instance outcomes: recording outcomes")),
        "{done:?}"
    );
}

/// Lets a test hold work at a point: [`Gate::pass`] says it has been reached, then waits to be
/// let go, the first time only.
#[derive(Default)]
struct Gate {
    entered: tokio::sync::Notify,
    go: tokio::sync::Notify,
    passed: std::sync::atomic::AtomicBool,
}

impl Gate {
    async fn pass(&self) {
        if !self.passed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.entered.notify_one();
            self.go.notified().await;
        }
    }
}

/// An index whose first `record_outcomes` waits at a [`Gate`].
fn gated(index: LocalIndex) -> Arc<InterceptedIndex> {
    Arc::new(InterceptedIndex {
        inner: index,
        on_record: OnRecord::Wait(Gate::default()),
    })
}

/// Results whose first opening of the manifest waits at a [`Gate`].
struct GatedResults {
    inner: Arc<FakeResults>,
    gate: Gate,
}

#[async_trait]
impl ImportResults for GatedResults {
    async fn open(
        &self,
        at: &ResultsLocation,
        name: &str,
    ) -> Result<Option<ResultStream>, ResultsError> {
        if name == MANIFEST {
            self.gate.pass().await;
        }
        self.inner.open(at, name).await
    }
}

/// A claim of a few seconds: renewed every second, so a test that waits for a renewal past the
/// first expiry takes a few seconds, and a renewal late by a second on a loaded machine still
/// keeps it.
fn short_claim() -> OutcomeTiming {
    OutcomeTiming {
        interval: Duration::from_secs(1),
        claim_ttl: Duration::from_secs(3),
        give_up: GiveUp::After(MANIFEST_WAIT),
    }
}

/// Waits until J1's claim, first set to expire at `first`, has been renewed past it and `first`
/// has passed: a claim that was not renewed would have expired by then. Polls the job store (the
/// observable event); fails after a minute.
async fn until_renewed_past(jobs: &Arc<dyn JobStore>, first: &str) -> Job {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let job = jobs.get("J1").await.unwrap().unwrap();
        let renewed = job
            .claim
            .as_ref()
            .is_some_and(|c| c.expires_at.as_str() > first);
        if renewed && rfc3339(SystemTime::now()).as_str() > first {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "not renewed past {first}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The expiry of J1's claim now.
async fn claim_expiry(jobs: &Arc<dyn JobStore>) -> String {
    let job = jobs.get("J1").await.unwrap().unwrap();
    job.claim.map(|c| c.expires_at).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_working_longer_than_its_claim_renews_it_and_no_other_gateway_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    let gate = gated(index.clone());
    let a = reader(&jobs, &results, gate.clone(), "gw-a", short_claim());
    let b = reader(
        &jobs,
        &results,
        Arc::new(index.clone()),
        "gw-b",
        short_claim(),
    );
    let working = tokio::spawn(async move { a.pass(&CancellationToken::new()).await });
    gate.gate().entered.notified().await;
    let first = claim_expiry(&jobs).await;
    let held = until_renewed_past(&jobs, &first).await;
    assert_eq!(
        held.claim.as_ref().map(|c| c.gateway_id.as_str()),
        Some("gw-a")
    );
    assert_eq!(b.pass(&CancellationToken::new()).await.unwrap(), 0);
    assert_eq!(
        jobs.get("J1")
            .await
            .unwrap()
            .unwrap()
            .claim
            .map(|c| c.gateway_id),
        Some("gw-a".to_string())
    );
    gate.gate().go.notify_one();
    assert_eq!(working.await.unwrap().unwrap(), 1);
    assert_study_outcomes(&index).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_is_renewed_from_the_moment_it_is_taken_even_while_the_manifest_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    let slow = Arc::new(GatedResults {
        inner: results.clone(),
        gate: Gate::default(),
    });
    let a = OutcomeReader::new(
        jobs.clone(),
        slow.clone(),
        Some(Arc::new(index.clone())),
        "gw-a".into(),
        short_claim(),
    );
    let b = reader(
        &jobs,
        &results,
        Arc::new(index.clone()),
        "gw-b",
        short_claim(),
    );
    let working = tokio::spawn(async move { a.pass(&CancellationToken::new()).await });
    slow.gate.entered.notified().await;
    let first = claim_expiry(&jobs).await;
    until_renewed_past(&jobs, &first).await;
    assert_eq!(b.pass(&CancellationToken::new()).await.unwrap(), 0);
    assert_eq!(
        *results.reads.lock().unwrap(),
        0,
        "gw-b did not read the results"
    );
    slow.gate.go.notify_one();
    assert_eq!(working.await.unwrap().unwrap(), 1);
    assert_study_outcomes(&index).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_claim_was_taken_over_while_recording_does_not_end_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    let gate = gated(index.clone());
    // A claim of an hour: gw-a does not renew it during the test; the claim is made to lapse
    // below, as if gw-a had been frozen past its life.
    let long = OutcomeTiming {
        claim_ttl: Duration::from_secs(3600),
        ..timing(MANIFEST_WAIT)
    };
    let a = reader(&jobs, &results, gate.clone(), "gw-a", long);
    let b = reader(
        &jobs,
        &results,
        Arc::new(index.clone()),
        "gw-b",
        timing(MANIFEST_WAIT),
    );
    let working = tokio::spawn(async move { a.pass(&CancellationToken::new()).await });
    gate.gate().entered.notified().await;
    let mut lapsed = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(
        lapsed.claim.as_ref().map(|c| c.gateway_id.as_str()),
        Some("gw-a")
    );
    lapsed.claim = Some(OutcomeClaim {
        gateway_id: "gw-a".into(),
        expires_at: rfc3339(SystemTime::now() - Duration::from_secs(1)),
    });
    std::fs::write(
        dir.path().join("jobs/J1.json"),
        serde_json::to_vec(&lapsed).unwrap(),
    )
    .unwrap();
    assert_eq!(
        b.pass(&CancellationToken::new()).await.unwrap(),
        1,
        "gw-b takes over and ends the job"
    );
    let ended = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!(ended.status, JobStatus::CompletedWithErrors);
    assert!(
        !ended
            .message
            .as_deref()
            .unwrap_or("")
            .contains("incomplete")
    );
    gate.gate().go.notify_one();
    assert_eq!(
        working.await.unwrap().unwrap(),
        0,
        "gw-a does not end the job"
    );
    assert_eq!(
        jobs.get("J1").await.unwrap().unwrap(),
        ended,
        "ended once: gw-a wrote nothing"
    );
    assert_study_outcomes(&index).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopping_while_recording_gives_the_job_back() {
    let dir = tempfile::tempdir().unwrap();
    let (jobs, index, results) = imported_study(dir.path()).await;
    let gate = gated(index);
    let a = reader(&jobs, &results, gate.clone(), "gw-a", timing(MANIFEST_WAIT));
    let stop = CancellationToken::new();
    let working = {
        let stop = stop.clone();
        tokio::spawn(async move { a.pass(&stop).await })
    };
    gate.gate().entered.notified().await;
    stop.cancel();
    assert_eq!(working.await.unwrap().unwrap(), 0);
    let left = jobs.get("J1").await.unwrap().unwrap();
    assert_eq!((left.status, left.claim), (JobStatus::Imported, None));
}

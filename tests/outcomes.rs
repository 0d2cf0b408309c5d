//! End-to-end test of per-instance import outcomes on LocalStack S3: a study stored with
//! `--s3-bucket` and the local job journal (so the local instance index in `--store-dir/index/`),
//! its job taken to IMPORTED as the import state machine would take it, and the import's results
//! put where HealthImaging writes them: the manifest and `SUCCESS/success.ndjson`,
//! `WARNING/warning.ndjson`, `FAILURE/failure.ndjson` of 5,000 lines each. The gateway's outcome
//! reader must record each instance's outcome, and `instances show` and `jobs show --failed` print
//! them.
//!
//! The state machine itself is not run: it records IMPORTED in the DynamoDB job table only (an
//! import needs --job-table), whose instance index is not built yet; tests/import_pipeline.rs covers
//! the state machine's part up to IMPORTED.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use dicom_gateway::jobs::{Job, JobStatus};

/// Lines per result file, as in the issue.
const LINES: usize = 5_000;

/// One stored instance, as the index records it.
#[derive(Debug, Clone)]
struct Stored {
    sop: String,
    key: String,
}

/// The job of the only job file in `{store}/jobs/`, once it is in a status `done` accepts.
fn wait_for_local_job(store: &Path, what: &str, done: impl Fn(&Job) -> bool) -> Job {
    eventually(what, Duration::from_secs(60), || {
        let dir = store.join("jobs");
        let jobs: Vec<Job> = std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        match jobs.as_slice() {
            [job] if done(job) => Ok(job.clone()),
            other => Err(format!("{other:?}")),
        }
    })
}

/// Replaces a job's file in the journal as the journal does it (temp file, rename).
fn write_local_job(store: &Path, job: &Job) {
    let path = store.join("jobs").join(format!("{}.json", job.job_id));
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec_pretty(job).unwrap()).unwrap();
    std::fs::rename(temp, path).unwrap();
}

/// The latest index record per object key of `job_id`, from `{store}/index/{job_id}.jsonl`.
fn indexed(store: &Path, job_id: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(store.join("index").join(format!("{job_id}.jsonl")))
        .unwrap_or_default();
    let mut latest: Vec<serde_json::Value> = Vec::new();
    for line in text.lines() {
        let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        latest.retain(|o| o["objectKey"] != r["objectKey"]);
        latest.push(r);
    }
    latest
}

/// `LINES` result lines of `file`: first the lines of `ours` (instance, line), then lines naming
/// other objects of the job's prefix (not stored) and of other jobs' prefixes.
fn result_file(bucket: &str, job: &Job, ours: &[(&Stored, String)]) -> Vec<u8> {
    let mut out = String::new();
    for (stored, line) in ours {
        let input = format!("s3://{bucket}/import/{}", stored.key);
        out.push_str(&line.replace("{input}", &input));
        out.push('\n');
    }
    for i in ours.len()..LINES {
        let input = if i % 2 == 0 {
            format!("{}1.2.9/1.2.9.1/1.2.9.1.{i}.dcm", job.input_s3_uri)
        } else {
            format!("s3://{bucket}/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6M/1.2.9/1.2.9.1/1.2.9.1.{i}.dcm")
        };
        out.push_str(&format!(
            r#"{{"inputFile":"{input}","importResponse":{{"imageSetId":"{i:032x}","imageSetVersion":1,"isPrimary":true}},"exception":{{"exceptionType":"ValidationException","message":"other file {i}"}}}}"#
        ));
        out.push('\n');
    }
    out.into_bytes()
}

fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn per_instance_outcomes_of_an_import_show_in_instances_show_and_jobs_show_failed() {
    let stack = stack();
    let s3 = s3_client(&localstack()).await;
    let store = tempfile::tempdir().unwrap();
    let store_dir = store.path().to_str().unwrap().to_string();
    let id = unique("gw-outcomes");
    let gw = Gateway::start(
        &[
            "--s3-bucket",
            &stack.bucket,
            "--s3-prefix",
            "import/",
            "--s3-force-path-style",
            "--store-dir",
            &store_dir,
            "--batch-idle",
            "1s",
            // Without an import, the outcome reader looks at the recovery interval.
            "--recovery-interval",
            "1s",
            "--gateway-id",
            &id,
        ],
        &[],
    );
    send_testdata(gw.port);
    let closed = wait_for_local_job(store.path(), "the batch to close", |j| {
        j.status == JobStatus::Closed
    });
    assert_eq!(
        closed.input_s3_uri,
        format!("s3://{}/import/{}/", stack.bucket, closed.job_id)
    );
    let records = eventually(
        "the 5 instances to be indexed",
        Duration::from_secs(20),
        || {
            let r = indexed(store.path(), &closed.job_id);
            if r.len() == 5 {
                Ok(r)
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
    let stored: Vec<Stored> = records
        .iter()
        .map(|r| Stored {
            sop: r["sopInstanceUid"].as_str().unwrap().into(),
            key: r["objectKey"].as_str().unwrap().into(),
        })
        .collect();

    // What the state machine records with IMPORTED.
    let mut job = closed.clone();
    job.status = JobStatus::Imported;
    job.output_s3_uri = Some(format!("s3://{}/results/{}/", stack.bucket, job.job_id));
    job.datastore_id = Some(stack.datastore_id.clone());
    job.import_job_id = Some(IMPORT_JOB_ID.into());
    job.import_ended_at = Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string());
    // And what HealthImaging writes: two instances imported (one into a non-primary image set),
    // one with a warning, two refused.
    let (bucket, manifest_key) = manifest_location(&job);
    let folder = manifest_key
        .trim_end_matches("job-output-manifest.json")
        .to_string();
    let success = result_file(
        &stack.bucket,
        &job,
        &[
            (
                &stored[0],
                r#"{"inputFile":"{input}","importResponse":{"imageSetId":"0a1b2c3d4e5f60718293a4b5c6d7e8f9","imageSetVersion":1,"isPrimary":true}}"#.into(),
            ),
            (
                &stored[1],
                r#"{"inputFile":"{input}","importResponse":{"imageSetId":"1a1b2c3d4e5f60718293a4b5c6d7e8f9","imageSetVersion":2,"isPrimary":false}}"#.into(),
            ),
        ],
    );
    let warning = result_file(
        &stack.bucket,
        &job,
        &[(
            &stored[2],
            r#"{"inputFile":"{input}","importResponse":{"imageSetId":"0a1b2c3d4e5f60718293a4b5c6d7e8f9","imageSetVersion":1,"isPrimary":true,"warnings":[{"warning_reason_code":45330,"type":"InvalidOffsetTable","message":"The Basic Offset Table is invalid"}]}}"#.into(),
        )],
    );
    let failure = result_file(
        &stack.bucket,
        &job,
        &[
            (
                &stored[3],
                r#"{"inputFile":"{input}","exception":{"exceptionType":"ValidationException","message":"Unsupported transfer syntax"}}"#.into(),
            ),
            (
                &stored[4],
                r#"{"inputFile":"{input}","exception":{"exceptionType":"InternalServerException","message":"Retry the import"}}"#.into(),
            ),
        ],
    );
    for (name, body) in [
        (
            "job-output-manifest.json",
            manifest_json(&stack, 3, 2, Some(2)),
        ),
        ("SUCCESS/success.ndjson", success),
        ("WARNING/warning.ndjson", warning),
        ("FAILURE/failure.ndjson", failure),
    ] {
        s3.put_object()
            .bucket(&bucket)
            .key(format!("{folder}{name}"))
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    write_local_job(store.path(), &job);

    let done = wait_for_local_job(store.path(), "the outcome reader to end the job", |j| {
        j.status.is_terminal()
    });
    assert_eq!(done.status, JobStatus::CompletedWithErrors, "{done:?}");
    assert_eq!((done.imported_count, done.failed_count), (Some(3), Some(2)));
    let log = gw.log_text();
    assert!(
        log.contains("per-instance outcomes recorded")
            && log.contains("records_matched=5")
            && log.contains("records_changed=5"),
        "{log}"
    );
    // The lines naming objects the gateway did not store (of the job's prefix, or of other jobs)
    // are noted on the job; every file the manifest counts has its outcome.
    let message = done.message.clone().unwrap_or_default();
    assert!(
        message.contains("; incomplete per-instance outcomes: ")
            && !message.contains("recorded")
            && message.contains("result line(s) name no object of the job's input prefix")
            && message.contains("object(s) without a record in the instance index"),
        "{message}"
    );
    assert!(
        log.contains("result lines name files outside the job's input prefix"),
        "other jobs' lines are counted: {log}"
    );

    let show = |sop: &str| cli(&["instances", "show", sop, "--store-dir", &store_dir]);
    let primary = show(&stored[0].sop);
    assert!(
        primary.contains("Outcome:            IMPORTED\n")
            && primary.contains("Image set:          0a1b2c3d4e5f60718293a4b5c6d7e8f9\n")
            && primary.contains("Primary:            yes\n"),
        "{primary}"
    );
    assert!(
        show(&stored[1].sop).contains("Primary:            no (a non-primary image set)"),
        "{}",
        show(&stored[1].sop)
    );
    let warned = show(&stored[2].sop);
    assert!(
        warned.contains("Outcome:            IMPORTED_WITH_WARNINGS\n")
            && warned.contains(
                "Warning:            InvalidOffsetTable (45330): The Basic Offset Table is invalid\n"
            ),
        "{warned}"
    );
    let refused = show(&stored[3].sop);
    assert!(
        refused.contains("Outcome:            FAILED\n")
            && refused.contains("Exception:          ValidationException\n")
            && refused.contains("Message:            Unsupported transfer syntax\n"),
        "{refused}"
    );
    let json: serde_json::Value = serde_json::from_str(&cli(&[
        "instances",
        "show",
        &stored[4].sop,
        "--json",
        "--store-dir",
        &store_dir,
    ]))
    .unwrap();
    assert_eq!(json[0]["outcome"], "FAILED");
    assert_eq!(json[0]["exceptionType"], "InternalServerException");

    let text = cli(&[
        "jobs",
        "show",
        &job.job_id,
        "--failed",
        "--store-dir",
        &store_dir,
    ]);
    assert!(
        text.contains("COMPLETED_WITH_ERRORS") && text.contains("Failed instances: 2\n"),
        "{text}"
    );
    for (s, exception) in [
        (&stored[3], "ValidationException"),
        (&stored[4], "InternalServerException"),
    ] {
        assert!(
            text.contains(&format!(
                "SOP Instance UID:   {}\nObject key:         {}\nException:          {exception}\n",
                s.sop, s.key
            )),
            "{text}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(&cli(&[
        "jobs",
        "show",
        &job.job_id,
        "--failed",
        "--json",
        "--store-dir",
        &store_dir,
    ]))
    .unwrap();
    assert_eq!(json["status"], "COMPLETED_WITH_ERRORS");
    let failed: Vec<&str> = json["failedInstances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sopInstanceUid"].as_str().unwrap())
        .collect();
    let mut expected = vec![stored[3].sop.as_str(), stored[4].sop.as_str()];
    expected.sort_by_key(|sop| stored.iter().find(|s| s.sop == *sop).unwrap().key.clone());
    assert_eq!(failed, expected, "in object key order");
    let plain: serde_json::Value = serde_json::from_str(&cli(&[
        "jobs",
        "show",
        &job.job_id,
        "--json",
        "--store-dir",
        &store_dir,
    ]))
    .unwrap();
    assert!(plain.get("failedInstances").is_none(), "only with --failed");
}

//! End-to-end test of per-instance import outcomes on LocalStack, in the deployment's shape: a
//! study stored to S3 with the stack's DynamoDB job table and instance table (`--job-table`,
//! `--instance-table`), imported by the real import state machine, and the import's results put
//! where HealthImaging writes them: the manifest and `SUCCESS/success.ndjson`,
//! `WARNING/warning.ndjson`, `FAILURE/failure.ndjson` of 5,000 lines each. The gateway must record
//! each instance's outcome in the instance table, and `instances show` and `jobs show --failed`
//! print them.
//!
//! Only HealthImaging is mocked, as in tests/import_pipeline.rs: the gateway runs the state
//! machine as test case `Outcomes` of tests/sfn-mock-config.json, whose mocked GetDICOMImportJob
//! answers COMPLETED with this test's own output folder. The mocked import writes nothing, and the
//! result lines name the job's input objects, known only once the job exists: the test empties the
//! folder before the gateway starts (an earlier run's results), and once the state machine has
//! recorded IMPORTED puts the result files, the manifest last. The outcome reader waits for a
//! manifest not written yet, and reads the result files beside one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use dicom_gateway::jobs::{Job, JobStatus};

/// This test's case of tests/sfn-mock-config.json: the import completes, with its own output
/// folder.
const CASE: &str = "Outcomes";

/// Lines per result file, as in the issue.
const LINES: usize = 5_000;

/// The UID root of this test's instances; each run adds a number of its own, since the stack's
/// tables are shared by every test and run.
const ROOT: &str = "1.2.826.0.1.3680043.2.1125.20";

/// One stored instance, as the index records it.
#[derive(Debug, Clone)]
struct Stored {
    sop: String,
    key: String,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn per_instance_outcomes_of_an_import_show_in_instances_show_and_jobs_show_failed() {
    let stack = stack();
    let s3 = s3_client(&localstack()).await;
    let db = dynamodb_client(&localstack()).await;
    let work = tempfile::tempdir().unwrap();
    let root = format!(
        "{ROOT}.{}",
        ulid::Ulid::generate().random() % 999_999_999_999 + 1
    );
    let files = write_corpus(work.path(), &root, 5, 1_000);
    let id = unique("gw-outcomes");
    clear_mocked_output(&s3, &stack, CASE).await;
    let arn = format!("{}#{CASE}", stack.state_machine_arn);
    let tables = [
        "--job-table",
        stack.table.as_str(),
        "--instance-table",
        stack.instance_table.as_str(),
    ];
    let mut args = vec![
        "--s3-bucket",
        &stack.bucket,
        "--s3-prefix",
        "import/",
        "--s3-force-path-style",
        "--store-dir",
        work.path().to_str().unwrap(),
        "--state-machine-arn",
        &arn,
        "--datastore-id",
        &stack.datastore_id,
        "--data-access-role-arn",
        &stack.role_arn,
        "--results-prefix",
        "results/",
        "--batch-idle",
        "1s",
        // The outcome reader looks at the import poll interval too.
        "--import-poll-interval",
        "2s",
        "--gateway-id",
        &id,
    ];
    args.extend(tables);
    let gw = Gateway::start(&args, &[]);
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let out = storescu(gw.port, "-xe", &paths);
    assert!(out.status.success(), "storescu: {}", text(&out));

    // The state machine records IMPORTED (after CLOSED, which means indexed: the five records
    // are in the instance table), with the output folder of the mocked GetDICOMImportJob.
    let opened = wait_for_job_of_gateway(&db, &stack.table, &gw, &id).await;
    let job = wait_for_imported(&db, &stack.table, &opened.job_id).await;
    assert_eq!(job.status, JobStatus::Imported, "{job:?}");
    assert_eq!(
        job.input_s3_uri,
        format!("s3://{}/import/{}/", stack.bucket, job.job_id)
    );
    let (bucket, folder) = mocked_output_folder(&stack, CASE);
    assert_eq!(
        job.output_s3_uri,
        Some(format!("s3://{bucket}/{folder}")),
        "the OutputS3Uri GetDICOMImportJob reported"
    );
    assert_eq!(job.import_job_id.as_deref(), Some(IMPORT_JOB_ID));
    assert!(
        job.execution_arn
            .as_deref()
            .is_some_and(|a| a.ends_with(&job.job_id)),
        "{job:?}"
    );
    let stored: Vec<Stored> = (1..=5)
        .map(|i| {
            let sop = format!("{root}.{i}");
            let key = format!("{}/{root}/{root}.0/{sop}.dcm", job.job_id);
            Stored { sop, key }
        })
        .collect();

    // What HealthImaging writes: two instances imported (one into a non-primary image set), one
    // with a warning, two refused.
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
    put_results(
        &s3,
        &job,
        vec![
            ("SUCCESS/success.ndjson", success),
            ("WARNING/warning.ndjson", warning),
            ("FAILURE/failure.ndjson", failure),
        ],
        manifest_json(&stack, 3, 2, Some(2)),
    )
    .await;

    let done = wait_for_final(&db, &stack.table, &job.job_id, &gw).await;
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

    assert!(
        done.outcome_claimed_at.is_some(),
        "the first claim's time: {done:?}"
    );

    let with_tables = |command: &[&str]| {
        let mut all = command.to_vec();
        all.extend(tables);
        cli(&all)
    };
    let show = |sop: &str| with_tables(&["instances", "show", sop]);
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
    let json: serde_json::Value = serde_json::from_str(&with_tables(&[
        "instances",
        "show",
        &stored[4].sop,
        "--json",
    ]))
    .unwrap();
    assert_eq!(json[0]["outcome"], "FAILED");
    assert_eq!(json[0]["exceptionType"], "InternalServerException");

    // The failures come from the table's sparse index, which is eventually consistent.
    let text = eventually(
        "jobs show --failed to list both",
        Duration::from_secs(10),
        || {
            let text = with_tables(&["jobs", "show", &job.job_id, "--failed"]);
            if text.contains("COMPLETED_WITH_ERRORS") && text.contains("Failed instances: 2\n") {
                Ok(text)
            } else {
                Err(text)
            }
        },
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
    let json: serde_json::Value = serde_json::from_str(&with_tables(&[
        "jobs",
        "show",
        &job.job_id,
        "--failed",
        "--json",
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
    let plain: serde_json::Value =
        serde_json::from_str(&with_tables(&["jobs", "show", &job.job_id, "--json"])).unwrap();
    assert!(plain.get("failedInstances").is_none(), "only with --failed");

    // Without --instance-table, the job is still shown, with a note instead of the list.
    let no_index = cli(&[
        "jobs",
        "show",
        &job.job_id,
        "--failed",
        "--job-table",
        &stack.table,
    ]);
    assert!(
        no_index.contains("COMPLETED_WITH_ERRORS")
            && no_index
                .contains("Failed instances: not listed: --job-table also needs --instance-table"),
        "{no_index}"
    );
    let json: serde_json::Value = serde_json::from_str(&cli(&[
        "jobs",
        "show",
        &job.job_id,
        "--failed",
        "--json",
        "--job-table",
        &stack.table,
    ]))
    .unwrap();
    assert_eq!(json["status"], "COMPLETED_WITH_ERRORS");
    assert!(
        json["failedInstancesNote"]
            .as_str()
            .is_some_and(|n| n.contains("--instance-table")),
        "{json}"
    );
}

//! End-to-end tests of the import path on LocalStack: the stack from infra/gateway.yaml (deployed by
//! scripts/test.sh through scripts/deploy.sh), the gateway started against its bucket, table and
//! state machine, a study sent with DCMTK storescu, and the real state machine definition running
//! to its end. Only the HealthImaging API is mocked, through LocalStack's Step Functions mocked
//! service integrations (tests/sfn-mock-config.json, selected by the `#TestCase` suffix of the state
//! machine ARN). The mocked import writes nothing, so each test puts the job-output-manifest.json a
//! real import would have written, where the job's recorded `outputS3Uri` says: each test case's
//! mocked GetDICOMImportJob answers its own OutputS3Uri. The state machine records IMPORTED, and the
//! gateway reads the manifest and ends the job (src/outcome.rs).

mod common;

use common::*;
use dicom_gateway::jobs::dynamodb::to_item;
use dicom_gateway::jobs::{Job, JobStatus, OutcomeClaim};

/// Clients for LocalStack's S3 and DynamoDB.
async fn clients() -> (aws_sdk_s3::Client, aws_sdk_dynamodb::Client) {
    let endpoint = localstack();
    (s3_client(&endpoint).await, dynamodb_client(&endpoint).await)
}

fn gateway(stack: &Stack, case: &str, gateway_id: &str) -> Gateway {
    let arn = format!("{}#{case}", stack.state_machine_arn);
    Gateway::start(
        &[
            "--s3-bucket",
            &stack.bucket,
            "--s3-prefix",
            "import/",
            "--s3-force-path-style",
            "--job-table",
            &stack.table,
            "--instance-table",
            &stack.instance_table,
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
            "--import-poll-interval",
            "2s",
            "--gateway-id",
            gateway_id,
        ],
        &[],
    )
}

/// Sends two instances, lets the batch close, and returns the job id (manifest already in place).
/// What a test puts where the mocked import's manifest goes (the mock itself writes nothing).
enum Manifest {
    /// No manifest: the import fails, or the test writes one itself.
    None,
    /// One with these imported and failed counts.
    Counts(u32, u32),
    /// This exact document.
    Json(Vec<u8>),
}

async fn send_study(
    stack: &Stack,
    s3: &aws_sdk_s3::Client,
    db: &aws_sdk_dynamodb::Client,
    gw: &Gateway,
    gateway_id: &str,
    manifest: Manifest,
) -> String {
    let out = storescu(
        gw.port,
        "-xb",
        &[
            &testdata("ct-implicit-le.dcm"),
            &testdata("mr-explicit-be.dcm"),
        ],
    );
    assert!(
        text(&out)
            .matches("Received Store Response (Success)")
            .count()
            == 2,
        "{}",
        text(&out)
    );
    let job_id = wait_for_job_of_gateway(db, &stack.table, gw, gateway_id)
        .await
        .job_id;
    match manifest {
        Manifest::None => {}
        Manifest::Counts(imported, failed) => {
            put_manifest(s3, stack, &job_id, imported, failed).await
        }
        Manifest::Json(bytes) => {
            put_manifest_bytes(s3, stack, &job_id, bytes).await;
        }
    }
    job_id
}

/// Sends a study to a gateway whose state machine runs mocked test case `case`, puts `manifest`
/// (imported, failed) if given, and returns the stack and the job once final.
async fn import_study(case: &str, manifest: Manifest) -> (Stack, Job) {
    let stack = stack();
    let (s3, db) = clients().await;
    let id = unique(&format!("gw-{}", case.to_lowercase()));
    let gw = gateway(&stack, case, &id);
    let job_id = send_study(&stack, &s3, &db, &gw, &id, manifest).await;
    let job = wait_for_final(&db, &stack.table, &job_id, &gw).await;
    (stack, job)
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_clean_import_ends_completed_with_counts_and_jobs_show_reports_it() {
    let (stack, job) = import_study("Completed", Manifest::Counts(2, 0)).await;
    let job_id = job.job_id.clone();
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(job.instance_count, Some(2));
    assert_eq!(job.imported_count, Some(2));
    assert_eq!(job.failed_count, Some(0));
    assert_eq!(job.scanned_count, Some(2));
    assert_eq!(
        (job.customer_error_count, job.server_error_count),
        (Some(0), Some(0))
    );
    assert_eq!(job.image_set_count, Some(1));
    assert_eq!(job.image_set_ids, vec!["0a1b2c3d4e5f60718293a4b5c6d7e8f9"]);
    assert_eq!(job.import_job_id.as_deref(), Some(IMPORT_JOB_ID));
    assert_eq!(
        job.output_s3_uri.as_deref(),
        Some(
            "s3://dicom-gateway-test/results/Completed/0123456789abcdef0123456789abcdef-DicomImport-import-job-0001/"
        ),
        "the OutputS3Uri GetDICOMImportJob reported"
    );
    assert!(job.import_ended_at.is_some(), "{job:?}");
    assert_eq!(job.claim, None, "the claim goes with the outcome");
    assert_eq!(
        job.input_s3_uri,
        format!("s3://{}/import/{job_id}/", stack.bucket)
    );
    assert!(
        job.execution_arn
            .as_deref()
            .is_some_and(|a| a.ends_with(&job_id)),
        "{job:?}"
    );
    assert!(job.ended_at.is_some());

    let show = std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["jobs", "show", &job_id, "--job-table", &stack.table])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(
        text.contains("COMPLETED")
            && text.contains("importedCount")
            && text.contains("every file reached HealthImaging"),
        "{text}"
    );
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args([
            "jobs",
            "list",
            "--job-table",
            &stack.table,
            "--instance-table",
            &stack.instance_table,
            "--limit",
            "100",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&job_id));
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn failed_files_in_a_completed_import_end_completed_with_errors() {
    let (_, job) = import_study("CompletedWithErrors", Manifest::Counts(1, 1)).await;
    assert_eq!(job.status, JobStatus::CompletedWithErrors, "{job:?}");
    assert_eq!((job.imported_count, job.failed_count), (Some(1), Some(1)));
    assert_eq!(job.customer_error_count, Some(1));
    assert!(
        job.message
            .as_deref()
            .is_some_and(|m| m.contains("1 file(s) failed")),
        "{job:?}"
    );
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_failed_import_ends_failed_with_its_message() {
    let (_, job) = import_study("Failed", Manifest::None).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let message = job.message.unwrap_or_default();
    assert!(
        message.contains("FAILED") && message.contains("cannot read the input prefix"),
        "{message}"
    );
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_throttled_start_is_retried_and_the_import_completes() {
    let (_, job) = import_study("ThrottledThenStarted", Manifest::Counts(2, 0)).await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_job_left_closed_without_an_execution_is_submitted_at_start_up() {
    let stack = stack();
    let (s3, db) = clients().await;
    let id = unique("gw-recovery");
    // A batch whose gateway crashed after recording CLOSED and before starting the import.
    let job_id = ulid::Ulid::generate().to_string();
    let mut job = Job::opened(
        &job_id,
        &humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        &format!("s3://{}/import/{job_id}/", stack.bucket),
        &id,
    );
    job.status = JobStatus::Closed;
    job.closed_at = Some(job.created_at.clone());
    job.instance_count = Some(3);
    db.put_item()
        .table_name(&stack.table)
        .set_item(Some(to_item(&job)))
        .send()
        .await
        .unwrap();
    let gw = gateway(&stack, "Recovered", &id);
    put_manifest(&s3, &stack, &job_id, 3, 0).await;
    let job = wait_for_final(&db, &stack.table, &job_id, &gw).await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(job.imported_count, Some(3));
    assert!(gw.log_text().contains("recovery"), "{}", gw.log_text());
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_manifest_of_6000_image_sets_larger_than_a_state_ends_completed_with_its_counts() {
    let manifest = manifest_json(&stack(), 6_000, 0, Some(6_000));
    assert!(
        manifest.len() > 256 * 1024,
        "over Step Functions' 256 KiB: {} bytes",
        manifest.len()
    );
    let (_, job) = import_study("LargeManifest", Manifest::Json(manifest)).await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(
        (job.scanned_count, job.imported_count, job.failed_count),
        (Some(6_000), Some(6_000), Some(0))
    );
    assert_eq!(job.image_set_count, Some(6_000));
    assert_eq!(job.image_set_ids.len(), 100, "a job keeps the first 100");
    assert_eq!(job.image_set_ids[0], image_set_id(0));
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_manifest_without_image_sets_summary_ends_with_the_counts_of_its_job_summary() {
    let manifest = manifest_json(&stack(), 2, 0, None);
    let (_, job) = import_study("NoImageSetsSummary", Manifest::Json(manifest)).await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!((job.imported_count, job.failed_count), (Some(2), Some(0)));
    assert_eq!(job.image_set_count, Some(1), "numberOfGeneratedImageSets");
    assert!(job.image_set_ids.is_empty(), "{job:?}");
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn an_output_uri_without_the_import_folder_gets_it_appended() {
    let (_, job) = import_study("OutputWithoutFolder", Manifest::Counts(2, 0)).await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(
        job.output_s3_uri.as_deref(),
        Some("s3://dicom-gateway-test/results/OutputWithoutFolder/")
    );
    assert_eq!(job.imported_count, Some(2));
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn access_denied_at_start_ends_failed_at_once_with_the_message() {
    let (_, job) = import_study("AccessDeniedAtStart", Manifest::None).await;
    assert_eq!(job.status, JobStatus::Failed, "{job:?}");
    let message = job.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("MedicalImaging.AccessDeniedException: ")
            && message
                .contains("is not authorized to perform: medical-imaging:StartDICOMImportJob"),
        "{message}"
    );
    assert_eq!(job.import_job_id, None, "no import was started");
    // At once: not after the retries that throttling gets (20 attempts, up to 300 s apart).
    let time = |t: &Option<String>| humantime::parse_rfc3339_weak(t.as_deref().unwrap()).unwrap();
    let took = time(&job.ended_at)
        .duration_since(time(&job.closed_at))
        .unwrap_or_default();
    assert!(
        took < std::time::Duration::from_secs(20),
        "{took:?}: {job:?}"
    );
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn an_imported_job_claimed_by_a_gateway_that_died_is_ended_by_another_once_the_claim_expires()
{
    let stack = stack();
    let (s3, db) = clients().await;
    let id = unique("gw-claim");
    // A job a dead gateway had claimed: IMPORTED, its manifest in place, the claim 10 s from expiry.
    let job_id = ulid::Ulid::generate().to_string();
    let now = std::time::SystemTime::now();
    let rfc3339 = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let mut job = Job::opened(
        &job_id,
        &rfc3339(now),
        &format!("s3://{}/import/{job_id}/", stack.bucket),
        "gw-dead",
    );
    job.status = JobStatus::Imported;
    job.instance_count = Some(2);
    job.output_s3_uri = Some(format!("s3://{}/results/{job_id}/", stack.bucket));
    job.datastore_id = Some(stack.datastore_id.clone());
    job.import_job_id = Some(IMPORT_JOB_ID.into());
    job.import_ended_at = Some(rfc3339(now));
    let expires_at = rfc3339(now + std::time::Duration::from_secs(10));
    job.claim = Some(OutcomeClaim {
        gateway_id: "gw-dead".into(),
        expires_at: expires_at.clone(),
    });
    db.put_item()
        .table_name(&stack.table)
        .set_item(Some(to_item(&job)))
        .send()
        .await
        .unwrap();
    let (bucket, key) = manifest_location(&job);
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(manifest_json(&stack, 2, 0, Some(1)).into())
        .send()
        .await
        .unwrap();

    let gw = gateway(&stack, "Completed", &id);
    let job = wait_for_final(&db, &stack.table, &job_id, &gw).await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(job.imported_count, Some(2));
    assert_eq!(job.claim, None);
    assert!(
        job.ended_at
            .as_deref()
            .is_some_and(|t| t > expires_at.as_str()),
        "ended at {:?}, while the claim ran until {expires_at}",
        job.ended_at
    );
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn without_an_output_uri_from_get_dicom_import_job_the_requested_prefix_is_read() {
    let (stack, job) = import_study("OutputMissing", Manifest::Counts(2, 0)).await;
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(
        job.output_s3_uri,
        Some(format!("s3://{}/results/{}/", stack.bucket, job.job_id)),
        "the prefix the import was started with"
    );
    assert_eq!(job.imported_count, Some(2));
}

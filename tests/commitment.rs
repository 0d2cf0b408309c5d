//! Storage Commitment with real modalities: pynetdicom (from PyPI, in the venv scripts/test.sh
//! makes) and Orthanc (Debian's package, run here on free ports with a generated configuration),
//! and `--commit-when imported` on LocalStack S3 with the import's results put where HealthImaging
//! writes them.
//!
//! The `imported` test's gateway stores in LocalStack S3 with the stack's job and instance tables,
//! as deployed, and imports through the real import state machine with only HealthImaging mocked,
//! as in tests/import_pipeline.rs: test case `CommitmentImported` of tests/sfn-mock-config.json,
//! whose mocked GetDICOMImportJob answers COMPLETED with this test's own output folder, the same
//! for each of its jobs. The mocked import writes nothing, and the result lines name the job's
//! input objects, known only once the job exists: the test empties the folder before each job (of
//! an earlier run, or its own first job), and once the state machine has recorded IMPORTED puts the
//! result files, the manifest last. The outcome reader waits for a manifest not written yet.
//!
//! The clients are installed by scripts/test.sh, which runs these ignored tests; a test whose client
//! is missing fails saying so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::*;
use dicom_gateway::jobs::{Job, JobStatus};

const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// A SOP Instance UID the modality names but never sent.
const UNKNOWN: &str = "1.2.826.0.1.3680043.2.1125.404.1";
/// Failure Reason 0x0112, no such object instance; 0x0110, processing failure.
const NO_SUCH_OBJECT_INSTANCE: u64 = 0x0112;
const PROCESSING_FAILURE: u64 = 0x0110;

/// The Python of the test venv (scripts/test.sh installs pynetdicom into it).
fn python() -> PathBuf {
    let venv = std::env::var_os("DICOM_GATEWAY_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var("HOME").unwrap_or_default())
                .join(".cache/dicom-gateway-test/venv")
        });
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import pynetdicom"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "pynetdicom is not installed in {}: run scripts/test.sh (it installs it)",
        venv.display()
    );
    python
}

/// The pynetdicom modality of tests/clients/commitment_scu.py, with `args`.
fn modality(args: &[String]) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/commitment_scu.py"))
        .args(args);
    cmd
}

/// The report the modality printed (one JSON line), after checking it exited 0.
fn report_of(out: &Output, gw: &Gateway) -> serde_json::Value {
    assert!(
        out.status.success(),
        "the modality failed: {}\ngateway log:\n{}",
        text(out),
        gw.log_text()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// (SOP Class UID, SOP Instance UID) of a test file.
fn sop_of(file: &str) -> (String, String) {
    let bytes = std::fs::read(testdata(file)).unwrap();
    let (meta, _) = dicom_gateway::part10::split_part10(&bytes).unwrap();
    (
        meta.media_storage_sop_class_uid().to_string(),
        meta.media_storage_sop_instance_uid().to_string(),
    )
}

fn referenced(report: &serde_json::Value) -> Vec<(String, String)> {
    report["referenced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().into(), r[1].as_str().unwrap().into()))
        .collect()
}

fn failed(report: &serde_json::Value) -> Vec<(String, String, u64)> {
    report["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().into(),
                r[1].as_str().unwrap().into(),
                r[2].as_u64().unwrap(),
            )
        })
        .collect()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A gateway on a local store whose modality `PYSCU` takes reports at `127.0.0.1:{report_port}`.
/// `index_grace`: `0s` fails unknown instances as soon as the index has caught up with the request
/// (an event, not a timer); a long one keeps instances stored after the request committable.
fn gateway_for_pyscu(report_port: u16, index_grace: &str) -> (Gateway, tempfile::TempDir) {
    local_gateway(&[
        "--commitment-peer",
        &format!("PYSCU=127.0.0.1:{report_port}"),
        "--commitment-index-grace",
        index_grace,
    ])
}

#[test]
#[ignore = "needs pynetdicom and Orthanc: run scripts/test.sh"]
fn pynetdicom_gets_its_report_on_the_same_association() {
    let report_port = free_port();
    let (gw, _store) = gateway_for_pyscu(report_port, "0s");
    let out = modality(&args(&[
        "--port",
        &gw.port.to_string(),
        "--wait-on",
        "same",
        "--unknown",
        UNKNOWN,
        testdata("ct-explicit-le.dcm").to_str().unwrap(),
        testdata("ct-implicit-le.dcm").to_str().unwrap(),
    ]))
    .output()
    .unwrap();
    let report = report_of(&out, &gw);
    assert_eq!(report["on"], "same-association");
    assert_eq!(report["event_type"], 2, "{report}");
    let mut got = referenced(&report);
    got.sort();
    let mut want = vec![sop_of("ct-explicit-le.dcm"), sop_of("ct-implicit-le.dcm")];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        failed(&report),
        vec![(
            CT_IMAGE_STORAGE.to_string(),
            UNKNOWN.to_string(),
            NO_SUCH_OBJECT_INSTANCE
        )]
    );
    let log = gw.wait_for_log("storage commitment report delivered");
    assert!(log.contains("via=SameAssociation"), "{log}");
    assert_no_patient_data(&log);
}

#[test]
#[ignore = "needs pynetdicom and Orthanc: run scripts/test.sh"]
fn pynetdicom_gets_its_report_on_a_new_association_after_releasing() {
    let report_port = free_port();
    // The instance is stored only after the release (on a second association), so the report
    // cannot be ready while the requesting association is open; the long grace keeps the
    // instance from failing before it arrives.
    let (gw, store) = gateway_for_pyscu(report_port, "10m");
    let out = modality(&args(&[
        "--port",
        &gw.port.to_string(),
        "--wait-on",
        "new",
        "--listen-port",
        &report_port.to_string(),
        "--store-after-release",
        testdata("ct-explicit-le.dcm").to_str().unwrap(),
    ]))
    .output()
    .unwrap();
    let report = report_of(&out, &gw);
    assert_eq!(report["on"], "new-association");
    assert_eq!(report["event_type"], 1);
    assert_eq!(referenced(&report), vec![sop_of("ct-explicit-le.dcm")]);
    assert!(failed(&report).is_empty(), "{report}");
    let log = gw.wait_for_log("storage commitment report delivered");
    assert!(log.contains("via=NewAssociation"), "{log}");
    eventually(
        "the delivered request to leave the journal",
        Duration::from_secs(10),
        || match files_under(&store.path().join("jobs/commitments")).len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        },
    );
}

/// Orthanc on free ports, with a generated configuration (not the system service), knowing the
/// gateway as modality `gateway`. Killed when dropped.
struct Orthanc {
    child: Child,
    http_port: u16,
    _dir: tempfile::TempDir,
}

impl Orthanc {
    /// Orthanc on `http_port` and `dicom_port`, knowing the gateway at `gateway_port`.
    fn start(http_port: u16, dicom_port: u16, gateway_port: u16) -> Orthanc {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let config = serde_json::json!({
            "Name": "dicom-gateway-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "Plugins": [],
            "DicomModalities": {
                "gateway": { "AET": AE, "Host": "127.0.0.1", "Port": gateway_port }
            }
        });
        let config_path = dir.path().join("orthanc.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        // Debian installs it in /usr/sbin, which is not on a non-root PATH.
        let binary = ["/usr/sbin/Orthanc", "/usr/bin/Orthanc"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("Orthanc");
        let child = Command::new(binary)
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("orthanc.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("Orthanc runs (Debian package orthanc: run scripts/test.sh): {e}")
            });
        let orthanc = Orthanc {
            child,
            http_port,
            _dir: dir,
        };
        eventually(
            "Orthanc's REST API",
            Duration::from_secs(30),
            || match http(orthanc.http_port, "GET", "/system", b"") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        orthanc
    }

    /// A REST call that must answer 200; its JSON body.
    fn call(&self, method: &str, path: &str, body: &[u8]) -> serde_json::Value {
        let (status, text) = http(self.http_port, method, path, body).unwrap();
        assert_eq!(status, 200, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request with `Connection: close`; (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[test]
#[ignore = "needs pynetdicom and Orthanc: run scripts/test.sh"]
fn orthanc_gets_a_success_report_for_a_study_it_sent() {
    // Each names the other's port: Orthanc's are chosen first, then the gateway starts.
    let (http_port, dicom_port) = (free_port(), free_port());
    let (gw, _store) = local_gateway(&[
        "--commitment-peer",
        &format!("ORTHANC=127.0.0.1:{dicom_port}"),
    ]);
    let orthanc = Orthanc::start(http_port, dicom_port, gw.port);
    let mut study = String::new();
    let mut sent = Vec::new();
    for file in ["ct-explicit-le.dcm", "ct-implicit-le.dcm"] {
        let added = orthanc.call(
            "POST",
            "/instances",
            &std::fs::read(testdata(file)).unwrap(),
        );
        study = added["ParentStudy"].as_str().unwrap().to_string();
        sent.push(sop_of(file).1);
    }
    let stored = orthanc.call(
        "POST",
        "/modalities/gateway/store",
        serde_json::json!({ "Resources": [study], "Synchronous": true })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(stored["FailedInstancesCount"], 0, "{stored}");
    // Orthanc's storage commitment SCU: N-ACTION on one association, the report awaited on a new
    // one the gateway opens to Orthanc's DICOM port.
    let request = orthanc.call(
        "POST",
        "/modalities/gateway/storage-commitment",
        serde_json::json!({ "Resources": [study] })
            .to_string()
            .as_bytes(),
    );
    let path = request["Path"].as_str().unwrap().to_string();
    let report = eventually(
        "Orthanc to receive the storage commitment report",
        Duration::from_secs(30),
        || {
            let r = orthanc.call("GET", &path, b"");
            match r["Status"].as_str() {
                Some("Pending") | None => Err(format!("{r}\n{}", gw.log_text())),
                Some(_) => Ok(r),
            }
        },
    );
    assert_eq!(report["Status"], "Success", "{report}");
    assert_eq!(report["RemoteAET"], AE);
    let mut committed: Vec<String> = report["Success"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["SOPInstanceUID"].as_str().unwrap().to_string())
        .collect();
    committed.sort();
    sent.sort();
    assert_eq!(committed, sent);
    assert!(report["Failures"].as_array().unwrap().is_empty());
    let log = gw.wait_for_log("storage commitment report delivered");
    assert!(log.contains("via=NewAssociation"), "{log}");
}

// ---- --commit-when imported on LocalStack S3 and DynamoDB -------------------------------------

/// The `imported` test's case of tests/sfn-mock-config.json: the import completes, with the
/// test's own output folder.
const IMPORTED_CASE: &str = "CommitmentImported";

/// The UID root of the `imported` test's instances; each run adds a number of its own, since the
/// stack's tables are shared by every test and run.
const IMPORTED_ROOT: &str = "1.2.826.0.1.3680043.2.1125.21";

/// (SOP Class UID, SOP Instance UID) of a DICOM file.
fn sop_of_path(path: &Path) -> (String, String) {
    let bytes = std::fs::read(path).unwrap();
    let (meta, _) = dicom_gateway::part10::split_part10(&bytes).unwrap();
    (
        meta.media_storage_sop_class_uid().to_string(),
        meta.media_storage_sop_instance_uid().to_string(),
    )
}

/// The jobs gateway `gateway_id` recorded in the job table (a scan, following its pages).
async fn jobs_of_gateway(db: &aws_sdk_dynamodb::Client, table: &str, gateway_id: &str) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut start = None;
    loop {
        let out = db
            .scan()
            .table_name(table)
            .filter_expression("gatewayId = :g")
            .expression_attribute_values(":g", AttributeValue::S(gateway_id.into()))
            .set_exclusive_start_key(start)
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        jobs.extend(
            out.items()
                .iter()
                .map(|i| dicom_gateway::jobs::dynamodb::from_item(i).unwrap()),
        );
        start = out.last_evaluated_key().cloned();
        if start.is_none() {
            return jobs;
        }
    }
}

/// The job of gateway `gateway_id` that `pick` accepts, waited for.
async fn wait_for_job(
    db: &aws_sdk_dynamodb::Client,
    table: &str,
    gateway_id: &str,
    what: &str,
    pick: impl Fn(&Job) -> bool,
) -> Job {
    eventually_async(what, Duration::from_secs(60), async || {
        let jobs = jobs_of_gateway(db, table, gateway_id).await;
        jobs.iter()
            .find(|j| pick(j))
            .cloned()
            .ok_or_else(|| format!("{jobs:?}"))
    })
    .await
}

/// The pending commitment requests gateway `gateway_id` holds in the job table (items
/// `commitment/{TransactionUID}`, src/commitment/dynamodb.rs).
async fn pending_requests(db: &aws_sdk_dynamodb::Client, table: &str, gateway_id: &str) -> usize {
    let mut n = 0;
    let mut start = None;
    loop {
        let out = db
            .scan()
            .table_name(table)
            .filter_expression("claimedBy = :g AND begins_with(jobId, :p)")
            .expression_attribute_values(":g", AttributeValue::S(gateway_id.into()))
            .expression_attribute_values(":p", AttributeValue::S("commitment/".into()))
            .set_exclusive_start_key(start)
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        n += out.items().len();
        start = out.last_evaluated_key().cloned();
        if start.is_none() {
            return n;
        }
    }
}

/// Puts what HealthImaging writes for the import of `job` (recorded IMPORTED) in its output
/// folder: `SUCCESS/success.ndjson` naming `imported` and `FAILURE/failure.ndjson` naming
/// `refused` (object keys), then the manifest with their counts.
async fn put_import_results(
    s3: &aws_sdk_s3::Client,
    stack: &Stack,
    job: &Job,
    imported: &[&str],
    refused: &[&str],
) {
    let line = |key: &str, rest: &str| {
        format!(
            r#"{{"inputFile":"s3://{}/import/{key}",{rest}}}"#,
            stack.bucket
        )
    };
    let success: String = imported
        .iter()
        .map(|k| {
            line(
                k,
                r#""importResponse":{"imageSetId":"0a1b2c3d4e5f60718293a4b5c6d7e8f9","imageSetVersion":1,"isPrimary":true}"#,
            ) + "\n"
        })
        .collect();
    let failure: String = refused
        .iter()
        .map(|k| {
            line(
                k,
                r#""exception":{"exceptionType":"ValidationException","message":"refused for the test"}"#,
            ) + "\n"
        })
        .collect();
    let manifest = manifest_json(stack, imported.len() as u32, refused.len() as u32, Some(1));
    put_results(
        s3,
        job,
        vec![
            ("SUCCESS/success.ndjson", success.into_bytes()),
            ("FAILURE/failure.ndjson", failure.into_bytes()),
        ],
        manifest,
    )
    .await;
}

/// Whether the state machine has taken `job` to IMPORTED or beyond (it ended otherwise).
fn imported_or_ended(job: &Job) -> bool {
    job.status == JobStatus::Imported || job.status.is_terminal()
}

/// A gateway on LocalStack S3 with the stack's job and instance tables, committing on import,
/// importing through the state machine as test case [`IMPORTED_CASE`]; its outcome reader looks
/// at the import poll interval.
fn imported_gateway(stack: &Stack, store: &Path, id: &str, report_port: u16) -> Gateway {
    let arn = format!("{}#{IMPORTED_CASE}", stack.state_machine_arn);
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
            "--store-dir",
            store.to_str().unwrap(),
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
            id,
            "--commit-when",
            "imported",
            "--commitment-peer",
            &format!("PYSCU=127.0.0.1:{report_port}"),
            "--commitment-index-grace",
            "0s",
        ],
        &[],
    )
}

/// The modality in the background: sends `files`, N-ACTION, releases, waits for the report on
/// `report_port`.
fn modality_waiting(gw: &Gateway, report_port: u16, files: &[&Path]) -> Child {
    let mut list = args(&[
        "--port",
        &gw.port.to_string(),
        "--wait-on",
        "new",
        "--listen-port",
        &report_port.to_string(),
        "--timeout",
        "180",
    ]);
    list.extend(files.iter().map(|f| f.display().to_string()));
    modality(&list)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack, pynetdicom and Orthanc: run scripts/test.sh"]
async fn imported_commits_what_healthimaging_imported_and_answers_after_a_restart() {
    let stack = stack();
    let s3 = s3_client(&localstack()).await;
    let db = dynamodb_client(&localstack()).await;
    let store = tempfile::tempdir().unwrap();
    let root = format!(
        "{IMPORTED_ROOT}.{}",
        ulid::Ulid::generate().random() % 999_999_999_999 + 1
    );
    let work = tempfile::tempdir().unwrap();
    let files = write_corpus(work.path(), &root, 3, 1_000);
    let (good, bad, later) = (&files[0], &files[1], &files[2]);
    let id = unique("gw-commit");
    let report_port = free_port();
    clear_mocked_output(&s3, &stack, IMPORTED_CASE).await;
    let mut gw = imported_gateway(&stack, store.path(), &id, report_port);

    // One instance HealthImaging imports, one it refuses.
    let first = modality_waiting(&gw, report_port, &[good, bad]);
    let imported = wait_for_job(
        &db,
        &stack.table,
        &id,
        "the first batch to be imported",
        imported_or_ended,
    )
    .await;
    assert_eq!(imported.status, JobStatus::Imported, "{imported:?}");
    assert_eq!(
        manifest_location(&imported).1,
        format!(
            "{}job-output-manifest.json",
            mocked_output_folder(&stack, IMPORTED_CASE).1
        ),
        "the output folder of the mocked GetDICOMImportJob"
    );
    // IMPORTED follows CLOSED, which means indexed; the keys follow the store's layout.
    let key_of = |job: &Job, file: &Path| {
        let sop = sop_of_path(file).1;
        format!("{}/{root}/{root}.0/{sop}.dcm", job.job_id)
    };
    put_import_results(
        &s3,
        &stack,
        &imported,
        &[&key_of(&imported, good)],
        &[&key_of(&imported, bad)],
    )
    .await;
    let report = report_of(&first.wait_with_output().unwrap(), &gw);
    assert_eq!(report["event_type"], 2, "{report}");
    assert_eq!(referenced(&report), vec![sop_of_path(good)]);
    let (class, sop) = sop_of_path(bad);
    assert_eq!(failed(&report), vec![(class, sop, PROCESSING_FAILURE)]);
    // The next job's results go to the same folder: this job's are removed once it has ended.
    let ended = wait_for_final(&db, &stack.table, &imported.job_id, &gw).await;
    assert_eq!(ended.status, JobStatus::CompletedWithErrors, "{ended:?}");
    clear_mocked_output(&s3, &stack, IMPORTED_CASE).await;

    // A request still pending when the gateway stops is answered by the next start.
    let second = modality_waiting(&gw, report_port, &[later]);
    eventually(
        "the second request to be recorded",
        Duration::from_secs(30),
        || match gw
            .log_text()
            .matches("storage commitment request recorded")
            .count()
        {
            2 => Ok(()),
            n => Err(format!("{n} recorded")),
        },
    );
    let stopped_log = gw.stop();
    assert_eq!(
        stopped_log
            .matches("storage commitment report delivered")
            .count(),
        1,
        "the second report waits for its import: {stopped_log}"
    );
    assert_eq!(
        pending_requests(&db, &stack.table, &id).await,
        1,
        "the pending request is kept across the restart"
    );
    let gw = imported_gateway(&stack, store.path(), &id, report_port);
    // Its batch was closed at the stop; its import, started then or by the next start's recovery,
    // runs on.
    let imported2 = wait_for_job(
        &db,
        &stack.table,
        &id,
        "the second batch to be imported",
        |j| j.job_id != imported.job_id && imported_or_ended(j),
    )
    .await;
    assert_eq!(imported2.status, JobStatus::Imported, "{imported2:?}");
    put_import_results(&s3, &stack, &imported2, &[&key_of(&imported2, later)], &[]).await;
    let report = report_of(&second.wait_with_output().unwrap(), &gw);
    assert_eq!(report["event_type"], 1, "{report}");
    assert_eq!(referenced(&report), vec![sop_of_path(later)]);
    eventually_async(
        "the delivered request to leave the table",
        Duration::from_secs(10),
        async || match pending_requests(&db, &stack.table, &id).await {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        },
    )
    .await;
}

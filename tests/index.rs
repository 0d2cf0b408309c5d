//! The instance index end to end: DCMTK's storescu stores to a gateway, and
//! `dicom-gateway instances show` traces each instance to its object, job and calling AE, also
//! after a SIGKILL that lost part of the index: with the local store and its journal, and (on
//! LocalStack) with S3 and the DynamoDB instance table of the infra/ stack.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::*;
use dicom_gateway::index::dynamodb::DynamoIndex;
use dicom_gateway::index::{InstanceIndex, InstanceOutcome, InstanceRecord, OutcomesRecorded};

const ROOT: &str = "1.2.826.0.1.3680043.2.1125.10";

/// `dicom-gateway instances show <uid> --json --store-dir <store>`.
fn instances_show(store: &Path, uid: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["instances", "show", uid, "--json", "--store-dir"])
        .arg(store)
        .env_remove("DICOM_GATEWAY_JOB_TABLE")
        .env_remove("DICOM_GATEWAY_INSTANCE_TABLE")
        .output()
        .expect("dicom-gateway runs")
}

/// The one record `instances show` prints for `uid`, or what it said instead.
fn record_of(store: &Path, uid: &str) -> Result<serde_json::Value, String> {
    let out = instances_show(store, uid);
    if !out.status.success() {
        return Err(text(&out));
    }
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
    match records.as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!("{} records: {other:?}", other.len())),
    }
}

/// The object key of a stored file: its path relative to the store root.
fn key_of(store: &Path, object: &Path) -> String {
    object
        .strip_prefix(store)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn instances_show_traces_a_stored_instance_to_its_key_job_and_calling_ae() {
    let (mut gw, store) = local_gateway(&[]);
    let file = testdata("ct-explicit-le.dcm");
    let out = storescu(gw.port, "-xe", &[&file]);
    assert!(out.status.success(), "storescu: {}", text(&out));
    let bytes = std::fs::read(&file).unwrap();
    let (meta, _) = dicom_gateway::part10::split_part10(&bytes).unwrap();
    let uid = meta
        .media_storage_sop_instance_uid
        .trim_end_matches('\0')
        .to_string();
    let objects = stored_objects(store.path());
    assert_eq!(objects.len(), 1);
    let key = key_of(store.path(), &objects[0]);

    // The record is written after the acknowledgement, in the background: wait until it shows.
    let record = eventually("the instance in the index", Duration::from_secs(10), || {
        record_of(store.path(), &uid)
    });
    assert_eq!(record["sopInstanceUid"], uid.as_str());
    assert_eq!(record["objectKey"], key.as_str());
    assert_eq!(record["jobId"], key.split('/').next().unwrap());
    assert_eq!(record["callingAeTitle"], "STORESCU");
    assert_eq!(
        record["sopClassUid"],
        meta.media_storage_sop_class_uid.trim_end_matches('\0')
    );
    assert_eq!(record["size"], objects[0].metadata().unwrap().len());
    assert_eq!(record["outcome"], "STORED");
    assert!(record["receivedAt"].as_str().unwrap().ends_with('Z'));

    // The text form names the same facts.
    let out = Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["instances", "show", &uid, "--store-dir"])
        .arg(store.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    for fact in [key.as_str(), "STORESCU", "STORED"] {
        assert!(shown.contains(fact), "{fact} missing from:\n{shown}");
    }

    // An unknown UID is an error that says where it looked and what to check.
    let out = instances_show(store.path(), "1.2.3.999");
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("no instance '1.2.3.999'"), "{said}");
    assert!(said.contains("index"), "{said}");
    gw.stop();
}

#[test]
fn after_a_sigkill_that_lost_index_lines_the_next_start_rebuilds_every_acknowledged_instance() {
    let work = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = write_corpus(work.path(), ROOT, 400, 8_000);
    let store = tempfile::tempdir().unwrap();
    let args = [
        "--store-dir",
        store.path().to_str().unwrap(),
        "--batch-idle",
        "1h",
    ];
    let mut gw = Gateway::start(&args, &[]);
    let log = work.path().join("storescu.log");
    // SIGKILL: the index writer's channel and any unwritten lines are lost.
    let acked = kill_mid_study(&mut gw, &files, &log, 100, ROOT);
    assert!(acked.len() >= 100, "{} acknowledged", acked.len());

    // Make the loss certain whatever the writer managed: cut the index file in the middle of a
    // line, as a crash mid-append would.
    let index_dir = store.path().join("index");
    for f in files_under(&index_dir) {
        let len = std::fs::metadata(&f).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        f.set_len(len / 3).unwrap();
    }

    let mut gw = Gateway::start(&args, &[]);
    let started = gw.wait_for_log("instance index rebuilt from the store");
    assert!(
        !started.contains("added=0"),
        "the rebuild added the lost records:\n{started}"
    );
    for sop in &acked {
        let record = record_of(store.path(), sop)
            .unwrap_or_else(|e| panic!("acknowledged {sop} not in the index: {e}"));
        let key = record["objectKey"].as_str().unwrap().to_string();
        assert!(key.ends_with(&format!("/{sop}.dcm")), "{key}");
        assert!(store.path().join(&key).is_file(), "{key} is not stored");
        assert_eq!(record["jobId"], key.split('/').next().unwrap());
        assert_eq!(record["callingAeTitle"], "STORESCU");
        assert_eq!(record["outcome"], "STORED");
    }
    gw.stop();
}

// ---- S3 and the DynamoDB instance table (LocalStack) -------------------------------------------

/// A UID root of its own for each run: the stack's table is shared by every test and run.
fn unique_root() -> String {
    let n = ulid::Ulid::generate().random() % 999_999_999_999 + 1;
    format!("{ROOT}.{n}")
}

/// `serve` options for S3 and the stack's job and instance tables.
fn s3_args(stack: &Stack, gateway_id: &str, batch_idle: &str) -> Vec<String> {
    [
        "--s3-bucket",
        &stack.bucket,
        "--s3-force-path-style",
        "--job-table",
        &stack.table,
        "--instance-table",
        &stack.instance_table,
        "--batch-idle",
        batch_idle,
        "--gateway-id",
        gateway_id,
    ]
    .map(String::from)
    .to_vec()
}

fn start(args: &[String]) -> Gateway {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start(&args, &[])
}

/// `dicom-gateway instances show <uid> [--json]` against the stack's tables.
fn instances_show_dynamodb(stack: &Stack, uid: &str, json: bool) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["instances", "show", uid])
        .args(json.then_some("--json"))
        .args(["--job-table", &stack.table])
        .args(["--instance-table", &stack.instance_table])
        .output()
        .expect("dicom-gateway runs")
}

/// The one record `instances show --json` prints for `uid` from DynamoDB, or what it said instead.
fn dynamodb_record_of(stack: &Stack, uid: &str) -> Result<serde_json::Value, String> {
    let out = instances_show_dynamodb(stack, uid, true);
    if !out.status.success() {
        return Err(text(&out));
    }
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
    match records.as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!("{} records: {other:?}", other.len())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn instances_show_traces_an_instance_stored_to_s3_through_the_dynamodb_index() {
    let stack = stack();
    let db = dynamodb_client(&localstack()).await;
    let work = tempfile::tempdir().unwrap();
    let root = unique_root();
    let files = write_corpus(work.path(), &root, 3, 2_000);
    let gateway_id = unique("gw-index");
    let mut gw = start(&s3_args(&stack, &gateway_id, "1s"));
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let out = storescu(gw.port, "-xe", &paths);
    assert!(out.status.success(), "storescu: {}", text(&out));

    // CLOSED means indexed: once the job is recorded CLOSED, every record is in the table.
    let job = wait_for_job_of_gateway(&db, &stack.table, &gw, &gateway_id).await;
    let job = eventually_async(
        "the job to be CLOSED",
        Duration::from_secs(30),
        async || match get_job(&db, &stack.table, &job.job_id).await {
            Some(j) if j.status != dicom_gateway::jobs::JobStatus::Open => Ok(j),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    for i in 1..=3 {
        let sop = format!("{root}.{i}");
        let record = dynamodb_record_of(&stack, &sop)
            .unwrap_or_else(|e| panic!("{sop} not indexed when its job was CLOSED: {e}"));
        let key = record["objectKey"].as_str().unwrap();
        assert_eq!(
            key,
            format!("{}/{root}/{root}.0/{sop}.dcm", job.job_id),
            "{record}"
        );
        assert_eq!(record["jobId"], job.job_id.as_str());
        assert_eq!(record["studyInstanceUid"], root.as_str());
        assert_eq!(record["callingAeTitle"], "STORESCU");
        assert_eq!(record["sopClassUid"], CT);
        assert_eq!(record["outcome"], "STORED");
        assert!(record["size"].as_u64().unwrap() > 2_000);
    }

    // The text form, and an unknown UID naming the table to check.
    let out = instances_show_dynamodb(&stack, &format!("{root}.2"), false);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&job.job_id) && shown.contains("STORESCU"),
        "{shown}"
    );
    let out = instances_show_dynamodb(&stack, &format!("{root}.999"), false);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains(&stack.instance_table) && said.contains("--instance-table"),
        "{said}"
    );
    gw.stop();
}

/// Deletes every item of SOP Instance UID `sop` from the instance table.
async fn delete_records(db: &aws_sdk_dynamodb::Client, table: &str, sop: &str) -> usize {
    let out = db
        .query()
        .table_name(table)
        .key_condition_expression("sopInstanceUid = :s")
        .expression_attribute_values(":s", AttributeValue::S(sop.into()))
        .send()
        .await
        .unwrap();
    for item in out.items() {
        db.delete_item()
            .table_name(table)
            .key("sopInstanceUid", item["sopInstanceUid"].clone())
            .key("objectKey", item["objectKey"].clone())
            .send()
            .await
            .unwrap();
    }
    out.items().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn after_a_sigkill_with_s3_and_dynamodb_recovery_indexes_every_acknowledged_instance() {
    let stack = stack();
    let db = dynamodb_client(&localstack()).await;
    let work = tempfile::tempdir().unwrap();
    let root = unique_root();
    let files = write_corpus(work.path(), &root, 400, 8_000);
    let gateway_id = unique("gw-index-kill");
    // The batch stays open: the SIGKILL leaves its job OPEN, for recovery.
    let args = s3_args(&stack, &gateway_id, "1h");
    let mut gw = start(&args);
    let log = work.path().join("storescu.log");
    let acked = kill_mid_study(&mut gw, &files, &log, 100, &root);
    assert!(acked.len() >= 100, "{} acknowledged", acked.len());

    // Make the loss certain whatever the writer managed before the kill: remove the records of
    // every third acknowledged instance, as a channel lost at SIGKILL would have.
    let mut lost = Vec::new();
    for sop in acked.iter().step_by(3) {
        delete_records(&db, &stack.instance_table, sop).await;
        lost.push(sop.clone());
    }

    // The next start (same gateway id) recovers its OPEN job: the index first, then adoption.
    let mut gw = start(&args);
    let log_text = gw.wait_for_log("adopted and closed from its stored objects");
    assert!(
        log_text.contains("instance index repaired from the stored objects"),
        "{log_text}"
    );
    for sop in &acked {
        let record = dynamodb_record_of(&stack, sop)
            .unwrap_or_else(|e| panic!("acknowledged {sop} not in the index: {e}"));
        let key = record["objectKey"].as_str().unwrap();
        assert!(key.ends_with(&format!("/{root}.0/{sop}.dcm")), "{key}");
        assert_eq!(record["jobId"], key.split('/').next().unwrap());
        assert_eq!(record["outcome"], "STORED");
        if lost.contains(sop) {
            // Rebuilt from the S3 listing: the gateway's role does not read images back.
            assert!(record.get("callingAeTitle").is_none(), "{record}");
        }
    }
    gw.stop();
}

/// A record of job `job`, as the writer would append it.
fn record(job: &str, root: &str, i: usize) -> InstanceRecord {
    let sop = format!("{root}.{i}");
    InstanceRecord {
        object_key: format!("{job}/{root}/{root}.0/{sop}.dcm"),
        sop_instance_uid: sop,
        sop_class_uid: Some(CT.into()),
        study_instance_uid: root.into(),
        series_instance_uid: format!("{root}.0"),
        job_id: job.into(),
        size: 1000 + i as u64,
        calling_ae_title: Some("CT1".into()),
        received_at: "2026-11-24T06:00:00.000Z".into(),
        outcome: InstanceOutcome::Stored,
    }
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn outcomes_are_recorded_once_on_the_table_and_failures_are_listed_by_job() {
    let stack = stack();
    let db = dynamodb_client(&localstack()).await;
    let index = DynamoIndex::new(db.clone(), stack.instance_table.clone());
    let job = ulid::Ulid::generate().to_string();
    let root = unique_root();
    let records: Vec<InstanceRecord> = (1..=40).map(|i| record(&job, &root, i)).collect();
    index.append(records.clone()).await.unwrap(); // two BatchWriteItem calls
    let key = |i: usize| records[i - 1].object_key.clone();
    let image_set = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let failed = |i: usize| InstanceOutcome::Failed {
        exception_type: "ValidationException".into(),
        message: format!("file {i} refused"),
    };
    let mut outcomes: Vec<(String, InstanceOutcome)> = Vec::new();
    for i in 1..=20 {
        outcomes.push((
            key(i),
            InstanceOutcome::Imported {
                image_set_id: image_set.into(),
                is_primary: i % 2 == 0,
            },
        ));
    }
    for i in 21..=25 {
        outcomes.push((
            key(i),
            InstanceOutcome::ImportedWithWarnings {
                image_set_id: image_set.into(),
                is_primary: true,
                warnings: vec!["InvalidOffsetTable (45330): offsets".into()],
            },
        ));
    }
    for i in 26..=35 {
        outcomes.push((key(i), failed(i)));
    }
    // A key the index has no record of: skipped, and no partial item is created for it.
    let unknown = format!("{job}/{root}/{root}.0/{root}.999.dcm");
    outcomes.push((unknown.clone(), failed(999)));

    assert_eq!(
        index.record_outcomes(&job, outcomes.clone()).await.unwrap(),
        OutcomesRecorded {
            matched: 35,
            changed: 35
        },
        "the unknown key is not matched"
    );
    // A resumed outcome reader records the same again: nothing changes.
    assert_eq!(
        index.record_outcomes(&job, outcomes).await.unwrap(),
        OutcomesRecorded {
            matched: 35,
            changed: 0
        }
    );
    // Nor does the success file read again after the warnings were recorded: IMPORTED never
    // replaces IMPORTED_WITH_WARNINGS of the same image set (the condition keeps the item, which
    // still counts as matched), while another image set's IMPORTED does replace it.
    let imported = |id: &str| InstanceOutcome::Imported {
        image_set_id: id.into(),
        is_primary: true,
    };
    assert_eq!(
        index
            .record_outcomes(&job, vec![(key(21), imported(image_set))])
            .await
            .unwrap(),
        OutcomesRecorded {
            matched: 1,
            changed: 0
        }
    );
    assert!(
        matches!(
            index.find(&format!("{root}.21")).await.unwrap()[0].outcome,
            InstanceOutcome::ImportedWithWarnings { .. }
        ),
        "the warnings stay"
    );
    let other_set = "ffffffffffffffffffffffffffffffff";
    assert_eq!(
        index
            .record_outcomes(&job, vec![(key(25), imported(other_set))])
            .await
            .unwrap()
            .changed,
        1
    );
    assert_eq!(
        index.find(&format!("{root}.25")).await.unwrap()[0].outcome,
        imported(other_set)
    );
    // And an IMPORTED outcome for a key the index lacks is still told apart from one kept.
    assert_eq!(
        index
            .record_outcomes(&job, vec![(unknown.clone(), imported(image_set))])
            .await
            .unwrap(),
        OutcomesRecorded::default()
    );
    assert!(index.find(&format!("{root}.999")).await.unwrap().is_empty());
    assert_eq!(
        index
            .missing(&job, vec![unknown.clone(), key(1)])
            .await
            .unwrap(),
        vec![unknown]
    );

    let found = index.find(&format!("{root}.22")).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].outcome,
        InstanceOutcome::ImportedWithWarnings {
            image_set_id: image_set.into(),
            is_primary: true,
            warnings: vec!["InvalidOffsetTable (45330): offsets".into()],
        }
    );
    assert_eq!(
        found[0].calling_ae_title.as_deref(),
        Some("CT1"),
        "the rest stays"
    );
    assert_eq!(
        index.find(&format!("{root}.40")).await.unwrap()[0],
        records[39]
    );

    // Failures by job, from the sparse index (eventually consistent).
    let expected: Vec<String> = {
        let mut k: Vec<String> = (26..=35).map(key).collect();
        k.sort();
        k
    };
    let listed = eventually_async(
        "the failures in the index",
        Duration::from_secs(10),
        async || {
            let listed = index.failed(&job).await.map_err(|e| e.to_string())?;
            let keys: Vec<String> = listed.iter().map(|r| r.object_key.clone()).collect();
            if keys == expected {
                Ok(listed)
            } else {
                Err(format!("{keys:?}"))
            }
        },
    )
    .await;
    assert_eq!(listed[0].outcome, failed(26));

    // A later outcome replaces a failure (its details and its place in the index go with it),
    // and a repair racing it never turns it back into STORED.
    let fixed = InstanceOutcome::Imported {
        image_set_id: image_set.into(),
        is_primary: true,
    };
    assert_eq!(
        index
            .record_outcomes(&job, vec![(key(26), fixed.clone())])
            .await
            .unwrap()
            .changed,
        1
    );
    assert_eq!(
        index.add_absent(vec![records[25].clone()]).await.unwrap(),
        0
    );
    let now = index.find(&format!("{root}.26")).await.unwrap();
    assert_eq!(now[0].outcome, fixed);
    eventually_async(
        "the fixed failure out of the index",
        Duration::from_secs(10),
        async || {
            let n = index.failed(&job).await.map_err(|e| e.to_string())?.len();
            if n == 9 {
                Ok(())
            } else {
                Err(format!("{n} listed"))
            }
        },
    )
    .await;
    let item = db
        .get_item()
        .table_name(&stack.instance_table)
        .key("sopInstanceUid", AttributeValue::S(format!("{root}.26")))
        .key("objectKey", AttributeValue::S(key(26)))
        .send()
        .await
        .unwrap();
    let item = item.item().unwrap();
    for gone in ["failedJobId", "exceptionType", "message"] {
        assert!(!item.contains_key(gone), "{gone} left on {item:?}");
    }
}

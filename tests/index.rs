//! The instance index end to end: DCMTK's storescu stores to a local-store gateway, and
//! `dicom-gateway instances show` traces each instance to its object, job and calling AE, also
//! after a SIGKILL that lost part of the index.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const ROOT: &str = "1.2.826.0.1.3680043.2.1125.10";

/// `dicom-gateway instances show <uid> --json --store-dir <store>`.
fn instances_show(store: &Path, uid: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["instances", "show", uid, "--json", "--store-dir"])
        .arg(store)
        .env_remove("DICOM_GATEWAY_JOB_TABLE")
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

//! The gateway killed or stopped in the middle of a study: nothing acknowledged is lost, nothing
//! partial is visible, and the next start finishes the batch.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const ROOT: &str = "1.2.826.0.1.3680043.2.1125.7";

fn corpus(dir: &Path, n: usize) -> Vec<PathBuf> {
    write_corpus(dir, ROOT, n, 16_000)
}

/// SOP Instance UIDs whose C-STORE got Success, from storescu's log (each response follows its file).
fn acknowledged(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    let mut current = None;
    let mut acked = Vec::new();
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("I: Sending file: ") {
            let i: usize = f
                .rsplit("ct")
                .next()
                .unwrap()
                .trim_end_matches(".dcm")
                .parse()
                .unwrap();
            current = Some(format!("1.2.826.0.1.3680043.2.1125.7.{}", i + 1));
        } else if line.contains("Received Store Response (Success)") {
            acked.push(current.take().unwrap());
        }
    }
    acked
}

fn stored_objects(store: &Path) -> Vec<PathBuf> {
    files_under(store)
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "dcm") && !p.starts_with(store.join(".incoming"))
        })
        .collect()
}

/// Every visible object is whole: a Part-10 file whose data set is the full one that was sent.
fn assert_all_whole(objects: &[PathBuf]) {
    for p in objects {
        let sop = p.file_stem().unwrap().to_str().unwrap();
        let expected_len = ct_dataset(
            sop,
            "1.2.826.0.1.3680043.2.1125.7",
            "1.2.826.0.1.3680043.2.1125.7.0",
            16_000,
        )
        .len();
        let bytes = std::fs::read(p).unwrap();
        let (_, offset) = dicom_gateway::part10::split_part10(&bytes)
            .unwrap_or_else(|| panic!("{} is not Part-10", p.display()));
        assert_eq!(
            bytes.len() - offset,
            expected_len,
            "{} is partial",
            p.display()
        );
    }
}

fn journal(store: &Path) -> Vec<serde_json::Value> {
    files_under(&store.join("jobs"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

#[test]
fn sigkill_mid_association_loses_nothing_acknowledged_and_the_next_start_closes_the_batch() {
    let work = tempfile::tempdir().unwrap();
    let files = corpus(work.path(), 1500);
    let store = tempfile::tempdir().unwrap();
    let args = [
        "--store-dir",
        store.path().to_str().unwrap(),
        "--gateway-id",
        "crash-test",
        "--batch-idle",
        "1h",
    ];
    let mut gw = Gateway::start(&args, &[]);
    let log = work.path().join("storescu.log");
    let mut sender = storescu_background(gw.port, &files, &log);
    wait_for_successes(&log, 100);
    let mut child = gw.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let _ = sender.wait();

    let acked = acknowledged(&log);
    assert!(
        acked.len() >= 100 && acked.len() < files.len(),
        "killed mid-study: {} acknowledged",
        acked.len()
    );
    let objects = stored_objects(store.path());
    for sop in &acked {
        assert!(
            objects
                .iter()
                .any(|p| p.file_name().unwrap().to_str().unwrap() == format!("{sop}.dcm")),
            "acknowledged {sop} is not stored"
        );
    }
    assert!(
        objects.len() <= acked.len() + 1,
        "at most the instance being answered at the kill is stored unacknowledged"
    );
    assert_all_whole(&objects);
    let jobs = journal(store.path());
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["status"], "OPEN", "the kill left the batch open");

    // The next start removes the partial upload and closes the batch from what is stored.
    let mut gw = Gateway::start(&args, &[]);
    let until = Instant::now() + Duration::from_secs(20);
    while journal(store.path())[0]["status"] != "CLOSED" {
        assert!(
            Instant::now() < until,
            "recovery did not close the batch: {:?}\n{}",
            journal(store.path()),
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let job = &journal(store.path())[0];
    assert_eq!(job["instanceCount"], objects.len() as u64);
    assert_eq!(job["closeReason"], "recovered");
    assert!(
        files_under(&store.path().join(".incoming")).is_empty(),
        "no partial upload left"
    );
    gw.stop();
}

#[test]
fn sigterm_mid_transfer_finishes_or_aborts_cleanly_within_the_deadline() {
    let work = tempfile::tempdir().unwrap();
    let files = corpus(work.path(), 1500);
    let store = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(
        &[
            "--store-dir",
            store.path().to_str().unwrap(),
            "--shutdown-deadline",
            "1s",
        ],
        &[],
    );
    let log = work.path().join("storescu.log");
    let mut sender = storescu_background(gw.port, &files, &log);
    wait_for_successes(&log, 100);
    let t0 = Instant::now();
    let gw_log = gw.stop(); // SIGTERM, and asserts a clean exit
    let took = t0.elapsed();
    let _ = sender.wait();
    assert!(
        took < Duration::from_secs(8),
        "stopped in {took:?} with a 1 s deadline"
    );

    let acked = acknowledged(&log);
    let objects = stored_objects(store.path());
    for sop in &acked {
        assert!(
            objects
                .iter()
                .any(|p| p.file_name().unwrap().to_str().unwrap() == format!("{sop}.dcm")),
            "acknowledged {sop} is not stored"
        );
    }
    assert_all_whole(&objects);
    assert!(
        files_under(&store.path().join(".incoming")).is_empty(),
        "the instance in flight was discarded"
    );
    // Either storescu finished within the deadline, or the rest was aborted after it.
    if acked.len() < files.len() {
        assert!(gw_log.contains("shutdown deadline passed"), "{gw_log}");
    }
    let jobs = journal(store.path());
    assert_eq!(jobs.len(), 1, "{gw_log}");
    assert_eq!(jobs[0]["status"], "CLOSED");
    assert_eq!(jobs[0]["closeReason"], "shutdown");
    assert_eq!(jobs[0]["instanceCount"], objects.len() as u64);
}

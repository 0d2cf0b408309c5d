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

/// Every visible object is whole: a Part-10 file whose data set is the full one that was sent.
fn assert_all_whole(objects: &[PathBuf]) {
    for p in objects {
        let sop = p.file_stem().unwrap().to_str().unwrap();
        let expected_len = ct_dataset(sop, ROOT, &format!("{ROOT}.0"), 16_000).len();
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

/// Every acknowledged instance is among the stored objects.
fn assert_acknowledged_stored(acked: &[String], objects: &[PathBuf]) {
    for sop in acked {
        assert!(
            objects
                .iter()
                .any(|p| p.file_name().unwrap().to_str().unwrap() == format!("{sop}.dcm")),
            "acknowledged {sop} is not stored"
        );
    }
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
    let acked = kill_mid_study(&mut gw, &files, &log, 100, ROOT);
    assert!(
        acked.len() >= 100 && acked.len() < files.len(),
        "killed mid-study: {} acknowledged",
        acked.len()
    );
    let objects = stored_objects(store.path());
    assert_acknowledged_stored(&acked, &objects);
    assert!(
        objects.len() <= acked.len() + 1,
        "at most the instance being answered at the kill is stored unacknowledged"
    );
    assert_all_whole(&objects);
    let jobs = local_jobs(store.path());
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["status"], "OPEN", "the kill left the batch open");

    // The next start removes the partial upload and closes the batch from what is stored.
    let mut gw = Gateway::start(&args, &[]);
    let job = wait_for_closed_local_job(store.path(), &gw);
    assert_eq!(job["instanceCount"], objects.len() as u64);
    assert_eq!(job["closeReason"], "recovered");
    assert!(incoming_is_empty(store.path()), "no partial upload left");
    gw.stop();
}

#[test]
fn sigterm_mid_transfer_finishes_or_aborts_cleanly_within_the_deadline() {
    let work = tempfile::tempdir().unwrap();
    let files = corpus(work.path(), 1500);
    let (mut gw, store) = local_gateway(&["--shutdown-deadline", "1s"]);
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

    let acked = acknowledged(&log, ROOT);
    let objects = stored_objects(store.path());
    assert_acknowledged_stored(&acked, &objects);
    assert_all_whole(&objects);
    assert!(
        incoming_is_empty(store.path()),
        "the instance in flight was discarded"
    );
    // Either storescu finished within the deadline, or the rest was aborted after it.
    if acked.len() < files.len() {
        assert!(gw_log.contains("shutdown deadline passed"), "{gw_log}");
    }
    let jobs = local_jobs(store.path());
    assert_eq!(jobs.len(), 1, "{gw_log}");
    assert_eq!(jobs[0]["status"], "CLOSED");
    assert_eq!(jobs[0]["closeReason"], "shutdown");
    assert_eq!(jobs[0]["instanceCount"], objects.len() as u64);
}

//! scripts/replay.sh against a running gateway: its summary must match what was stored.

mod common;

use common::*;

fn replay(port: u16, dir: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/replay.sh"))
        .args(["-n", "3", "127.0.0.1", &port.to_string()])
        .arg(dir)
        .env_remove("DICOM_GATEWAY_AE_TITLE")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn count(summary: &str, label: &str) -> usize {
    let line = summary
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no '{label}' in:\n{summary}"));
    line.rsplit(' ').next().unwrap().trim().parse().unwrap()
}

#[test]
fn replay_sends_testdata_and_its_summary_matches_what_was_stored() {
    let (gw, store) = local_gateway(&[]);
    let (ok, summary) = replay(gw.port, &testdata(""));
    assert!(ok, "{summary}");
    let stored = stored_objects(store.path());
    assert_eq!(count(&summary, "succeeded:"), stored.len(), "{summary}");
    assert_eq!(
        count(&summary, "succeeded:"),
        TESTDATA_FILES.len(),
        "{summary}"
    );
    assert_eq!(count(&summary, "failed:"), 0);
    assert_eq!(
        count(&summary, "skipped (not DICOM):"),
        1,
        "generate.sh is skipped: {summary}"
    );
    // Every file went in its own transfer syntax: stored bytes equal the files' data sets.
    for p in stored {
        let bytes = std::fs::read(&p).unwrap();
        let (meta, _) = dicom_gateway::part10::split_part10(&bytes).unwrap();
        assert_eq!(meta.source_application_entity_title(), Some("REPLAY"));
    }
}

#[test]
fn replay_reports_failure_statuses_and_exits_non_zero() {
    let gw = unreachable_s3_gateway();
    let (ok, summary) = replay(gw.port, &testdata(""));
    assert!(!ok, "{summary}");
    assert_eq!(count(&summary, "succeeded:"), 0, "{summary}");
    assert_eq!(
        count(&summary, "failed:"),
        TESTDATA_FILES.len(),
        "{summary}"
    );
    assert!(summary.contains("(Refused: OutOfResources)"), "{summary}");
}

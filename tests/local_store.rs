//! End-to-end tests of the gateway on its embedded local store, driven by DCMTK's echoscu and
//! storescu exactly as users run them, plus a raw SCU where byte-level control is needed.

mod common;

use std::time::Duration;

use common::*;
use dicom_ul::pdu::Pdu;

#[test]
fn echo_succeeds() {
    let (gw, _store) = local_gateway(&[]);
    let out = echoscu(gw.port, AE, "ECHOSCU");
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_study_in_five_transfer_syntaxes_arrives_byte_for_byte_and_its_batch_is_recorded_at_shutdown() {
    let (mut gw, store) = local_gateway(&[]);
    send_testdata(gw.port);
    let objects = stored_objects(store.path());
    assert_eq!(objects.len(), 5, "{objects:?}");
    let mut matched: Vec<_> = objects
        .iter()
        .map(|p| assert_matches_a_sent_file(&std::fs::read(p).unwrap()))
        .collect();
    matched.sort();
    let mut expected = TESTDATA_FILES.to_vec();
    expected.sort();
    assert_eq!(matched, expected);
    // Key layout: {jobId}/{study}/{series}/{sop}.dcm, all in one batch.
    let rel: Vec<_> = objects
        .iter()
        .map(|p| p.strip_prefix(store.path()).unwrap().to_path_buf())
        .collect();
    let job_id = rel[0]
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        rel.iter()
            .all(|r| r.components().count() == 4 && r.starts_with(&job_id))
    );
    // Written atomically: nothing left in the incoming directory.
    assert!(incoming_is_empty(store.path()));

    // Graceful shutdown closes the open batch and records it.
    let log = gw.stop();
    let journal = store.path().join("jobs").join(format!("{job_id}.json"));
    let job: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&journal).unwrap_or_else(|_| panic!("no job file; log:\n{log}")),
    )
    .unwrap();
    assert_eq!(
        job["status"], "CLOSED",
        "no state machine configured: the job stays CLOSED"
    );
    assert_eq!(job["instanceCount"], 5);
    assert_eq!(job["closeReason"], "shutdown");
    assert_eq!(job["callingAeTitles"][0], "STORESCU");
    assert_eq!(job["studyInstanceUids"].as_array().unwrap().len(), 1);

    // The operator commands read the same journal.
    let dir = store.path().to_str().unwrap();
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["jobs", "list", "--store-dir", dir])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains(&job_id) && list.contains("CLOSED"), "{list}");
    let show = std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["jobs", "show", &job_id, "--store-dir", dir])
        .output()
        .unwrap();
    assert!(show.status.success());
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("instanceCount") && show.contains("import has not started"),
        "{show}"
    );
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args([
            "jobs",
            "show",
            "01AAAAAAAAAAAAAAAAAAAAAAAA",
            "--store-dir",
            dir,
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("jobs list"));
}

#[test]
fn wrong_called_ae_disallowed_calling_ae_and_disallowed_sop_class_are_rejected_and_nothing_is_stored()
 {
    let (gw, store) = local_gateway(&[
        "--calling-ae-allow",
        "STORESCU,ECHOSCU",
        "--sop-class-allow",
        "1.2.840.10008.5.1.4.1.1.4,1.2.840.10008.1.1",
    ]);

    let out = echoscu(gw.port, "NOT_THE_GATEWAY", "ECHOSCU");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("Called AE Title Not Recognized"),
        "{}",
        text(&out)
    );

    let out = echoscu(gw.port, AE, "INTRUDER");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&out)
    );

    // CT is outside the SOP class allow-list: its presentation context is rejected.
    let out = storescu(gw.port, "-xi", &[&testdata("ct-implicit-le.dcm")]);
    assert!(
        !out.status.success()
            || text(&out)
                .to_lowercase()
                .contains("no presentation context"),
        "{}",
        text(&out)
    );
    assert!(stored_objects(store.path()).is_empty());

    let log = gw.log_text();
    assert!(log.contains("called AE title not recognized"), "{log}");
    assert!(log.contains("calling AE title not recognized"), "{log}");
    assert!(
        log.contains("presentation contexts rejected abstract_syntax_not_supported="),
        "{log}"
    );
}

#[test]
fn peers_outside_the_address_allow_list_are_rejected() {
    let (gw, _store) = local_gateway(&["--peer-allow", "10.0.0.0/8"]);
    let out = echoscu(gw.port, AE, "ECHOSCU");
    assert!(!out.status.success());
    assert!(text(&out).contains("Rejected Permanent"), "{}", text(&out));
    assert!(gw.log_text().contains("peer address not in --peer-allow"));
}

#[test]
fn over_the_association_limit_the_extra_peer_gets_a_transient_rejection_and_the_others_complete() {
    let (gw, store) = local_gateway(&["--max-associations", "1"]);
    let mut holder = RawScu::associate(gw.port, AE);
    let out = echoscu(gw.port, AE, "ECHOSCU");
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("Rejected Transient") && t.contains("Local Limit Exceeded"),
        "{t}"
    );
    // The association holding the slot is unaffected.
    let status = holder.store(
        1,
        "1.2.3.4.1",
        &ct_dataset("1.2.3.4.1", "1.2.3", "1.2.3.1", 1000),
        16000,
    );
    assert_eq!(status, 0x0000);
    holder.release();
    assert_eq!(stored_objects(store.path()).len(), 1);
    // Once the slot is free (just after the release), the next peer gets in.
    eventually(
        "an echo to succeed once the slot is free",
        Duration::from_secs(5),
        || {
            let out = echoscu(gw.port, AE, "ECHOSCU");
            if out.status.success() {
                Ok(())
            } else {
                Err(text(&out))
            }
        },
    );
}

#[test]
fn mismatched_and_invalid_uids_get_failure_statuses_and_the_association_stays_usable() {
    let (gw, store) = local_gateway(&[]);
    let mut scu = RawScu::associate(gw.port, AE);
    // Data set SOP Instance UID differs from the command's: 0xA900.
    assert_eq!(
        scu.store(
            1,
            "1.2.3.4.99",
            &ct_dataset("1.2.3.4.1", "1.2.3", "1.2.3.1", 500),
            100
        ),
        0xA900
    );
    // Study Instance UID is not a UID (a path traversal attempt): 0xC000, nothing written.
    assert_eq!(
        scu.store(
            2,
            "1.2.3.4.2",
            &ct_dataset("1.2.3.4.2", "../../etc", "1.2.3.1", 500),
            100
        ),
        0xC000
    );
    // Command UID that is not a UID: 0xC000.
    assert_eq!(
        scu.store(
            3,
            "1.2.x",
            &ct_dataset("1.2.x", "1.2.3", "1.2.3.1", 500),
            100
        ),
        0xC000
    );
    // Garbage instead of a data set: 0xC000.
    assert_eq!(
        scu.store(4, "1.2.3.4.4", b"\x08\x00\x18\x00xx\xff\xff", 100),
        0xC000
    );
    // The same association then stores a good instance.
    assert_eq!(
        scu.store(
            5,
            "1.2.3.4.5",
            &ct_dataset("1.2.3.4.5", "1.2.3", "1.2.3.1", 70_000),
            16_000
        ),
        0x0000
    );
    scu.release();
    let objects = stored_objects(store.path());
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert!(objects[0].ends_with("1.2.3/1.2.3.1/1.2.3.4.5.dcm"));
    assert!(incoming_is_empty(store.path()));
}

#[test]
fn malformed_pdus_get_an_abort_while_a_parallel_association_is_served_normally() {
    let (gw, store) = local_gateway(&[]);
    let mut good = RawScu::associate(gw.port, AE);

    // A PDU of an unknown type before any association.
    let mut bad = RawScu::connect(gw.port);
    bad.send_raw(&[0x42, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
    assert!(
        matches!(bad.read(), Some(Pdu::AbortRQ { .. })),
        "unknown PDU type is aborted"
    );

    // An associated peer announcing an absurd PDU length.
    let mut absurd = RawScu::associate(gw.port, AE);
    absurd.send_raw(&[0x04, 0, 0xFF, 0xFF, 0xFF, 0xF0]);
    assert!(
        matches!(absurd.read(), Some(Pdu::AbortRQ { .. })),
        "oversized PDU is aborted"
    );

    // A truncated PDV item inside a P-DATA-TF.
    let mut truncated = RawScu::associate(gw.port, AE);
    truncated.send_raw(&[0x04, 0, 0, 0, 0, 8, 0, 0, 0, 50, 1, 3, 0, 0]);
    assert!(
        matches!(truncated.read(), Some(Pdu::AbortRQ { .. })),
        "truncated PDV is aborted"
    );

    // A data set fragment before any command, and a PDV on a context that was never accepted.
    let mut out_of_order = RawScu::associate(gw.port, AE);
    out_of_order.send_raw(&dicom_gateway::pdu::encode_pdata(1, false, true, b"data"));
    assert!(matches!(out_of_order.read(), Some(Pdu::AbortRQ { .. })));
    let mut wrong_ctx = RawScu::associate(gw.port, AE);
    wrong_ctx.send_raw(&dicom_gateway::pdu::encode_pdata(9, true, true, b"cmd"));
    assert!(matches!(wrong_ctx.read(), Some(Pdu::AbortRQ { .. })));

    // A peer that disappears in the middle of an instance leaves nothing behind.
    let mut vanishing = RawScu::associate(gw.port, AE);
    let cmd = dicom_gateway::dimse::request(
        dicom_gateway::dimse::command_field::C_STORE_RQ,
        1,
        CT,
        Some("1.2.3.9"),
        true,
    );
    vanishing.send_raw(&dicom_gateway::pdu::encode_pdata(1, true, true, &cmd));
    vanishing.send_raw(&dicom_gateway::pdu::encode_pdata(
        1,
        false,
        false,
        &ct_dataset("1.2.3.9", "1.2.3", "1.2.3.1", 50_000)[..30_000],
    ));
    drop(vanishing);

    // Meanwhile the good association and a DCMTK client are served normally.
    assert_eq!(
        good.store(
            1,
            "1.2.3.4.1",
            &ct_dataset("1.2.3.4.1", "1.2.3", "1.2.3.1", 10_000),
            4096
        ),
        0x0000
    );
    good.release();
    let out = storescu(gw.port, "-xi", &[&testdata("ct-implicit-le.dcm")]);
    assert!(out.status.success(), "{}", text(&out));
    // The gateway logs this once the vanished peer's partial upload is removed.
    let log = gw.wait_for_log("incomplete instance discarded");
    assert_eq!(stored_objects(store.path()).len(), 2);
    assert!(
        incoming_is_empty(store.path()),
        "the vanished peer's partial upload was removed"
    );
    assert!(log.contains("association aborted"), "{log}");
}

#[test]
fn bad_options_are_refused_with_a_message_naming_the_option() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["serve", "--ae-title", "A_TITLE_LONGER_THAN_SIXTEEN"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ae-title"));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for opt in [
        "--listen",
        "--ae-title",
        "--calling-ae-allow",
        "--peer-allow",
        "--s3-bucket",
        "--part-size",
        "--batch-max-instances",
        "DICOM_GATEWAY_AE_TITLE",
    ] {
        assert!(help.contains(opt), "--help mentions {opt}");
    }
}

#[test]
fn the_echo_subcommand_succeeds_against_a_gateway_and_fails_clearly_when_rejected_or_down() {
    let (gw, _store) = local_gateway(&[]);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
            .arg("echo")
            .args(args)
            .env_remove("DICOM_GATEWAY_AE_TITLE")
            .output()
            .unwrap()
    };
    let peer = format!("127.0.0.1:{}", gw.port);
    let ok = run(&[&peer]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("Success"));

    let rejected = run(&[&peer, "--called-ae", "SOMEONE_ELSE"]);
    assert_eq!(rejected.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&rejected.stderr).contains("called AE title not recognized"));

    let down = run(&[&format!("127.0.0.1:{}", free_port()), "--timeout", "5s"]);
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot connect"));
}

#[test]
fn json_logs_are_one_object_per_line_with_the_association_fields() {
    let (mut gw, _store) = local_gateway(&["--log-format", "json"]);
    let out = storescu(gw.port, "-xi", &[&testdata("ct-implicit-le.dcm")]);
    assert!(out.status.success());
    let log = gw.stop();
    let mut stored = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"] == "instance stored" {
            stored = true;
            assert_eq!(
                v["sop_instance_uid"],
                "2.25.311420171180473612498023164377015521.2.1.1"
            );
            assert!(v["key"].as_str().unwrap().ends_with(".dcm"));
            let spans = v["spans"]
                .as_array()
                .unwrap_or_else(|| panic!("no span list: {line}"));
            assert!(
                spans.iter().any(|s| s["name"] == "association"
                    && s["calling_ae"] == "STORESCU"
                    && s["peer"].is_string()),
                "{line}"
            );
        }
    }
    assert!(stored, "{log}");
}

#[test]
fn no_patient_data_reaches_the_log_even_at_trace_level() {
    let (mut gw, _store) = local_gateway(&["--log-level", "trace"]);
    send_testdata(gw.port);
    let mut scu = RawScu::associate(gw.port, AE);
    assert_eq!(
        scu.store(
            1,
            "1.2.3.4.1",
            &ct_dataset("1.2.3.4.1", "1.2.3", "1.2.3.1", 2000),
            700
        ),
        0x0000
    );
    assert_eq!(
        scu.store(
            2,
            "1.2.3.4.9",
            &ct_dataset("1.2.3.4.2", "1.2.3", "1.2.3.1", 2000),
            700
        ),
        0xA900
    );
    scu.release();
    let log = gw.stop();
    assert!(
        log.contains("DEBUG") && log.contains("C-STORE request"),
        "the log level took effect"
    );
    assert_no_patient_data(&log);
}

#[test]
fn a_sop_instance_uid_sent_twice_in_a_batch_is_stored_once_by_the_duplicate_policy() {
    // (policy, status of the second copy, pixel bytes of the copy that ends up stored)
    for (policy, second_status, kept_pixels) in [
        ("overwrite", 0x0000, 2000),
        ("keep-first", 0x0000, 1000),
        ("reject", 0x0111, 1000),
    ] {
        let (mut gw, store) = local_gateway(&["--duplicate-policy", policy]);
        let mut scu = RawScu::associate(gw.port, AE);
        assert_eq!(
            scu.store(
                1,
                "1.2.3.4.7",
                &ct_dataset("1.2.3.4.7", "1.2.3", "1.2.3.1", 1000),
                4096
            ),
            0x0000,
            "{policy}"
        );
        assert_eq!(
            scu.store(
                2,
                "1.2.3.4.7",
                &ct_dataset("1.2.3.4.7", "1.2.3", "1.2.3.1", 2000),
                4096
            ),
            second_status,
            "{policy}"
        );
        scu.release();
        let objects = stored_objects(store.path());
        assert_eq!(objects.len(), 1, "{policy}: {objects:?}");
        let bytes = std::fs::read(&objects[0]).unwrap();
        let (_, offset) = dicom_gateway::part10::split_part10(&bytes).unwrap();
        assert_eq!(
            &bytes[offset..],
            &ct_dataset("1.2.3.4.7", "1.2.3", "1.2.3.1", kept_pixels)[..],
            "{policy}: the expected copy is stored"
        );
        let log = gw.stop();
        let jobs = local_jobs(store.path());
        assert_eq!(jobs[0]["instanceCount"], 1, "{policy}: counted once\n{log}");
    }
}

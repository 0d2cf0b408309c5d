//! End-to-end tests of the limits that make a batch an import job HealthImaging accepts (issue 9,
//! items 5 and 6): objects counted as files, bytes reserved while instances stream, the per-file
//! limit, and the `healthimaging` transfer-syntax preset. The gateway runs on its local store; the
//! clients are DCMTK's storescu and a raw SCU where a test must control what is sent when.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use dicom_gateway::{dimse, pdu};
use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResultReason,
    UserVariableItem,
};

/// Fragment size of the raw SCU's data sets.
const FRAGMENT: usize = 16_000;

/// Sends the C-STORE-RQ command for `sop` on context 1 and the first `upto` bytes of `dataset`.
fn begin_store(scu: &mut RawScu, message_id: u16, sop: &str, dataset: &[u8], upto: usize) {
    let cmd = dimse::request(
        dimse::command_field::C_STORE_RQ,
        message_id,
        CT,
        Some(sop),
        true,
    );
    scu.send_raw(&pdu::encode_pdata(1, true, true, &cmd));
    for chunk in dataset[..upto].chunks(FRAGMENT) {
        scu.send_raw(&pdu::encode_pdata(1, false, false, chunk));
    }
}

/// Sends the rest of `dataset` from `from`, the last fragment flagged last, and reads the response:
/// its status and its command set's bytes (where an Error Comment would be).
fn finish_store(scu: &mut RawScu, dataset: &[u8], from: usize) -> (u16, Vec<u8>) {
    let chunks: Vec<&[u8]> = dataset[from..].chunks(FRAGMENT).collect();
    for (i, c) in chunks.iter().enumerate() {
        scu.send_raw(&pdu::encode_pdata(1, false, i + 1 == chunks.len(), c));
    }
    match scu.read() {
        Some(Pdu::PData { data }) => {
            let status = dimse::response_status(&data[0].data).unwrap().0;
            (status, data[0].data.clone())
        }
        other => panic!("expected a response, got {other:?}"),
    }
}

/// A whole C-STORE; returns the status and the response command set.
fn c_store(scu: &mut RawScu, message_id: u16, sop: &str, dataset: &[u8]) -> (u16, Vec<u8>) {
    begin_store(scu, message_id, sop, dataset, 0);
    finish_store(scu, dataset, 0)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Waits for a job in the local journal with `status`, other than those in `known`; returns its id.
fn wait_for_new_job(store: &Path, status: &str, known: &[String]) -> String {
    eventually(
        &format!("a new {status} job in the journal"),
        Duration::from_secs(20),
        || {
            let jobs = local_jobs(store);
            jobs.iter()
                .filter(|j| j["status"] == status)
                .filter_map(|j| j["jobId"].as_str())
                .find(|id| !known.iter().any(|k| k == id))
                .map(str::to_string)
                .ok_or_else(|| format!("{jobs:?}"))
        },
    )
}

/// The job id of the first batch the gateway opened (it is recorded OPEN only once an instance in
/// it is durable, so the log says it first).
fn first_opened_batch(gw: &Gateway) -> String {
    eventually("a batch to open", Duration::from_secs(20), || {
        let log = gw.log_text();
        log.lines()
            .find(|l| l.contains("batch opened"))
            .and_then(|l| l.split("job_id=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .ok_or(log.clone())
    })
}

/// The job of the journal whose id is `id`.
fn job(store: &Path, id: &str) -> serde_json::Value {
    local_jobs(store)
        .into_iter()
        .find(|j| j["jobId"] == id)
        .unwrap_or_else(|| panic!("no job {id}"))
}

#[test]
fn concurrent_associations_cannot_push_a_batch_past_the_byte_limit() {
    // A batch takes no new instance once 1 MB is stored or in flight, and never holds more than 1.5 MB.
    let (mut gw, store) = local_gateway(&[
        "--batch-max-bytes",
        "1MB",
        "--job-max-bytes",
        "1500KB",
        "--log-level",
        "dicom_gateway=debug",
    ]);
    let a = ct_dataset("1.2.3.7.1", "1.2.3.7", "1.2.3.7.0", 900_000);
    let b = ct_dataset("1.2.3.7.2", "1.2.3.7", "1.2.3.7.0", 900_000);
    let mut sender_a = RawScu::associate(gw.port, AE);
    let mut sender_b = RawScu::associate(gw.port, AE);

    // Both instances start while the batch is nearly empty: they are both in it.
    begin_store(&mut sender_a, 1, "1.2.3.7.1", &a, FRAGMENT);
    let first = first_opened_batch(&gw);
    begin_store(&mut sender_b, 1, "1.2.3.7.2", &b, FRAGMENT);
    // A completes (0.9 MB). B's bytes then take the batch to 1 MB, which closes it to new
    // instances, and on towards 1.8 MB: B is refused before the batch passes 1.5 MB.
    assert_eq!(finish_store(&mut sender_a, &a, FRAGMENT).0, 0x0000);
    let (status, response) = finish_store(&mut sender_b, &b, FRAGMENT);
    assert_eq!(status, 0xA700, "the instance that would overflow the batch");
    assert!(
        contains(&response, "import batch full; send the instance again"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    // The association goes on: sent again, B goes into the next batch.
    assert_eq!(c_store(&mut sender_b, 2, "1.2.3.7.2", &b).0, 0x0000);
    let second = wait_for_new_job(store.path(), "OPEN", std::slice::from_ref(&first));

    // Bytes in flight close a batch to new instances before anything is stored: C streams into
    // the second batch (0.9 MB stored) until 1 MB is reached; D, sent meanwhile, gets a new batch.
    let c = ct_dataset("1.2.3.7.3", "1.2.3.7", "1.2.3.7.0", 300_000);
    let d = ct_dataset("1.2.3.7.4", "1.2.3.7", "1.2.3.7.0", 10_000);
    let mut sender_c = RawScu::associate(gw.port, AE);
    begin_store(&mut sender_c, 1, "1.2.3.7.3", &c, 10 * FRAGMENT);
    eventually(
        "the second batch to close while C is in flight",
        Duration::from_secs(20),
        || {
            let log = gw.log_text();
            log.lines()
                .find(|l| l.contains("batch closing") && l.contains(&second))
                .map(|_| ())
                .ok_or(log.clone())
        },
    );
    let mut sender_d = RawScu::associate(gw.port, AE);
    assert_eq!(c_store(&mut sender_d, 1, "1.2.3.7.4", &d).0, 0x0000);
    assert_eq!(finish_store(&mut sender_c, &c, 10 * FRAGMENT).0, 0x0000);
    for scu in [sender_a, sender_b, sender_c, sender_d] {
        scu.release();
    }
    let log = gw.stop();

    let jobs = local_jobs(store.path());
    assert_eq!(jobs.len(), 3, "{jobs:#?}\n{log}");
    for j in &jobs {
        assert_eq!(j["status"], "CLOSED", "{j}");
        let bytes = j["totalBytes"].as_u64().unwrap();
        assert!(bytes <= 1_500_000, "a batch of {bytes} bytes: {j}");
    }
    let (first, second) = (job(store.path(), &first), job(store.path(), &second));
    assert_eq!(first["instanceCount"], 1, "A only: {first}");
    assert_eq!(first["closeReason"], "max-bytes");
    assert_eq!(second["instanceCount"], 2, "B and C: {second}");
    assert_eq!(second["closeReason"], "max-bytes");
    assert!(second["totalBytes"].as_u64().unwrap() > 1_000_000);
    assert_eq!(stored_objects(store.path()).len(), 4);
    assert!(
        incoming_is_empty(store.path()),
        "B's first upload was aborted"
    );
}

#[test]
fn a_repeat_under_a_new_series_counts_as_a_second_object() {
    let (mut gw, store) = local_gateway(&[]);
    let mut scu = RawScu::associate(gw.port, AE);
    let sop = "1.2.3.8.1";
    let in_series = |series: &str, pixels: usize| ct_dataset(sop, "1.2.3.8", series, pixels);
    assert_eq!(
        c_store(&mut scu, 1, sop, &in_series("1.2.3.8.10", 1000)).0,
        0
    );
    // The same SOP instance under another series: a second object, a second file of the job.
    assert_eq!(
        c_store(&mut scu, 2, sop, &in_series("1.2.3.8.20", 2000)).0,
        0
    );
    // Again under that series: it replaces the object there and counts once.
    assert_eq!(
        c_store(&mut scu, 3, sop, &in_series("1.2.3.8.20", 3000)).0,
        0
    );
    scu.release();
    let log = gw.stop();

    let objects = stored_objects(store.path());
    assert_eq!(objects.len(), 2, "{objects:?}");
    let on_disk: u64 = objects
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let jobs = local_jobs(store.path());
    assert_eq!(jobs.len(), 1, "{jobs:?}\n{log}");
    assert_eq!(jobs[0]["instanceCount"], 2, "two objects: {}", jobs[0]);
    assert_eq!(
        jobs[0]["totalBytes"].as_u64(),
        Some(on_disk),
        "the bytes of both objects, the replaced copy's not counted"
    );
}

#[test]
fn an_oversized_instance_is_refused_while_it_streams_and_the_association_continues() {
    let (mut gw, store) = local_gateway(&["--max-instance-size", "100KB"]);

    // Raw SCU: the status, the Error Comment, then a good instance on the same association.
    let mut scu = RawScu::associate(gw.port, AE);
    let big = ct_dataset("1.2.3.9.1", "1.2.3.9", "1.2.3.9.0", 300_000);
    let (status, response) = c_store(&mut scu, 1, "1.2.3.9.1", &big);
    assert_eq!(status, 0xA700);
    assert!(
        contains(
            &response,
            "instance larger than the per-file limit of 100000 bytes"
        ),
        "{}",
        String::from_utf8_lossy(&response)
    );
    let small = ct_dataset("1.2.3.9.2", "1.2.3.9", "1.2.3.9.0", 50_000);
    assert_eq!(c_store(&mut scu, 2, "1.2.3.9.2", &small).0, 0x0000);
    scu.release();

    // DCMTK's storescu: the large file is refused, the next one in the same association stored.
    let dir = tempfile::tempdir().unwrap();
    let (large, fine) = (dir.path().join("large"), dir.path().join("fine"));
    std::fs::create_dir_all(&large).unwrap();
    std::fs::create_dir_all(&fine).unwrap();
    let large = write_corpus(&large, "1.2.3.10", 1, 300_000);
    let fine = write_corpus(&fine, "1.2.3.11", 1, 50_000);
    let log = dir.path().join("storescu.log");
    let status = storescu_background(gw.port, &[large[0].clone(), fine[0].clone()], &log)
        .wait()
        .unwrap();
    let outcomes = storescu_outcomes(&log);
    assert_eq!(outcomes.len(), 2, "{outcomes:?} ({status})");
    assert!(
        outcomes[0]
            .1
            .as_deref()
            .is_some_and(|r| r.contains("OutOfResources")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1].1.as_deref(), Some("Success"), "{outcomes:?}");

    let log = gw.stop();
    let objects = stored_objects(store.path());
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert!(
        objects
            .iter()
            .all(|p| !p.ends_with("1.2.3.9.1.dcm") && !p.ends_with("1.2.3.10.1.dcm")),
        "{objects:?}"
    );
    assert!(incoming_is_empty(store.path()), "the uploads were aborted");
    assert!(log.contains("limit per file"), "{log}");
    assert_eq!(local_jobs(store.path())[0]["instanceCount"], 2);
}

/// Proposes CT Image Storage in one presentation context per transfer syntax list; returns the
/// result of each (reason and chosen syntax), in order.
fn negotiate(port: u16, proposals: &[&[&str]]) -> Vec<(PresentationContextResultReason, String)> {
    let mut scu = RawScu::connect(port);
    scu.send_pdu(&Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "RAWSCU".into(),
        called_ae_title: AE.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: proposals
            .iter()
            .enumerate()
            .map(|(i, ts)| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: CT.into(),
                transfer_syntaxes: ts.iter().map(|s| s.to_string()).collect(),
            })
            .collect(),
        user_variables: vec![UserVariableItem::MaxLength(65536)],
    }));
    let results = match scu.read() {
        Some(Pdu::AssociationAC(ac)) => ac
            .presentation_contexts
            .into_iter()
            .map(|r| {
                (
                    r.reason,
                    r.transfer_syntax.trim_end_matches('\0').to_string(),
                )
            })
            .collect(),
        other => panic!("association not accepted: {other:?}"),
    };
    scu.release();
    results
}

#[test]
fn the_healthimaging_preset_refuses_unsupported_syntaxes_at_negotiation_and_accepts_supported_ones()
{
    const JPEG_XL_LOSSLESS: &str = "1.2.840.10008.1.2.4.110";
    const JPIP_REFERENCED: &str = "1.2.840.10008.1.2.4.94";
    const ENCAPSULATED_UNCOMPRESSED: &str = "1.2.840.10008.1.2.1.98";
    const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";
    let proposals: [&[&str]; 4] = [
        &[JPEG_XL_LOSSLESS],
        &[JPIP_REFERENCED, ENCAPSULATED_UNCOMPRESSED],
        &[JPEG_XL_LOSSLESS, EXPLICIT_LE],
        &[JPEG_LS_LOSSLESS],
    ];
    use PresentationContextResultReason::*;

    let (gw, _store) = local_gateway(&["--transfer-syntax-allow", "healthimaging"]);
    let results = negotiate(gw.port, &proposals);
    assert_eq!(results.len(), 4, "{results:?}");
    assert_eq!(results[0].0, TransferSyntaxesNotSupported, "{results:?}");
    assert_eq!(results[1].0, TransferSyntaxesNotSupported, "{results:?}");
    assert_eq!(
        results[2],
        (Acceptance, EXPLICIT_LE.to_string()),
        "the sender's uncompressed fallback"
    );
    assert_eq!(results[3], (Acceptance, JPEG_LS_LOSSLESS.to_string()));
    // A real client sending JPEG baseline, which HealthImaging keeps as is.
    let out = storescu(gw.port, "-xy", &[&testdata("sc-jpeg-baseline.dcm")]);
    assert!(
        out.status.success() && !text(&out).contains("Failed"),
        "{}",
        text(&out)
    );

    // Without the preset, every standard syntax is accepted, those HealthImaging refuses included.
    let (default_gw, _store) = local_gateway(&[]);
    let results = negotiate(default_gw.port, &proposals);
    assert_eq!(results[0], (Acceptance, JPEG_XL_LOSSLESS.to_string()));
}

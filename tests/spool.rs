//! Edge mode (`--spool-dir`): instances are acknowledged from a local spool and uploaded to S3 in
//! the background. S3 is cut off with the fault proxy (tests/common FaultProxy) or unreachable; the
//! gateway is killed while uploading; spool files are truncated; the spool fills up. Nothing
//! acknowledged may be lost, and no batch may be imported before all its instances are in S3.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `dicom-gateway spool status --json` for `dir`.
fn spool_status(dir: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_dicom-gateway"))
        .args(["spool", "status", "--json", "--spool-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "spool status: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The spool's waiting and quarantined files, as `spool status` counts them.
fn spool_counts(dir: &Path) -> (u64, u64) {
    let s = spool_status(dir);
    (
        s["files"].as_u64().unwrap(),
        s["quarantinedFiles"].as_u64().unwrap(),
    )
}

/// Environment for a gateway whose S3 endpoint has nothing listening (no LocalStack needed).
fn unreachable_s3() -> Vec<(&'static str, String)> {
    vec![
        (
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", free_port()),
        ),
        ("AWS_ACCESS_KEY_ID", "x".into()),
        ("AWS_SECRET_ACCESS_KEY", "x".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_MAX_ATTEMPTS", "1".into()),
    ]
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The SOP Instance UIDs of the objects under `keys` (`.../{sop}.dcm`).
fn sops_of(keys: &[String]) -> Vec<String> {
    let mut sops: Vec<String> = keys
        .iter()
        .filter_map(|k| k.rsplit('/').next())
        .map(|f| f.trim_end_matches(".dcm").to_string())
        .collect();
    sops.sort();
    sops
}

#[test]
fn with_s3_unreachable_edge_mode_acknowledges_from_the_spool_and_a_truncated_file_is_quarantined_at_the_next_start()
 {
    let (spool, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let http = free_port();
    let metrics = format!("127.0.0.1:{http}");
    let env = unreachable_s3();
    let args = [
        "--s3-bucket",
        "unreachable",
        "--s3-force-path-style",
        "--spool-dir",
        spool.path().to_str().unwrap(),
        "--store-dir",
        store.path().to_str().unwrap(),
        "--metrics-listen",
        metrics.as_str(),
        // Explicit: the default (leave 10% of the file system free) depends on this machine's disk.
        "--spool-max-bytes",
        "1GB",
    ];
    let mut gw = Gateway::start(&args, &env_refs(&env));
    let files: Vec<PathBuf> = TESTDATA_FILES.iter().take(3).map(|f| testdata(f)).collect();
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let out = storescu(gw.port, "-xb", &refs);
    assert_eq!(
        text(&out)
            .matches("Received Store Response (Success)")
            .count(),
        3,
        "acknowledged from the spool although S3 does not answer:\n{}\n{}",
        text(&out),
        gw.log_text()
    );
    assert_eq!(spool_counts(spool.path()), (3, 0));
    // Ready: the spool accepts, whatever S3 does. The spool gauges follow within a second.
    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 200, "{body}");
    eventually("the spool gauges", Duration::from_secs(10), || {
        let (_, m) = http_get(http, "/metrics");
        if m.contains("dicom_gateway_spool_files 3") {
            Ok(())
        } else {
            Err(m)
        }
    });
    gw.wait_for_log("spool: uploads to S3 bucket unreachable");
    // `spool status` tells that uploads fail, and why, from the running uploader's report.
    eventually("the uploader's report", Duration::from_secs(10), || {
        let s = spool_status(spool.path());
        match s["uploader"]["lastError"].as_str() {
            Some(e)
                if e.contains("dispatch failure") && s["uploader"]["failingSince"].is_string() =>
            {
                Ok(())
            }
            _ => Err(s.to_string()),
        }
    });
    gw.stop();

    // A power cut tore one file (a disk that acknowledged a flush it had not done).
    let objects = spool.path().join("objects");
    let mut names: Vec<PathBuf> = files_under(&objects);
    names.sort();
    let torn = &names[1];
    let len = std::fs::metadata(torn).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(torn)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let mut gw = Gateway::start(&args, &env_refs(&env));
    let log = gw.wait_for_log("moved to quarantine");
    let line = log
        .lines()
        .find(|l| l.contains("moved to quarantine"))
        .unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(torn.file_name().unwrap().to_str().unwrap()),
        "{line}"
    );
    assert_eq!(
        spool_counts(spool.path()),
        (2, 1),
        "never uploaded, never deleted"
    );
    assert_eq!(
        std::fs::metadata(
            spool
                .path()
                .join("quarantine")
                .join(torn.file_name().unwrap())
        )
        .unwrap()
        .len(),
        len / 2
    );
    let log = gw.stop();
    assert_no_patient_data(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn s3_cut_off_for_60s_while_1000_instances_arrive_over_two_associations() {
    let endpoint = localstack();
    let stack = stack();
    let s3 = s3_client(&endpoint).await;
    let db = dynamodb_client(&endpoint).await;
    let root = "1.2.826.0.1.3680043.2.1125.11";
    let work = tempfile::tempdir().unwrap();
    let files = write_corpus(work.path(), root, 1000, 4_000);
    let (spool, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gateway_id = unique("gw-edge");

    // S3 (only S3) goes through the proxy, which is down: cut off from the start.
    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    proxy.down();
    let cut = Instant::now();
    let arn_case = format!("{}#Completed", stack.state_machine_arn);
    let gw = Gateway::start(
        &[
            "--s3-bucket",
            &stack.bucket,
            "--s3-force-path-style",
            "--spool-dir",
            spool.path().to_str().unwrap(),
            "--spool-max-bytes",
            "1GB",
            "--store-dir",
            store.path().to_str().unwrap(),
            "--job-table",
            &stack.table,
            "--state-machine-arn",
            &arn_case,
            "--datastore-id",
            &stack.datastore_id,
            "--data-access-role-arn",
            &stack.role_arn,
            "--gateway-id",
            &gateway_id,
            "--batch-idle",
            "2s",
            "--import-poll-interval",
            "2s",
        ],
        &[("AWS_ENDPOINT_URL_S3", &proxy.url())],
    );

    // Two associations of 500 each: every C-STORE is answered Success from the local disk.
    let sending = Instant::now();
    let logs = [work.path().join("a.log"), work.path().join("b.log")];
    let mut senders: Vec<_> = files
        .chunks(500)
        .zip(&logs)
        .map(|(half, log)| storescu_background(gw.port, half, log))
        .collect();
    for s in &mut senders {
        tokio::task::block_in_place(|| s.wait()).unwrap();
    }
    let took = sending.elapsed();
    let acked: Vec<String> = logs.iter().flat_map(|l| acknowledged(l, root)).collect();
    assert_eq!(acked.len(), 1000, "{}", gw.log_text());
    assert!(
        took < Duration::from_secs(45),
        "1,000 small instances took {took:?}: acknowledgements waited for S3"
    );
    eprintln!("1,000 instances acknowledged in {took:?} with S3 cut off");

    // The batch is recorded OPEN (its instances are acknowledged), and stays OPEN: nothing of it
    // is in S3, so it must not close, let alone import, for the whole cut.
    let job = wait_for_job_of_gateway(&db, &stack.table, &gw, &gateway_id).await;
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed())).await;
    let job = get_job(&db, &stack.table, &job.job_id).await.unwrap();
    assert_eq!(
        job.status,
        dicom_gateway::jobs::JobStatus::Open,
        "no import may start on a partial batch: {job:?}"
    );
    assert_eq!(spool_counts(spool.path()), (1000, 0));
    assert!(gw.log_text().contains("spool: uploads to S3 bucket"));

    // The cut ends: everything reaches S3, byte for byte, and the batch imports whole.
    proxy.up();
    let prefix = format!("import/{}/", job.job_id);
    let keys = eventually_async(
        "the 1,000 instances in S3",
        Duration::from_secs(180),
        async || {
            let keys: Vec<String> = bucket_keys(&s3, &stack.bucket)
                .await
                .into_iter()
                .filter(|k| k.starts_with(&prefix))
                .collect();
            if keys.len() == 1000 {
                Ok(keys)
            } else {
                Err(format!("{} so far", keys.len()))
            }
        },
    )
    .await;
    let mut expected = acked.clone();
    expected.sort();
    assert_eq!(sops_of(&keys), expected);
    for key in &keys {
        let body = get_object(&s3, &stack.bucket, key, None).await;
        let (meta, offset) = dicom_gateway::part10::split_part10(&body).unwrap();
        let sop = meta.media_storage_sop_instance_uid().to_string();
        assert_eq!(
            &body[offset..],
            &ct_dataset(&sop, root, &format!("{root}.0"), 4_000)[..],
            "{key} differs from what was sent"
        );
    }
    assert!(gw.log_text().contains("spool: uploads resumed"));
    // The spool empties, and `spool status` reports the uploads and their rate.
    eventually(
        "an empty spool and the uploads reported",
        Duration::from_secs(20),
        || {
            let s = spool_status(spool.path());
            let u = &s["uploader"];
            if s["files"] == 0
                && u["uploadedFiles"] == 1000
                && u["bytesPerSecond"].as_u64() > Some(0)
            {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );
    put_manifest(&s3, &stack, &job.job_id, 1000, 0).await;
    let job = wait_for_final(&db, &stack.table, &job.job_id, &gw).await;
    assert_eq!(
        job.status,
        dicom_gateway::jobs::JobStatus::Completed,
        "{job:?}"
    );
    assert_eq!(job.instance_count, Some(1000));
    assert_eq!(spool_counts(spool.path()), (0, 0));
    assert_no_open_multipart_upload(&s3, &stack.bucket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn sigkill_while_the_uploader_is_busy_then_every_acknowledged_instance_reaches_s3_once() {
    let endpoint = localstack();
    let s3 = s3_client(&endpoint).await;
    let bucket = new_bucket(&s3, "gw-spool-kill").await;
    let root = "1.2.826.0.1.3680043.2.1125.12";
    let work = tempfile::tempdir().unwrap();
    let files = write_corpus(work.path(), root, 400, 4_000);
    let (spool, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let gateway_id = unique("gw-spool-kill");
    let args = [
        "--s3-bucket",
        bucket.as_str(),
        "--s3-force-path-style",
        "--spool-dir",
        spool.path().to_str().unwrap(),
        "--spool-max-bytes",
        "1GB",
        "--store-dir",
        store.path().to_str().unwrap(),
        "--gateway-id",
        gateway_id.as_str(),
        "--batch-idle",
        "1h",
        // One upload at a time: the kill finds the uploader busy.
        "--spool-upload-concurrency",
        "1",
    ];
    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    proxy.down();
    let mut gw = Gateway::start(&args, &[("AWS_ENDPOINT_URL", &proxy.url())]);
    let log = work.path().join("storescu.log");
    let out = {
        let mut sender = storescu_background(gw.port, &files, &log);
        tokio::task::block_in_place(|| sender.wait()).unwrap()
    };
    assert!(out.success());
    let acked = acknowledged(&log, root);
    assert_eq!(acked.len(), 400, "{}", gw.log_text());

    // S3 comes back; the uploader gets to work, and is killed in the middle of it.
    proxy.up();
    eventually_async(
        "some uploads",
        Duration::from_secs(90),
        async || match bucket_keys(&s3, &bucket).await.len() {
            n if n >= 20 => Ok(()),
            n => Err(format!("{n} so far")),
        },
    )
    .await;
    gw.kill();
    let uploaded = bucket_keys(&s3, &bucket).await.len();
    let (waiting, _) = spool_counts(spool.path());
    assert!(
        uploaded < 400 && waiting > 0,
        "killed while busy: {uploaded} uploaded, {waiting} waiting"
    );
    assert!(
        uploaded as u64 + waiting >= 400,
        "every acknowledged instance is in S3 or in the spool: {uploaded} + {waiting}"
    );
    let jobs = local_jobs(store.path());
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["status"], "OPEN");

    // The next start uploads the rest, and only then does recovery close the batch from S3.
    let gw = Gateway::start(&args, &[("AWS_ENDPOINT_URL", &proxy.url())]);
    let job = tokio::task::block_in_place(|| wait_for_closed_local_job(store.path(), &gw));
    assert_eq!(job["instanceCount"], 400, "{}", gw.log_text());
    assert_eq!(job["closeReason"], "recovered");
    let keys = bucket_keys(&s3, &bucket).await;
    assert_eq!(keys.len(), 400, "one object per acknowledged instance");
    let mut expected = acked;
    expected.sort();
    assert_eq!(sops_of(&keys), expected);
    assert_eq!(spool_counts(spool.path()), (0, 0));
    assert_no_open_multipart_upload(&s3, &bucket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_full_spool_answers_a700_with_a_clear_comment_and_loses_nothing() {
    let endpoint = localstack();
    let s3 = s3_client(&endpoint).await;
    let bucket = new_bucket(&s3, "gw-spool-full").await;
    let (spool, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    proxy.down();
    let gw = Gateway::start(
        &[
            "--s3-bucket",
            &bucket,
            "--s3-force-path-style",
            "--spool-dir",
            spool.path().to_str().unwrap(),
            "--store-dir",
            store.path().to_str().unwrap(),
            // Room for five of these 16 kB instances.
            "--spool-max-bytes",
            "90000",
        ],
        &[("AWS_ENDPOINT_URL", &proxy.url())],
    );
    let (study, series) = (
        "1.2.826.0.1.3680043.2.1125.13",
        "1.2.826.0.1.3680043.2.1125.13.1",
    );
    let sop = |i: usize| format!("{series}.{i}");
    let mut scu = RawScu::associate(gw.port, AE);
    let mut answers = Vec::new();
    for i in 1..=8 {
        scu.send_store(
            i as u16,
            &sop(i),
            &ct_dataset(&sop(i), study, series, 16_000),
            8192,
        );
        answers.push(scu.read_response());
    }
    let acked: Vec<String> = (1..=8)
        .filter(|i| answers[i - 1].0 == 0x0000)
        .map(sop)
        .collect();
    assert_eq!(
        acked.len(),
        5,
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    for (status, command) in &answers[5..] {
        assert_eq!(*status, 0xA700);
        assert!(
            String::from_utf8_lossy(command).contains("spool full"),
            "the Error Comment says why"
        );
    }
    assert_eq!(
        spool_counts(spool.path()),
        (5, 0),
        "nothing acknowledged dropped"
    );
    assert!(gw.log_text().contains("spool full"));

    // S3 comes back: the five reach it, the spool empties, and the refused ones, sent again on
    // the same association (it went on after each refusal), go through.
    proxy.up();
    let keys =
        eventually_async(
            "five objects in S3",
            Duration::from_secs(90),
            async || match bucket_keys(&s3, &bucket).await {
                keys if keys.len() == 5 => Ok(keys),
                keys => Err(format!("{keys:?}")),
            },
        )
        .await;
    let mut expected = acked.clone();
    expected.sort();
    assert_eq!(sops_of(&keys), expected);
    eventually(
        "an empty spool",
        Duration::from_secs(10),
        || match spool_counts(spool.path()) {
            (0, 0) => Ok(()),
            counts => Err(format!("{counts:?}")),
        },
    );
    for i in 6..=8 {
        assert_eq!(
            scu.store(
                i as u16 + 100,
                &sop(i),
                &ct_dataset(&sop(i), study, series, 16_000),
                8192
            ),
            0x0000
        );
    }
    scu.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_batch_whose_open_record_the_kill_lost_is_recorded_and_closed_once_replayed() {
    let endpoint = localstack();
    let s3 = s3_client(&endpoint).await;
    let bucket = new_bucket(&s3, "gw-spool-lost").await;
    let root = "1.2.826.0.1.3680043.2.1125.14";
    let work = tempfile::tempdir().unwrap();
    let files = write_corpus(work.path(), root, 20, 4_000);
    let (spool, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = [
        "--s3-bucket",
        bucket.as_str(),
        "--s3-force-path-style",
        "--spool-dir",
        spool.path().to_str().unwrap(),
        "--spool-max-bytes",
        "1GB",
        "--store-dir",
        store.path().to_str().unwrap(),
        "--gateway-id",
        "gw-spool-lost",
        "--batch-idle",
        "1h",
    ];
    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    proxy.down();
    let mut gw = Gateway::start(&args, &[("AWS_ENDPOINT_URL", &proxy.url())]);
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let out = storescu(gw.port, "-xe", &refs);
    assert_eq!(
        text(&out)
            .matches("Received Store Response (Success)")
            .count(),
        20
    );
    gw.kill();
    // As if the kill had come before the job's OPEN record was written.
    for job in files_under(&store.path().join("jobs")) {
        std::fs::remove_file(job).unwrap();
    }
    assert!(local_jobs(store.path()).is_empty());

    proxy.up();
    let gw = Gateway::start(&args, &[("AWS_ENDPOINT_URL", &proxy.url())]);
    let job = tokio::task::block_in_place(|| wait_for_closed_local_job(store.path(), &gw));
    assert_eq!(job["instanceCount"], 20, "{}", gw.log_text());
    assert_eq!(job["closeReason"], "recovered");
    assert_eq!(bucket_keys(&s3, &bucket).await.len(), 20);
}

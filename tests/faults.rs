//! Network failures between the gateway and AWS, injected with a TCP proxy in front of LocalStack
//! (tests/common FaultProxy): the durability promise must hold while S3, DynamoDB or Step Functions
//! are unreachable, and everything must complete once they are back.

mod common;

use std::time::Duration;

use common::*;

/// The SOP Instance UIDs of the objects under `keys` (`.../{sop}.dcm`).
fn stored_sops(keys: &[String]) -> std::collections::HashSet<String> {
    keys.iter()
        .map(|k| {
            k.rsplit('/')
                .next()
                .unwrap()
                .trim_end_matches(".dcm")
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn s3_failing_mid_replay_never_loses_an_acknowledged_instance_and_a_resend_completes_the_study()
 {
    let endpoint = localstack();
    let s3 = s3_client(&endpoint).await;
    let bucket = new_bucket(&s3, "gw-fault").await;
    let root = "1.2.826.0.1.3680043.2.1125.8";
    let work = tempfile::tempdir().unwrap();
    let files = write_corpus(work.path(), root, 500, 4_000);

    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    let gw = Gateway::start(
        &["--s3-bucket", &bucket, "--s3-force-path-style"],
        &[("AWS_ENDPOINT_URL", &proxy.url())],
    );
    let log = work.path().join("storescu.log");
    let mut sender = storescu_background(gw.port, &files, &log);

    // Let part of the study through, then cut S3 off.
    tokio::task::block_in_place(|| wait_for_successes(&log, 100));
    proxy.down();
    // A few instances fail while it is down; then S3 comes back for the rest.
    tokio::task::block_in_place(|| {
        eventually(
            "5 failure statuses while S3 is down",
            Duration::from_secs(60),
            || {
                let failures = storescu_outcomes(&log)
                    .iter()
                    .filter(|(_, r)| r.as_deref().is_some_and(|r| r != "Success"))
                    .count();
                if failures >= 5 {
                    Ok(())
                } else {
                    Err(format!(
                        "{failures} so far; gateway log:\n{}",
                        gw.log_text()
                    ))
                }
            },
        )
    });
    proxy.up();
    tokio::task::block_in_place(|| sender.wait()).unwrap();

    let outcomes = storescu_outcomes(&log);
    assert_eq!(
        outcomes.len(),
        files.len(),
        "every file was sent in the one association"
    );
    let stored = stored_sops(&bucket_keys(&s3, &bucket).await);
    let mut failed_files = Vec::new();
    for (file, response) in &outcomes {
        match response.as_deref() {
            Some("Success") => assert!(
                stored.contains(&corpus_sop(root, file)),
                "{file} acknowledged but not in the bucket"
            ),
            Some(other) => {
                assert_eq!(other, "Refused: OutOfResources", "{file}");
                failed_files.push(work.path().join(file));
            }
            None => panic!("{file} got no response"),
        }
    }
    assert!(failed_files.len() >= 5);
    assert!(gw.log_text().contains("instance not stored"));

    // Once S3 is back, sending the failed ones again completes the study.
    let refs: Vec<&std::path::Path> = failed_files.iter().map(|p| p.as_path()).collect();
    let out = storescu(gw.port, "-xe", &refs);
    assert_eq!(
        text(&out)
            .matches("Received Store Response (Success)")
            .count(),
        failed_files.len(),
        "{}",
        text(&out)
    );
    assert_eq!(
        stored_sops(&bucket_keys(&s3, &bucket).await).len(),
        files.len()
    );
    assert_no_open_multipart_upload(&s3, &bucket).await;
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn dynamodb_and_step_functions_down_at_batch_close_delay_the_job_but_fail_no_c_store() {
    let endpoint = localstack();
    let stack = stack();
    let db = dynamodb_client(&endpoint).await;
    let s3 = s3_client(&endpoint).await;
    let gateway_id = unique("gw-outage");

    // S3 direct; DynamoDB and Step Functions through the proxy, which is down from the start.
    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    proxy.down();
    let arn_case = format!("{}#Completed", stack.state_machine_arn);
    let gw = Gateway::start(
        &[
            "--s3-bucket",
            &stack.bucket,
            "--s3-force-path-style",
            "--job-table",
            &stack.table,
            "--instance-table",
            &stack.instance_table,
            "--state-machine-arn",
            &arn_case,
            "--datastore-id",
            &stack.datastore_id,
            "--data-access-role-arn",
            &stack.role_arn,
            "--batch-idle",
            "1s",
            "--import-poll-interval",
            "2s",
            "--gateway-id",
            &gateway_id,
        ],
        &[
            ("AWS_ENDPOINT_URL", &proxy.url()),
            ("AWS_ENDPOINT_URL_S3", &endpoint),
        ],
    );
    let out = storescu(
        gw.port,
        "-xb",
        &[
            &testdata("ct-implicit-le.dcm"),
            &testdata("mr-explicit-be.dcm"),
        ],
    );
    assert_eq!(
        text(&out)
            .matches("Received Store Response (Success)")
            .count(),
        2,
        "no C-STORE fails because the job store is down:\n{}",
        text(&out)
    );

    // The batch closes while DynamoDB is unreachable: recording it fails and is retried, and
    // nothing is recorded yet.
    gw.wait_for_log("recording the closed job failed; will retry");
    assert!(
        job_of_gateway(&db, &stack.table, &gateway_id)
            .await
            .is_none()
    );

    // Once they are back, the job is recorded, started and imported.
    proxy.up();
    let job = wait_for_job_of_gateway(&db, &stack.table, &gw, &gateway_id).await;
    put_manifest(&s3, &stack, &job.job_id, 2, 0).await;
    let job = wait_for_final(&db, &stack.table, &job.job_id, &gw).await;
    assert_eq!(
        job.status,
        dicom_gateway::jobs::JobStatus::Completed,
        "{job:?}"
    );
    assert_eq!(job.instance_count, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn sigkill_mid_association_with_s3_loses_nothing_acknowledged_and_recovery_submits_the_batch()
{
    let endpoint = localstack();
    let s3 = s3_client(&endpoint).await;
    let bucket = new_bucket(&s3, "gw-kill").await;
    let root = "1.2.826.0.1.3680043.2.1125.9";
    let work = tempfile::tempdir().unwrap();
    let files = write_corpus(work.path(), root, 800, 4_000);
    let journal = tempfile::tempdir().unwrap();
    let gateway_id = unique("gw-kill");
    let args = [
        "--s3-bucket",
        bucket.as_str(),
        "--s3-force-path-style",
        "--store-dir",
        journal.path().to_str().unwrap(),
        "--gateway-id",
        gateway_id.as_str(),
        "--batch-idle",
        "1h",
    ];
    let mut gw = Gateway::start(&args, &[]);
    let log = work.path().join("storescu.log");
    let mut sender = storescu_background(gw.port, &files, &log);
    tokio::task::block_in_place(|| wait_for_successes(&log, 50));
    gw.kill();
    tokio::task::block_in_place(|| sender.wait()).unwrap();

    let acked = acknowledged(&log, root);
    assert!(acked.len() >= 50 && acked.len() < files.len());
    let keys = bucket_keys(&s3, &bucket).await;
    let stored = stored_sops(&keys);
    for sop in &acked {
        assert!(
            stored.contains(sop),
            "acknowledged {sop} is not in the bucket"
        );
    }
    assert!(
        stored.len() <= acked.len() + 1,
        "no object appears beyond the one being answered at the kill"
    );
    // Every visible object is whole (a multipart or PutObject in progress is never visible).
    for key in &keys {
        let body = get_object(&s3, &bucket, key, None).await;
        let (meta, offset) = dicom_gateway::part10::split_part10(&body).unwrap();
        let sop = meta.media_storage_sop_instance_uid().to_string();
        assert_eq!(
            &body[offset..],
            &ct_dataset(&sop, root, &format!("{root}.0"), 4_000)[..],
            "{key} is partial"
        );
    }

    // The next start closes the batch the kill left OPEN, from what is in the bucket.
    let gw = Gateway::start(&args, &[]);
    let job = tokio::task::block_in_place(|| wait_for_closed_local_job(journal.path(), &gw));
    assert_eq!(job["instanceCount"], keys.len() as u64);
    assert_eq!(job["closeReason"], "recovered");
}

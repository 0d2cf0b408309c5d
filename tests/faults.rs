//! Network failures between the gateway and AWS, injected with a TCP proxy in front of LocalStack
//! (tests/common FaultProxy): the durability promise must hold while S3, DynamoDB or Step Functions
//! are unreachable, and everything must complete once they are back.

mod common;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use common::*;

async fn keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let out = s3
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from)),
        );
        token = out.next_continuation_token().map(String::from);
        if token.is_none() {
            return keys;
        }
    }
}

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
async fn s3_failing_mid_replay_never_loses_an_acknowledged_instance_and_a_resend_completes_the_study()
 {
    let Some(endpoint) = localstack() else { return };
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
    let failures = |log: &std::path::Path| {
        storescu_outcomes(log)
            .iter()
            .filter(|(_, r)| r.as_deref().is_some_and(|r| r != "Success"))
            .count()
    };

    // Let part of the study through, then cut S3 off.
    tokio::task::block_in_place(|| wait_for_successes(&log, 100));
    proxy.down();
    let until = Instant::now() + Duration::from_secs(60);
    // A few instances fail while it is down; then S3 comes back for the rest.
    while failures(&log) < 5 {
        assert!(
            Instant::now() < until,
            "no failure while S3 was down:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.up();
    tokio::task::block_in_place(|| sender.wait()).unwrap();

    let outcomes = storescu_outcomes(&log);
    assert_eq!(
        outcomes.len(),
        files.len(),
        "every file was sent in the one association"
    );
    let stored = stored_sops(&keys(&s3, &bucket).await);
    let sop_of = |file: &str| {
        format!(
            "{root}.{}",
            file.trim_start_matches("ct")
                .trim_end_matches(".dcm")
                .parse::<usize>()
                .unwrap()
                + 1
        )
    };
    let mut failed_files = Vec::new();
    for (file, response) in &outcomes {
        match response.as_deref() {
            Some("Success") => assert!(
                stored.contains(&sop_of(file)),
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
    assert_eq!(stored_sops(&keys(&s3, &bucket).await).len(), files.len());
    let uploads = s3
        .list_multipart_uploads()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(
        uploads.uploads().is_empty(),
        "no multipart upload left open"
    );
}

#[tokio::test]
async fn dynamodb_and_step_functions_down_at_batch_close_delay_the_job_but_fail_no_c_store() {
    let Some(endpoint) = localstack() else { return };
    let Some(Stack {
        bucket,
        table,
        state_machine_arn: arn,
        role_arn: role,
        datastore_id: datastore,
    }) = stack()
    else {
        return;
    };
    let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let db = aws_sdk_dynamodb::Client::new(&conf);
    let s3 = s3_client(&endpoint).await;
    let gateway_id = format!(
        "gw-outage-{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    );

    // S3 direct; DynamoDB and Step Functions through the proxy, which is down from the start.
    let mut proxy = FaultProxy::start(endpoint.trim_start_matches("http://"));
    proxy.down();
    let arn_case = format!("{arn}#Completed");
    let gw = Gateway::start(
        &[
            "--s3-bucket",
            &bucket,
            "--s3-force-path-style",
            "--job-table",
            &table,
            "--state-machine-arn",
            &arn_case,
            "--datastore-id",
            &datastore,
            "--data-access-role-arn",
            &role,
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

    // The batch closes while DynamoDB is unreachable: nothing is recorded yet, the gateway retries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let find = || async {
        db.scan()
            .table_name(&table)
            .filter_expression("gatewayId = :g")
            .expression_attribute_values(":g", AttributeValue::S(gateway_id.clone()))
            .send()
            .await
            .unwrap()
            .items()
            .first()
            .map(|i| dicom_gateway::jobs::dynamodb::from_item(i).unwrap())
    };
    assert!(find().await.is_none());
    assert!(
        gw.log_text().contains("failed; will retry"),
        "{}",
        gw.log_text()
    );

    // Once they are back, the job is recorded, started and imported.
    proxy.up();
    let until = Instant::now() + Duration::from_secs(90);
    let mut manifest_put = false;
    loop {
        if let Some(job) = find().await {
            if !manifest_put {
                let manifest = serde_json::json!({"jobSummary": {"numberOfImportedFiles": 2, "numberOfFilesWithCustomerError": 0, "numberOfFilesWithServerError": 0, "imageSetsSummary": [{"imageSetId": "f00d"}]}});
                s3.put_object()
                    .bucket(&bucket)
                    .key(format!("results/{}/{datastore}-DicomImport-import-job-0001/job-output-manifest.json", job.job_id))
                    .body(manifest.to_string().into_bytes().into())
                    .send()
                    .await
                    .unwrap();
                manifest_put = true;
            }
            if job.status.is_terminal() {
                assert_eq!(
                    job.status,
                    dicom_gateway::jobs::JobStatus::Completed,
                    "{job:?}"
                );
                assert_eq!(job.instance_count, Some(2));
                break;
            }
        }
        assert!(
            Instant::now() < until,
            "job did not complete after the outage:\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_association_with_s3_loses_nothing_acknowledged_and_recovery_submits_the_batch()
{
    let Some(endpoint) = localstack() else { return };
    let s3 = s3_client(&endpoint).await;
    let bucket = new_bucket(&s3, "gw-kill").await;
    let root = "1.2.826.0.1.3680043.2.1125.9";
    let work = tempfile::tempdir().unwrap();
    let files = write_corpus(work.path(), root, 800, 4_000);
    let journal = tempfile::tempdir().unwrap();
    let gateway_id = format!(
        "gw-kill-{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    );
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
    let mut child = gw.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    tokio::task::block_in_place(|| sender.wait()).unwrap();

    let sop_of = |file: &str| {
        format!(
            "{root}.{}",
            file.trim_start_matches("ct")
                .trim_end_matches(".dcm")
                .parse::<usize>()
                .unwrap()
                + 1
        )
    };
    let acked: Vec<String> = storescu_outcomes(&log)
        .iter()
        .filter(|(_, r)| r.as_deref() == Some("Success"))
        .map(|(f, _)| sop_of(f))
        .collect();
    assert!(acked.len() >= 50 && acked.len() < files.len());
    let keys = keys(&s3, &bucket).await;
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
        let body = s3
            .get_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
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
    let until = Instant::now() + Duration::from_secs(20);
    let job = loop {
        let jobs: Vec<serde_json::Value> = files_under(&journal.path().join("jobs"))
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect();
        if jobs.len() == 1 && jobs[0]["status"] == "CLOSED" {
            break jobs[0].clone();
        }
        assert!(
            Instant::now() < until,
            "recovery did not close the batch: {jobs:?}\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["instanceCount"], keys.len() as u64);
    assert_eq!(job["closeReason"], "recovered");
}

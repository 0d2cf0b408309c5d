//! End-to-end tests of the S3 store against LocalStack (started by scripts/test.sh), with DCMTK
//! storescu as the client; and against an S3 endpoint where nothing listens.

mod common;

use std::io::Write;

use common::*;

fn s3_gateway(bucket: &str, extra: &[&str]) -> Gateway {
    let mut args = vec![
        "--s3-bucket",
        bucket,
        "--s3-prefix",
        "import/",
        "--s3-force-path-style",
    ];
    args.extend_from_slice(extra);
    Gateway::start(&args, &[])
}

/// An S3 client for LocalStack and a new bucket in it.
async fn client_and_bucket() -> (aws_sdk_s3::Client, String) {
    let s3 = s3_client(&localstack()).await;
    let bucket = new_bucket(&s3, "gw-test").await;
    (s3, bucket)
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_study_in_five_transfer_syntaxes_lands_in_s3_byte_for_byte() {
    let (s3, bucket) = client_and_bucket().await;
    let gw = s3_gateway(&bucket, &[]);
    send_testdata(gw.port);
    let keys = bucket_keys(&s3, &bucket).await;
    assert_eq!(keys.len(), 5, "{keys:?}");
    let mut matched = Vec::new();
    for key in &keys {
        // import/{jobId}/{study}/{series}/{sop}.dcm
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts.len(), 5, "{key}");
        assert_eq!(parts[0], "import");
        assert!(parts[4].ends_with(".dcm"));
        let object = get_object(&s3, &bucket, key, None).await;
        matched.push(assert_matches_a_sent_file(&object));
        let head = s3
            .head_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_type(), Some("application/dicom"));
        assert_eq!(
            head.content_encoding(),
            None,
            "no content encoding: HealthImaging cannot read it"
        );
    }
    matched.sort();
    let mut expected = TESTDATA_FILES.to_vec();
    expected.sort();
    assert_eq!(matched, expected);
}

#[test]
fn with_s3_unreachable_every_instance_gets_a_failure_status_and_the_association_continues() {
    let gw = unreachable_s3_gateway();
    let files: Vec<_> = TESTDATA_FILES.iter().take(3).map(|f| testdata(f)).collect();
    let refs: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    let out = storescu(gw.port, "-xb", &refs);
    let t = text(&out);
    assert_eq!(
        t.matches("Received Store Response (Refused: OutOfResources)")
            .count(),
        3,
        "one failure status per instance, all in one association:\n{t}"
    );
    assert!(!t.contains("Received Store Response (Success)"), "{t}");
    assert!(gw.log_text().contains("instance not stored"));
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_missing_bucket_gets_a_failure_status_not_a_success() {
    let s3 = s3_client(&localstack()).await;
    let gw = s3_gateway("no-such-bucket-for-dicom-gateway", &[]);
    let out = storescu(gw.port, "-xi", &[&testdata("ct-implicit-le.dcm")]);
    let t = text(&out);
    assert!(t.contains("Refused: OutOfResources"), "{t}");
    assert!(
        s3.head_bucket()
            .bucket("no-such-bucket-for-dicom-gateway")
            .send()
            .await
            .is_err()
    );
}

/// Writes a Part-10 CT instance whose pixel data is `pixel_bytes` long, without holding it in
/// memory; returns the length of its data set.
fn write_large_instance(path: &std::path::Path, sop: &str, pixel_bytes: u64) -> u64 {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let meta = dicom_gateway::part10::FileMeta {
        sop_class_uid: CT,
        sop_instance_uid: sop,
        transfer_syntax_uid: EXPLICIT_LE,
        source_ae_title: "TEST",
    };
    let meta = meta.encode().unwrap();
    f.write_all(&meta).unwrap();
    let header = ct_dataset(
        sop,
        "1.2.826.0.1.3680043.2.1125.1",
        "1.2.826.0.1.3680043.2.1125.1.1",
        0,
    );
    f.write_all(&header[..header.len() - 4]).unwrap();
    f.write_all(&(pixel_bytes as u32).to_le_bytes()).unwrap();
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut left = pixel_bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    header.len() as u64 + pixel_bytes
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn a_one_gigabyte_instance_goes_through_multipart_with_bounded_memory() {
    let (s3, bucket) = client_and_bucket().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("large.dcm");
    let sop = "1.2.826.0.1.3680043.2.1125.1.1.1";
    let pixel_bytes: u64 = 1 << 30;
    let dataset_len = write_large_instance(&file, sop, pixel_bytes);
    let gw = s3_gateway(&bucket, &["--part-size", "8MiB"]);
    let out = storescu(gw.port, "-xe", &[&file]);
    assert!(
        out.status.success() && text(&out).contains("Received Store Response (Success)"),
        "{}\n{}",
        text(&out),
        gw.log_text()
    );
    let peak = gw.peak_rss();
    std::fs::remove_file(&file).unwrap();

    let keys = bucket_keys(&s3, &bucket).await;
    assert_eq!(keys.len(), 1);
    let head = s3
        .head_object()
        .bucket(&bucket)
        .key(&keys[0])
        .send()
        .await
        .unwrap();
    // The stored object is our meta group + the data set as sent; the sent file had the same meta
    // group apart from the implementation fields, so compare the data set length and its tail.
    let object_len = head.content_length().unwrap() as u64;
    let start = get_object(&s3, &bucket, &keys[0], Some("bytes=0-4095".into())).await;
    let (meta, offset) = dicom_gateway::part10::split_part10(&start).unwrap();
    assert_eq!(meta.media_storage_sop_instance_uid(), sop);
    assert_eq!(object_len - offset as u64, dataset_len, "data set length");
    let tail = get_object(
        &s3,
        &bucket,
        &keys[0],
        Some(format!("bytes={}-{}", object_len - 1000, object_len - 1)),
    )
    .await;
    let expected: Vec<u8> = (pixel_bytes - 1000..pixel_bytes)
        .map(|i| ((i % (1 << 20)) % 251) as u8)
        .collect();
    assert_eq!(tail, expected, "last bytes of the pixel data");
    assert!(
        peak < 256 << 20,
        "gateway peak RSS {} MiB for a 1 GiB instance",
        peak >> 20
    );
    eprintln!("1 GiB instance stored; gateway peak RSS {} MiB", peak >> 20);
    assert_no_open_multipart_upload(&s3, &bucket).await;
}

#[tokio::test]
#[ignore = "needs LocalStack: run scripts/test.sh"]
async fn no_patient_data_reaches_the_log_even_at_trace_level_with_s3() {
    let (s3, bucket) = client_and_bucket().await;
    let mut gw = s3_gateway(&bucket, &["--log-level", "trace"]);
    send_testdata(gw.port);
    let log = gw.stop();
    assert_eq!(bucket_keys(&s3, &bucket).await.len(), 5);
    assert_no_patient_data(&log);
}

//! LocalStack (started by scripts/test.sh) and the infra/ stack deployed to it: clients, the stack's
//! outputs, and one copy of each look-up the tests make in S3 and the job table.
//!
//! Tests that need LocalStack are `#[ignore = "needs LocalStack: run scripts/test.sh"]`, which runs
//! them with `--include-ignored`; run by hand without LocalStack, they fail here, loudly.

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use dicom_gateway::jobs::dynamodb::from_item;
use dicom_gateway::jobs::{Job, JobStatus};

use super::{Gateway, eventually_async};

/// Mocked HealthImaging import job id (tests/sfn-mock-config.json).
pub const IMPORT_JOB_ID: &str = "import-job-0001";

/// The environment variable scripts/test.sh sets once LocalStack runs.
const LOCALSTACK_FLAG: &str = "DICOM_GATEWAY_TEST_LOCALSTACK";

/// LocalStack's endpoint; panics outside scripts/test.sh (or its environment).
pub fn localstack() -> String {
    assert!(
        std::env::var_os(LOCALSTACK_FLAG).is_some(),
        "this test needs LocalStack and {LOCALSTACK_FLAG} is unset: run scripts/test.sh"
    );
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .load()
        .await
}

/// An S3 client for `endpoint`, with path-style addressing (as LocalStack needs).
pub async fn s3_client(endpoint: &str) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk_config(endpoint).await)
            .force_path_style(true)
            .build(),
    )
}

pub async fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(endpoint).await)
}

/// The outputs of the infra/ stack that scripts/test.sh deployed to LocalStack.
pub struct Stack {
    pub bucket: String,
    pub table: String,
    /// The instance index table (`--instance-table`).
    pub instance_table: String,
    pub state_machine_arn: String,
    pub role_arn: String,
    pub datastore_id: String,
}

/// The deployed stack, from the DICOM_GATEWAY_TEST_STACK_* variables scripts/test.sh sets; panics,
/// naming the missing ones, without them.
pub fn stack() -> Stack {
    localstack();
    let mut missing = Vec::new();
    let mut get = |k: &str| {
        let name = format!("DICOM_GATEWAY_TEST_STACK_{k}");
        std::env::var(&name).unwrap_or_else(|_| {
            missing.push(name);
            String::new()
        })
    };
    let stack = Stack {
        bucket: get("BucketName"),
        table: get("JobTableName"),
        instance_table: get("InstanceTableName"),
        state_machine_arn: get("StateMachineArn"),
        role_arn: get("DataAccessRoleArn"),
        datastore_id: get("DatastoreId"),
    };
    assert!(
        missing.is_empty(),
        "this test needs the LocalStack test stack and {missing:?} are unset: run scripts/test.sh"
    );
    stack
}

/// `prefix` and a fresh ULID, lower-case (fit for a bucket name or a gateway id).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    )
}

/// Creates a bucket with a unique name starting with `prefix` in LocalStack; returns its name.
pub async fn new_bucket(s3: &aws_sdk_s3::Client, prefix: &str) -> String {
    let bucket = unique(prefix);
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("bucket created in LocalStack");
    bucket
}

/// Every key in `bucket`, following the listing's pages, sorted.
pub async fn bucket_keys(s3: &aws_sdk_s3::Client, bucket: &str) -> Vec<String> {
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
            keys.sort();
            return keys;
        }
    }
}

/// The object at `key`, or the byte `range` of it (e.g. "bytes=0-99").
pub async fn get_object(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    range: Option<String>,
) -> Vec<u8> {
    let out = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .set_range(range)
        .send()
        .await
        .unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

pub async fn assert_no_open_multipart_upload(s3: &aws_sdk_s3::Client, bucket: &str) {
    let uploads = s3
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    assert!(
        uploads.uploads().is_empty(),
        "multipart uploads left open: {:?}",
        uploads.uploads()
    );
}

/// The job that the gateway `gateway_id` recorded in `table`, if any (a scan, following its pages).
pub async fn job_of_gateway(
    db: &aws_sdk_dynamodb::Client,
    table: &str,
    gateway_id: &str,
) -> Option<Job> {
    let mut start = None;
    loop {
        let out = db
            .scan()
            .table_name(table)
            .filter_expression("gatewayId = :g")
            .expression_attribute_values(":g", AttributeValue::S(gateway_id.into()))
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap();
        if let Some(item) = out.items().first() {
            return Some(from_item(item).unwrap());
        }
        start = out.last_evaluated_key().cloned();
        start.as_ref()?;
    }
}

/// Waits for the job recorded by `gateway_id` to appear; returns it.
pub async fn wait_for_job_of_gateway(
    db: &aws_sdk_dynamodb::Client,
    table: &str,
    gw: &Gateway,
    gateway_id: &str,
) -> Job {
    eventually_async(
        &format!("a job recorded by gateway {gateway_id}"),
        Duration::from_secs(30),
        async || {
            job_of_gateway(db, table, gateway_id)
                .await
                .ok_or_else(|| gw.log_text())
        },
    )
    .await
}

pub async fn get_job(db: &aws_sdk_dynamodb::Client, table: &str, job_id: &str) -> Option<Job> {
    let out = db
        .get_item()
        .table_name(table)
        .key("jobId", AttributeValue::S(job_id.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    out.item().map(|i| from_item(i).unwrap())
}

/// Waits for job `job_id` to reach a final status; returns it.
pub async fn wait_for_final(
    db: &aws_sdk_dynamodb::Client,
    table: &str,
    job_id: &str,
    gw: &Gateway,
) -> Job {
    eventually_async(
        &format!("job {job_id} to finish"),
        Duration::from_secs(90),
        async || match get_job(db, table, job_id).await {
            Some(job) if job.status.is_terminal() => Ok(job),
            job => Err(format!("{job:?}\ngateway log:\n{}", gw.log_text())),
        },
    )
    .await
}

/// Waits until the state machine has recorded job `job_id` IMPORTED (or it has ended without
/// that); returns the job.
pub async fn wait_for_imported(db: &aws_sdk_dynamodb::Client, table: &str, job_id: &str) -> Job {
    eventually_async(
        &format!("job {job_id} to be IMPORTED"),
        Duration::from_secs(90),
        async || match get_job(db, table, job_id).await {
            Some(job) if job.status == JobStatus::Imported || job.status.is_terminal() => Ok(job),
            job => Err(format!("{job:?}")),
        },
    )
    .await
}

/// The key of `job-output-manifest.json` for a job recorded IMPORTED, from its `outputS3Uri` as a
/// reader independent of the gateway's would find it: the import's
/// `{datastoreId}-DicomImport-{importJobId}/` folder is appended when the URI lacks it.
pub fn manifest_location(job: &Job) -> (String, String) {
    let uri = job
        .output_s3_uri
        .as_deref()
        .expect("an IMPORTED job has an outputS3Uri");
    let (bucket, prefix) = uri
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .expect("outputS3Uri is s3://bucket/prefix/");
    let folder = format!(
        "{}-DicomImport-{IMPORT_JOB_ID}/",
        job.datastore_id
            .as_deref()
            .expect("an IMPORTED job has a datastoreId")
    );
    let mut key = prefix.to_string();
    if !key.ends_with(&folder) {
        key.push_str(&folder);
    }
    key.push_str("job-output-manifest.json");
    (bucket.to_string(), key)
}

/// A job-output-manifest.json as HealthImaging documents it ("Understanding import jobs"):
/// `imported` files and `customer_errors` failed ones, and `image_sets` entries in
/// `imageSetsSummary` (`None`: no `imageSetsSummary` at all).
pub fn manifest_json(
    stack: &Stack,
    imported: u32,
    customer_errors: u32,
    image_sets: Option<usize>,
) -> Vec<u8> {
    let mut summary = serde_json::json!({
        "jobId": IMPORT_JOB_ID,
        "datastoreId": stack.datastore_id,
        "inputS3Uri": format!("s3://{}/import/", stack.bucket),
        "outputS3Uri": format!("s3://{}/results/", stack.bucket),
        "numberOfScannedFiles": imported + customer_errors,
        "numberOfImportedFiles": imported,
        "numberOfFilesWithCustomerError": customer_errors,
        "numberOfFilesWithServerError": 0,
        "numberOfGeneratedImageSets": image_sets.unwrap_or(1),
    });
    if let Some(n) = image_sets {
        summary["imageSetsSummary"] = (0..n)
            .map(|i| {
                serde_json::json!({
                    "imageSetId": image_set_id(i),
                    "imageSetVersion": 1,
                    "isPrimary": true,
                    "numberOfMatchedSOPInstances": 1,
                })
            })
            .collect();
    }
    serde_json::json!({ "jobSummary": summary })
        .to_string()
        .into_bytes()
}

/// The id of the `i`th image set of [`manifest_json`]'s manifests.
pub fn image_set_id(i: usize) -> String {
    format!(
        "{:032x}",
        0x0a1b_2c3d_4e5f_6071_8293_a4b5_c6d7_e8f9_u128 + i as u128
    )
}

/// Waits for job `job_id` to be IMPORTED, then puts `manifest` where its recorded `outputS3Uri`
/// says HealthImaging writes it (the mocked import writes nothing). Returns the job as IMPORTED.
pub async fn put_manifest_bytes(
    s3: &aws_sdk_s3::Client,
    stack: &Stack,
    job_id: &str,
    manifest: Vec<u8>,
) -> Job {
    let db = dynamodb_client(&localstack()).await;
    let job = wait_for_imported(&db, &stack.table, job_id).await;
    if job.status == JobStatus::Imported {
        let (bucket, key) = manifest_location(&job);
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .body(manifest.into())
            .send()
            .await
            .unwrap();
    }
    job
}

/// [`put_manifest_bytes`] with a manifest of `imported` files and `customer_errors` failed ones,
/// in one image set.
pub async fn put_manifest(
    s3: &aws_sdk_s3::Client,
    stack: &Stack,
    job_id: &str,
    imported: u32,
    customer_errors: u32,
) {
    let manifest = manifest_json(stack, imported, customer_errors, Some(1));
    put_manifest_bytes(s3, stack, job_id, manifest).await;
}

/// The Step Functions mock configuration LocalStack reads for each execution (scripts/test.sh
/// copies it into $LS_HOME).
const SFN_MOCK_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sfn-mock-config.json");

/// The output folder, (bucket, key prefix ending in `/`), that the mocked GetDICOMImportJob of
/// test case `case` of `stack`'s state machine answers as its OutputS3Uri
/// (tests/sfn-mock-config.json): where the results of every job imported under `case` are read.
/// Every execution of a case answers the same folder.
pub fn mocked_output_folder(stack: &Stack, case: &str) -> (String, String) {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(SFN_MOCK_CONFIG).unwrap()).unwrap();
    let machine = stack
        .state_machine_arn
        .rsplit_once(':')
        .map_or(stack.state_machine_arn.as_str(), |(_, name)| name);
    let response = config["StateMachines"][machine]["TestCases"][case]["GetImport"]
        .as_str()
        .unwrap_or_else(|| panic!("test case {case} of {machine} mocks no GetImport"));
    let uri = config["MockedResponses"][response]["0"]["Return"]["JobProperties"]["OutputS3Uri"]
        .as_str()
        .unwrap_or_else(|| panic!("mocked response {response} has no OutputS3Uri"));
    let (bucket, prefix) = uri
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .expect("OutputS3Uri is s3://bucket/prefix/");
    (bucket.to_string(), prefix.to_string())
}

/// Deletes every object in test case `case`'s output folder ([`mocked_output_folder`]): results an
/// earlier job of the case left (an earlier run's, or an earlier job's of the same test), which the
/// outcome reader would otherwise read for the next job of the case as soon as it is IMPORTED.
pub async fn clear_mocked_output(s3: &aws_sdk_s3::Client, stack: &Stack, case: &str) {
    let (bucket, prefix) = mocked_output_folder(stack, case);
    let mut token = None;
    loop {
        let out = s3
            .list_objects_v2()
            .bucket(&bucket)
            .prefix(&prefix)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        for key in out.contents().iter().filter_map(|o| o.key()) {
            s3.delete_object()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .unwrap();
        }
        token = out.next_continuation_token().map(String::from);
        if token.is_none() {
            return;
        }
    }
}

/// Puts an import's results in the output folder of `job` (recorded IMPORTED), where HealthImaging
/// writes them: `files` (name under the folder, body), then `manifest` last, since the outcome
/// reader waits for a missing manifest but reads the result files it finds beside one.
pub async fn put_results(
    s3: &aws_sdk_s3::Client,
    job: &Job,
    files: Vec<(&str, Vec<u8>)>,
    manifest: Vec<u8>,
) {
    let (bucket, manifest_key) = manifest_location(job);
    let folder = manifest_key.trim_end_matches("job-output-manifest.json");
    let files = files
        .into_iter()
        .map(|(name, body)| (format!("{folder}{name}"), body))
        .chain([(manifest_key.clone(), manifest)]);
    for (key, body) in files {
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
}

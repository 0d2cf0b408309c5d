//! Shared handling of AWS: describing and classifying SDK errors, loading the SDK configuration
//! once (and failing fast when it cannot work), and the ECS task metadata the gateway id comes from.

use std::time::Duration;

use aws_config::SdkConfig;
use aws_sdk_s3::config::ProvideCredentials;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

/// One line for logs and job records: `Code: message` when the service answered, otherwise the
/// transport error (connection refused, timeout) with its causes.
pub(crate) fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err.as_service_error() {
        Some(e) => format!(
            "{}: {}",
            e.code().unwrap_or("error"),
            e.message().unwrap_or("no message")
        ),
        None => DisplayErrorContext(err).to_string(),
    }
}

/// The error code when the service answered (e.g. `ConditionalCheckFailedException`).
pub(crate) fn code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<&str> {
    err.as_service_error().and_then(|e| e.code())
}

/// Whether a DynamoDB conditional write was refused because its condition did not hold: the
/// expected "someone else got there first" answer of claims and conditional updates, not an error.
pub(crate) fn is_condition_failure<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    code(err) == Some("ConditionalCheckFailedException")
}

/// A DynamoDB string attribute.
pub(crate) fn dynamo_string(v: &str) -> aws_sdk_dynamodb::types::AttributeValue {
    aws_sdk_dynamodb::types::AttributeValue::S(v.to_string())
}

/// Error codes that mean "too many requests, slow down": the AWS SDKs' standard retry mode retries
/// them (the list is the Rust SDK's, `aws-runtime` `retries::classifiers::THROTTLING_ERRORS`; see
/// "Retry behavior", https://docs.aws.amazon.com/sdkref/latest/guide/feature-retry-behavior.html).
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// Other error codes that go away by themselves. The SDKs' transient codes (`RequestTimeout`,
/// `RequestTimeoutException`) and the services' internal errors (HTTP 5xx, also retried by the
/// SDKs' standard mode, same page); `ServiceQuotaExceededException` (HealthImaging's concurrent
/// import jobs, freed as jobs end: docs/aws-facts.md item 2) and `ExecutionLimitExceeded` (Step
/// Functions' running executions, likewise); `ExpiredToken*` because the credentials provider
/// fetches new credentials on the next attempt.
const TRANSIENT_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "InternalServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "ServiceQuotaExceededException",
    "ExecutionLimitExceeded",
    "ExpiredToken",
    "ExpiredTokenException",
];

/// HTTP statuses the SDKs' standard mode retries whatever the code: 500, 502, 503, 504 (the Rust
/// SDK's `TRANSIENT_ERROR_STATUS_CODES`), and 429 (too many requests).
const TRANSIENT_STATUSES: &[u16] = &[429, 500, 502, 503, 504];

/// Whether a service's answer (its error code and HTTP status) may change if the call is made
/// again. Everything else the service says (AccessDenied, ValidationException, ResourceNotFound,
/// StateMachineDoesNotExist, NoSuchBucket, ...) is the caller's problem and stays so.
pub(crate) fn is_retriable_answer(code: Option<&str>, status: Option<u16>) -> bool {
    code.is_some_and(|c| THROTTLING_CODES.contains(&c) || TRANSIENT_CODES.contains(&c))
        || status.is_some_and(|s| TRANSIENT_STATUSES.contains(&s))
}

/// Whether a failed AWS call may succeed if made again: throttling, internal errors, timeouts and
/// lost connections may; a refused request (access denied, validation, missing resource) or one that
/// could not even be built will fail the same way every time.
pub(crate) fn is_retriable<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(e) => {
            is_retriable_answer(e.err().code(), Some(e.raw().status().as_u16()))
        }
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        // A connector "user" error is a request the HTTP client refuses (e.g. a malformed
        // endpoint URL); I/O, timeouts and the rest (e.g. credentials not available right now)
        // are transient.
        SdkError::DispatchFailure(e) => !e.is_user(),
        // ConstructionFailure, and any kind added later: not something a retry fixes.
        _ => false,
    }
}

// ---- loading the configuration -----------------------------------------------------------------

/// How long start-up waits for the credentials provider chain to answer once.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the AWS configuration cannot work: `serve` stops at start-up with this, naming what to set.
#[derive(Debug, Error)]
pub(crate) enum AwsSetupError {
    #[error(
        "no AWS region for {needed_by}: set AWS_REGION (e.g. AWS_REGION=eu-west-1), or AWS_PROFILE to a profile with a region"
    )]
    NoRegion { needed_by: String },
    #[error(
        "no AWS credentials for {needed_by} ({reason}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an IAM role (ECS task role, EC2 instance profile)"
    )]
    NoCredentials { needed_by: String, reason: String },
}

/// The AWS SDK configuration, loaded and checked once per process on first use, shared by every
/// client (S3, DynamoDB, Step Functions): one region and credentials lookup instead of one per client.
pub(crate) struct Aws {
    /// What uses AWS, for the error message (e.g. "--s3-bucket, --job-table").
    needed_by: String,
    config: OnceCell<SdkConfig>,
}

impl Aws {
    pub(crate) fn new(needed_by: impl Into<String>) -> Self {
        Aws {
            needed_by: needed_by.into(),
            config: OnceCell::new(),
        }
    }

    /// The loaded configuration; fails when it has no region, or when the credentials provider
    /// chain finds no credentials within a few seconds.
    pub(crate) async fn config(&self) -> Result<&SdkConfig, AwsSetupError> {
        self.config
            .get_or_try_init(|| load_checked(&self.needed_by))
            .await
    }
}

/// Loads the standard AWS configuration (environment, profile, container/instance roles) and
/// checks that it can work: a region, and credentials resolved once.
async fn load_checked(needed_by: &str) -> Result<SdkConfig, AwsSetupError> {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    if config.region().is_none() {
        return Err(AwsSetupError::NoRegion {
            needed_by: needed_by.to_string(),
        });
    }
    let no_credentials = |reason: String| AwsSetupError::NoCredentials {
        needed_by: needed_by.to_string(),
        reason,
    };
    let Some(provider) = config.credentials_provider() else {
        return Err(no_credentials("no credentials provider configured".into()));
    };
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
        Ok(Ok(_)) => Ok(config),
        Ok(Err(e)) => Err(no_credentials(causes(&e))),
        Err(_) => Err(no_credentials(format!(
            "the credentials providers gave no answer within {CREDENTIALS_TIMEOUT:?}"
        ))),
    }
}

/// An error and its causes on one line, each cause once (the SDK's `DisplayErrorContext` adds a
/// multi-line debug dump, too much for a start-up message).
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

// ---- ECS task metadata ---------------------------------------------------------------------------

/// The environment variable ECS sets in each container (Fargate platform 1.4.0 and later, and the
/// EC2 launch type's agent 1.39.0 and later) to the base URI of the task metadata endpoint v4
/// ("Amazon ECS task metadata endpoint version 4",
/// https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-metadata-endpoint-v4-fargate.html).
pub(crate) const ECS_METADATA_ENV: &str = "ECS_CONTAINER_METADATA_URI_V4";

/// Why the ECS task id could not be read.
#[derive(Debug, Error)]
pub(crate) enum EcsMetadataError {
    #[error("{ECS_METADATA_ENV} '{0}' is not an http:// URI")]
    BadUri(String),
    #[error("the task metadata endpoint cannot be read: {0}")]
    Io(#[from] std::io::Error),
    #[error("the task metadata endpoint gave no answer within {0:?}")]
    Timeout(Duration),
    #[error("the task metadata endpoint answered '{0}'")]
    Status(String),
    #[error("the task metadata has no usable TaskARN: {0}")]
    NoTaskArn(String),
}

/// The task id in the JSON of `${ECS_CONTAINER_METADATA_URI_V4}/task`: the last path segment of its
/// `TaskARN` (`arn:aws:ecs:region:account:task/cluster/id`, or `task/id` in the older format).
/// ("Amazon ECS task metadata V4 JSON response", `TaskARN`: "The Amazon Resource Name (ARN) of the
/// task to which the container belongs",
/// https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-metadata-endpoint-v4-response.html.)
pub(crate) fn task_id_from_metadata(json: &[u8]) -> Result<String, EcsMetadataError> {
    /// The part of the task metadata response read here.
    #[derive(serde::Deserialize)]
    struct Task {
        #[serde(rename = "TaskARN")]
        task_arn: String,
    }
    let task: Task =
        serde_json::from_slice(json).map_err(|e| EcsMetadataError::NoTaskArn(e.to_string()))?;
    let id = task
        .task_arn
        .strip_prefix("arn:")
        .and_then(|rest| rest.split_once(":task/"))
        .and_then(|(_, path)| path.rsplit('/').next())
        .filter(|id| {
            !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .ok_or_else(|| EcsMetadataError::NoTaskArn(format!("'{}'", task.task_arn)))?;
    Ok(id.to_string())
}

/// Asks the task metadata endpoint at `base_uri` (the value of [`ECS_METADATA_ENV`]) for this
/// task's id, within `timeout`. A plain HTTP/1.0 GET: the endpoint is a link-local `http://`
/// address, and HTTP/1.0 makes the server end the body by closing the connection (no chunking).
pub(crate) async fn ecs_task_id(
    base_uri: &str,
    timeout: Duration,
) -> Result<String, EcsMetadataError> {
    let rest = base_uri
        .strip_prefix("http://")
        .ok_or_else(|| EcsMetadataError::BadUri(base_uri.to_string()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(EcsMetadataError::BadUri(base_uri.to_string()));
    }
    let address = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let request = format!(
        "GET {}/task HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n",
        path.trim_end_matches('/')
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&address).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // The task document is a few KiB; 4 MiB is far beyond any real one.
        (&mut stream)
            .take(4 << 20)
            .read_to_end(&mut response)
            .await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| EcsMetadataError::Timeout(timeout))??;
    let text_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| EcsMetadataError::Status("no HTTP header".into()))?;
    let head = String::from_utf8_lossy(&response[..text_end]);
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(EcsMetadataError::Status(status_line.to_string()));
    }
    task_id_from_metadata(&response[text_end + 4..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sfn::operation::start_execution::StartExecutionError;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    fn service_error(code: &str, status: u16) -> SdkError<StartExecutionError, HttpResponse> {
        let err = StartExecutionError::generic(
            ErrorMetadata::builder()
                .code(code)
                .message("from the service")
                .build(),
        );
        let raw = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        SdkError::service_error(err, raw)
    }

    #[test]
    fn throttling_and_internal_errors_are_retriable() {
        for (code, status) in [
            ("ThrottlingException", 400),
            ("ProvisionedThroughputExceededException", 400),
            ("SlowDown", 503),
            ("InternalServerException", 500),
            ("ServiceQuotaExceededException", 402),
            ("ExecutionLimitExceeded", 400),
            ("SomethingNew", 503),
            ("SomethingElse", 429),
        ] {
            assert!(
                is_retriable(&service_error(code, status)),
                "{code} ({status})"
            );
        }
    }

    #[test]
    fn refusals_are_permanent() {
        for (code, status) in [
            ("AccessDeniedException", 400),
            ("AccessDenied", 403),
            ("ValidationException", 400),
            ("ResourceNotFoundException", 400),
            ("StateMachineDoesNotExist", 400),
            ("NoSuchBucket", 404),
            ("InvalidArn", 400),
            ("ConflictException", 409),
        ] {
            assert!(
                !is_retriable(&service_error(code, status)),
                "{code} ({status})"
            );
        }
    }

    #[test]
    fn transport_failures_are_retriable_but_unbuildable_requests_are_not() {
        let refused: SdkError<StartExecutionError, HttpResponse> = SdkError::dispatch_failure(
            ConnectorError::io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into()),
        );
        assert!(is_retriable(&refused));
        let timeout: SdkError<StartExecutionError, HttpResponse> = SdkError::timeout_error("slow");
        assert!(is_retriable(&timeout));
        let user: SdkError<StartExecutionError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::user("bad endpoint".into()));
        assert!(!is_retriable(&user));
        let unbuildable: SdkError<StartExecutionError, HttpResponse> =
            SdkError::construction_failure("missing field");
        assert!(!is_retriable(&unbuildable));
    }

    /// A `/task` response with the fields "Amazon ECS task metadata v4 JSON response for tasks on
    /// Fargate" lists, and the task ARN of the "Amazon ECS task metadata v4 examples" page
    /// (https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-metadata-endpoint-v4-examples.html).
    const FARGATE_TASK: &str = r#"{
        "Cluster": "arn:aws:ecs:us-west-2:111122223333:cluster/default",
        "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/default/8f03e41243824aea923aca126495f665",
        "Family": "curltest",
        "Revision": "24",
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Limits": { "CPU": 0.25, "Memory": 512 },
        "PullStartedAt": "2020-10-08T20:47:16.053330955Z",
        "AvailabilityZone": "us-west-2a",
        "LaunchType": "FARGATE",
        "Containers": [ { "Name": "curl", "DockerId": "8f03e41243824aea923aca126495f665-2495160603" } ]
    }"#;

    #[test]
    fn the_task_id_is_the_last_segment_of_the_task_arn() {
        assert_eq!(
            task_id_from_metadata(FARGATE_TASK.as_bytes()).unwrap(),
            "8f03e41243824aea923aca126495f665"
        );
        // The older ARN format, without the cluster ("Amazon ECS task metadata v3 examples for
        // tasks on Fargate").
        let old_format = r#"{"TaskARN": "arn:aws:ecs:us-east-2:012345678910:task/9781c248-0edd-4cdb-9a93-f63cb662a5d3"}"#;
        assert_eq!(
            task_id_from_metadata(old_format.as_bytes()).unwrap(),
            "9781c248-0edd-4cdb-9a93-f63cb662a5d3"
        );
        for bad in [
            r#"{"Cluster": "default"}"#,
            r#"{"TaskARN": ""}"#,
            r#"{"TaskARN": "arn:aws:ecs:us-east-1:0123:cluster/default"}"#,
            r#"{"TaskARN": "arn:aws:ecs:us-east-1:0123:task/default/"}"#,
            r#"{"TaskARN": "arn:aws:ecs:us-east-1:0123:task/default/a b"}"#,
            "not json",
        ] {
            assert!(task_id_from_metadata(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    /// Serves one canned HTTP answer on a local port; returns the base URI and the request seen.
    async fn one_answer(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v4/abc-123", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).to_string()
        });
        (base, served)
    }

    #[tokio::test]
    async fn the_task_id_is_read_from_the_endpoint() {
        let answer: &'static str = Box::leak(
            format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{FARGATE_TASK}")
                .into_boxed_str(),
        );
        let (base, served) = one_answer(answer).await;
        let id = ecs_task_id(&base, Duration::from_secs(5)).await.unwrap();
        assert_eq!(id, "8f03e41243824aea923aca126495f665");
        assert!(
            served
                .await
                .unwrap()
                .starts_with("GET /v4/abc-123/task HTTP/1.0\r\n")
        );

        let (base, _served) = one_answer("HTTP/1.0 500 Internal Server Error\r\n\r\n").await;
        let err = ecs_task_id(&base, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, EcsMetadataError::Status(_)), "{err}");
        assert!(matches!(
            ecs_task_id("https://x/v4", Duration::from_secs(1)).await,
            Err(EcsMetadataError::BadUri(_))
        ));
    }
}

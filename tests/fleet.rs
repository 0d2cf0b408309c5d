//! A fleet that heals itself, and a gateway that fails fast on configuration and loudly on
//! reachability: periodic recovery adopts a killed gateway's batch, the gateway id comes from the
//! ECS task metadata endpoint, `serve` without a region or credentials exits naming what to set, and
//! an unreachable AWS endpoint is one ERROR line and a 503 on `/readyz`, not a stopped gateway.
//! None of these needs LocalStack.

mod common;

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;

/// The AWS settings that could give `serve` a region or credentials from this machine's
/// environment (the shared test environment may set some of them).
const AWS_ENV: &[&str] = &[
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_EC2_METADATA_DISABLED",
    "RUST_LOG",
];

/// A child process killed (if still running) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `serve` with `args` in an environment without any AWS setting except `env` (and empty AWS
/// config files), expecting it to exit; returns its exit status and standard error. A gateway that
/// starts instead fails the wait, and is killed when the panic drops it.
fn serve_expecting_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dicom-gateway"));
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--store-dir"])
        .arg(dir.path().join("store"))
        .args(args);
    for var in AWS_ENV {
        cmd.env_remove(var);
    }
    // Empty AWS config files: no profile of this machine's can supply a region or credentials.
    let (config, credentials) = (dir.path().join("config"), dir.path().join("credentials"));
    std::fs::write(&config, "").unwrap();
    std::fs::write(&credentials, "").unwrap();
    cmd.env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .env("DICOM_GATEWAY_LOG_LEVEL", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let stderr_path = dir.path().join("stderr");
    let mut child = KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = eventually("serve to exit", Duration::from_secs(60), || {
        match child.0.try_wait().unwrap() {
            Some(status) => Ok(status),
            None => Err(std::fs::read_to_string(&stderr_path).unwrap_or_default()),
        }
    });
    (status, std::fs::read_to_string(&stderr_path).unwrap())
}

#[test]
fn serve_without_a_region_exits_naming_what_to_set_and_without_sdk_noise() {
    // IMDS is not disabled: on a machine without it, the SDK's probing of it must stay out of
    // the output (it used to print several multi-line WARN blobs).
    let (status, stderr) = serve_expecting_exit(&["--s3-bucket", "b"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no AWS region for --s3-bucket"), "{stderr}");
    assert!(stderr.contains("set AWS_REGION"), "{stderr}");
    assert!(!stderr.contains("WARN"), "no SDK probing noise:\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");

    let (status, stderr) = serve_expecting_exit(
        &["--job-table", "jobs", "--instance-table", "instances"],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("for --job-table, --instance-table"),
        "{stderr}"
    );

    // The job table without the instance table is a usage error that says what to add.
    let (status, stderr) = serve_expecting_exit(&["--job-table", "jobs"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--job-table also needs --instance-table"),
        "{stderr}"
    );
}

#[test]
fn serve_without_credentials_exits_naming_what_to_set() {
    let (status, stderr) = serve_expecting_exit(
        &["--s3-bucket", "b"],
        &[
            ("AWS_REGION", "us-east-1"),
            // No instance metadata either, so the answer does not depend on this machine.
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no AWS credentials for --s3-bucket"),
        "{stderr}"
    );
    assert!(
        stderr.contains("AWS_ACCESS_KEY_ID") && stderr.contains("AWS_PROFILE"),
        "{stderr}"
    );
    assert!(!stderr.contains("WARN"), "{stderr}");
}

#[test]
fn an_unreachable_endpoint_is_one_error_and_unready_but_the_gateway_serves() {
    let http = free_port();
    let metrics = format!("127.0.0.1:{http}");
    let store = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(
        &[
            "--s3-bucket",
            "unreachable",
            "--s3-force-path-style",
            "--metrics-listen",
            &metrics,
            "--store-dir",
            store.path().to_str().unwrap(),
        ],
        &[
            // Nothing listens on the discard port: every connection is refused.
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let log = gw.wait_for_log("does not answer at start-up");
    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("object store"), "{body}");
    assert_eq!(http_get(http, "/healthz").0, 200, "alive, only not ready");
    let out = echoscu(gw.port, AE, "ECHOSCU");
    assert!(out.status.success(), "the listener serves: {}", text(&out));

    let log_after = gw.stop();
    let errors: Vec<&str> = log_after
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR line:\n{log_after}");
    assert!(
        errors[0].contains("S3 bucket unreachable") && errors[0].contains("Connection refused"),
        "which and why: {}",
        errors[0]
    );
    assert!(!log.contains("WARN aws_config"), "{log}");
}

/// Serves `${ECS_CONTAINER_METADATA_URI_V4}/task` for one request with a task document; returns
/// the base URI.
fn fake_task_metadata_endpoint(task_arn: &str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/v4/0123abcd-task", listener.local_addr().unwrap());
    let body = format!(
        r#"{{"Cluster":"default","TaskARN":"{task_arn}","Family":"dicom-gateway","Revision":"7","DesiredStatus":"RUNNING","KnownStatus":"RUNNING","LaunchType":"FARGATE","Containers":[]}}"#
    );
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut request = [0u8; 2048];
        let n = s.read(&mut request).unwrap();
        let request = String::from_utf8_lossy(&request[..n]);
        let answer = if request.starts_with("GET /v4/0123abcd-task/task ") {
            format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}")
        } else {
            "HTTP/1.0 404 Not Found\r\n\r\n".to_string()
        };
        let _ = s.write_all(answer.as_bytes());
    });
    base
}

#[test]
fn on_ecs_the_gateway_id_is_the_task_id() {
    let base = fake_task_metadata_endpoint(
        "arn:aws:ecs:eu-west-1:111122223333:task/dicom/8f03e41243824aea923aca126495f665",
    );
    let store = tempfile::tempdir().unwrap();
    let gw = Gateway::start(
        &["--store-dir", store.path().to_str().unwrap()],
        &[("ECS_CONTAINER_METADATA_URI_V4", base.as_str())],
    );
    let log = gw.log_text();
    assert!(
        log.contains("gateway_id=8f03e41243824aea923aca126495f665"),
        "{log}"
    );

    // --gateway-id still wins, without asking the endpoint (which would answer only once anyway).
    let gw = Gateway::start(
        &[
            "--store-dir",
            store.path().to_str().unwrap(),
            "--gateway-id",
            "chosen",
        ],
        &[("ECS_CONTAINER_METADATA_URI_V4", "http://127.0.0.1:9/v4/x")],
    );
    assert!(gw.log_text().contains("gateway_id=chosen"));
    assert!(!gw.log_text().contains("WARN"), "{}", gw.log_text());

    // An endpoint that does not answer: a WARN, and the host name.
    let gw = Gateway::start(
        &["--store-dir", store.path().to_str().unwrap()],
        &[
            ("ECS_CONTAINER_METADATA_URI_V4", "http://127.0.0.1:9/v4/x"),
            ("HOSTNAME", "fleet-test-host"),
        ],
    );
    let log = gw.log_text();
    assert!(log.contains("cannot read this ECS task's id"), "{log}");
    assert!(log.contains("gateway_id=fleet-test-host"), "{log}");
}

#[test]
fn a_running_gateway_adopts_a_killed_gateways_open_batch_without_a_restart() {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap();
    // The survivor: recovery every ~1 s, other gateways' batches orphaned after 8 s open (twice its
    // own --batch-max-age would allow 4 s; 8 s leaves the victim time to receive first).
    let mut survivor = Gateway::start(
        &[
            "--store-dir",
            dir,
            "--gateway-id",
            "gw-survivor",
            "--recovery-interval",
            "1s",
            "--batch-max-age",
            "2s",
            "--orphan-age",
            "8s",
        ],
        &[],
    );
    // The victim keeps its batch open: it would close it only after an hour.
    let mut victim = Gateway::start(
        &[
            "--store-dir",
            dir,
            "--gateway-id",
            "gw-victim",
            "--batch-idle",
            "1h",
            "--batch-max-age",
            "30m",
        ],
        &[],
    );
    send_testdata(victim.port);
    let jobs = local_jobs(store.path());
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["status"], "OPEN");
    assert_eq!(jobs[0]["gatewayId"], "gw-victim");
    let job_id = jobs[0]["jobId"].as_str().unwrap().to_string();

    victim.kill(); // SIGKILL: the batch stays OPEN

    let job = eventually(
        "the survivor's periodic recovery to adopt the batch",
        Duration::from_secs(40),
        || match &local_jobs(store.path())[..] {
            [job] if job["status"] == "CLOSED" => Ok(job.clone()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(job["jobId"], job_id.as_str());
    assert_eq!(job["gatewayId"], "gw-survivor");
    assert_eq!(job["closeReason"], "recovered");
    assert_eq!(job["instanceCount"], 5);
    assert!(
        survivor
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the survivor was never restarted"
    );
    let log = survivor.stop();
    let adopted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("adopted and closed from its stored objects"))
        .collect();
    assert_eq!(adopted.len(), 1, "{log}");
    assert!(
        adopted[0].contains(&job_id) && adopted[0].contains("previous_gateway=gw-victim"),
        "{}",
        adopted[0]
    );
}

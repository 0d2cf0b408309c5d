//! Puts the parts together for `dicom-gateway serve` and runs them until a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::association::Services;
use crate::batch::Batcher;
use crate::config::{ImportConfig, JobStoreConfig, LogFormat, ServeConfig, StoreConfig, TlsConfig};
use crate::emf::Emitter;
use crate::health::Readiness;
use crate::import::{ImportTrigger, Pipeline, StepFunctionsTrigger};
use crate::jobs::JobStore;
use crate::jobs::dynamodb::DynamoJobStore;
use crate::jobs::local::LocalJournal;
use crate::listener::{Admission, Listener};
use crate::recovery::Recovery;
use crate::store::ObjectStore;
use crate::store::local::LocalStore;
use crate::store::s3::S3Store;
use crate::tls::TlsSwitch;

/// How long start-up recovery leaves another gateway's CLOSED job alone.
const RECOVERY_GRACE: Duration = Duration::from_secs(300);
/// Longest pause between retries of job recording and import starts.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// At shutdown, time given to recording the last batches before giving up (recovery at the next
/// start picks up CLOSED jobs; see the README).
const PIPELINE_DRAIN: Duration = Duration::from_secs(10);

async fn aws_config() -> aws_config::SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

/// The job store the configuration names: a DynamoDB table, or the local journal.
pub(crate) async fn open_job_store(config: &JobStoreConfig) -> Arc<dyn JobStore> {
    match config {
        JobStoreConfig::DynamoDb { table } => Arc::new(DynamoJobStore::new(
            aws_sdk_dynamodb::Client::new(&aws_config().await),
            table.clone(),
        )),
        JobStoreConfig::LocalJournal { dir } => Arc::new(LocalJournal::new(dir.clone())),
    }
}

/// Opens the object store the configuration names: an S3 bucket, or the local directory.
async fn open_store(config: &StoreConfig) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match config {
        StoreConfig::S3 {
            bucket,
            prefix,
            force_path_style,
            part_size,
            parts_in_flight,
        } => {
            let conf = aws_config().await;
            let s3_conf = aws_sdk_s3::config::Builder::from(&conf)
                .force_path_style(*force_path_style)
                .build();
            let client = aws_sdk_s3::Client::from_conf(s3_conf);
            Ok(Arc::new(S3Store::new(
                client,
                bucket.clone(),
                prefix.clone(),
                *part_size,
                *parts_in_flight,
            )))
        }
        StoreConfig::Local { dir } => {
            let store = LocalStore::open(dir).await.with_context(|| {
                format!(
                    "cannot use --store-dir {}: check that it is writable",
                    dir.display()
                )
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// The Step Functions trigger that starts each closed batch's import.
async fn open_trigger(config: &ImportConfig) -> Arc<dyn ImportTrigger> {
    Arc::new(StepFunctionsTrigger::new(
        aws_sdk_sfn::Client::new(&aws_config().await),
        config.state_machine_arn.clone(),
        config.settings.clone(),
    ))
}

/// Loads the TLS material and binds the TLS listener; SIGHUP reloads the material from then on.
async fn open_tls(config: &TlsConfig) -> anyhow::Result<(TcpListener, Arc<TlsSwitch>)> {
    let switch = TlsSwitch::load(config.files.clone()).map_err(|e| {
        anyhow::anyhow!("TLS configuration (--tls-cert, --tls-key, --tls-client-ca): {e}")
    })?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (--tls-listen): is another process using the port?",
            config.listen
        )
    })?;
    spawn_tls_reloader(switch.clone());
    Ok((listener, switch))
}

/// Runs the gateway until `shutdown` is cancelled, then shuts down gracefully.
pub(crate) async fn serve(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = open_store(&config.store).await?;
    let jobs = open_job_store(&config.job_store).await;
    let trigger = match &config.import {
        Some(import) => Some(open_trigger(import).await),
        None => None,
    };
    let gateway_id = config.gateway_id.clone();
    let plain = match config.listen {
        None => None,
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (--listen): is another process using the port?")
        })?),
    };
    let tls = match &config.tls {
        Some(tls) => Some(open_tls(tls).await?),
        None => None,
    };

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let location_store = store.clone();
    let batcher = Batcher::new(
        config.batch_limits,
        move |id| location_store.input_s3_uri(id),
        events_tx,
    );
    let pipeline = Pipeline::new(
        jobs.clone(),
        trigger.clone(),
        gateway_id.clone(),
        MAX_RETRY_BACKOFF,
    );
    let pipeline_task = tokio::spawn(pipeline.clone().run(events_rx));
    // Recovery runs beside the listener: a slow or unreachable job store must not delay receiving.
    let recovery = {
        let recovery = Recovery::new(
            pipeline.clone(),
            jobs.clone(),
            store.clone(),
            gateway_id.clone(),
        );
        tokio::spawn(async move {
            match recovery.run(RECOVERY_GRACE).await {
                Ok(0) => {}
                Ok(n) => info!(
                    jobs = n,
                    "recovery: finished jobs left behind by a previous run"
                ),
                Err(e) => {
                    warn!(error = %e, "recovery: could not list CLOSED jobs; they will be retried at the next start")
                }
            }
        })
    };
    let timer_stop = CancellationToken::new();
    let timer = tokio::spawn(batcher.clone().run_timer(timer_stop.clone()));

    let services = Arc::new(Services {
        acceptance: config.acceptance.clone(),
        timeouts: config.timeouts,
        store: store.clone(),
        batcher: batcher.clone(),
        duplicates: config.duplicate_policy,
    });
    let listener = Listener::new(
        plain,
        tls,
        services,
        Admission {
            max_associations: config.max_associations,
            max_pending: config.max_pending_connections,
            peer_allow: config.peer_allow.clone(),
            proxy_protocol: config.proxy_protocol,
        },
    );
    info!(
        listen = %listener.local_addrs().0.map(|a| a.to_string()).unwrap_or_else(|| "off (--tls-only)".into()),
        tls_listen = %listener.local_addrs().1.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        mutual_tls = config.tls.as_ref().is_some_and(|tls| tls.files.client_ca.is_some()),
        ae_title = %config.acceptance.ae_title,
        store = %store.describe(),
        jobs = %jobs.describe(),
        import = %trigger.as_ref().map(|t| t.describe()).unwrap_or_else(|| "none (batches stay CLOSED)".into()),
        gateway_id = %gateway_id,
        sop_classes = config.acceptance.syntaxes.sop_class_count(),
        max_associations = config.max_associations,
        proxy_protocol = config.proxy_protocol,
        "dicom-gateway listening"
    );
    let health_stop = CancellationToken::new();
    let health = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let http = TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen on {addr} (--metrics-listen): is another process using the port?"
                )
            })?;
            let readiness = Readiness::new(store.clone(), jobs.clone(), trigger.clone());
            info!(listen = %http.local_addr()?, "health and metrics on /healthz, /readyz, /metrics");
            let (r, s) = (readiness.clone(), shutdown.clone());
            // Unready as soon as shutdown begins, so load balancers send no new associations.
            tokio::spawn(async move {
                s.cancelled().await;
                r.shutting_down();
            });
            Some(tokio::spawn(crate::health::serve(
                http,
                readiness,
                health_stop.clone(),
                config.proxy_protocol,
            )))
        }
    };
    // CloudWatch metrics ride on the JSON log (the container's format); text logs are for people.
    let emf_stop = CancellationToken::new();
    let emf = (config.log.format == LogFormat::Json).then(|| {
        let jobs = config.import.is_some().then(|| jobs.clone());
        tokio::spawn(Emitter::new(config.emf_interval, jobs).run(emf_stop.clone()))
    });
    listener.run(shutdown, config.shutdown_deadline).await;

    // Every association has ended: close the open batch and record what is left.
    timer_stop.cancel();
    let _ = timer.await;
    batcher.close_all(Duration::from_secs(5)).await;
    drop(batcher);
    recovery.abort();
    if tokio::time::timeout(PIPELINE_DRAIN, pipeline_task)
        .await
        .is_err()
    {
        warn!(
            "job store or import trigger still unavailable at shutdown; CLOSED jobs are started by recovery at the next start"
        );
    }
    health_stop.cancel();
    if let Some(h) = health {
        let _ = h.await;
    }
    // Last: the final record counts everything the shutdown still did.
    emf_stop.cancel();
    if let Some(e) = emf {
        let _ = e.await;
    }
    info!("dicom-gateway stopped");
    Ok(())
}

/// Reloads the TLS certificate, key and client CA on every SIGHUP; a failed reload keeps the
/// previous configuration, and running associations are never touched.
fn spawn_tls_reloader(switch: Arc<TlsSwitch>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match switch.reload() {
                Ok(()) => {
                    info!("SIGHUP: TLS certificate and key reloaded; new associations use them")
                }
                Err(e) => {
                    warn!(error = %e, "SIGHUP: TLS reload failed; the previous certificate stays in use")
                }
            }
        }
    });
}

/// Resolves on the first SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received; shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received; shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

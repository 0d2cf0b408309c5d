//! Puts the parts together for `dicom-gateway serve` and runs them until a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::association::{AcceptancePolicy, Services, Timeouts};
use crate::batch::Batcher;
use crate::config::{JobStoreArgs, ServeArgs};
use crate::health::Readiness;
use crate::import::{ImportSettings, ImportTrigger, Pipeline, StepFunctionsTrigger};
use crate::jobs::JobStore;
use crate::jobs::dynamodb::DynamoJobStore;
use crate::jobs::local::LocalJournal;
use crate::listener::Listener;
use crate::policy::SyntaxPolicy;
use crate::recovery::Recovery;
use crate::store::ObjectStore;
use crate::store::local::LocalStore;
use crate::store::s3::S3Store;
use crate::tls::{TlsFiles, TlsSwitch};

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

/// The job store the options ask for: DynamoDB with --job-table, else the local journal.
pub async fn open_job_store(args: &JobStoreArgs) -> Arc<dyn JobStore> {
    match &args.job_table {
        Some(table) => Arc::new(DynamoJobStore::new(
            aws_sdk_dynamodb::Client::new(&aws_config().await),
            table.clone(),
        )),
        None => Arc::new(LocalJournal::new(
            args.store_dir.join(LocalJournal::DIR_NAME),
        )),
    }
}

/// Builds the store the options ask for: S3 when a bucket is given, else the local directory.
async fn open_store(args: &ServeArgs) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match &args.s3_bucket {
        Some(bucket) => {
            let conf = aws_config().await;
            let s3_conf = aws_sdk_s3::config::Builder::from(&conf)
                .force_path_style(args.s3_force_path_style)
                .build();
            let client = aws_sdk_s3::Client::from_conf(s3_conf);
            Ok(Arc::new(S3Store::new(
                client,
                bucket.clone(),
                args.s3_prefix.clone(),
                args.part_size as usize,
                args.parts_in_flight,
            )))
        }
        None => {
            let store = LocalStore::open(&args.store_dir).await.with_context(|| {
                format!(
                    "cannot use --store-dir {}: check that it is writable",
                    args.store_dir.display()
                )
            })?;
            Ok(Arc::new(store))
        }
    }
}

async fn open_trigger(args: &ServeArgs) -> Option<Arc<dyn ImportTrigger>> {
    let arn = args.state_machine_arn.clone()?;
    // validate() guarantees these are present when a state machine is configured.
    let settings = ImportSettings {
        datastore_id: args.datastore_id.clone().unwrap_or_default(),
        data_access_role_arn: args.data_access_role_arn.clone().unwrap_or_default(),
        results_bucket: args.s3_bucket.clone().unwrap_or_default(),
        results_prefix: args.results_prefix.clone(),
        table_name: args.job_table.clone().unwrap_or_default(),
        poll_interval: args.import_poll_interval,
        max_polls: args.import_max_polls,
    };
    Some(Arc::new(StepFunctionsTrigger::new(
        aws_sdk_sfn::Client::new(&aws_config().await),
        arn,
        settings,
    )))
}

/// Runs the gateway until `shutdown` is cancelled, then shuts down gracefully.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = open_store(&args).await?;
    let jobs = open_job_store(&JobStoreArgs {
        job_table: args.job_table.clone(),
        store_dir: args.store_dir.clone(),
    })
    .await;
    let trigger = open_trigger(&args).await;
    let gateway_id = args.gateway_id();
    let plain = if args.tls_only {
        None
    } else {
        Some(TcpListener::bind(args.listen).await.with_context(|| {
            format!(
                "cannot listen on {} (--listen): is another process using the port?",
                args.listen
            )
        })?)
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            };
            let switch = TlsSwitch::load(files).map_err(|e| {
                anyhow::anyhow!("TLS configuration (--tls-cert, --tls-key, --tls-client-ca): {e}")
            })?;
            let l = TcpListener::bind(args.tls_listen).await.with_context(|| {
                format!(
                    "cannot listen on {} (--tls-listen): is another process using the port?",
                    args.tls_listen
                )
            })?;
            spawn_tls_reloader(switch.clone());
            Some((l, switch))
        }
        _ => None,
    };

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let location_store = store.clone();
    let batcher = Batcher::new(
        args.batch_limits(),
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

    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    let syntaxes = SyntaxPolicy::new(
        non_empty(&args.sop_class_allow).as_deref(),
        non_empty(&args.transfer_syntax_allow).as_deref(),
    );
    let services = Arc::new(Services {
        acceptance: AcceptancePolicy {
            ae_title: args.ae_title.trim().to_string(),
            accept_any_called_ae: args.accept_any_called_ae,
            calling_ae_allow: args.calling_ae_allow.clone(),
            syntaxes,
            max_pdu: args.max_pdu,
            ae_bindings: args.ae_bindings().map_err(anyhow::Error::msg)?,
        },
        timeouts: Timeouts {
            request: args.association_timeout,
            idle: args.idle_timeout,
            io: args.io_timeout,
        },
        store: store.clone(),
        batcher: batcher.clone(),
        duplicates: args.duplicate_policy,
    });
    let listener = Listener::new(
        plain,
        tls,
        services,
        args.max_associations,
        args.peer_allow.clone(),
    );
    info!(
        listen = %listener.local_addrs().0.map(|a| a.to_string()).unwrap_or_else(|| "off (--tls-only)".into()),
        tls_listen = %listener.local_addrs().1.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        mutual_tls = args.tls_client_ca.is_some(),
        ae_title = %args.ae_title,
        store = %store.describe(),
        jobs = %jobs.describe(),
        import = %trigger.as_ref().map(|t| t.describe()).unwrap_or_else(|| "none (batches stay CLOSED)".into()),
        gateway_id = %gateway_id,
        sop_classes = if args.sop_class_allow.is_empty() { "all storage + verification".to_string() } else { args.sop_class_allow.len().to_string() },
        max_associations = args.max_associations,
        "dicom-gateway listening"
    );
    let health_stop = CancellationToken::new();
    let health = match args.metrics_listen {
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
            )))
        }
    };
    listener.run(shutdown, args.shutdown_deadline).await;

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
pub async fn shutdown_signal() {
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

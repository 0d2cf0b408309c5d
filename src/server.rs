//! Puts the parts together for `dicom-gateway serve` and runs them until a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::association::Services;
use crate::aws::{Aws, AwsSetupError};
use crate::batch::{BatchEvent, Batcher};
use crate::commitment::Commitments;
use crate::commitment::dynamodb::DynamoPending;
use crate::commitment::pending::{LocalPending, PendingStore};
use crate::config::{
    ImportConfig, IndexConfig, JobStoreConfig, LogFormat, ServeConfig, SpoolConfig, StoreConfig,
    TlsConfig,
};
use crate::emf::Emitter;
use crate::health::Readiness;
use crate::import::{ImportTrigger, Pipeline, StepFunctionsTrigger};
use crate::index::dynamodb::DynamoIndex;
use crate::index::local::LocalIndex;
use crate::index::repair::{Repairer, run_gate};
use crate::index::{CHANNEL_CAPACITY, IndexSender, InstanceIndex, run_writer};
use crate::jobs::JobStore;
use crate::jobs::dynamodb::DynamoJobStore;
use crate::jobs::local::LocalJournal;
use crate::listener::{Admission, Listener};
use crate::outcome::{GiveUp, MANIFEST_WAIT, OutcomeReader, OutcomeTiming, S3Results};
use crate::recovery::Recovery;
use crate::store::ObjectStore;
use crate::store::local::LocalStore;
use crate::store::s3::S3Store;
use crate::store::spool::Spool;
use crate::tls::TlsSwitch;

/// How long recovery leaves a CLOSED job alone that a live pipeline may still be starting.
const RECOVERY_GRACE: Duration = Duration::from_secs(300);
/// Longest wait for the ECS task metadata endpoint at start-up. It is a local agent on the task's
/// own host (link-local address) that answers in milliseconds; a few seconds cover a busy agent
/// without delaying start-up noticeably when something is wrong.
const ECS_METADATA_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest pause between retries of job recording and import starts.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// At shutdown, time given to recording the last batches before giving up (recovery at the next
/// start picks up CLOSED jobs; see the README).
const PIPELINE_DRAIN: Duration = Duration::from_secs(10);
/// Bounds on each S3 call. Without them the SDK waits on a half-open connection for ever, and the
/// association whose instance is being stored keeps its slot (and holds up shutdown). An attempt
/// may move one part (8 MiB by default) over a slow link; the SDK retries a timed-out attempt.
fn s3_timeouts() -> aws_smithy_types::timeout::TimeoutConfig {
    aws_smithy_types::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(120))
        .build()
}

/// At shutdown, time given to the outcome reader to finish the job in hand.
const OUTCOME_DRAIN: Duration = Duration::from_secs(5);

/// The AWS configuration for the options of `config` that use AWS, loaded on first use.
fn aws_for(config: &ServeConfig) -> Aws {
    let needed_by: Vec<&str> = [
        (
            "--s3-bucket",
            matches!(config.store, StoreConfig::S3 { .. }),
        ),
        (
            "--job-table",
            matches!(config.job_store, JobStoreConfig::DynamoDb { .. }),
        ),
        (
            "--instance-table",
            matches!(config.index, IndexConfig::DynamoDb { .. }),
        ),
        ("--state-machine-arn", config.import.is_some()),
    ]
    .into_iter()
    .filter_map(|(option, used)| used.then_some(option))
    .collect();
    Aws::new(needed_by.join(", "))
}

/// The job store the configuration names: a DynamoDB table, or the local journal.
pub(crate) async fn open_job_store(
    config: &JobStoreConfig,
    aws: &Aws,
) -> Result<Arc<dyn JobStore>, AwsSetupError> {
    Ok(match config {
        JobStoreConfig::DynamoDb { table } => Arc::new(DynamoJobStore::new(
            aws_sdk_dynamodb::Client::new(aws.config().await?),
            table.clone(),
        )),
        JobStoreConfig::LocalJournal { dir } => Arc::new(LocalJournal::new(dir.clone())),
    })
}

/// An S3 client from the AWS configuration.
async fn s3_client(aws: &Aws, force_path_style: bool) -> anyhow::Result<aws_sdk_s3::Client> {
    let s3_conf = aws_sdk_s3::config::Builder::from(aws.config().await?)
        .force_path_style(force_path_style)
        .timeout_config(s3_timeouts())
        .build();
    Ok(aws_sdk_s3::Client::from_conf(s3_conf))
}

/// Opens the object store the configuration names: an S3 bucket, or the local directory.
async fn open_store(config: &StoreConfig, aws: &Aws) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match config {
        StoreConfig::S3 {
            bucket,
            prefix,
            force_path_style,
            part_size,
            parts_in_flight,
        } => {
            let client = s3_client(aws, *force_path_style).await?;
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

/// Edge mode: the spool in front of `inner` (S3), with what a crash left in it queued for upload.
async fn open_spool(
    config: &SpoolConfig,
    inner: Arc<dyn ObjectStore>,
) -> anyhow::Result<Arc<Spool>> {
    Spool::open(
        config.dir.clone(),
        config.capacity,
        config.upload_concurrency,
        inner,
    )
    .await
    .with_context(|| {
        format!(
            "cannot use --spool-dir {}: check that it is writable",
            config.dir.display()
        )
    })
}

/// The Step Functions trigger that starts each closed batch's import.
async fn open_trigger(
    config: &ImportConfig,
    aws: &Aws,
) -> Result<Arc<dyn ImportTrigger>, AwsSetupError> {
    Ok(Arc::new(StepFunctionsTrigger::new(
        aws_sdk_sfn::Client::new(aws.config().await?),
        config.state_machine_arn.clone(),
        config.settings.clone(),
    )))
}

/// This gateway's name in job records, resolved once at start-up: the one given (`--gateway-id`);
/// on ECS the task's id, unique per task and stable for its life; elsewhere the host name. A
/// metadata endpoint that does not answer falls back to the host name with a WARN.
async fn resolve_gateway_id(given: Option<&str>) -> String {
    if let Some(id) = given {
        return id.to_string();
    }
    if let Ok(uri) = std::env::var(crate::aws::ECS_METADATA_ENV)
        && !uri.is_empty()
    {
        match crate::aws::ecs_task_id(&uri, ECS_METADATA_TIMEOUT).await {
            Ok(task_id) => return task_id,
            Err(e) => {
                let host = host_name();
                warn!(error = %e, gateway_id = %host, "cannot read this ECS task's id; the host name is the gateway id (give --gateway-id to choose one)");
                return host;
            }
        }
    }
    host_name()
}

/// The host name ($HOSTNAME, else /etc/hostname), or "dicom-gateway".
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "dicom-gateway".into())
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

/// Where pending Storage Commitment requests are kept: beside the job records.
async fn open_pending(
    config: &JobStoreConfig,
    aws: &Aws,
) -> Result<Arc<dyn PendingStore>, AwsSetupError> {
    Ok(match config {
        JobStoreConfig::DynamoDb { table } => Arc::new(DynamoPending::new(
            aws_sdk_dynamodb::Client::new(aws.config().await?),
            table.clone(),
        )),
        JobStoreConfig::LocalJournal { dir } => Arc::new(LocalPending::new(dir.clone())),
    })
}

/// The instance index the configuration names: the local journal or a DynamoDB table.
pub(crate) async fn open_instance_index(
    config: &IndexConfig,
    aws: &Aws,
) -> Result<Arc<dyn InstanceIndex>, AwsSetupError> {
    Ok(match config {
        IndexConfig::Local { store_root } => Arc::new(LocalIndex::new(store_root)),
        IndexConfig::DynamoDb { table } => Arc::new(DynamoIndex::new(
            aws_sdk_dynamodb::Client::new(aws.config().await?),
            table.clone(),
        )),
    })
}

/// What the index gives the rest of the gateway: the index itself (for the outcome reader), the
/// receive path's sender, the writer task to wait for at shutdown, and the repairer that closing
/// batches and recovery use.
struct OpenIndex {
    index: Arc<dyn InstanceIndex>,
    sender: IndexSender,
    writer: tokio::task::JoinHandle<()>,
    repairer: Arc<Repairer>,
}

/// The instance index the configuration names, the writer the receive path hands records to,
/// and for the local journal a rebuild of what a crash lost (in the background, so receiving
/// starts at once).
async fn open_index(
    config: &IndexConfig,
    aws: &Aws,
    store: Arc<dyn ObjectStore>,
) -> Result<OpenIndex, AwsSetupError> {
    let (sender, rx, tally) = IndexSender::channel(CHANNEL_CAPACITY);
    let progress = sender.progress().unwrap_or_default();
    let index = match config {
        // One LocalIndex for the rebuild and the writer: its lock keeps them apart.
        IndexConfig::Local { store_root } => {
            let local = LocalIndex::new(store_root);
            let rebuilding = local.clone();
            tokio::spawn(async move {
                match rebuilding.rebuild_async().await {
                    Ok(added) => {
                        // Storage Commitment may now take an instance the index lacks as not stored.
                        progress.set_rebuilt();
                        info!(added, index = %rebuilding.describe(), "instance index rebuilt from the store")
                    }
                    Err(e) => {
                        warn!(error = %e, "instance index rebuild failed; `dicom-gateway instances show` may miss instances stored before a crash")
                    }
                }
            });
            Arc::new(local) as Arc<dyn InstanceIndex>
        }
        // No start-up rebuild: what a crash lost is repaired when recovery adopts the batch, and
        // a batch's records are written before it is recorded CLOSED (crate::index::repair).
        IndexConfig::DynamoDb { .. } => {
            progress.set_rebuilt();
            open_instance_index(config, aws).await?
        }
    };
    let writer = tokio::spawn(run_writer(index.clone(), rx, tally.clone()));
    let repairer = Arc::new(Repairer::new(index.clone(), store, Some(tally)));
    Ok(OpenIndex {
        index,
        sender,
        writer,
        repairer,
    })
}

/// Runs the gateway until `shutdown` is cancelled, then shuts down gracefully.
pub(crate) async fn serve(config: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A missing region or credentials stops start-up here, naming what to set (exit status 2).
    let aws = aws_for(&config);
    let store = open_store(&config.store, &aws).await?;
    // Edge mode: the spool takes the store's place on the receive path; S3 is behind it.
    let spool = match &config.spool {
        Some(spool) => Some(open_spool(spool, store.clone()).await?),
        None => None,
    };
    let store: Arc<dyn ObjectStore> = match &spool {
        Some(spool) => spool.clone(),
        None => store,
    };
    let jobs = open_job_store(&config.job_store, &aws).await?;
    let OpenIndex {
        index: instance_index,
        sender: index,
        writer: index_writer,
        repairer: index_repairer,
    } = open_index(&config.index, &aws, store.clone()).await?;
    let trigger = match &config.import {
        Some(import) => Some(open_trigger(import, &aws).await?),
        None => None,
    };
    let gateway_id = resolve_gateway_id(config.gateway_id.as_deref()).await;
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

    // Batch events go through the index gate: a closing batch reaches the pipeline (which
    // records it CLOSED) once its job's instances are indexed.
    let (events_tx, gate_rx) = mpsc::unbounded_channel();
    let (gate_tx, events_rx) = mpsc::unbounded_channel();
    tokio::spawn(run_gate(index_repairer.clone(), gate_rx, gate_tx));
    // Edge mode: the batches of the instances a crash left in the spool are recorded OPEN (a job
    // already recorded is left alone): a gateway killed right after a batch's first acknowledged
    // instance may never have recorded it, and its instances must still be imported. A job id is
    // the batch's ULID, which holds when it opened.
    let replayed = spool.as_ref().map(|s| s.pending_jobs()).unwrap_or_default();
    for job_id in &replayed {
        if let Ok(ulid) = ulid::Ulid::from_string(job_id) {
            let _ = events_tx.send(BatchEvent::Opened {
                job_id: job_id.clone(),
                created_at: crate::clock::rfc3339(ulid.datetime()),
                input_s3_uri: store.input_s3_uri(job_id),
            });
        }
    }
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
    // Recovery runs beside the listener, at start-up and then periodically: a slow or
    // unreachable job store must not delay receiving.
    let recovery_stop = CancellationToken::new();
    let recovery = {
        let recovery = Recovery::new(
            pipeline.clone(),
            jobs.clone(),
            store.clone(),
            index_repairer.clone(),
            gateway_id.clone(),
            config.recovery.orphan_age,
        );
        recovery.wait_for(replayed);
        let (interval, stop) = (config.recovery.interval, recovery_stop.clone());
        tokio::spawn(async move {
            recovery
                .run_periodically(interval, RECOVERY_GRACE, stop)
                .await
        })
    };
    // Imports end IMPORTED, and a gateway that reads S3 reads their results and ends them: one
    // that imports, or (looking at the recovery interval) one that shares the DynamoDB job table
    // without importing, so that a fleet restarted without --state-machine-arn still finishes the
    // imports in flight. The latter never gives a job up: it may lack what reading the results
    // takes, so it leaves that decision to a gateway that imports (outcome::GiveUp). A local job
    // journal without imports has no IMPORTED jobs to finish.
    let reads_outcomes = match (&config.import, &config.job_store) {
        (Some(import), _) => Some((import.settings.poll_interval, GiveUp::After(MANIFEST_WAIT))),
        (None, JobStoreConfig::DynamoDb { .. }) => Some((config.recovery.interval, GiveUp::Never)),
        (None, JobStoreConfig::LocalJournal { .. }) => None,
    };
    let outcomes = match (&config.store, reads_outcomes) {
        (
            StoreConfig::S3 {
                force_path_style, ..
            },
            Some((interval, give_up)),
        ) => {
            let reader = OutcomeReader::new(
                jobs.clone(),
                Arc::new(S3Results::new(s3_client(&aws, *force_path_style).await?)),
                Some(instance_index.clone()),
                gateway_id.clone(),
                OutcomeTiming::every(interval, give_up),
            );
            let stop = CancellationToken::new();
            Some((tokio::spawn(reader.run(stop.clone())), stop))
        }
        _ => None,
    };
    let timer_stop = CancellationToken::new();
    let timer = tokio::spawn(batcher.clone().run_timer(timer_stop.clone()));
    let uploader = spool.as_ref().map(|spool| {
        let (spool, stop) = (spool.clone(), CancellationToken::new());
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { spool.run_uploader(stop).await }
        });
        (task, stop)
    });

    // Storage Commitment decides from the instance index.
    let acceptance = config.acceptance.clone();
    let pending = open_pending(&config.job_store, &aws).await?;
    let (commitments, commitment_worker) = Commitments::new(
        config.commitment.clone(),
        config.acceptance.ae_title.clone(),
        gateway_id.clone(),
        instance_index.clone(),
        index.progress().unwrap_or_default(),
        store.clone(),
        pending,
    );
    let commitments = Some(commitments);
    let commitment_stop = CancellationToken::new();
    let commitment_task = tokio::spawn(commitment_worker.run(commitment_stop.clone()));
    let services = Arc::new(Services {
        acceptance,
        timeouts: config.timeouts,
        store: store.clone(),
        batcher: batcher.clone(),
        duplicates: config.duplicate_policy,
        index,
        commitments,
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
        index = %instance_index.describe(),
        import = %trigger.as_ref().map(|t| t.describe()).unwrap_or_else(|| "none (batches stay CLOSED)".into()),
        gateway_id = %gateway_id,
        sop_classes = config.acceptance.syntaxes.sop_class_count(),
        max_associations = config.max_associations,
        proxy_protocol = config.proxy_protocol,
        "dicom-gateway listening"
    );
    // Checked once, beside the listener: an unreachable dependency is one ERROR line, not a
    // reason to stop receiving.
    let readiness = Readiness::new(store.clone(), jobs.clone(), trigger.clone());
    {
        let readiness = readiness.clone();
        tokio::spawn(async move { readiness.startup_check().await });
    }
    // The DynamoDB index too, with one Query: it is derived data, so it does not make the gateway
    // unready, but a wrong table name or a missing permission should show at once.
    if matches!(config.index, IndexConfig::DynamoDb { .. }) {
        let index = instance_index.clone();
        tokio::spawn(async move {
            if let Err(e) = index.find("2.25.0").await {
                error!(error = %e, "{} does not answer at start-up; receiving continues, and records it misses are repaired from the store when their batch closes", index.describe());
            }
        });
    }
    let health_stop = CancellationToken::new();
    let health = match config.metrics_listen {
        None => None,
        Some(addr) => {
            let http = TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen on {addr} (--metrics-listen): is another process using the port?"
                )
            })?;
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
    // Edge mode: uploads still to do wait in the spool for the next start; their batches stay
    // OPEN (never closed partial), and recovery closes them once the next start uploaded them.
    if let Some((task, stop)) = uploader {
        stop.cancel();
        let _ = task.await;
    }
    drop(batcher);
    recovery_stop.cancel();
    recovery.abort();
    // Requests not answered yet stay recorded; the next start (or another gateway) answers them.
    commitment_stop.cancel();
    let _ = commitment_task.await;
    // Every sender went with the associations: the writer appends what it holds, then ends.
    if tokio::time::timeout(Duration::from_secs(5), index_writer)
        .await
        .is_err()
    {
        warn!(
            "instance index: still writing at shutdown; batches not recorded CLOSED are repaired by recovery at the next start"
        );
    }
    // The job in hand is finished; should that take too long, its claim expires and the next
    // gateway to look finishes it.
    if let Some((task, stop)) = outcomes {
        stop.cancel();
        if tokio::time::timeout(OUTCOME_DRAIN, task).await.is_err() {
            warn!("import outcome: still recording at shutdown; another gateway finishes the job");
        }
    }
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

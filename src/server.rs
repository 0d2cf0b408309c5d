//! Puts the parts together for `dicom-gateway serve` and runs them until a shutdown signal.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::association::{AcceptancePolicy, Services, Timeouts};
use crate::batch::Batcher;
use crate::config::ServeArgs;
use crate::jobs::{JobStore, LocalJournal, LogJobStore, run_recorder};
use crate::listener::Listener;
use crate::policy::Policy;
use crate::store::ObjectStore;
use crate::store::local::LocalStore;
use crate::store::s3::S3Store;

/// Builds the store the options ask for: S3 when a bucket is given, else the local directory.
async fn open_store(args: &ServeArgs) -> anyhow::Result<(Arc<dyn ObjectStore>, Arc<dyn JobStore>)> {
    match &args.s3_bucket {
        Some(bucket) => {
            let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let s3_conf = aws_sdk_s3::config::Builder::from(&conf).force_path_style(args.s3_force_path_style).build();
            let client = aws_sdk_s3::Client::from_conf(s3_conf);
            let store = S3Store::new(client, bucket.clone(), args.s3_prefix.clone(), args.part_size as usize, args.parts_in_flight);
            Ok((Arc::new(store), Arc::new(LogJobStore)))
        }
        None => {
            let store = LocalStore::open(&args.store_dir)
                .await
                .with_context(|| format!("cannot use --store-dir {}: check that it is writable", args.store_dir.display()))?;
            let journal = LocalJournal::new(store.root().join(LocalJournal::DIR_NAME));
            Ok((Arc::new(store), Arc::new(journal)))
        }
    }
}

/// Runs the gateway until `shutdown` is cancelled, then shuts down gracefully.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (store, jobs) = open_store(&args).await?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen): is another process using the port?", args.listen))?;

    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    let location_store = store.clone();
    let batcher = Batcher::new(args.batch_limits(), move |id| location_store.batch_location(id), closed_tx);
    let recorder = tokio::spawn(run_recorder(jobs.clone(), closed_rx, std::time::Duration::from_secs(30)));
    let timer_stop = CancellationToken::new();
    let timer = tokio::spawn(batcher.clone().run_timer(timer_stop.clone()));

    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    let policy = Policy::new(non_empty(&args.sop_class_allow).as_deref(), non_empty(&args.transfer_syntax_allow).as_deref());
    let services = Arc::new(Services {
        acceptance: AcceptancePolicy {
            ae_title: args.ae_title.trim().to_string(),
            accept_any_called_ae: args.accept_any_called_ae,
            calling_ae_allow: args.calling_ae_allow.clone(),
            policy,
            max_pdu: args.max_pdu,
        },
        timeouts: Timeouts { request: args.association_timeout, idle: args.idle_timeout, io: args.io_timeout },
        store: store.clone(),
        batcher: batcher.clone(),
    });
    let listener = Listener::new(listener, services, args.max_associations, args.peer_allow.clone());
    info!(
        listen = %listener.local_addr()?,
        ae_title = %args.ae_title,
        store = %store.describe(),
        jobs = %jobs.describe(),
        sop_classes = if args.sop_class_allow.is_empty() { "all storage + verification".to_string() } else { args.sop_class_allow.len().to_string() },
        max_associations = args.max_associations,
        "dicom-gateway listening"
    );
    listener.run(shutdown, args.shutdown_deadline).await;

    // Every association has ended: close the open batch and record what is left.
    timer_stop.cancel();
    let _ = timer.await;
    batcher.close_all(std::time::Duration::from_secs(5)).await;
    drop(batcher);
    let _ = recorder.await;
    info!("dicom-gateway stopped");
    Ok(())
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

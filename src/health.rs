//! Health and metrics over HTTP (`--metrics-listen`): `/healthz`, `/readyz` and `/metrics`.
//!
//! `/healthz` answers as long as the process serves requests. `/readyz` answers 200 only if the
//! DICOM listener is up (this server starts after it) and the configured object store, job store and
//! import trigger actually answer a cheap call, not merely if a port is open. In edge mode the
//! object store is the spool, which answers while it accepts instances, whether S3 does or not
//! (its uploader reports S3 itself). The result is cached
//! for a few seconds so a busy scraper cannot load AWS. Once shutdown begins, `/readyz` answers 503
//! so load balancers stop sending new associations. `/metrics` is the Prometheus text exposition
//! of [`crate::metrics`].
//!
//! The same checks run once at start-up ([`Readiness::startup_check`]), whether or not the HTTP
//! endpoints are on: a bucket, table or state machine that does not answer is one ERROR line
//! naming it and why, while the gateway starts anyway (the listener stays up, and `/readyz` answers
//! 503 until the dependency answers).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::import::ImportTrigger;
use crate::jobs::JobStore;
use crate::store::ObjectStore;

/// How long a readiness result is reused.
pub(crate) const READINESS_CACHE: Duration = Duration::from_secs(3);
/// Longest each dependency check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Answers `/readyz`: whether the store, job store and trigger answer, cached briefly.
pub(crate) struct Readiness {
    store: Arc<dyn ObjectStore>,
    jobs: Arc<dyn JobStore>,
    trigger: Option<Arc<dyn ImportTrigger>>,
    shutting_down: AtomicBool,
    cache: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        jobs: Arc<dyn JobStore>,
        trigger: Option<Arc<dyn ImportTrigger>>,
    ) -> Arc<Self> {
        Arc::new(Readiness {
            store,
            jobs,
            trigger,
            shutting_down: AtomicBool::new(false),
            cache: Mutex::new(None),
        })
    }

    pub(crate) fn shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Ok when every dependency answers; otherwise what failed, one clause per dependency.
    pub(crate) async fn check(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err("shutting down".into());
        }
        let mut cache = self.cache.lock().await;
        if let Some((at, result)) = cache.as_ref()
            && at.elapsed() < READINESS_CACHE
        {
            return result.clone();
        }
        let result = self.probe().await;
        *cache = Some((Instant::now(), result.clone()));
        result
    }

    async fn probe(&self) -> Result<(), String> {
        let problems: Vec<String> = self
            .probe_each()
            .await
            .into_iter()
            .filter_map(|d| d.problem.map(|p| format!("{}: {p}", d.role)))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Checks every dependency at once, each within [`CHECK_TIMEOUT`].
    async fn probe_each(&self) -> [Dependency; 3] {
        let timed = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {CHECK_TIMEOUT:?}")),
        };
        let store = tokio::time::timeout(CHECK_TIMEOUT, async {
            self.store.check().await.map_err(|e| e.to_string())
        });
        let jobs = tokio::time::timeout(CHECK_TIMEOUT, async {
            self.jobs.check().await.map_err(|e| e.to_string())
        });
        let trigger = tokio::time::timeout(CHECK_TIMEOUT, async {
            match &self.trigger {
                Some(t) => t.check().await.map_err(|e| e.to_string()),
                None => Ok(()),
            }
        });
        let (store, jobs, trigger) = tokio::join!(store, jobs, trigger);
        [
            Dependency {
                role: "object store",
                name: self.store.describe(),
                problem: timed(store),
            },
            Dependency {
                role: "job store",
                name: self.jobs.describe(),
                problem: timed(jobs),
            },
            Dependency {
                role: "import trigger",
                name: self
                    .trigger
                    .as_ref()
                    .map(|t| t.describe())
                    .unwrap_or_default(),
                problem: timed(trigger),
            },
        ]
    }

    /// Checks the dependencies once at start-up: one ERROR line for each that does not answer,
    /// saying which and why. Never fails: the gateway keeps running (and `/readyz` says 503) until
    /// the dependency answers. Returns whether all answered.
    pub(crate) async fn startup_check(&self) -> bool {
        let mut all = true;
        for d in self.probe_each().await {
            if let Some(problem) = d.problem {
                all = false;
                error!(dependency = d.role, error = %problem, "{} does not answer at start-up; receiving continues, /readyz answers 503 until it does", d.name);
            }
        }
        if all {
            info!("start-up check: every dependency answers");
        }
        all
    }
}

/// One dependency's readiness: what it is, and what is wrong with it, if anything.
struct Dependency {
    /// Its role ("object store", "job store", "import trigger").
    role: &'static str,
    /// Which one (e.g. "S3 bucket b prefix 'import/'").
    name: String,
    problem: Option<String>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> (StatusCode, String) {
    match readiness.check().await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::metrics().encode(),
    )
}

/// Serves the three endpoints on `listener` until `stop` is cancelled. With `proxy_protocol`, each
/// connection starts with a PROXY protocol v2 header, which is read and dropped first: a Network Load
/// Balancer whose target group has proxy protocol v2 enabled sends it on health-check connections too
/// ("Edit target group attributes for your Network Load Balancer",
/// https://docs.aws.amazon.com/elasticloadbalancing/latest/network/edit-target-group-attributes.html).
pub(crate) async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
    proxy_protocol: bool,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness);
    if proxy_protocol {
        let listener = ProxiedListener::spawn(listener, stop.clone());
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    } else {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    }
}

/// How long a connection to the health port may take to send its PROXY header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections whose header is being read at once; more wait in the kernel's backlog.
const PROXY_HEADERS_IN_FLIGHT: usize = 64;

/// The health port behind a load balancer that sends PROXY protocol v2 headers: connections are
/// handed to HTTP only once their header is read, each read in its own task so that a slow or
/// silent connection cannot hold up the load balancer's health checks.
struct ProxiedListener {
    ready: tokio::sync::mpsc::Receiver<(tokio::net::TcpStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

impl ProxiedListener {
    fn spawn(listener: TcpListener, stop: CancellationToken) -> ProxiedListener {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = tokio::sync::mpsc::channel(PROXY_HEADERS_IN_FLIGHT);
        let slots = Arc::new(tokio::sync::Semaphore::new(PROXY_HEADERS_IN_FLIGHT));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let (mut socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "health port: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let header = tokio::time::timeout(
                        PROXY_HEADER_TIMEOUT,
                        crate::proxy_protocol::read_header(&mut socket),
                    )
                    .await;
                    match header {
                        Ok(Ok(_)) => {
                            let _ = tx.send((socket, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "health port: connection without a usable PROXY header closed")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "health port: no PROXY header in time; closed")
                        }
                    }
                });
            }
        });
        ProxiedListener { ready, local }
    }
}

impl axum::serve::Listener for ProxiedListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task ended: shutdown is under way, and axum stops on its own signal.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

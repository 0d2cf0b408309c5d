//! Health and metrics over HTTP (`--metrics-listen`): `/healthz`, `/readyz` and `/metrics`.
//!
//! `/healthz` answers as long as the process serves requests. `/readyz` answers 200 only if the
//! DICOM listener is up (this server starts after it) and the configured object store, job store and
//! import trigger actually answer a cheap call, not merely if a port is open. The result is cached
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

/// Serves the three endpoints on `listener` until `stop` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

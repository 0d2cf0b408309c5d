//! The accept loop: one task per association, a limit on how many run at once, and graceful shutdown.
//!
//! Shaped after mini-redis: a semaphore bounds concurrent associations, and shutdown is signalled
//! rather than forced. Two [`CancellationToken`]s replace mini-redis's broadcast channel because we
//! need two stages: *graceful* stops accepting and lets associations finish; *hard* (after the
//! deadline) makes every association send A-ABORT and discard its instance in flight.
//!
//! A TLS port (DICOM over TLS) is served beside the plain one, under the same limit; its handshake
//! runs in the association's own task, bounded by the association request timeout.
//!
//! A peer over the limit is not left hanging: it gets A-ASSOCIATE-RJ (rejected-transient,
//! service-provider presentation, local-limit-exceeded), so a modality retries later instead of
//! timing out. A peer outside the address allow-list gets A-ASSOCIATE-RJ (rejected-permanent,
//! no reason given) before its request is even looked at. Those early rejections are themselves
//! bounded so a flood cannot grow tasks without limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource,
};
use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, field, info, info_span, warn};

use crate::association::{Handler, Services, reject_early};
use crate::metrics::metrics;
use crate::tls::TlsSwitch;
use tokio_rustls::TlsAcceptor;

/// How many early rejections may be in progress at once; beyond that, connections are closed.
const MAX_REJECTIONS_IN_FLIGHT: usize = 16;
/// How long an early rejection waits for the peer's request.
const REJECTION_WAIT: Duration = Duration::from_secs(5);

/// Accepts connections on the plain and TLS ports and runs one association task for each.
pub(crate) struct Listener {
    /// The plain DICOM port (absent with --tls-only).
    plain: Option<TcpListener>,
    /// The DICOM TLS port and its (reloadable) TLS configuration.
    tls: Option<(TcpListener, Arc<TlsSwitch>)>,
    services: Arc<Services>,
    limit: Arc<Semaphore>,
    rejections: Arc<Semaphore>,
    peer_allow: Vec<IpNet>,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
    next_id: AtomicU64,
}

/// Accepts on `listener`, or waits forever if there is none.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

impl Listener {
    /// One association limit and one shutdown cover both ports.
    pub(crate) fn new(
        plain: Option<TcpListener>,
        tls: Option<(TcpListener, Arc<TlsSwitch>)>,
        services: Arc<Services>,
        max_associations: usize,
        peer_allow: Vec<IpNet>,
    ) -> Self {
        Listener {
            plain,
            tls,
            services,
            limit: Arc::new(Semaphore::new(max_associations)),
            rejections: Arc::new(Semaphore::new(MAX_REJECTIONS_IN_FLIGHT)),
            peer_allow,
            tracker: TaskTracker::new(),
            hard_stop: CancellationToken::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Addresses actually bound: (plain, TLS).
    pub(crate) fn local_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (
            self.plain.as_ref().and_then(|l| l.local_addr().ok()),
            self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok()),
        )
    }

    /// Accepts associations until `graceful` is cancelled, then waits up to `deadline` for running
    /// associations to finish before aborting the rest.
    pub(crate) async fn run(self, graceful: CancellationToken, deadline: Duration) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let (accepted, tls) = tokio::select! {
                _ = graceful.cancelled() => break,
                r = accept(self.plain.as_ref()) => (r, None),
                r = accept(self.tls.as_ref().map(|(l, _)| l)) => (r, self.tls.as_ref().map(|(_, t)| t.acceptor())),
            };
            match accepted {
                Ok((socket, peer)) => {
                    backoff = Duration::from_millis(10);
                    self.dispatch(socket, peer, tls);
                }
                Err(e) => {
                    // Usually EMFILE/ENFILE: wait for connections to close instead of spinning.
                    error!(error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        drop(self.plain);
        drop(self.tls);
        self.tracker.close();
        let active = self.tracker.len();
        if active > 0 {
            info!(active, deadline = ?deadline, "no longer accepting; waiting for associations to finish");
        }
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                active = self.tracker.len(),
                "shutdown deadline passed; aborting remaining associations"
            );
            self.hard_stop.cancel();
            self.tracker.wait().await;
        }
    }

    fn dispatch(&self, socket: TcpStream, peer: SocketAddr, tls: Option<TlsAcceptor>) {
        // Nagle's algorithm would hold back every small C-STORE-RSP for ~40 ms.
        let _ = socket.set_nodelay(true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !self.peer_allow.is_empty()
            && !self.peer_allow.iter().any(|net| net.contains(&peer.ip()))
        {
            warn!(association = id, peer = %peer, reason = "peer address not in --peer-allow", "association rejected");
            metrics().reject("peer address not allowed");
            let rj = AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::NoReasonGiven,
                ),
            };
            self.reject(socket, tls, rj);
            return;
        }
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            warn!(association = id, peer = %peer, reason = "association limit reached (--max-associations)", "association rejected");
            metrics().reject("association limit reached");
            let rj = AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            };
            self.reject(socket, tls, rj);
            return;
        };
        let span = info_span!("association", id, peer = %peer, tls = tls.is_some(), calling_ae = field::Empty, called_ae = field::Empty);
        let (services, hard_stop) = (self.services.clone(), self.hard_stop.clone());
        self.tracker.spawn(
            async move {
                match tls {
                    None => Handler::new(socket, peer, services, hard_stop).run().await,
                    Some(acceptor) => {
                        // The handshake counts against the association request timeout.
                        match tokio::time::timeout(services.timeouts.request, acceptor.accept(socket)).await {
                            Ok(Ok(stream)) => {
                                let cn = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::tls::subject_cn(c));
                                Handler::new(stream, peer, services, hard_stop).with_peer_cn(cn).run().await
                            }
                            Ok(Err(e)) => {
                                warn!(reason = %e, "TLS handshake failed");
                                metrics().reject("tls handshake failed");
                            }
                            Err(_) => {
                                warn!("TLS handshake did not finish within the association request timeout");
                                metrics().reject("tls handshake failed");
                            }
                        }
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }

    fn reject(&self, socket: TcpStream, tls: Option<TlsAcceptor>, rj: AssociationRJ) {
        if let Ok(permit) = self.rejections.clone().try_acquire_owned() {
            tokio::spawn(async move {
                match tls {
                    None => reject_early(socket, rj, REJECTION_WAIT).await,
                    Some(acceptor) => {
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(REJECTION_WAIT, acceptor.accept(socket)).await
                        {
                            reject_early(stream, rj, REJECTION_WAIT).await;
                        }
                    }
                }
                drop(permit);
            });
        }
        // else: dropping the socket closes it; the peer sees a closed connection.
    }
}

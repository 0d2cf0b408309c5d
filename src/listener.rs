//! The accept loop: pending connections, a limit on how many associations run at once, and graceful
//! shutdown.
//!
//! Shaped after mini-redis: a semaphore bounds concurrent associations, and shutdown is signalled
//! rather than forced. Two [`CancellationToken`]s replace mini-redis's broadcast channel because we
//! need two stages: *graceful* stops accepting and lets associations finish; *hard* (after the
//! deadline) makes every association send A-ABORT and discard its instance in flight.
//!
//! A new connection is first *pending*: everything before its A-ASSOCIATE-RQ (the PROXY protocol
//! header with `--proxy-protocol`, the TLS handshake on the TLS port, the request itself) must
//! arrive within the association request timeout, and pending connections have their own, larger
//! bound (`--max-pending-connections`). Only a complete A-ASSOCIATE-RQ takes an association slot, so
//! load balancer health checks, port scans and idle sockets never keep a sender out.
//!
//! A request over the association limit is not left hanging: it gets A-ASSOCIATE-RJ
//! (rejected-transient, service-provider presentation, local-limit-exceeded), so a modality retries
//! later instead of timing out. A peer outside the address allow-list gets A-ASSOCIATE-RJ
//! (rejected-permanent, no reason given) without its request being negotiated.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource,
};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug, error, field, info, info_span, warn};

use crate::association::{Handler, RequestError, Services};
use crate::metrics::metrics;
use crate::proxy_protocol::{self, ProxyHeader, ProxyHeaderError};
use crate::tls::TlsSwitch;

/// Who may connect, how many at once, and how their address is learnt: the listener's part of the
/// configuration.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    /// Most associations served at once.
    pub max_associations: usize,
    /// Most connections waiting for their A-ASSOCIATE-RQ at once.
    pub max_pending: usize,
    /// Peer networks allowed; empty allows any address.
    pub peer_allow: Vec<IpNet>,
    /// Every connection starts with a PROXY protocol v2 header naming the client.
    pub proxy_protocol: bool,
}

/// The DICOM ports and everything their connections share, until shutdown.
pub(crate) struct Listener {
    /// The plain DICOM port (absent with --tls-only).
    plain: Option<TcpListener>,
    /// The DICOM TLS port and its (reloadable) TLS configuration.
    tls: Option<(TcpListener, Arc<TlsSwitch>)>,
    front: Arc<Front>,
    pending: Arc<PendingConnections>,
    tracker: TaskTracker,
    next_id: AtomicU64,
}

/// What every connection's task shares: admission rules, the association limit, the services.
struct Front {
    services: Arc<Services>,
    limit: Arc<Semaphore>,
    peer_allow: Vec<IpNet>,
    proxy_protocol: bool,
    hard_stop: CancellationToken,
}

/// Accepts on `listener`, or waits forever if there is none.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

impl Listener {
    /// One association limit, one pending bound and one shutdown cover both ports.
    pub(crate) fn new(
        plain: Option<TcpListener>,
        tls: Option<(TcpListener, Arc<TlsSwitch>)>,
        services: Arc<Services>,
        admission: Admission,
    ) -> Self {
        Listener {
            plain,
            tls,
            front: Arc::new(Front {
                services,
                limit: Arc::new(Semaphore::new(admission.max_associations)),
                peer_allow: admission.peer_allow,
                proxy_protocol: admission.proxy_protocol,
                hard_stop: CancellationToken::new(),
            }),
            pending: Arc::new(PendingConnections::new(admission.max_pending)),
            tracker: TaskTracker::new(),
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
            self.front.hard_stop.cancel();
            self.tracker.wait().await;
        }
    }

    /// Starts the task of a new connection, pending until its A-ASSOCIATE-RQ arrives.
    fn dispatch(&self, socket: TcpStream, socket_peer: SocketAddr, tls: Option<TlsAcceptor>) {
        // Nagle's algorithm would hold back every small C-STORE-RSP for ~40 ms.
        let _ = socket.set_nodelay(true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = self.pending.admit(id);
        // Behind a load balancer the socket's peer is the balancer (`via`); `peer` is recorded once
        // the PROXY protocol header has named the client.
        let span = if self.front.proxy_protocol {
            info_span!("association", id, peer = field::Empty, via = %socket_peer, tls = tls.is_some(), calling_ae = field::Empty, called_ae = field::Empty)
        } else {
            info_span!("association", id, peer = %socket_peer, tls = tls.is_some(), calling_ae = field::Empty, called_ae = field::Empty)
        };
        let pending = Pending {
            slot,
            deadline: Instant::now() + self.front.services.timeouts.request,
            hard_stop: self.front.hard_stop.clone(),
        };
        self.tracker.spawn(
            self.front
                .clone()
                .connection(socket, socket_peer, tls, pending)
                .instrument(span),
        );
    }
}

impl Front {
    /// One connection: the PROXY protocol header and the TLS handshake where configured, then the
    /// association.
    async fn connection(
        self: Arc<Self>,
        mut socket: TcpStream,
        socket_peer: SocketAddr,
        tls: Option<TlsAcceptor>,
        pending: Pending,
    ) {
        debug!("connection accepted");
        let peer = if self.proxy_protocol {
            let header = match pending
                .wait(
                    "PROXY protocol header",
                    proxy_protocol::read_header(&mut socket),
                )
                .await
            {
                Ok(header) => header,
                Err(end) => return end.log(),
            };
            match header {
                Ok(ProxyHeader::Proxied { client }) => client,
                // The load balancer's own connection (a health check): the socket's peer is real.
                Ok(ProxyHeader::Local) => socket_peer,
                Err(ProxyHeaderError::Closed) => {
                    return debug!("connection closed before sending anything");
                }
                Err(e) => {
                    warn!(reason = %e, "connection refused: PROXY protocol header missing or malformed (--proxy-protocol)");
                    metrics().reject("proxy protocol header missing or malformed");
                    return;
                }
            }
        } else {
            socket_peer
        };
        if self.proxy_protocol {
            Span::current().record("peer", field::display(peer));
        }
        match tls {
            None => {
                let handler = Handler::new(socket, self.services.clone(), self.hard_stop.clone());
                self.associate(handler, peer, pending).await
            }
            Some(acceptor) => {
                // A TCP health check or port scan closes without a byte: not a failed handshake.
                let mut first = [0u8; 1];
                match pending.wait("TLS handshake", socket.peek(&mut first)).await {
                    Err(end) => return end.log(),
                    Ok(Ok(0)) => return debug!("connection closed before sending anything"),
                    Ok(Err(e)) => return debug!(error = %e, "connection error"),
                    Ok(Ok(_)) => {}
                }
                let stream = match pending.wait("TLS handshake", acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        warn!(reason = %e, "TLS handshake failed");
                        metrics().reject("tls handshake failed");
                        return;
                    }
                    Err(end) => return end.log(),
                };
                let cn = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| crate::tls::subject_cn(c));
                let handler = Handler::new(stream, self.services.clone(), self.hard_stop.clone())
                    .with_peer_cn(cn);
                self.associate(handler, peer, pending).await
            }
        }
    }

    /// Reads the A-ASSOCIATE-RQ; only then does the connection stop being pending and take an
    /// association slot (or get A-ASSOCIATE-RJ).
    async fn associate<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        mut handler: Handler<S>,
        peer: SocketAddr,
        pending: Pending,
    ) {
        let wait = pending.remaining();
        let rq = match pending
            .wait("A-ASSOCIATE-RQ", handler.read_request(wait))
            .await
        {
            Ok(Ok(rq)) => rq,
            Ok(Err(RequestError::Closed)) => {
                return debug!("connection closed before an A-ASSOCIATE-RQ");
            }
            Ok(Err(e)) => return warn!(reason = %e, "association request failed"),
            Err(end) => return end.log(),
        };
        drop(pending);
        if !self.peer_allow.is_empty() && !self.peer_allow.iter().any(|n| n.contains(&peer.ip())) {
            warn!(
                reason = "peer address not in --peer-allow",
                "association rejected"
            );
            metrics().reject("peer address not allowed");
            let rj = AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::NoReasonGiven,
                ),
            };
            return handler.reject(rj).await;
        }
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            warn!(
                reason = "association limit reached (--max-associations)",
                "association rejected"
            );
            metrics().reject("association limit reached");
            let rj = AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            };
            return handler.reject(rj).await;
        };
        handler.run(rq).await;
        drop(permit);
    }
}

/// The connections accepted whose A-ASSOCIATE-RQ has not arrived yet, oldest first, each with the
/// token that closes it.
///
/// Over the bound the *oldest* is closed, not the newcomer. A real sender writes its request right
/// after connecting (after a handshake of a few round trips on TLS), so it is pending for
/// milliseconds; the connections pending longest are the ones least likely ever to send a request
/// (idle sockets, scans, slow drip). Refusing newcomers instead would let whoever holds that many
/// idle sockets keep every sender out for as long as they keep reconnecting.
struct PendingConnections {
    max: usize,
    /// Keyed by connection id, which grows with every accept: the first entry is the oldest.
    open: Mutex<BTreeMap<u64, CancellationToken>>,
}

impl PendingConnections {
    fn new(max: usize) -> Self {
        PendingConnections {
            max,
            open: Mutex::new(BTreeMap::new()),
        }
    }

    /// Registers connection `id` as pending, closing the oldest pending connection if the bound is
    /// reached.
    fn admit(self: &Arc<Self>, id: u64) -> PendingSlot {
        let token = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while open.len() >= self.max {
            match open.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        open.insert(id, token.clone());
        PendingSlot {
            set: self.clone(),
            id,
            token,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A connection's place among the pending ones; leaving it (dropping) frees the place.
struct PendingSlot {
    set: Arc<PendingConnections>,
    id: u64,
    /// Cancelled when a newer connection needs the place.
    token: CancellationToken,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut open = self.set.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.id);
    }
}

/// Why a connection stopped being pending without its A-ASSOCIATE-RQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingEnd {
    /// Closed to make room for a newer connection (`--max-pending-connections`).
    Evicted,
    /// The association request timeout passed during this stage.
    TimedOut(&'static str),
    /// The shutdown deadline passed.
    ShuttingDown,
}

impl PendingEnd {
    /// One line for the connection's end; the socket is closed when the task returns.
    fn log(self) {
        match self {
            PendingEnd::Evicted => {
                warn!(
                    reason = "--max-pending-connections reached: the oldest pending connection is closed",
                    "connection closed before an A-ASSOCIATE-RQ"
                );
                metrics().reject("pending connection limit reached");
            }
            PendingEnd::TimedOut(stage) => {
                warn!(
                    reason = format_args!(
                        "no complete {stage} within the association request timeout (--association-timeout)"
                    ),
                    "association request failed"
                );
                if stage == "TLS handshake" {
                    metrics().reject("tls handshake failed");
                }
            }
            PendingEnd::ShuttingDown => debug!("pending connection closed: gateway shutting down"),
        }
    }
}

/// A connection until its A-ASSOCIATE-RQ has arrived: every step is bounded by one deadline, and
/// ends early when the connection is evicted or the gateway stops.
struct Pending {
    slot: PendingSlot,
    /// Connection time plus the association request timeout (the ARTIM timer of PS3.8 §9.1.5).
    deadline: Instant,
    hard_stop: CancellationToken,
}

impl Pending {
    /// Runs one step (`stage` names it in the log) of the pending connection.
    async fn wait<F: Future>(&self, stage: &'static str, step: F) -> Result<F::Output, PendingEnd> {
        tokio::select! {
            biased;
            _ = self.slot.token.cancelled() => Err(PendingEnd::Evicted),
            _ = self.hard_stop.cancelled() => Err(PendingEnd::ShuttingDown),
            r = tokio::time::timeout_at(self.deadline, step) => r.map_err(|_| PendingEnd::TimedOut(stage)),
        }
    }

    /// Time left until the deadline.
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_bound_the_oldest_pending_connection_is_closed_and_leaving_frees_a_place() {
        let set = Arc::new(PendingConnections::new(2));
        let first = set.admit(1);
        let second = set.admit(2);
        assert_eq!(set.len(), 2);
        let third = set.admit(3);
        assert!(first.token.is_cancelled(), "the oldest is closed");
        assert!(!second.token.is_cancelled() && !third.token.is_cancelled());
        assert_eq!(set.len(), 2);
        // The evicted connection's task ends later; its slot leaving must not remove another.
        drop(first);
        assert_eq!(set.len(), 2);
        // A connection that got its request in leaves, and the next one evicts no one.
        drop(second);
        let fourth = set.admit(4);
        assert!(!third.token.is_cancelled() && !fourth.token.is_cancelled());
        assert_eq!(set.len(), 2);
    }

    #[tokio::test]
    async fn a_pending_step_ends_at_the_deadline_at_eviction_and_at_the_hard_stop() {
        let set = Arc::new(PendingConnections::new(1));
        let hard_stop = CancellationToken::new();
        let pending = |id, wait| Pending {
            slot: set.admit(id),
            deadline: Instant::now() + wait,
            hard_stop: hard_stop.clone(),
        };
        let never = std::future::pending::<()>;
        let p = pending(1, Duration::from_millis(10));
        assert_eq!(
            p.wait("A-ASSOCIATE-RQ", never()).await,
            Err(PendingEnd::TimedOut("A-ASSOCIATE-RQ"))
        );
        let long = Duration::from_secs(60);
        let evicted = pending(2, long);
        let newer = pending(3, long);
        assert_eq!(evicted.wait("x", never()).await, Err(PendingEnd::Evicted));
        hard_stop.cancel();
        assert_eq!(
            newer.wait("x", never()).await,
            Err(PendingEnd::ShuttingDown)
        );
    }
}

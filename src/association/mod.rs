//! One association, from A-ASSOCIATE-RQ to release or abort.
//!
//! The [`Handler`] owns the connection. It negotiates, then runs the DIMSE loop: command fragments
//! are collected (they are small), data set fragments are handed to an [`InstanceReceiver`] as they
//! arrive, and each C-STORE is answered only once the receiver reports the outcome, which for
//! Success means the object is durable. A protocol violation gets an A-ABORT with the matching
//! reason; an A-ABORT, a dropped connection or the shutdown deadline discards the instance in flight.

mod negotiate;
#[cfg(test)]
mod tests;

pub use negotiate::{AcceptancePolicy, AcceptedContext, Negotiation, negotiate};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{AbortRQServiceProviderReason, AssociationRJ, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, BufStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, warn};

use crate::batch::Batcher;
use crate::dimse::{self, Command, command_field, status};
use crate::instance::{InstanceReceiver, Outcome};
use crate::pdu::{self, Incoming, PduError, Pdv};
use crate::store::ObjectStore;

/// Largest command set accepted (real ones are a few hundred bytes).
const MAX_COMMAND_SET: usize = 64 * 1024;

/// Timeouts of one association.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From connection to a complete A-ASSOCIATE-RQ (the ARTIM timer of PS3.8 §9.1.5).
    pub request: Duration,
    /// Longest wait for the next PDU once associated.
    pub idle: Duration,
    /// Longest a single write to the peer may take.
    pub io: Duration,
}

/// What every association shares.
pub struct Services {
    pub acceptance: AcceptancePolicy,
    pub timeouts: Timeouts,
    pub store: Arc<dyn ObjectStore>,
    pub batcher: Arc<Batcher>,
    pub duplicates: crate::config::DuplicatePolicy,
}

enum Dimse {
    Idle,
    Command {
        context_id: u8,
        buf: Vec<u8>,
    },
    Data {
        context_id: u8,
        command: Command,
        receiver: Option<Box<InstanceReceiver>>,
        discard: Option<Outcome>,
        span: Span,
    },
}

/// Why the DIMSE loop ended.
enum End {
    Released,
    AbortedByPeer,
    Closed,
    Aborted(&'static str),
}

pub struct Handler<S> {
    stream: BufStream<S>,
    peer: SocketAddr,
    services: Arc<Services>,
    /// Cancelled when the shutdown deadline passes: abort whatever is in flight.
    hard_stop: CancellationToken,
    /// Reused for PDU bodies (see [`pdu::read_pdu_into`]).
    scratch: bytes::BytesMut,
    /// Subject common name of the client's TLS certificate, on the TLS port with client certificates.
    peer_cn: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Handler<S> {
    pub fn new(
        stream: S,
        peer: SocketAddr,
        services: Arc<Services>,
        hard_stop: CancellationToken,
    ) -> Self {
        Handler {
            stream: BufStream::with_capacity(64 * 1024, 16 * 1024, stream),
            peer,
            services,
            hard_stop,
            scratch: bytes::BytesMut::new(),
            peer_cn: None,
        }
    }

    /// Records the client certificate's subject common name (TLS with client certificates).
    pub fn with_peer_cn(mut self, cn: Option<String>) -> Self {
        self.peer_cn = cn;
        self
    }

    /// Runs the association to its end. Errors are logged here, once, with the association's span.
    pub async fn run(mut self) {
        let rq = match self.read_request().await {
            Ok(rq) => rq,
            Err(reason) => {
                warn!(peer = %self.peer, reason = %reason, "association request failed");
                return;
            }
        };
        let span = Span::current();
        span.record("calling_ae", rq.calling_ae_title.trim());
        span.record("called_ae", rq.called_ae_title.trim());
        match negotiate(&rq, &self.services.acceptance, self.peer_cn.as_deref()) {
            Negotiation::Rejected { rj, reason } => {
                warn!(reason, result = ?rj.result, source = ?rj.source, "association rejected");
                crate::metrics::metrics().reject(reason);
                let _ = self.send(&Pdu::AssociationRJ(rj)).await;
            }
            Negotiation::Accepted {
                ac,
                contexts,
                peer_max_pdu,
                rejected,
            } => {
                if !rejected.is_empty() {
                    log_rejected_contexts(&rejected);
                }
                if let Err(e) = self.send(&Pdu::AssociationAC(ac)).await {
                    warn!(error = %e, "could not send A-ASSOCIATE-AC");
                    return;
                }
                info!(
                    accepted_contexts = contexts.len(),
                    rejected_contexts = rejected.len(),
                    "association accepted"
                );
                let calling_ae = rq.calling_ae_title.trim().to_string();
                let m = crate::metrics::metrics();
                m.associations.inc();
                m.associations_active.inc();
                let end = self.serve(&contexts, peer_max_pdu, &calling_ae).await;
                m.associations_active.dec();
                match end {
                    End::Released => info!("association released"),
                    End::AbortedByPeer => info!("association aborted by peer"),
                    End::Closed => info!("connection closed by peer without release"),
                    End::Aborted(why) => warn!(reason = why, "association aborted"),
                }
            }
        }
    }

    async fn read_request(&mut self) -> Result<dicom_ul::pdu::AssociationRQ, String> {
        let read = pdu::read_pdu(&mut self.stream, self.services.acceptance.max_pdu);
        match tokio::time::timeout(self.services.timeouts.request, read).await {
            Err(_) => Err("no A-ASSOCIATE-RQ within the association request timeout".into()),
            Ok(Ok(Some(Incoming::Other(Pdu::AssociationRQ(rq))))) => Ok(rq),
            Ok(Ok(None)) => Err("connection closed before an A-ASSOCIATE-RQ".into()),
            Ok(Ok(Some(_))) => {
                let _ = self
                    .send(&pdu::abort(AbortRQServiceProviderReason::UnexpectedPdu))
                    .await;
                Err("first PDU is not an A-ASSOCIATE-RQ".into())
            }
            Ok(Err(e)) => {
                let _ = self.send(&pdu::abort(e.abort_reason())).await;
                Err(e.to_string())
            }
        }
    }

    async fn send(&mut self, p: &Pdu) -> Result<(), PduError> {
        match tokio::time::timeout(
            self.services.timeouts.io,
            pdu::write_pdu(&mut self.stream, p),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(PduError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            ))),
        }
    }

    async fn respond(
        &mut self,
        context_id: u8,
        command: &Command,
        outcome: &Outcome,
        peer_max_pdu: u32,
    ) -> Result<(), PduError> {
        debug!(
            message_id = command.message_id,
            status = format_args!("{:#06X}", outcome.status),
            "response sent"
        );
        let rsp = dimse::response(command, outcome.status, outcome.comment.as_deref());
        match tokio::time::timeout(
            self.services.timeouts.io,
            pdu::write_message(&mut self.stream, context_id, true, &rsp, peer_max_pdu),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(PduError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            ))),
        }
    }

    /// The DIMSE loop.
    async fn serve(
        &mut self,
        contexts: &HashMap<u8, AcceptedContext>,
        peer_max_pdu: u32,
        calling_ae: &str,
    ) -> End {
        let mut state = Dimse::Idle;
        let end = loop {
            let next = tokio::select! {
                biased;
                _ = self.hard_stop.cancelled() => {
                    let _ = self.send(&pdu::abort(AbortRQServiceProviderReason::ReasonNotSpecified)).await;
                    break End::Aborted("gateway shutting down: deadline passed");
                }
                r = tokio::time::timeout(self.services.timeouts.idle, pdu::read_pdu_into(&mut self.stream, self.services.acceptance.max_pdu, &mut self.scratch)) => r,
            };
            let incoming = match next {
                Err(_) => {
                    let _ = self
                        .send(&pdu::abort(
                            AbortRQServiceProviderReason::ReasonNotSpecified,
                        ))
                        .await;
                    break End::Aborted("idle timeout");
                }
                Ok(Ok(Some(i))) => i,
                Ok(Ok(None)) => break End::Closed,
                Ok(Err(PduError::Io(e))) => {
                    debug!(error = %e, "connection error");
                    break End::Closed;
                }
                Ok(Err(PduError::Truncated)) => break End::Closed,
                Ok(Err(e)) => {
                    warn!(error = %e, "invalid PDU from peer");
                    let _ = self.send(&pdu::abort(e.abort_reason())).await;
                    break End::Aborted("invalid PDU");
                }
            };
            match incoming {
                Incoming::PData(pdvs) => {
                    for pdv in pdvs {
                        match self
                            .on_pdv(pdv, &mut state, contexts, peer_max_pdu, calling_ae)
                            .await
                        {
                            Ok(()) => {}
                            Err(Violation::Protocol(why)) => {
                                warn!(reason = why, "DIMSE protocol violation");
                                let _ = self
                                    .send(&pdu::abort(
                                        AbortRQServiceProviderReason::UnexpectedPduParameter,
                                    ))
                                    .await;
                                abandon(state).await;
                                return End::Aborted(why);
                            }
                            Err(Violation::Io(e)) => {
                                debug!(error = %e, "could not send response");
                                abandon(state).await;
                                return End::Closed;
                            }
                        }
                    }
                }
                Incoming::Other(Pdu::ReleaseRQ) => {
                    if !matches!(state, Dimse::Idle) {
                        warn!(
                            "release requested in the middle of a message; the incomplete instance is discarded"
                        );
                    }
                    let _ = self.send(&Pdu::ReleaseRP).await;
                    break End::Released;
                }
                Incoming::Other(Pdu::AbortRQ { .. }) => break End::AbortedByPeer,
                Incoming::Other(other) => {
                    warn!(pdu = %other.short_description(), "unexpected PDU during association");
                    let _ = self
                        .send(&pdu::abort(AbortRQServiceProviderReason::UnexpectedPdu))
                        .await;
                    break End::Aborted("unexpected PDU");
                }
            }
        };
        abandon(state).await;
        end
    }

    async fn on_pdv(
        &mut self,
        pdv: Pdv,
        state: &mut Dimse,
        contexts: &HashMap<u8, AcceptedContext>,
        peer_max_pdu: u32,
        calling_ae: &str,
    ) -> Result<(), Violation> {
        let Some(context) = contexts.get(&pdv.context_id) else {
            return Err(Violation::Protocol(
                "PDV on a presentation context that was not accepted",
            ));
        };
        if pdv.is_command {
            let buf = match state {
                Dimse::Idle => {
                    *state = Dimse::Command {
                        context_id: pdv.context_id,
                        buf: Vec::with_capacity(pdv.data.len()),
                    };
                    let Dimse::Command { buf, .. } = state else {
                        unreachable!()
                    };
                    buf
                }
                Dimse::Command { context_id, buf } if *context_id == pdv.context_id => buf,
                _ => {
                    return Err(Violation::Protocol(
                        "command fragment while another message is in progress",
                    ));
                }
            };
            if buf.len() + pdv.data.len() > MAX_COMMAND_SET {
                return Err(Violation::Protocol("command set larger than 64 KiB"));
            }
            buf.extend_from_slice(&pdv.data);
            if !pdv.is_last {
                return Ok(());
            }
            let Dimse::Command { buf, .. } = std::mem::replace(state, Dimse::Idle) else {
                unreachable!()
            };
            let command = Command::parse(&buf)
                .map_err(|_| Violation::Protocol("command set cannot be decoded"))?;
            return self
                .on_command(
                    pdv.context_id,
                    context,
                    command,
                    state,
                    peer_max_pdu,
                    calling_ae,
                )
                .await;
        }

        let Dimse::Data {
            context_id,
            receiver,
            span,
            ..
        } = state
        else {
            return Err(Violation::Protocol("data set fragment without a command"));
        };
        if *context_id != pdv.context_id {
            return Err(Violation::Protocol(
                "data set fragment on a different presentation context than its command",
            ));
        }
        if let Some(r) = receiver.as_mut() {
            r.feed(&pdv.data).instrument(span.clone()).await;
        }
        if !pdv.is_last {
            return Ok(());
        }
        let Dimse::Data {
            context_id,
            command,
            receiver,
            discard,
            span,
        } = std::mem::replace(state, Dimse::Idle)
        else {
            unreachable!()
        };
        let outcome = match (receiver, discard) {
            (Some(r), _) => r.finish().instrument(span).await,
            (None, Some(outcome)) => outcome,
            (None, None) => Outcome {
                status: status::SUCCESS,
                comment: None,
            },
        };
        self.respond(context_id, &command, &outcome, peer_max_pdu)
            .await
            .map_err(Violation::Io)
    }

    async fn on_command(
        &mut self,
        context_id: u8,
        context: &AcceptedContext,
        command: Command,
        state: &mut Dimse,
        peer_max_pdu: u32,
        calling_ae: &str,
    ) -> Result<(), Violation> {
        let unrecognized = Outcome {
            status: status::UNRECOGNIZED_OPERATION,
            comment: Some("only C-ECHO and C-STORE are supported".into()),
        };
        match command.command_field {
            command_field::C_STORE_RQ if command.has_dataset => {
                let span = tracing::info_span!(
                    "instance",
                    sop_instance_uid = command.affected_sop_instance_uid.as_deref().unwrap_or("?")
                );
                span.in_scope(|| {
                    debug!(
                        message_id = command.message_id,
                        sop_class = command.affected_sop_class_uid.as_deref().unwrap_or("?"),
                        transfer_syntax = %context.transfer_syntax,
                        context_id,
                        "C-STORE request"
                    )
                });
                let mut receiver = InstanceReceiver::new(
                    self.services.store.clone(),
                    self.services.batcher.clone(),
                    &command,
                    &context.transfer_syntax,
                    calling_ae,
                    self.services.duplicates,
                );
                if command.affected_sop_class_uid.as_deref()
                    != Some(context.abstract_syntax.as_str())
                {
                    receiver.fail_with(
                        status::DATASET_DOES_NOT_MATCH,
                        "Affected SOP Class UID differs from the presentation context",
                    );
                }
                *state = Dimse::Data {
                    context_id,
                    command,
                    receiver: Some(Box::new(receiver)),
                    discard: None,
                    span,
                };
                Ok(())
            }
            command_field::C_STORE_RQ => {
                let outcome = Outcome {
                    status: status::CANNOT_UNDERSTAND,
                    comment: Some("C-STORE-RQ without a data set".into()),
                };
                self.respond(context_id, &command, &outcome, peer_max_pdu)
                    .await
                    .map_err(Violation::Io)
            }
            command_field::C_ECHO_RQ if !command.has_dataset => {
                debug!("C-ECHO");
                let outcome = Outcome {
                    status: status::SUCCESS,
                    comment: None,
                };
                self.respond(context_id, &command, &outcome, peer_max_pdu)
                    .await
                    .map_err(Violation::Io)
            }
            command_field::C_CANCEL_RQ => Ok(()), // nothing is cancellable here: C-STORE has no pending responses
            _ if command.has_dataset => {
                *state = Dimse::Data {
                    context_id,
                    command,
                    receiver: None,
                    discard: Some(unrecognized),
                    span: Span::none(),
                };
                Ok(())
            }
            field => {
                info!(
                    command_field = format_args!("{field:#06X}"),
                    "unsupported DIMSE command"
                );
                self.respond(context_id, &command, &unrecognized, peer_max_pdu)
                    .await
                    .map_err(Violation::Io)
            }
        }
    }
}

enum Violation {
    Protocol(&'static str),
    Io(PduError),
}

/// One line for the rejected presentation contexts of an association (senders such as storescu
/// propose dozens speculatively), naming the first few SOP classes; every context at DEBUG.
fn log_rejected_contexts(rejected: &[(String, dicom_ul::pdu::PresentationContextResultReason)]) {
    use dicom_ul::pdu::PresentationContextResultReason as R;
    for (abstract_syntax, reason) in rejected {
        debug!(abstract_syntax = %abstract_syntax, name = crate::policy::uid_name(abstract_syntax).unwrap_or("unknown"), reason = %reason, "presentation context rejected");
    }
    let count = |r: R| rejected.iter().filter(|(_, x)| *x == r).count();
    let first: Vec<String> = rejected
        .iter()
        .take(5)
        .map(|(uid, _)| {
            format!(
                "{uid} ({})",
                crate::policy::uid_name(uid).unwrap_or("unknown")
            )
        })
        .collect();
    info!(
        abstract_syntax_not_supported = count(R::AbstractSyntaxNotSupported),
        transfer_syntaxes_not_supported = count(R::TransferSyntaxesNotSupported),
        first = %first.join(", "),
        "presentation contexts rejected"
    );
}

/// Discards the instance in flight, if any: its upload is aborted and it never counts in a batch.
async fn abandon(state: Dimse) {
    if let Dimse::Data {
        receiver: Some(r),
        span,
        ..
    } = state
    {
        r.abort().instrument(span).await;
    }
}

/// Reads an A-ASSOCIATE-RQ (briefly) and answers it with `rj`. Used for peers turned away before
/// negotiation: outside the address allow-list, or over the association limit.
pub async fn reject_early<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    rj: AssociationRJ,
    wait: Duration,
) {
    let mut stream = BufStream::new(stream);
    if let Ok(Ok(Some(Incoming::Other(Pdu::AssociationRQ(_))))) =
        tokio::time::timeout(wait, pdu::read_pdu(&mut stream, pdu::MAX_CONTROL_PDU)).await
    {
        let _ =
            tokio::time::timeout(wait, pdu::write_pdu(&mut stream, &Pdu::AssociationRJ(rj))).await;
    }
}

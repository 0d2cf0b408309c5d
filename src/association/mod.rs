//! One association, from A-ASSOCIATE-RQ to release or abort.
//!
//! The [`Handler`] owns the connection. It negotiates, then runs the DIMSE loop: command fragments
//! are collected (they are small), data set fragments are handed to an [`InstanceReceiver`] as they
//! arrive, and each C-STORE is answered only once the receiver reports the outcome, which for
//! Success means the object is durable. A protocol violation gets an A-ABORT with the matching
//! reason; an A-ABORT, a dropped connection or the shutdown deadline discards the instance in flight.
//!
//! On a Storage Commitment context, an N-ACTION-RQ's Action Information is collected, checked and
//! handed to [`Commitments`], then answered; the report comes back through the association's
//! [`LiveAssociation`] channel if it is still open, and goes out as an N-EVENT-REPORT-RQ between
//! messages, its N-EVENT-REPORT-RSP read like any other command.

mod negotiate;
#[cfg(test)]
mod tests;

pub(crate) use negotiate::{AcceptancePolicy, AcceptedContext, AeBinding, Negotiation, negotiate};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::uids::{
    STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
};
use dicom_ul::pdu::{AbortRQServiceProviderReason, AssociationRJ, AssociationRQ, Pdu};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, warn};

use crate::batch::{Batcher, DuplicatePolicy};
use crate::commitment::{self, Commitments, LiveAssociation, LiveReport};
use crate::connection::Connection;
use crate::dimse::{self, Command, Status, command_field};
use crate::index::IndexSender;
use crate::instance::{InstanceContext, InstanceError, InstanceReceiver};
use crate::pdu::{Incoming, PduError, Pdv};
use crate::store::ObjectStore;

/// Largest command set accepted (real ones are a few hundred bytes).
const MAX_COMMAND_SET: usize = 64 * 1024;

/// Timeouts of one association.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From connection to a complete A-ASSOCIATE-RQ (the ARTIM timer of PS3.8 §9.1.5).
    pub request: Duration,
    /// Longest wait for the next PDU once associated.
    pub idle: Duration,
    /// Longest a single write to the peer may take.
    pub io: Duration,
}

/// Why no A-ASSOCIATE-RQ was read from a new connection.
#[derive(Debug, Error)]
pub(crate) enum RequestError {
    /// Closed before the first byte of a PDU: a health check, a port scan, a probe. Not a fault.
    #[error("connection closed before an A-ASSOCIATE-RQ")]
    Closed,
    /// Another PDU came first (answered with A-ABORT).
    #[error("first PDU is not an A-ASSOCIATE-RQ")]
    NotARequest,
    #[error("no A-ASSOCIATE-RQ within the association request timeout (--association-timeout)")]
    TimedOut,
    /// A truncated, oversized or undecodable PDU (answered with A-ABORT where it can be).
    #[error(transparent)]
    Pdu(PduError),
}

/// What every association shares: the policy it is negotiated under and where instances go.
pub(crate) struct Services {
    pub acceptance: AcceptancePolicy,
    pub timeouts: Timeouts,
    pub store: Arc<dyn ObjectStore>,
    pub batcher: Arc<Batcher>,
    pub duplicates: DuplicatePolicy,
    /// Where records of stored instances go.
    pub index: IndexSender,
    /// Storage Commitment, when on (it needs the instance index).
    pub commitments: Option<Arc<Commitments>>,
}

/// The status a request is answered with, and for failures a short, patient-data-free Error
/// Comment (0000,0902) so the sender's log says why.
#[derive(Debug)]
struct Answer {
    status: Status,
    comment: Option<String>,
}

impl Answer {
    const SUCCESS: Answer = Answer {
        status: Status::SUCCESS,
        comment: None,
    };

    fn failure(status: Status, comment: &str) -> Answer {
        Answer {
            status,
            comment: Some(comment.to_string()),
        }
    }

    fn unrecognized() -> Answer {
        Answer::failure(
            Status::UNRECOGNIZED_OPERATION,
            "only C-ECHO, C-STORE and Storage Commitment are supported",
        )
    }
}

impl From<commitment::Refusal> for Answer {
    fn from(r: commitment::Refusal) -> Answer {
        Answer {
            status: r.status,
            comment: Some(r.reason),
        }
    }
}

impl From<Result<(), InstanceError>> for Answer {
    fn from(outcome: Result<(), InstanceError>) -> Answer {
        match outcome {
            Ok(()) => Answer::SUCCESS,
            Err(e) => Answer {
                status: e.status(),
                comment: Some(e.comment()),
            },
        }
    }
}

/// Where a data set being received goes.
enum DataSet {
    /// A C-STORE's data set, streamed to the store.
    Instance(Box<InstanceReceiver>),
    /// The Action Information of a Storage Commitment N-ACTION, collected whole (it is small).
    Action(Vec<u8>),
    /// The data set of a request we do not support: consumed, then answered with this.
    Refused(Answer),
    /// A data set nobody answers (one that came with a response): consumed.
    Ignored,
}

/// Where the DIMSE loop is in the current message (PS3.7 §9, PS3.8 §9.3.5).
enum Dimse {
    /// Between messages.
    Idle,
    /// Collecting the fragments of a command set (small, bounded by [`MAX_COMMAND_SET`]).
    Command { context_id: u8, buf: Vec<u8> },
    /// The command is complete; its data set is arriving.
    Data {
        context_id: u8,
        command: Command,
        data_set: DataSet,
        /// The instance's span (SOP Instance UID), for everything done with its fragments.
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

/// An association's Storage Commitment state: where its reports arrive, and the one it sent
/// whose N-EVENT-REPORT-RSP is awaited.
struct Live {
    association: LiveAssociation,
    /// The Storage Commitment context reports go on: the last one an N-ACTION came on.
    context_id: u8,
    transfer_syntax: String,
    /// Message ID of our next N-EVENT-REPORT-RQ.
    next_message_id: u16,
    awaiting: Option<Awaiting>,
    /// The worker is gone (shutdown): no more reports come.
    closed: bool,
}

/// A report sent, its response not yet read.
struct Awaiting {
    message_id: u16,
    delivered: oneshot::Sender<Status>,
}

impl Live {
    /// Whether a report may go out now: none is awaiting its response (or the worker stopped
    /// waiting for it).
    fn can_send(&mut self) -> bool {
        if self
            .awaiting
            .as_ref()
            .is_some_and(|a| a.delivered.is_closed())
        {
            self.awaiting = None;
        }
        !self.closed && self.awaiting.is_none()
    }
}

/// What woke an idle association that may receive reports.
enum Wake {
    Stop,
    Report(Option<LiveReport>),
    Peer(Result<(), PduError>),
}

/// Runs one association over its [`Connection`]: negotiation, then the DIMSE loop.
pub(crate) struct Handler<S> {
    connection: Connection<S>,
    services: Arc<Services>,
    /// Cancelled when the shutdown deadline passes: abort whatever is in flight.
    hard_stop: CancellationToken,
    /// Subject common name of the client's TLS certificate, on the TLS port with client certificates.
    peer_cn: Option<String>,
    /// Set when a Storage Commitment context was accepted.
    live: Option<Live>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Handler<S> {
    pub(crate) fn new(stream: S, services: Arc<Services>, hard_stop: CancellationToken) -> Self {
        let connection = Connection::new(stream, services.acceptance.max_pdu, services.timeouts.io);
        Handler {
            connection,
            services,
            hard_stop,
            peer_cn: None,
            live: None,
        }
    }

    /// Records the client certificate's subject common name (TLS with client certificates).
    pub(crate) fn with_peer_cn(mut self, cn: Option<String>) -> Self {
        self.peer_cn = cn;
        self
    }

    /// Reads the A-ASSOCIATE-RQ, waiting at most `wait` (the rest of the association request
    /// timeout), and records its AE titles in the association's span. The listener calls this
    /// before the association takes a slot, so a connection that never sends a request holds none;
    /// the caller logs the error.
    pub(crate) async fn read_request(
        &mut self,
        wait: Duration,
    ) -> Result<AssociationRQ, RequestError> {
        match self.connection.read_pdu(wait).await {
            Ok(Some(Incoming::Other(Pdu::AssociationRQ(rq)))) => {
                let span = Span::current();
                span.record("calling_ae", rq.calling_ae_title.trim());
                span.record("called_ae", rq.called_ae_title.trim());
                Ok(rq)
            }
            Ok(None) => Err(RequestError::Closed),
            Ok(Some(_)) => {
                self.connection
                    .abort(AbortRQServiceProviderReason::UnexpectedPdu)
                    .await;
                Err(RequestError::NotARequest)
            }
            Err(PduError::TimedOut(_)) => Err(RequestError::TimedOut),
            Err(e) => {
                self.connection.abort(e.abort_reason()).await;
                Err(RequestError::Pdu(e))
            }
        }
    }

    /// Answers the request with `rj`, before negotiation: the peer is outside the address
    /// allow-list, or every association slot is taken.
    pub(crate) async fn reject(mut self, rj: AssociationRJ) {
        let _ = self.connection.write_pdu(&Pdu::AssociationRJ(rj)).await;
    }

    /// Negotiates `rq` and runs the association to its end. Errors are logged here, once, with the
    /// association's span.
    pub(crate) async fn run(mut self, rq: AssociationRQ) {
        match negotiate(&rq, &self.services.acceptance, self.peer_cn.as_deref()) {
            Negotiation::Rejected { rj, reason } => {
                warn!(reason, result = ?rj.result, source = ?rj.source, "association rejected");
                crate::metrics::metrics().reject(reason);
                let _ = self.connection.write_pdu(&Pdu::AssociationRJ(rj)).await;
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
                if let Err(e) = self.connection.write_pdu(&Pdu::AssociationAC(ac)).await {
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
                self.connection.set_peer_max_pdu(peer_max_pdu);
                self.live = self.open_live(&contexts);
                let end = self.serve(&contexts, &calling_ae).await;
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

    /// Registers for live delivery of commitment reports if a Storage Commitment context was accepted.
    fn open_live(&self, contexts: &HashMap<u8, AcceptedContext>) -> Option<Live> {
        let commitments = self.services.commitments.as_ref()?;
        let (&context_id, context) = contexts
            .iter()
            .filter(|(_, c)| c.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL)
            .min_by_key(|(id, _)| **id)?;
        Some(Live {
            association: commitments.open_association(),
            context_id,
            transfer_syntax: context.transfer_syntax.clone(),
            next_message_id: 1,
            awaiting: None,
            closed: false,
        })
    }

    /// Waits until the peer sends something, a commitment report is ready to go, or the
    /// shutdown deadline passes. Only between messages, with no report awaiting its response.
    async fn wait_for_peer_or_report(&mut self) -> Wake {
        let idle = self.services.timeouts.idle;
        let Some(live) = self.live.as_mut() else {
            return Wake::Peer(Ok(()));
        };
        tokio::select! {
            biased;
            _ = self.hard_stop.cancelled() => Wake::Stop,
            r = live.association.reports.recv() => Wake::Report(r),
            r = self.connection.readable(idle) => Wake::Peer(r),
        }
    }

    /// Sends a commitment report as an N-EVENT-REPORT-RQ; its response is read by the DIMSE loop.
    async fn send_report(&mut self, live_report: LiveReport) -> Result<(), PduError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        let LiveReport { report, delivered } = live_report;
        let message_id = live.next_message_id;
        live.next_message_id = live.next_message_id.wrapping_add(1).max(1);
        let command = dimse::n_event_report_request(
            message_id,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
            report.event_type_id(),
        );
        let data = report.encode(commitment::dataset::Encoding::of(&live.transfer_syntax));
        let context_id = live.context_id;
        live.awaiting = Some(Awaiting {
            message_id,
            delivered,
        });
        info!(
            transaction_uid = %report.transaction_uid,
            message_id,
            event_type_id = report.event_type_id(),
            "storage commitment report sent on the requesting association"
        );
        self.connection
            .write_message(context_id, true, &command)
            .await?;
        self.connection
            .write_message(context_id, false, &data)
            .await
    }

    async fn respond(
        &mut self,
        context_id: u8,
        command: &Command,
        answer: &Answer,
    ) -> Result<(), PduError> {
        debug!(
            message_id = command.message_id,
            status = %answer.status,
            "response sent"
        );
        let rsp = dimse::response(command, answer.status, answer.comment.as_deref());
        self.connection.write_message(context_id, true, &rsp).await
    }

    /// The DIMSE loop.
    async fn serve(&mut self, contexts: &HashMap<u8, AcceptedContext>, calling_ae: &str) -> End {
        let mut state = Dimse::Idle;
        let end = loop {
            if matches!(state, Dimse::Idle) && self.live.as_mut().is_some_and(Live::can_send) {
                match self.wait_for_peer_or_report().await {
                    Wake::Stop => {
                        self.connection
                            .abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                            .await;
                        break End::Aborted("gateway shutting down: deadline passed");
                    }
                    Wake::Report(Some(report)) => {
                        if let Err(e) = self.send_report(report).await {
                            debug!(error = %e, "could not send a storage commitment report");
                            break End::Closed;
                        }
                        continue;
                    }
                    Wake::Report(None) => {
                        if let Some(live) = self.live.as_mut() {
                            live.closed = true;
                        }
                        continue;
                    }
                    Wake::Peer(Err(PduError::TimedOut(_))) => {
                        self.connection
                            .abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                            .await;
                        break End::Aborted("idle timeout");
                    }
                    Wake::Peer(Err(e)) => {
                        debug!(error = %e, "connection error");
                        break End::Closed;
                    }
                    Wake::Peer(Ok(())) => {}
                }
            }
            let next = tokio::select! {
                biased;
                _ = self.hard_stop.cancelled() => {
                    self.connection.abort(AbortRQServiceProviderReason::ReasonNotSpecified).await;
                    break End::Aborted("gateway shutting down: deadline passed");
                }
                r = self.connection.read_pdu(self.services.timeouts.idle) => r,
            };
            let incoming = match next {
                Ok(Some(i)) => i,
                Ok(None) => break End::Closed,
                Err(PduError::TimedOut(_)) => {
                    self.connection
                        .abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                        .await;
                    break End::Aborted("idle timeout");
                }
                Err(PduError::Io(e)) => {
                    debug!(error = %e, "connection error");
                    break End::Closed;
                }
                Err(PduError::Truncated) => break End::Closed,
                Err(e) => {
                    warn!(error = %e, "invalid PDU from peer");
                    self.connection.abort(e.abort_reason()).await;
                    break End::Aborted("invalid PDU");
                }
            };
            match incoming {
                Incoming::PData(pdvs) => {
                    for pdv in pdvs {
                        match self.on_pdv(pdv, &mut state, contexts, calling_ae).await {
                            Ok(()) => {}
                            Err(Violation::Protocol(why)) => {
                                warn!(reason = why, "DIMSE protocol violation");
                                self.connection
                                    .abort(AbortRQServiceProviderReason::UnexpectedPduParameter)
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
                    let _ = self.connection.write_pdu(&Pdu::ReleaseRP).await;
                    break End::Released;
                }
                Incoming::Other(Pdu::AbortRQ { .. }) => break End::AbortedByPeer,
                Incoming::Other(other) => {
                    warn!(pdu = %other.short_description(), "unexpected PDU during association");
                    self.connection
                        .abort(AbortRQServiceProviderReason::UnexpectedPdu)
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
                .on_command(pdv.context_id, context, command, state, calling_ae)
                .await;
        }

        let Dimse::Data {
            context_id,
            data_set,
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
        match data_set {
            DataSet::Instance(receiver) => {
                receiver.feed(&pdv.data).instrument(span.clone()).await;
            }
            DataSet::Action(buf) => {
                if buf.len() + pdv.data.len() > commitment::MAX_ACTION_INFORMATION {
                    // Refused once complete; the rest is consumed, not kept.
                    *data_set = DataSet::Refused(Answer::failure(
                        Status::RESOURCE_LIMITATION,
                        "Action Information too large",
                    ));
                } else {
                    buf.extend_from_slice(&pdv.data);
                }
            }
            DataSet::Refused(_) | DataSet::Ignored => {}
        }
        if !pdv.is_last {
            return Ok(());
        }
        let Dimse::Data {
            context_id,
            command,
            data_set,
            span,
        } = std::mem::replace(state, Dimse::Idle)
        else {
            unreachable!()
        };
        let answer = match data_set {
            DataSet::Instance(receiver) => receiver.finish().instrument(span).await.into(),
            DataSet::Action(bytes) => {
                let transfer_syntax = contexts
                    .get(&context_id)
                    .map(|c| c.transfer_syntax.as_str())
                    .unwrap_or_default();
                self.commitment_request(context_id, transfer_syntax, &bytes, calling_ae)
                    .await
            }
            DataSet::Refused(answer) => answer,
            DataSet::Ignored => return Ok(()),
        };
        self.respond(context_id, &command, &answer)
            .await
            .map_err(Violation::Io)
    }

    async fn on_command(
        &mut self,
        context_id: u8,
        context: &AcceptedContext,
        command: Command,
        state: &mut Dimse,
        calling_ae: &str,
    ) -> Result<(), Violation> {
        let data_set = match command.command_field {
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
                let receiver = span.in_scope(|| {
                    InstanceReceiver::new(
                        self.services.store.clone(),
                        self.services.batcher.clone(),
                        &command,
                        InstanceContext {
                            abstract_syntax: &context.abstract_syntax,
                            transfer_syntax: &context.transfer_syntax,
                            calling_ae_title: calling_ae,
                            duplicates: self.services.duplicates,
                            index: self.services.index.clone(),
                        },
                    )
                });
                (DataSet::Instance(Box::new(receiver)), span)
            }
            command_field::C_STORE_RQ => {
                let answer =
                    Answer::failure(Status::CANNOT_UNDERSTAND, "C-STORE-RQ without a data set");
                return self.answer(context_id, &command, &answer).await;
            }
            command_field::C_ECHO_RQ if !command.has_dataset => {
                debug!("C-ECHO");
                return self.answer(context_id, &command, &Answer::SUCCESS).await;
            }
            // Nothing is cancellable here: C-STORE has no pending responses.
            command_field::C_CANCEL_RQ => return Ok(()),
            command_field::N_ACTION_RQ
                if context.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL
                    && self.live.is_some() =>
            {
                let data_set = match commitment::check_action_command(&command) {
                    Ok(()) => DataSet::Action(Vec::new()),
                    Err(refusal) => {
                        warn!(status = %refusal.status, reason = %refusal.reason, "storage commitment request refused");
                        let answer = Answer::from(refusal);
                        if !command.has_dataset {
                            return self.answer(context_id, &command, &answer).await;
                        }
                        DataSet::Refused(answer)
                    }
                };
                (data_set, Span::none())
            }
            field if field & command_field::RESPONSE_BIT != 0 => {
                self.on_response(&command);
                if !command.has_dataset {
                    return Ok(());
                }
                (DataSet::Ignored, Span::none())
            }
            _ if command.has_dataset => (DataSet::Refused(Answer::unrecognized()), Span::none()),
            field => {
                info!(
                    command_field = format_args!("{field:#06X}"),
                    "unsupported DIMSE command"
                );
                return self
                    .answer(context_id, &command, &Answer::unrecognized())
                    .await;
            }
        };
        let (data_set, span) = data_set;
        *state = Dimse::Data {
            context_id,
            command,
            data_set,
            span,
        };
        Ok(())
    }

    /// Reads a complete N-ACTION's Action Information and hands the request over; the answer is
    /// its N-ACTION-RSP.
    async fn commitment_request(
        &mut self,
        context_id: u8,
        transfer_syntax: &str,
        bytes: &[u8],
        calling_ae: &str,
    ) -> Answer {
        let (Some(commitments), Some(live)) =
            (self.services.commitments.clone(), self.live.as_mut())
        else {
            return Answer::unrecognized();
        };
        let action = match commitment::read_action_information(bytes, transfer_syntax) {
            Ok(action) => action,
            Err(refusal) => {
                warn!(status = %refusal.status, reason = %refusal.reason, "storage commitment request refused");
                return refusal.into();
            }
        };
        // Reports for this request go back on the context it came on.
        live.context_id = context_id;
        live.transfer_syntax = transfer_syntax.to_string();
        let transaction_uid = action.transaction_uid.clone();
        match commitments
            .submit(action, calling_ae, live.association.id)
            .await
        {
            Ok(()) => Answer::SUCCESS,
            Err(e) => {
                warn!(transaction_uid = %transaction_uid, status = %e.status(), reason = %e, "storage commitment request refused");
                Answer::failure(e.status(), e.comment())
            }
        }
    }

    /// A response from the peer: the N-EVENT-REPORT-RSP of the report we sent, or nothing we
    /// asked for (ignored).
    fn on_response(&mut self, command: &Command) {
        let is_report_response =
            command.command_field == command_field::N_EVENT_REPORT_RQ | command_field::RESPONSE_BIT;
        let awaited = self
            .live
            .as_mut()
            .filter(|_| is_report_response)
            .and_then(|live| {
                live.awaiting
                    .take_if(|a| a.message_id == command.message_id)
            });
        match awaited {
            Some(a) => {
                let status = command.status.unwrap_or(Status::PROCESSING_FAILURE);
                debug!(message_id = command.message_id, status = %status, "N-EVENT-REPORT-RSP");
                let _ = a.delivered.send(status);
            }
            None => info!(
                command_field = format_args!("{:#06X}", command.command_field),
                message_id = command.message_id,
                "unexpected response from the peer ignored"
            ),
        }
    }

    /// Answers a request that has no data set (or whose data set was refused).
    async fn answer(
        &mut self,
        context_id: u8,
        command: &Command,
        answer: &Answer,
    ) -> Result<(), Violation> {
        self.respond(context_id, command, answer)
            .await
            .map_err(Violation::Io)
    }
}

/// Why a PDV ended the association.
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
        data_set: DataSet::Instance(receiver),
        span,
        ..
    } = state
    {
        receiver.abort().instrument(span).await;
    }
}

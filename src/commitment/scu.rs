//! Delivering a report on a new association, when the one that carried the request is gone
//! (PS3.4 J.3.3: the SCP then initiates an association to the SCU).
//!
//! The gateway calls the requesting AE at its `--commitment-peer` address, as association
//! requestor, proposing the Storage Commitment Push Model with SCP/SCU Role Selection asking for
//! the SCP role only (PS3.7 D.3.3.4): the acceptor stays the SCU of the service although it did
//! not open the association. It then sends the N-EVENT-REPORT-RQ, reads the N-EVENT-REPORT-RSP and
//! releases.

use std::time::Duration;

use dicom_dictionary_std::uids::{
    DICOM_APPLICATION_CONTEXT, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
    STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AssociationRQ, Pdu, PresentationContextProposed,
    PresentationContextResultReason, RequestorRoles, UserVariableItem,
};
use thiserror::Error;
use tokio::net::TcpStream;

use super::Report;
use super::dataset::Encoding;
use crate::connection::Connection;
use crate::dimse::{self, Command, Status, command_field};
use crate::part10::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::pdu::{Incoming, PduError};

/// The one presentation context proposed.
const CONTEXT_ID: u8 = 1;
/// Our Maximum Length Received: only command sets and a small response come back.
const MAX_PDU: u32 = 64 * 1024;

/// Why a report could not be delivered on a new association (it is tried again later).
#[derive(Debug, Error)]
pub(crate) enum DeliveryError {
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        peer: String,
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("association rejected: {0}")]
    Rejected(String),
    #[error(
        "the peer accepted no Storage Commitment context in implicit or explicit VR little endian"
    )]
    ContextRejected,
    #[error("the peer refused the SCP role for Storage Commitment")]
    RoleRefused,
    #[error("association aborted by the peer")]
    Aborted,
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<PduError> for DeliveryError {
    fn from(e: PduError) -> Self {
        DeliveryError::Protocol(e.to_string())
    }
}

/// Where and as whom to deliver.
pub(crate) struct Peer<'a> {
    /// host:port from `--commitment-peer`.
    pub address: &'a str,
    /// The requesting AE, called.
    pub ae_title: &'a str,
    /// Our AE title, calling.
    pub our_ae_title: &'a str,
}

/// Sends `report` to `peer` on a new association, within `timeout` for the whole exchange.
/// Returns the status of the N-EVENT-REPORT-RSP.
pub(crate) async fn deliver(
    peer: &Peer<'_>,
    report: &Report,
    timeout: Duration,
) -> Result<Status, DeliveryError> {
    match tokio::time::timeout(timeout, run(peer, report, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(DeliveryError::Timeout(timeout)),
    }
}

async fn read(
    connection: &mut Connection<TcpStream>,
    wait: Duration,
) -> Result<Incoming, DeliveryError> {
    match connection.read_pdu(wait).await? {
        Some(Incoming::Other(Pdu::AbortRQ { .. })) => Err(DeliveryError::Aborted),
        Some(i) => Ok(i),
        None => Err(DeliveryError::Protocol(
            "connection closed by the peer".into(),
        )),
    }
}

/// The A-ASSOCIATE-RQ: one Storage Commitment context, and the role selection asking for SCP.
pub(crate) fn association_request(peer: &Peer<'_>) -> AssociationRQ {
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: peer.our_ae_title.to_string(),
        called_ae_title: peer.ae_title.to_string(),
        application_context_name: DICOM_APPLICATION_CONTEXT.to_string(),
        presentation_contexts: vec![PresentationContextProposed {
            id: CONTEXT_ID,
            abstract_syntax: STORAGE_COMMITMENT_PUSH_MODEL.to_string(),
            transfer_syntaxes: vec![
                EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
                IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
            ],
        }],
        user_variables: vec![
            UserVariableItem::MaxLength(MAX_PDU),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
            UserVariableItem::ScuScpRoleSelectionSubItem(
                STORAGE_COMMITMENT_PUSH_MODEL.to_string(),
                RequestorRoles {
                    scu: false,
                    scp: true,
                },
            ),
        ],
    }
}

async fn run(peer: &Peer<'_>, report: &Report, wait: Duration) -> Result<Status, DeliveryError> {
    let socket =
        TcpStream::connect(peer.address)
            .await
            .map_err(|source| DeliveryError::Connect {
                peer: peer.address.to_string(),
                source,
            })?;
    let _ = socket.set_nodelay(true);
    let mut connection = Connection::new(socket, MAX_PDU, wait);
    connection
        .write_pdu(&Pdu::AssociationRQ(association_request(peer)))
        .await?;
    let (transfer_syntax, peer_max) = match read(&mut connection, wait).await? {
        Incoming::Other(Pdu::AssociationAC(ac)) => {
            let Some(pc) = ac.presentation_contexts.iter().find(|pc| {
                pc.id == CONTEXT_ID && pc.reason == PresentationContextResultReason::Acceptance
            }) else {
                connection
                    .abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                    .await;
                return Err(DeliveryError::ContextRejected);
            };
            let ts = crate::uid::trim_uid(&pc.transfer_syntax).to_string();
            if ts != EXPLICIT_VR_LITTLE_ENDIAN && ts != IMPLICIT_VR_LITTLE_ENDIAN {
                connection
                    .abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                    .await;
                return Err(DeliveryError::ContextRejected);
            }
            // An acceptor that answers the role selection must grant the SCP role; one that
            // leaves it out is taken at its word that the context is usable (not every
            // implementation answers role selection items).
            let refused = ac.user_variables.iter().any(|v| {
                matches!(v, UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles)
                    if crate::uid::trim_uid(uid) == STORAGE_COMMITMENT_PUSH_MODEL && !roles.scp)
            });
            if refused {
                connection
                    .abort(AbortRQServiceProviderReason::ReasonNotSpecified)
                    .await;
                return Err(DeliveryError::RoleRefused);
            }
            let peer_max = ac
                .user_variables
                .iter()
                .find_map(|v| match v {
                    UserVariableItem::MaxLength(n) => Some(*n),
                    _ => None,
                })
                .unwrap_or(0);
            (ts, peer_max)
        }
        Incoming::Other(Pdu::AssociationRJ(rj)) => {
            return Err(DeliveryError::Rejected(format!(
                "{:?}, {}",
                rj.result, rj.source
            )));
        }
        other => {
            return Err(DeliveryError::Protocol(format!(
                "unexpected answer to A-ASSOCIATE-RQ: {other:?}"
            )));
        }
    };
    connection.set_peer_max_pdu(peer_max);
    let command = dimse::n_event_report_request(
        1,
        STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
        report.event_type_id(),
    );
    connection.write_message(CONTEXT_ID, true, &command).await?;
    connection
        .write_message(
            CONTEXT_ID,
            false,
            &report.encode(Encoding::of(&transfer_syntax)),
        )
        .await?;
    let status = read_response(&mut connection, wait).await?;
    let _ = connection.write_pdu(&Pdu::ReleaseRQ).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), read(&mut connection, wait)).await;
    Ok(status)
}

/// Reads the N-EVENT-REPORT-RSP (skipping nothing else: the peer has nothing else to send).
async fn read_response(
    connection: &mut Connection<TcpStream>,
    wait: Duration,
) -> Result<Status, DeliveryError> {
    let mut command = Vec::new();
    loop {
        match read(connection, wait).await? {
            Incoming::PData(pdvs) => {
                for pdv in pdvs {
                    if !pdv.is_command {
                        return Err(DeliveryError::Protocol(
                            "a data set where the N-EVENT-REPORT-RSP was expected".into(),
                        ));
                    }
                    command.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        let rsp = Command::parse(&command)
                            .map_err(|e| DeliveryError::Protocol(e.to_string()))?;
                        if rsp.command_field
                            != command_field::N_EVENT_REPORT_RQ | command_field::RESPONSE_BIT
                        {
                            return Err(DeliveryError::Protocol(format!(
                                "command {:#06X} where the N-EVENT-REPORT-RSP was expected",
                                rsp.command_field
                            )));
                        }
                        return rsp.status.ok_or_else(|| {
                            DeliveryError::Protocol("N-EVENT-REPORT-RSP without a status".into())
                        });
                    }
                }
            }
            other => {
                return Err(DeliveryError::Protocol(format!(
                    "unexpected PDU instead of N-EVENT-REPORT-RSP: {other:?}"
                )));
            }
        }
    }
}

/// The N-EVENT-REPORT-RSP an SCU sends (for the in-process tests' peers).
#[cfg(test)]
pub(crate) fn response(message_id: u16, status: Status) -> Vec<u8> {
    let request = Command::parse(&dimse::n_event_report_request(
        message_id,
        STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
        1,
    ))
    .expect("a command set we built");
    dimse::response(&request, status, None)
}

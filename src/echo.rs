//! `dicom-gateway echo`: a C-ECHO client, for container health checks and for administrators
//! checking that a gateway (or any Store SCP) answers.
//!
//! It does what echoscu does, with errors that say which step failed: connecting, association
//! (with the rejection reason), or the echo itself (with the status).

use std::time::{Duration, Instant};

use dicom_dictionary_std::uids::{
    DICOM_APPLICATION_CONTEXT, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION,
};
use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResultReason,
    UserVariableItem,
};
use thiserror::Error;
use tokio::net::TcpStream;

use crate::connection::Connection;
use crate::dimse::{self, Status, command_field};
use crate::part10::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::pdu::{self, Incoming, PduError};

/// The echo runs under one overall timeout ([`echo`]); single reads and writes need none of their own.
const NO_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Which step of a C-ECHO failed, for a message that tells the administrator where to look.
#[derive(Debug, Error)]
pub(crate) enum EchoError {
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        peer: String,
        source: std::io::Error,
    },
    #[error("no answer from {0} within the timeout")]
    Timeout(String),
    #[error("association rejected ({result:?}): {reason}")]
    Rejected {
        result: dicom_ul::pdu::AssociationRJResult,
        reason: String,
    },
    #[error("association aborted by the peer")]
    Aborted,
    #[error("the peer does not accept the Verification SOP class")]
    VerificationNotAccepted,
    #[error("C-ECHO answered with status {0} ({desc})", desc = .0.description())]
    Status(Status),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<PduError> for EchoError {
    fn from(e: PduError) -> Self {
        EchoError::Protocol(e.to_string())
    }
}

/// Result of a successful echo.
#[derive(Debug)]
pub(crate) struct EchoOk {
    pub round_trip: Duration,
}

/// Runs one C-ECHO against `peer` (host:port), calling `called_ae` as `calling_ae`.
pub(crate) async fn echo(
    peer: &str,
    calling_ae: &str,
    called_ae: &str,
    timeout: Duration,
) -> Result<EchoOk, EchoError> {
    match tokio::time::timeout(timeout, run(peer, calling_ae, called_ae)).await {
        Ok(r) => r,
        Err(_) => Err(EchoError::Timeout(peer.to_string())),
    }
}

async fn read(connection: &mut Connection<TcpStream>) -> Result<Incoming, EchoError> {
    match connection.read_pdu(NO_TIMEOUT).await? {
        Some(Incoming::Other(Pdu::AbortRQ { .. })) => Err(EchoError::Aborted),
        Some(i) => Ok(i),
        None => Err(EchoError::Protocol("connection closed by the peer".into())),
    }
}

async fn run(peer: &str, calling_ae: &str, called_ae: &str) -> Result<EchoOk, EchoError> {
    let started = Instant::now();
    let socket = TcpStream::connect(peer)
        .await
        .map_err(|source| EchoError::Connect {
            peer: peer.to_string(),
            source,
        })?;
    let _ = socket.set_nodelay(true);
    let mut connection = Connection::new(socket, pdu::MAX_CONTROL_PDU, NO_TIMEOUT);
    let rq = AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling_ae.to_string(),
        called_ae_title: called_ae.to_string(),
        application_context_name: DICOM_APPLICATION_CONTEXT.to_string(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: VERIFICATION.to_string(),
            transfer_syntaxes: vec![
                EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
                IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
            ],
        }],
        user_variables: vec![
            UserVariableItem::MaxLength(pdu::MAX_CONTROL_PDU),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
        ],
    };
    connection.write_pdu(&Pdu::AssociationRQ(rq)).await?;
    let peer_max = match read(&mut connection).await? {
        Incoming::Other(Pdu::AssociationAC(ac)) => {
            let accepted = ac
                .presentation_contexts
                .iter()
                .any(|pc| pc.id == 1 && pc.reason == PresentationContextResultReason::Acceptance);
            if !accepted {
                connection
                    .abort(dicom_ul::pdu::AbortRQServiceProviderReason::ReasonNotSpecified)
                    .await;
                return Err(EchoError::VerificationNotAccepted);
            }
            ac.user_variables
                .iter()
                .find_map(|v| {
                    if let UserVariableItem::MaxLength(n) = v {
                        Some(*n)
                    } else {
                        None
                    }
                })
                .unwrap_or(0)
        }
        Incoming::Other(Pdu::AssociationRJ(rj)) => {
            return Err(EchoError::Rejected {
                result: rj.result,
                reason: rj.source.to_string(),
            });
        }
        other => {
            return Err(EchoError::Protocol(format!(
                "unexpected answer to A-ASSOCIATE-RQ: {other:?}"
            )));
        }
    };
    let rq = dimse::request(command_field::C_ECHO_RQ, 1, VERIFICATION, None, false);
    connection.set_peer_max_pdu(peer_max);
    connection.write_message(1, true, &rq).await?;
    let mut command = Vec::new();
    loop {
        match read(&mut connection).await? {
            Incoming::PData(pdvs) => {
                let mut last = false;
                for pdv in pdvs {
                    command.extend_from_slice(&pdv.data);
                    last |= pdv.is_last && pdv.is_command;
                }
                if last {
                    break;
                }
            }
            other => {
                return Err(EchoError::Protocol(format!(
                    "unexpected PDU instead of C-ECHO-RSP: {other:?}"
                )));
            }
        }
    }
    let status =
        dimse::response_status(&command).map_err(|e| EchoError::Protocol(e.to_string()))?;
    let round_trip = started.elapsed();
    let _ = connection.write_pdu(&Pdu::ReleaseRQ).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), read(&mut connection)).await;
    if !status.is_success() {
        return Err(EchoError::Status(status));
    }
    Ok(EchoOk { round_trip })
}

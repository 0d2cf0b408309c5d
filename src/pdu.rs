//! DICOM Upper Layer PDU framing on an async byte stream (PS3.8 §9.3).
//!
//! Every PDU is read header first, its length checked against a limit *before* anything is
//! allocated, then its body read in one piece. P-DATA-TF PDUs (the bulk of the traffic) are split
//! into PDVs here without copying: each PDV's data is a slice of the PDU body. The other PDUs
//! (association negotiation, release, abort) are decoded and encoded with dicom-ul.

use bytes::{Buf, Bytes, BytesMut};
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, Pdu};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// PDU type of P-DATA-TF (PS3.8 §9.3.5), the only one read without dicom-ul.
pub(crate) const PDATA_TF: u8 = 0x04;
/// Every PDU starts with its type, a reserved byte and a 4-byte big-endian length (PS3.8 §9.3.1).
pub(crate) const PDU_HEADER_SIZE: usize = 6;
/// A PDV item starts with its 4-byte length, then the presentation context ID and the message
/// control header (PS3.8 §9.3.5.1).
pub(crate) const PDV_HEADER_SIZE: usize = 6;
/// The part of a PDV header its item length counts: context ID and message control header.
const PDV_CONTROL_SIZE: usize = 2;
/// Message control header bits (PS3.8 Annex E.2).
const PDV_COMMAND_BIT: u8 = 0x01;
const PDV_LAST_BIT: u8 = 0x02;
/// Upper bound for the non-data PDUs (an A-ASSOCIATE-RQ with 128 contexts is far below this).
pub(crate) const MAX_CONTROL_PDU: u32 = 256 * 1024;

/// Why a PDU could not be read or written; [`PduError::abort_reason`] maps it to an A-ABORT.
#[derive(Debug, Error)]
pub enum PduError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a PDU")]
    Truncated,
    #[error("PDU of type {pdu_type:#04x} announces {length} bytes, more than the {max} allowed")]
    TooLarge { pdu_type: u8, length: u32, max: u32 },
    #[error("malformed PDU: {0}")]
    Malformed(&'static str),
    #[error("unrecognized PDU type {0:#04x}")]
    UnknownType(u8),
    #[error("PDU cannot be decoded: {0}")]
    Decode(String),
    #[error("timed out {0}")]
    TimedOut(&'static str),
}

impl PduError {
    /// The A-ABORT reason this error should be reported to the peer with.
    pub(crate) fn abort_reason(&self) -> AbortRQServiceProviderReason {
        match self {
            PduError::UnknownType(_) => AbortRQServiceProviderReason::UnrecognizedPdu,
            PduError::TooLarge { .. } | PduError::Malformed(_) | PduError::Decode(_) => {
                AbortRQServiceProviderReason::InvalidPduParameter
            }
            _ => AbortRQServiceProviderReason::ReasonNotSpecified,
        }
    }
}

/// One presentation data value of a P-DATA-TF PDU.
#[derive(Debug, Clone)]
pub struct Pdv {
    pub context_id: u8,
    pub is_command: bool,
    pub is_last: bool,
    pub data: Bytes,
}

/// One PDU read from the peer: data (split into PDVs without copying) or a control PDU.
#[derive(Debug)]
pub enum Incoming {
    PData(Vec<Pdv>),
    Other(Pdu),
}

/// Reads the next PDU. `Ok(None)` means the peer closed the connection between PDUs.
/// `max_pdata` is the largest P-DATA-TF body accepted (our negotiated maximum length).
#[cfg(test)]
pub(crate) async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    max_pdata: u32,
) -> Result<Option<Incoming>, PduError> {
    read_pdu_into(r, max_pdata, &mut BytesMut::new()).await
}

/// [`read_pdu`] with a caller-owned buffer for PDU bodies. Once the PDVs of the previous PDU have
/// been dropped, the buffer's memory is reused instead of allocating (and page-faulting in) a fresh
/// max-PDU-sized block for every PDU, which dominated CPU time under load.
pub async fn read_pdu_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max_pdata: u32,
    scratch: &mut BytesMut,
) -> Result<Option<Incoming>, PduError> {
    let mut header = [0u8; PDU_HEADER_SIZE];
    let n = r.read(&mut header).await?;
    if n == 0 {
        return Ok(None);
    }
    if n < PDU_HEADER_SIZE {
        r.read_exact(&mut header[n..])
            .await
            .map_err(eof_is_truncation)?;
    }
    let pdu_type = header[0];
    let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    let max = match pdu_type {
        PDATA_TF => max_pdata,
        0x01..=0x07 => MAX_CONTROL_PDU,
        other => return Err(PduError::UnknownType(other)),
    };
    if length > max {
        return Err(PduError::TooLarge {
            pdu_type,
            length,
            max,
        });
    }
    scratch.clear();
    scratch.resize(length as usize, 0);
    r.read_exact(&mut scratch[..])
        .await
        .map_err(eof_is_truncation)?;
    let body = scratch.split().freeze();
    if pdu_type == PDATA_TF {
        return split_pdvs(body).map(|p| Some(Incoming::PData(p)));
    }
    let mut whole = BytesMut::with_capacity(PDU_HEADER_SIZE + body.len());
    whole.extend_from_slice(&header);
    whole.extend_from_slice(&body);
    match dicom_ul::pdu::read_pdu(whole.freeze(), dicom_ul::pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(pdu)) => Ok(Some(Incoming::Other(pdu))),
        Ok(None) => Err(PduError::Truncated),
        Err(e) => Err(PduError::Decode(e.to_string())),
    }
}

fn eof_is_truncation(e: std::io::Error) -> PduError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        PduError::Truncated
    } else {
        PduError::Io(e)
    }
}

/// Splits a P-DATA-TF body into PDVs (PS3.8 §9.3.5.1), sharing the body's memory.
pub fn split_pdvs(mut body: Bytes) -> Result<Vec<Pdv>, PduError> {
    let mut pdvs = Vec::with_capacity(2);
    if body.is_empty() {
        return Err(PduError::Malformed("P-DATA-TF without any PDV"));
    }
    while !body.is_empty() {
        if body.len() < PDV_HEADER_SIZE {
            return Err(PduError::Malformed("PDV item header is truncated"));
        }
        let item_len = body.get_u32() as usize;
        if item_len < PDV_CONTROL_SIZE || item_len > body.len() {
            return Err(PduError::Malformed("PDV item length does not fit the PDU"));
        }
        let context_id = body.get_u8();
        let control = body.get_u8();
        if control & !(PDV_COMMAND_BIT | PDV_LAST_BIT) != 0 {
            return Err(PduError::Malformed(
                "PDV message control header has reserved bits set",
            ));
        }
        let data = body.split_to(item_len - PDV_CONTROL_SIZE);
        pdvs.push(Pdv {
            context_id,
            is_command: control & PDV_COMMAND_BIT != 0,
            is_last: control & PDV_LAST_BIT != 0,
            data,
        });
    }
    Ok(pdvs)
}

/// Encodes one P-DATA-TF PDU holding one PDV.
pub fn encode_pdata(context_id: u8, is_command: bool, is_last: bool, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PDU_HEADER_SIZE + PDV_HEADER_SIZE + data.len());
    out.push(PDATA_TF);
    out.push(0);
    out.extend_from_slice(&((PDV_HEADER_SIZE + data.len()) as u32).to_be_bytes());
    out.extend_from_slice(&((PDV_CONTROL_SIZE + data.len()) as u32).to_be_bytes());
    out.push(context_id);
    let mut control = 0;
    if is_command {
        control |= PDV_COMMAND_BIT;
    }
    if is_last {
        control |= PDV_LAST_BIT;
    }
    out.push(control);
    out.extend_from_slice(data);
    out
}

/// Sends a message part (a command set or a data set) as PDVs no larger than the peer accepts.
/// `peer_max` is the peer's Maximum Length Received; 0 means unlimited.
pub(crate) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    context_id: u8,
    is_command: bool,
    data: &[u8],
    peer_max: u32,
) -> Result<(), PduError> {
    let max_chunk = if peer_max == 0 {
        usize::MAX
    } else {
        (peer_max as usize).saturating_sub(PDV_HEADER_SIZE).max(1)
    };
    let mut chunks = data.chunks(max_chunk).peekable();
    if data.is_empty() {
        w.write_all(&encode_pdata(context_id, is_command, true, &[]))
            .await?;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        w.write_all(&encode_pdata(context_id, is_command, last, chunk))
            .await?;
    }
    w.flush().await?;
    Ok(())
}

/// Encodes and sends a non-data PDU.
pub(crate) async fn write_pdu<W: AsyncWrite + Unpin>(w: &mut W, pdu: &Pdu) -> Result<(), PduError> {
    let mut out = Vec::with_capacity(512);
    dicom_ul::pdu::write_pdu(&mut out, pdu).map_err(|e| PduError::Decode(e.to_string()))?;
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

/// An A-ABORT from the service provider (us) with `reason`.
pub(crate) fn abort(reason: AbortRQServiceProviderReason) -> Pdu {
    Pdu::AbortRQ {
        source: AbortRQSource::ServiceProvider(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pdata_round_trip_and_zero_copy_split() {
        let mut wire = encode_pdata(3, true, true, b"cmd!");
        wire.extend(encode_pdata(3, false, false, b"data"));
        let mut r = &wire[..];
        match read_pdu(&mut r, 1024).await.unwrap().unwrap() {
            Incoming::PData(p) => {
                assert_eq!(p.len(), 1);
                assert!(p[0].is_command && p[0].is_last);
                assert_eq!(&p[0].data[..], b"cmd!");
            }
            other => panic!("{other:?}"),
        }
        match read_pdu(&mut r, 1024).await.unwrap().unwrap() {
            Incoming::PData(p) => {
                assert!(!p[0].is_command && !p[0].is_last && p[0].context_id == 3)
            }
            other => panic!("{other:?}"),
        }
        assert!(
            read_pdu(&mut r, 1024).await.unwrap().is_none(),
            "clean end between PDUs"
        );
    }

    #[tokio::test]
    async fn oversized_and_malformed_pdus_are_errors_before_allocation() {
        let huge = [0x04, 0, 0xFF, 0xFF, 0xFF, 0xF0];
        assert!(matches!(
            read_pdu(&mut &huge[..], 16384).await,
            Err(PduError::TooLarge { .. })
        ));
        let assoc_huge = [0x01, 0, 0x10, 0, 0, 0];
        assert!(matches!(
            read_pdu(&mut &assoc_huge[..], 16384).await,
            Err(PduError::TooLarge { .. })
        ));
        assert!(matches!(
            read_pdu(&mut &[0x09u8, 0, 0, 0, 0, 0][..], 16384).await,
            Err(PduError::UnknownType(9))
        ));
        assert!(matches!(
            read_pdu(&mut &[0x04u8, 0, 0, 0, 0, 10, 1, 2][..], 16384).await,
            Err(PduError::Truncated)
        ));
        // PDV item claims more than the PDU holds.
        let bad = [0x04, 0, 0, 0, 0, 8, 0, 0, 0, 50, 1, 3, 0, 0];
        assert!(matches!(
            read_pdu(&mut &bad[..], 16384).await,
            Err(PduError::Malformed(_))
        ));
        assert!(split_pdvs(Bytes::from_static(&[0, 0, 0, 1, 1])).is_err());
        assert!(split_pdvs(Bytes::new()).is_err());
    }

    #[tokio::test]
    async fn messages_are_fragmented_to_the_peer_maximum() {
        let mut out = Vec::new();
        write_message(&mut out, 1, false, &[7u8; 100], 46)
            .await
            .unwrap();
        let mut r = &out[..];
        let mut total = 0;
        let mut last_seen = false;
        while let Some(Incoming::PData(p)) = read_pdu(&mut r, 46).await.unwrap() {
            assert!(p[0].data.len() <= 40);
            total += p[0].data.len();
            last_seen = p[0].is_last;
        }
        assert_eq!(total, 100);
        assert!(last_seen);
    }

    #[tokio::test]
    async fn control_pdus_round_trip_through_dicom_ul() {
        let mut out = Vec::new();
        write_pdu(&mut out, &Pdu::ReleaseRQ).await.unwrap();
        write_pdu(
            &mut out,
            &abort(AbortRQServiceProviderReason::UnexpectedPdu),
        )
        .await
        .unwrap();
        let mut r = &out[..];
        assert!(matches!(
            read_pdu(&mut r, 4096).await.unwrap(),
            Some(Incoming::Other(Pdu::ReleaseRQ))
        ));
        assert!(matches!(
            read_pdu(&mut r, 4096).await.unwrap(),
            Some(Incoming::Other(Pdu::AbortRQ { .. }))
        ));
    }
}

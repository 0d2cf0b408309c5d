//! One DICOM Upper Layer connection: the socket, its buffers and the limits negotiated for it.
//!
//! Modelled on mini-redis's `Connection`: the association handler (and the `echo` client) read and
//! write whole PDUs and messages through it and never touch bytes, buffers, PDU sizes or timeouts.
//! The mapping of an elapsed timeout to an error lives here, once.

use std::time::Duration;

use bytes::BytesMut;
use dicom_ul::pdu::{AbortRQServiceProviderReason, Pdu};
use tokio::io::{AsyncRead, AsyncWrite, BufStream};

use crate::pdu::{self, Incoming, PduError};

/// Read buffer: large enough that a 16 KiB PDU arrives in one or two reads.
const READ_BUFFER: usize = 64 * 1024;
/// Write buffer: responses and control PDUs are small; one flush per message.
const WRITE_BUFFER: usize = 16 * 1024;

/// The socket of one association and what reading and writing on it needs.
pub(crate) struct Connection<S> {
    /// Buffered both ways: PDU headers are read in small pieces, each message is written with one flush.
    stream: BufStream<S>,
    /// Reused for PDU bodies, so a busy association does not allocate a fresh max-PDU block per PDU.
    scratch: BytesMut,
    /// Our Maximum Length Received: the largest P-DATA-TF PDU the peer may send us.
    max_pdu: u32,
    /// The peer's Maximum Length Received (0: unlimited), known once the association is negotiated:
    /// messages we send are fragmented to it.
    peer_max_pdu: u32,
    /// Longest a single write (a response, a control PDU) may take.
    io_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// A connection that accepts P-DATA-TF PDUs of up to `max_pdu` bytes.
    pub(crate) fn new(stream: S, max_pdu: u32, io_timeout: Duration) -> Self {
        Connection {
            stream: BufStream::with_capacity(READ_BUFFER, WRITE_BUFFER, stream),
            scratch: BytesMut::new(),
            max_pdu,
            peer_max_pdu: 0,
            io_timeout,
        }
    }

    /// Records the peer's Maximum Length Received from the negotiation.
    pub(crate) fn set_peer_max_pdu(&mut self, peer_max_pdu: u32) {
        self.peer_max_pdu = peer_max_pdu;
    }

    /// Reads the next PDU, waiting at most `wait`. `Ok(None)` is a clean close between PDUs;
    /// [`PduError::TimedOut`] means nothing complete arrived in time.
    pub(crate) async fn read_pdu(&mut self, wait: Duration) -> Result<Option<Incoming>, PduError> {
        let read = pdu::read_pdu_into(&mut self.stream, self.max_pdu, &mut self.scratch);
        tokio::time::timeout(wait, read)
            .await
            .map_err(|_| PduError::TimedOut("waiting for the peer"))?
    }

    /// Waits at most `wait` until the peer has sent something (or closed the connection), without
    /// consuming it. Unlike [`Connection::read_pdu`] this may be cancelled (by a `select!`)
    /// without losing bytes: what arrived stays buffered for the next read.
    pub(crate) async fn readable(&mut self, wait: Duration) -> Result<(), PduError> {
        use tokio::io::AsyncBufReadExt;
        tokio::time::timeout(wait, self.stream.fill_buf())
            .await
            .map_err(|_| PduError::TimedOut("waiting for the peer"))??;
        Ok(())
    }

    /// Encodes and sends a control PDU (association, release, abort).
    pub(crate) async fn write_pdu(&mut self, p: &Pdu) -> Result<(), PduError> {
        let write = pdu::write_pdu(&mut self.stream, p);
        tokio::time::timeout(self.io_timeout, write)
            .await
            .map_err(|_| PduError::TimedOut("writing to the peer"))?
    }

    /// Sends a command set or data set on `context_id`, fragmented to the peer's maximum.
    pub(crate) async fn write_message(
        &mut self,
        context_id: u8,
        is_command: bool,
        data: &[u8],
    ) -> Result<(), PduError> {
        let write = pdu::write_message(
            &mut self.stream,
            context_id,
            is_command,
            data,
            self.peer_max_pdu,
        );
        tokio::time::timeout(self.io_timeout, write)
            .await
            .map_err(|_| PduError::TimedOut("writing to the peer"))?
    }

    /// Sends an A-ABORT with `reason`, best effort: the association ends whatever happens.
    pub(crate) async fn abort(&mut self, reason: AbortRQServiceProviderReason) {
        let _ = self.write_pdu(&pdu::abort(reason)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_time_out_and_messages_follow_the_peer_maximum() {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let mut conn = Connection::new(ours, 16384, Duration::from_secs(1));
        assert!(matches!(
            conn.read_pdu(Duration::from_millis(10)).await,
            Err(PduError::TimedOut(_))
        ));
        conn.set_peer_max_pdu(46);
        conn.write_message(1, false, &[7u8; 100]).await.unwrap();
        drop(conn);
        let mut peer = Connection::new(theirs, 46, Duration::from_secs(1));
        let mut sizes = Vec::new();
        while let Some(Incoming::PData(p)) = peer.read_pdu(Duration::from_secs(1)).await.unwrap() {
            sizes.push(p[0].data.len());
        }
        assert_eq!(sizes, vec![40, 40, 20]);
    }
}

//! PROXY protocol version 2: the header a load balancer writes in front of a connection it relays,
//! naming the client it relays for.
//!
//! Behind an AWS Network Load Balancer whose target group has `proxy_protocol_v2.enabled`, the
//! socket's peer is the load balancer; "the load balancer prepends a proxy protocol header to the TCP
//! data", and its own health check connections carry one too, "without client information" (Elastic
//! Load Balancing, *Edit target group attributes for your Network Load Balancer*,
//! <https://docs.aws.amazon.com/elasticloadbalancing/latest/network/edit-target-group-attributes.html>).
//! With `--proxy-protocol` the listener reads the header before anything else (before the TLS
//! handshake on the TLS port) and uses the client it names for `--peer-allow` and in the logs.
//!
//! The format is section 2.2 of haproxy's `proxy-protocol.txt`
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): a 12-byte signature; a byte
//! holding the version (2) and the command (LOCAL `0x0`: the proxy's own connection, e.g. a health
//! check, whose "real connection endpoints" are to be used; PROXY `0x1`: relayed for a client); a
//! byte holding the address family and transport; a big-endian 16-bit length of what follows: the
//! addresses (source first), then TLVs, which are skipped (AWS adds type `0xEA`, the VPC endpoint ID
//! for PrivateLink traffic). The spec requires receivers to "reject incoming connections containing
//! partial protocol headers" and to drop unknown versions and commands; this module does.
//!
//! The header is read with exactly sized reads, so not one byte of the DICOM (or TLS) stream behind
//! it is consumed, and its length is bounded by [`MAX_BODY`]. The caller bounds the time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every version 2 header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport and length.
const FIXED: usize = 16;
/// Longest address block plus TLVs accepted. The addresses of TCP over IPv6 take 36 bytes and AWS's
/// TLV a few dozen more; the spec's largest address block (AF_UNIX) is 216. Anything longer is not a
/// load balancer we know, and would only cost memory.
pub(crate) const MAX_BODY: usize = 1024;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxyHeader {
    /// PROXY: the connection is relayed for `client` (the original source address and port).
    Proxied { client: SocketAddr },
    /// LOCAL: the proxy's own connection (a load balancer health check); the socket's peer is the
    /// real endpoint.
    Local,
}

/// Why a connection's first bytes are not a usable PROXY protocol v2 header.
#[derive(Debug, Error)]
pub(crate) enum ProxyHeaderError {
    /// The peer closed the connection without sending a byte (a TCP health check, a port scan).
    #[error("connection closed before sending anything")]
    Closed,
    /// The peer closed the connection in the middle of the header.
    #[error("PROXY protocol header truncated: the connection closed after {0} bytes")]
    Truncated(usize),
    /// The first bytes are not the signature: the peer did not go through the proxy.
    #[error(
        "no PROXY protocol header (the first bytes are not its signature): is the peer connecting \
         directly instead of through the load balancer?"
    )]
    Missing,
    /// A text (version 1) header: the load balancer is configured for the other version.
    #[error("PROXY protocol version 1 (text) header; only version 2 is accepted")]
    Version1,
    #[error("PROXY protocol version {0} is not 2")]
    Version(u8),
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    /// A PROXY command for something other than TCP over IPv4 or IPv6: no client address to use.
    #[error(
        "PROXY protocol address family/transport {0:#04x} is not TCP over IPv4 or IPv6, so the \
         header names no client address"
    )]
    Family(u8),
    #[error("PROXY protocol header length {len} is too short for its addresses ({need} bytes)")]
    ShortAddresses { len: usize, need: usize },
    #[error("PROXY protocol header length {0} is over the {MAX_BODY} bytes accepted")]
    TooLong(usize),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// The fixed 16 bytes, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fixed {
    /// LOCAL (false) or PROXY (true).
    proxied: bool,
    /// Address family (high nibble) and transport (low nibble).
    family: u8,
    /// Bytes that follow: addresses, then TLVs.
    len: usize,
}

/// Checks the first bytes received (fewer than 16 while they arrive) against the signature, so a
/// peer that sends something else is turned away at once instead of when 16 bytes have come.
fn check_signature(start: &[u8]) -> Result<(), ProxyHeaderError> {
    let n = start.len().min(SIGNATURE.len());
    if start[..n] == SIGNATURE[..n] {
        return Ok(());
    }
    if b"PROXY".starts_with(&start[..start.len().min(5)]) {
        return Err(ProxyHeaderError::Version1);
    }
    Err(ProxyHeaderError::Missing)
}

/// Decodes the fixed part of the header.
fn parse_fixed(h: &[u8; FIXED]) -> Result<Fixed, ProxyHeaderError> {
    check_signature(&h[..SIGNATURE.len()])?;
    let (version, command) = (h[12] >> 4, h[12] & 0x0F);
    if version != 2 {
        return Err(ProxyHeaderError::Version(version));
    }
    let proxied = match command {
        0x0 => false,
        0x1 => true,
        other => return Err(ProxyHeaderError::Command(other)),
    };
    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
    if len > MAX_BODY {
        return Err(ProxyHeaderError::TooLong(len));
    }
    Ok(Fixed {
        proxied,
        family: h[13],
        len,
    })
}

/// Reads the client address from the address block (`body`: addresses, then TLVs, ignored).
fn parse_body(fixed: Fixed, body: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    if !fixed.proxied {
        // "The receiver must accept this connection as valid and must use the real connection
        // endpoints and discard the protocol block including the family which is ignored."
        return Ok(ProxyHeader::Local);
    }
    let need = match fixed.family {
        0x11 => 12, // TCP over IPv4: 2 × 4 address bytes + 2 × 2 port bytes
        0x21 => 36, // TCP over IPv6: 2 × 16 + 2 × 2
        other => return Err(ProxyHeaderError::Family(other)),
    };
    if body.len() < need {
        return Err(ProxyHeaderError::ShortAddresses {
            len: body.len(),
            need,
        });
    }
    let (ip, port) = if fixed.family == 0x11 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&body[..4]);
        (IpAddr::V4(Ipv4Addr::from(a)), [body[8], body[9]])
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&body[..16]);
        (IpAddr::V6(Ipv6Addr::from(a)), [body[32], body[33]])
    };
    // An IPv4 client relayed over IPv6 (::ffff:a.b.c.d) must match --peer-allow's IPv4 networks.
    let client = SocketAddr::new(ip.to_canonical(), u16::from_be_bytes(port));
    Ok(ProxyHeader::Proxied { client })
}

/// Reads one PROXY protocol v2 header from the start of `stream`, and nothing after it.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let mut fixed = [0u8; FIXED];
    let mut filled = 0;
    while filled < FIXED {
        let n = stream.read(&mut fixed[filled..]).await?;
        if n == 0 {
            return Err(match filled {
                0 => ProxyHeaderError::Closed,
                n => ProxyHeaderError::Truncated(n),
            });
        }
        filled += n;
        check_signature(&fixed[..filled])?;
    }
    let header = parse_fixed(&fixed)?;
    let mut body = vec![0u8; header.len];
    stream.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProxyHeaderError::Truncated(FIXED)
        } else {
            ProxyHeaderError::Io(e)
        }
    })?;
    parse_body(header, &body)
}

/// Encodes a header, for tests (here and in the listener's).
#[cfg(test)]
pub(crate) fn encode(header: ProxyHeader, tlvs: &[u8]) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    let mut body = Vec::new();
    match header {
        ProxyHeader::Local => out.extend([0x20, 0x00]),
        ProxyHeader::Proxied { client } => {
            let (family, src, dst): (u8, Vec<u8>, Vec<u8>) = match client.ip() {
                IpAddr::V4(a) => (0x11, a.octets().to_vec(), vec![10, 0, 0, 1]),
                IpAddr::V6(a) => (
                    0x21,
                    a.octets().to_vec(),
                    Ipv6Addr::LOCALHOST.octets().to_vec(),
                ),
            };
            out.extend([0x21, family]);
            body.extend(src);
            body.extend(dst);
            body.extend(client.port().to_be_bytes());
            body.extend(11112u16.to_be_bytes());
        }
    }
    body.extend_from_slice(tlvs);
    out.extend((body.len() as u16).to_be_bytes());
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a header from `bytes` and returns it with what is left of the stream.
    async fn read(bytes: &[u8]) -> (Result<ProxyHeader, ProxyHeaderError>, Vec<u8>) {
        let mut stream = bytes;
        let header = read_header(&mut stream).await;
        (header, stream.to_vec())
    }

    fn proxied(addr: &str) -> ProxyHeader {
        ProxyHeader::Proxied {
            client: addr.parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn an_ipv4_header_names_the_client_and_leaves_the_stream_behind_it_untouched() {
        let mut bytes = encode(proxied("203.0.113.7:40123"), &[]);
        bytes.extend(b"\x01\x00A-ASSOCIATE-RQ");
        let (header, rest) = read(&bytes).await;
        assert_eq!(header.unwrap(), proxied("203.0.113.7:40123"));
        assert_eq!(rest, b"\x01\x00A-ASSOCIATE-RQ");
    }

    #[tokio::test]
    async fn an_ipv6_header_with_tlvs_names_the_client_and_the_tlvs_are_skipped() {
        // AWS's PP2_TYPE_AWS TLV (0xEA) with a VPC endpoint ID, then a NOOP TLV.
        let mut tlvs = vec![0xEA, 0x00, 0x17, 0x01];
        tlvs.extend(b"vpce-0123456789abcdef");
        tlvs.extend([0x04, 0x00, 0x01, 0x00]);
        let mut bytes = encode(proxied("[2001:db8::7]:5000"), &tlvs);
        bytes.extend(b"next");
        let (header, rest) = read(&bytes).await;
        assert_eq!(header.unwrap(), proxied("[2001:db8::7]:5000"));
        assert_eq!(rest, b"next");
    }

    #[tokio::test]
    async fn an_ipv4_client_relayed_over_ipv6_is_given_as_ipv4() {
        let (header, _) = read(&encode(proxied("[::ffff:10.1.2.3]:7"), &[])).await;
        assert_eq!(header.unwrap(), proxied("10.1.2.3:7"));
    }

    #[tokio::test]
    async fn a_local_header_is_a_health_check_whatever_its_address_block() {
        let (header, rest) = read(&encode(ProxyHeader::Local, &[])).await;
        assert_eq!(header.unwrap(), ProxyHeader::Local);
        assert!(rest.is_empty());
        // "must not assume zero is presented for LOCAL connections": the block is skipped.
        let mut bytes = encode(proxied("192.0.2.1:1"), &[]);
        bytes[12] = 0x20;
        bytes.push(0x01);
        let (header, rest) = read(&bytes).await;
        assert_eq!(header.unwrap(), ProxyHeader::Local);
        assert_eq!(rest, [0x01]);
    }

    #[tokio::test]
    async fn a_truncated_header_is_refused() {
        let bytes = encode(proxied("203.0.113.7:1"), &[]);
        for cut in [5, 15, 16, 20, bytes.len() - 1] {
            let (header, _) = read(&bytes[..cut]).await;
            assert!(
                matches!(header, Err(ProxyHeaderError::Truncated(_))),
                "cut at {cut}: {header:?}"
            );
        }
        assert!(matches!(read(&[]).await.0, Err(ProxyHeaderError::Closed)));
    }

    #[tokio::test]
    async fn a_missing_header_or_a_bad_signature_is_refused_at_the_first_wrong_byte() {
        // An A-ASSOCIATE-RQ where the header should be.
        let (header, _) = read(b"\x01\x00\x00\x00\x00\xCD rest of the request").await;
        assert!(
            matches!(header, Err(ProxyHeaderError::Missing)),
            "{header:?}"
        );
        let mut bytes = encode(proxied("203.0.113.7:1"), &[]);
        bytes[7] = b'X';
        assert!(matches!(
            read(&bytes).await.0,
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            read(b"PROXY TCP4 203.0.113.7 10.0.0.1 1 11112\r\n").await.0,
            Err(ProxyHeaderError::Version1)
        ));
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_it_is_read() {
        let mut bytes = encode(proxied("203.0.113.7:1"), &[]);
        bytes[14..16].copy_from_slice(&(MAX_BODY as u16 + 1).to_be_bytes());
        // Nothing follows the fixed part: the length alone decides.
        let (header, _) = read(&bytes[..FIXED]).await;
        assert!(
            matches!(header, Err(ProxyHeaderError::TooLong(1025))),
            "{header:?}"
        );
    }

    #[tokio::test]
    async fn other_versions_commands_and_families_are_refused() {
        let base = encode(proxied("203.0.113.7:1"), &[]);
        let with = |i: usize, v: u8| {
            let mut b = base.clone();
            b[i] = v;
            b
        };
        assert!(matches!(
            read(&with(12, 0x11)).await.0,
            Err(ProxyHeaderError::Version(1))
        ));
        assert!(matches!(
            read(&with(12, 0x22)).await.0,
            Err(ProxyHeaderError::Command(2))
        ));
        for family in [0x00, 0x12, 0x31] {
            assert!(matches!(
                read(&with(13, family)).await.0,
                Err(ProxyHeaderError::Family(f)) if f == family
            ));
        }
        // An IPv6 family with an IPv4-sized address block.
        assert!(matches!(
            read(&with(13, 0x21)).await.0,
            Err(ProxyHeaderError::ShortAddresses { len: 12, need: 36 })
        ));
    }
}

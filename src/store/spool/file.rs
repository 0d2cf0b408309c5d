//! One spool file: the object's bytes exactly as they go to S3, then a trailer that names the
//! object's final key and carries a CRC32C of the object and the key.
//!
//! ```text
//! object bytes (N) | key (K bytes, UTF-8) | N: u64 LE | K: u16 LE | CRC32C(object, key): u32 LE | "DGWSPL01"
//! ```
//!
//! The trailer is written with the object, in the same file, before the one fsync and the rename:
//! a spool file is whole or it is not there. What the file system can still do to it (a torn write
//! after a power cut on a disk that ignores flushes, a truncation, a flipped bit, an operator's
//! editor) shows as a missing magic, a length that differs from the trailer's, or a checksum that
//! does not match; such a file is quarantined, never uploaded ([`super::replay`]).
//!
//! CRC32C (Castagnoli) is hardware-accelerated on x86-64 and ARMv8 (the `crc-fast` crate the AWS
//! SDK already uses for S3's flexible checksums), and is one of the checksums S3 itself can verify
//! end to end (`x-amz-checksum-crc32c`, "Checking object integrity for data uploads in Amazon S3",
//! <https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity-upload.html>).

use std::io::{Read, Seek, SeekFrom};

use thiserror::Error;

use crate::store::{KeyError, ObjectKey};

/// The last 8 bytes of every spool file (version 1 of this layout).
pub(crate) const MAGIC: &[u8; 8] = b"DGWSPL01";
/// Object length, key length, checksum and magic.
const FIXED: usize = 8 + 2 + 4 + 8;
/// Longest key a trailer may name (real keys are at most 225 bytes: a ULID and three UIDs).
const MAX_KEY: usize = 1024;
/// The longest trailer: what replay reads from the end of a file.
pub(crate) const MAX_TRAILER: usize = FIXED + MAX_KEY;
/// The name of every spool file ends with this (its stem is a ULID: spool order is name order).
pub(crate) const SUFFIX: &str = ".spool";

/// A running CRC32C.
pub(crate) struct Checksum(crc_fast::Digest);

impl Checksum {
    pub(crate) fn new() -> Self {
        Checksum(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub(crate) fn value(&self) -> u32 {
        // A 32-bit CRC in the low half of the digest's u64.
        self.0.finalize() as u32
    }
}

/// Why a spool file cannot be trusted: it is quarantined, never uploaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum TornFile {
    #[error("{0} bytes: shorter than a spool trailer")]
    TooShort(u64),
    #[error("no spool trailer at its end (a torn or truncated write)")]
    NoTrailer,
    #[error("{actual} bytes where its trailer gives {expected}")]
    Length { actual: u64, expected: u64 },
    #[error("its trailer names no valid object key: {0}")]
    Key(KeyError),
    #[error("its trailer names {found}, not {expected}")]
    OtherKey { found: String, expected: String },
    #[error("the file ended before the object did")]
    ShortRead,
    #[error("CRC32C {actual:08x} where its trailer says {expected:08x}")]
    Checksum { actual: u32, expected: u32 },
}

/// What a spool file's trailer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trailer {
    /// Bytes of the object, in front of the trailer.
    pub object_len: u64,
    pub key: ObjectKey,
    /// CRC32C of the object's bytes followed by the key's.
    pub crc32c: u32,
}

impl Trailer {
    /// The trailer for an object of `object_len` bytes whose bytes had the running checksum
    /// `object` (the key is added to it here).
    pub(crate) fn encode(object_len: u64, key: &ObjectKey, mut object: Checksum) -> Vec<u8> {
        let key = key.as_str().as_bytes();
        object.update(key);
        let mut out = Vec::with_capacity(key.len() + FIXED);
        out.extend_from_slice(key);
        out.extend_from_slice(&object_len.to_le_bytes());
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(&object.value().to_le_bytes());
        out.extend_from_slice(MAGIC);
        out
    }

    /// Reads the trailer from the last bytes of a file of `file_len` bytes (`tail` is at most
    /// [`MAX_TRAILER`] bytes, ending where the file ends).
    pub(crate) fn decode(tail: &[u8], file_len: u64) -> Result<Trailer, TornFile> {
        if tail.len() < FIXED {
            return Err(TornFile::TooShort(file_len));
        }
        let (rest, fixed) = tail.split_at(tail.len() - FIXED);
        if &fixed[14..] != MAGIC {
            return Err(TornFile::NoTrailer);
        }
        let object_len = u64::from_le_bytes(fixed[0..8].try_into().unwrap_or_default());
        let key_len = u16::from_le_bytes(fixed[8..10].try_into().unwrap_or_default()) as usize;
        let crc32c = u32::from_le_bytes(fixed[10..14].try_into().unwrap_or_default());
        if key_len > rest.len() {
            return Err(TornFile::NoTrailer);
        }
        let expected = object_len.saturating_add((key_len + FIXED) as u64);
        if expected != file_len {
            return Err(TornFile::Length {
                actual: file_len,
                expected,
            });
        }
        let key = std::str::from_utf8(&rest[rest.len() - key_len..])
            .map_err(|_| TornFile::Key(KeyError::JobId))?;
        let key = ObjectKey::parse(key).map_err(TornFile::Key)?;
        Ok(Trailer {
            object_len,
            key,
            crc32c,
        })
    }

    /// Reads the trailer of an open spool file (blocking), leaving the file position at its end.
    pub(crate) fn read_from(
        file: &mut std::fs::File,
        file_len: u64,
    ) -> std::io::Result<Result<Trailer, TornFile>> {
        let n = file_len.min(MAX_TRAILER as u64);
        file.seek(SeekFrom::Start(file_len - n))?;
        let mut tail = vec![0; n as usize];
        file.read_exact(&mut tail)?;
        Ok(Trailer::decode(&tail, file_len))
    }

    /// Checks the running checksum of the object's bytes (the key is added here) against the
    /// trailer's.
    pub(crate) fn verify(&self, mut object: Checksum) -> Result<(), TornFile> {
        object.update(self.key.as_str().as_bytes());
        let actual = object.value();
        if actual == self.crc32c {
            Ok(())
        } else {
            Err(TornFile::Checksum {
                actual,
                expected: self.crc32c,
            })
        }
    }
}

/// Whether `name` is a spool file's name: a ULID and [`SUFFIX`].
pub(crate) fn is_spool_name(name: &str) -> bool {
    name.strip_suffix(SUFFIX)
        .is_some_and(|stem| ulid::Ulid::from_string(stem).is_ok())
}

/// When the spool file `name` was committed (its ULID's time), if it is a spool file's name.
pub(crate) fn committed_at(name: &str) -> Option<std::time::SystemTime> {
    let stem = name.strip_suffix(SUFFIX)?;
    ulid::Ulid::from_string(stem).ok().map(|u| u.datetime())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

    fn key() -> ObjectKey {
        ObjectKey::new(JOB, "1.2", "1.2.3", "1.2.3.4").unwrap()
    }

    /// A whole spool file for `object`.
    fn file(object: &[u8]) -> Vec<u8> {
        let mut crc = Checksum::new();
        crc.update(object);
        let mut out = object.to_vec();
        out.extend(Trailer::encode(object.len() as u64, &key(), crc));
        out
    }

    fn decode(bytes: &[u8]) -> Result<Trailer, TornFile> {
        let tail = &bytes[bytes.len().saturating_sub(MAX_TRAILER)..];
        Trailer::decode(tail, bytes.len() as u64)
    }

    #[test]
    fn a_whole_file_decodes_and_verifies() {
        let object = b"DICM and some more bytes";
        let bytes = file(object);
        let t = decode(&bytes).unwrap();
        assert_eq!(t.object_len, object.len() as u64);
        assert_eq!(t.key, key());
        let mut crc = Checksum::new();
        crc.update(object);
        assert_eq!(t.verify(crc), Ok(()));
        // The standard CRC32C check value ("123456789" gives E3069283).
        let mut check = Checksum::new();
        check.update(b"123456789");
        assert_eq!(check.value(), 0xE306_9283);
    }

    #[test]
    fn an_empty_object_has_a_trailer_too() {
        let t = decode(&file(b"")).unwrap();
        assert_eq!(t.object_len, 0);
    }

    #[test]
    fn truncations_are_detected_at_every_length() {
        let bytes = file(&[0x5A; 300]);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn a_zero_filled_tail_is_no_trailer() {
        let mut bytes = file(&[1; 100]);
        let n = bytes.len();
        bytes[n - 40..].fill(0);
        assert_eq!(decode(&bytes), Err(TornFile::NoTrailer));
    }

    #[test]
    fn a_flipped_bit_in_the_object_or_the_key_fails_the_checksum() {
        let object = vec![7u8; 1000];
        let bytes = file(&object);
        let t = decode(&bytes).unwrap();
        let mut changed = object.clone();
        changed[500] ^= 1;
        let mut crc = Checksum::new();
        crc.update(&changed);
        assert!(matches!(t.verify(crc), Err(TornFile::Checksum { .. })));
        // A key that still parses but differs by one digit.
        let mut other = t.clone();
        other.key = ObjectKey::new(JOB, "1.2", "1.2.3", "1.2.3.5").unwrap();
        let mut crc = Checksum::new();
        crc.update(&object);
        assert!(matches!(other.verify(crc), Err(TornFile::Checksum { .. })));
    }

    #[test]
    fn an_appended_byte_changes_the_length() {
        let mut bytes = file(&[3; 10]);
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(TornFile::NoTrailer));
        let mut bytes = file(&[3; 10]);
        bytes.splice(0..0, [9u8]);
        assert!(matches!(decode(&bytes), Err(TornFile::Length { .. })));
    }

    #[test]
    fn spool_names_are_ulids() {
        let name = format!("{}{SUFFIX}", ulid::Ulid::generate());
        assert!(is_spool_name(&name));
        assert!(committed_at(&name).is_some());
        assert!(!is_spool_name("notes.txt"));
        assert!(!is_spool_name("x.spool"));
    }
}

//! Reads the identifying UIDs from the start of a data set while it streams past.
//!
//! The object key needs the Study, Series and SOP Instance UIDs, which sit near the start of the
//! data set, before the bulk of it (pixel data). `HeaderSniffer` is a push parser: it is fed the
//! data set fragments as they arrive, keeps only the few values it wants, and skips everything else
//! by counting bytes, so it needs a few hundred bytes of memory whatever the instance size. It
//! understands every data set encoding a storage transfer syntax can have: implicit and explicit VR,
//! little and big endian, and deflated explicit VR (inflated on the fly here only; stored bytes stay
//! compressed). It stops as soon as it has passed Series Instance UID (0020,000E) at the top level,
//! long before encapsulated pixel data.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use flate2::{Decompress, FlushDecompress, Status};
use thiserror::Error;

use crate::policy::DatasetEncoding;
use crate::uid::trim_uid;

/// A tag as the parser compares it: group in the high half, element in the low half, so that
/// numeric order is data set order.
const fn tag_number(tag: Tag) -> u32 {
    ((tag.0 as u32) << 16) | tag.1 as u32
}

const SOP_CLASS_UID: u32 = tag_number(tags::SOP_CLASS_UID);
const SOP_INSTANCE_UID: u32 = tag_number(tags::SOP_INSTANCE_UID);
const STUDY_INSTANCE_UID: u32 = tag_number(tags::STUDY_INSTANCE_UID);
const SERIES_INSTANCE_UID: u32 = tag_number(tags::SERIES_INSTANCE_UID);

// The item and delimiter tags of PS3.5 §7.5 (dicom_dictionary_std has no constants for them).
const ITEM: u32 = tag_number(Tag(0xFFFE, 0xE000));
const ITEM_DELIMITATION: u32 = tag_number(Tag(0xFFFE, 0xE00D));
const SEQUENCE_DELIMITATION: u32 = tag_number(Tag(0xFFFE, 0xE0DD));
const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;

/// Deepest nesting of undefined-length sequences and items followed. Real headers nest a few
/// levels; the bound keeps a hostile data set from growing the stack without end.
const MAX_DEPTH: usize = 64;

/// Most inflated bytes read from a deflated data set's header. The instance receiver bounds the
/// *received* (compressed) bytes it holds; a deflate bomb of a few megabytes could otherwise
/// inflate to gigabytes of header to walk through.
const MAX_INFLATED: u64 = 64 * 1024 * 1024;

/// Longest value of interest we keep (UIDs are at most 64 bytes, CS at most 16; padding allowed).
const MAX_VALUE_LEN: u32 = 256;

/// Why a data set header could not be read (answered 0xC000 by the instance receiver).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SniffError {
    #[error("data set is malformed: {0}")]
    Malformed(&'static str),
    #[error("deflated data set cannot be inflated")]
    Inflate,
    #[error("data set lacks {0}")]
    Missing(&'static str),
    #[error("{0} is longer than any valid value")]
    ValueTooLong(&'static str),
}

/// The identifying attributes read from a data set header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatasetIds {
    pub sop_class_uid: Option<String>,
    pub sop_instance_uid: Option<String>,
    pub study_instance_uid: Option<String>,
    pub series_instance_uid: Option<String>,
}

/// The UIDs every stored instance must have, checked to be present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredIds {
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_class_uid: Option<String>,
}

impl DatasetIds {
    pub fn require(self) -> Result<RequiredIds, SniffError> {
        Ok(RequiredIds {
            sop_instance_uid: self
                .sop_instance_uid
                .ok_or(SniffError::Missing("SOP Instance UID (0008,0018)"))?,
            study_instance_uid: self
                .study_instance_uid
                .ok_or(SniffError::Missing("Study Instance UID (0020,000D)"))?,
            series_instance_uid: self
                .series_instance_uid
                .ok_or(SniffError::Missing("Series Instance UID (0020,000E)"))?,
            sop_class_uid: self.sop_class_uid,
        })
    }
}

/// How the elements at the current nesting level are encoded.
#[derive(Debug, Clone, Copy)]
struct Syntax {
    explicit: bool,
    big_endian: bool,
}

const IMPLICIT_LE: Syntax = Syntax {
    explicit: false,
    big_endian: false,
};

/// Where the parser is in the nesting of undefined-length sequences and items.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// Inside a sequence of undefined length: expect items or the sequence delimiter.
    Sequence(Syntax),
    /// Inside an item of undefined length: expect elements or the item delimiter.
    Item(Syntax),
}

/// A value of interest being collected.
#[derive(Debug)]
struct Pending {
    tag: u32,
    len: usize,
}

/// Push parser that reads the identifying UIDs from a data set as its fragments stream past.
pub struct HeaderSniffer {
    base: Syntax,
    inflater: Option<Decompress>,
    /// Bytes not yet parsed (a partial element header or value of interest).
    buf: Vec<u8>,
    /// Bytes still to be skipped (an uninteresting value).
    skip: u64,
    stack: Vec<Frame>,
    pending: Option<Pending>,
    ids: DatasetIds,
    done: bool,
}

impl HeaderSniffer {
    pub fn new(encoding: DatasetEncoding) -> Self {
        let (base, inflater) = match encoding {
            DatasetEncoding::ImplicitVrLittleEndian => (IMPLICIT_LE, None),
            DatasetEncoding::ExplicitVrLittleEndian => (
                Syntax {
                    explicit: true,
                    big_endian: false,
                },
                None,
            ),
            DatasetEncoding::ExplicitVrBigEndian => (
                Syntax {
                    explicit: true,
                    big_endian: true,
                },
                None,
            ),
            DatasetEncoding::DeflatedExplicitVrLittleEndian => (
                Syntax {
                    explicit: true,
                    big_endian: false,
                },
                Some(Decompress::new(false)),
            ),
        };
        HeaderSniffer {
            base,
            inflater,
            buf: Vec::new(),
            skip: 0,
            stack: Vec::new(),
            pending: None,
            ids: DatasetIds::default(),
            done: false,
        }
    }

    /// Feeds the next fragment of the data set (as received, i.e. still deflated if it was).
    pub fn feed(&mut self, data: &[u8]) -> Result<bool, SniffError> {
        if self.done {
            return Ok(true);
        }
        match self.inflater.take() {
            None => self.feed_plain(data)?,
            Some(mut inflater) => {
                let mut out = vec![0u8; 64 * 1024];
                let mut input = data;
                while !self.done {
                    let before_in = inflater.total_in();
                    let before_out = inflater.total_out();
                    let status = inflater
                        .decompress(input, &mut out, FlushDecompress::None)
                        .map_err(|_| SniffError::Inflate)?;
                    let consumed = (inflater.total_in() - before_in) as usize;
                    let produced = (inflater.total_out() - before_out) as usize;
                    input = &input[consumed..];
                    if inflater.total_out() > MAX_INFLATED {
                        return Err(SniffError::Malformed(
                            "deflated header inflates beyond 64 MiB without the identifying UIDs",
                        ));
                    }
                    self.feed_plain(&out[..produced])?;
                    if status == Status::StreamEnd || (consumed == 0 && produced == 0) {
                        break;
                    }
                }
                self.inflater = Some(inflater);
            }
        }
        Ok(self.done)
    }

    /// Ends the data set: returns what was found. A data set that ends without passing Series
    /// Instance UID is fine as long as the required UIDs were seen.
    pub fn finish(self) -> Result<DatasetIds, SniffError> {
        if !self.done && self.pending.is_some() {
            return Err(SniffError::Malformed("data set ends inside a value"));
        }
        Ok(self.ids)
    }

    fn syntax(&self) -> Syntax {
        match self.stack.last() {
            Some(Frame::Sequence(s)) | Some(Frame::Item(s)) => *s,
            None => self.base,
        }
    }

    fn feed_plain(&mut self, mut data: &[u8]) -> Result<(), SniffError> {
        while !self.done && !data.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            // Take just enough bytes for the next step so a skip can start right after a header.
            let need = self.bytes_needed();
            let take = need.saturating_sub(self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            // A header may turn out to need 12 bytes once its VR is visible.
            if self.buf.len() >= need && self.buf.len() >= self.bytes_needed() {
                self.step()?;
            }
        }
        Ok(())
    }

    /// How many bytes `buf` must hold before `step` can make progress.
    fn bytes_needed(&self) -> usize {
        if let Some(p) = &self.pending {
            return p.len;
        }
        if self.buf.len() < 8 {
            return 8;
        }
        let syntax = self.syntax();
        let tag = read_tag(&self.buf, syntax.big_endian);
        if syntax.explicit && tag >> 16 != 0xFFFE && has_long_header(&self.buf[4..6]) {
            12
        } else {
            8
        }
    }

    fn step(&mut self) -> Result<(), SniffError> {
        if let Some(p) = self.pending.take() {
            let value = std::mem::take(&mut self.buf);
            self.record(p.tag, &value[..p.len]);
            return Ok(());
        }
        let syntax = self.syntax();
        let header = std::mem::take(&mut self.buf);
        let tag = read_tag(&header, syntax.big_endian);
        let (vr, len) = if tag >> 16 == 0xFFFE {
            (None, read_u32(&header[4..8], syntax.big_endian))
        } else if syntax.explicit {
            let vr = [header[4], header[5]];
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Err(SniffError::Malformed(
                    "explicit VR is not two upper-case letters",
                ));
            }
            if has_long_header(&vr) {
                (Some(vr), read_u32(&header[8..12], syntax.big_endian))
            } else {
                (Some(vr), read_u16(&header[6..8], syntax.big_endian) as u32)
            }
        } else {
            (None, read_u32(&header[4..8], syntax.big_endian))
        };

        match (self.stack.last().copied(), tag) {
            (Some(Frame::Sequence(_)), ITEM) => {
                if len == UNDEFINED_LENGTH {
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(SniffError::Malformed("sequences nested too deeply"));
                    }
                    self.stack.push(Frame::Item(syntax));
                } else {
                    self.skip = len as u64;
                }
            }
            (Some(Frame::Sequence(_)), SEQUENCE_DELIMITATION) => {
                self.stack.pop();
            }
            (Some(Frame::Sequence(_)), _) => {
                return Err(SniffError::Malformed(
                    "sequence holds something other than items",
                ));
            }
            (Some(Frame::Item(_)), ITEM_DELIMITATION) => {
                self.stack.pop();
            }
            (_, ITEM | ITEM_DELIMITATION | SEQUENCE_DELIMITATION) => {
                return Err(SniffError::Malformed("delimiter outside a sequence"));
            }
            (frame, _) => {
                if frame.is_none() && tag > SERIES_INSTANCE_UID {
                    // Past everything we want: the rest of the data set is not our business.
                    self.done = true;
                    return Ok(());
                }
                if len == UNDEFINED_LENGTH {
                    // An undefined length is only legal for SQ, UN (whose content is then implicit VR
                    // little endian, PS3.5 §6.2.2) and encapsulated pixel data.
                    let inner = match vr {
                        Some(vr) if &vr == b"UN" => IMPLICIT_LE,
                        Some(vr) if &vr == b"SQ" || &vr == b"OB" || &vr == b"OW" => syntax,
                        Some(_) => {
                            return Err(SniffError::Malformed(
                                "undefined length on a VR that cannot have one",
                            ));
                        }
                        None => syntax,
                    };
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(SniffError::Malformed("sequences nested too deeply"));
                    }
                    self.stack.push(Frame::Sequence(inner));
                } else if frame.is_none() && is_interesting(tag) {
                    if len > MAX_VALUE_LEN {
                        return Err(SniffError::ValueTooLong(name_of(tag)));
                    }
                    self.pending = Some(Pending {
                        tag,
                        len: len as usize,
                    });
                    if len == 0 {
                        self.step()?;
                    }
                } else {
                    self.skip = len as u64;
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, tag: u32, value: &[u8]) {
        let text = String::from_utf8_lossy(value);
        let value = Some(trim_uid(&text).to_string());
        match tag {
            SOP_CLASS_UID => self.ids.sop_class_uid = value,
            SOP_INSTANCE_UID => self.ids.sop_instance_uid = value,
            STUDY_INSTANCE_UID => self.ids.study_instance_uid = value,
            SERIES_INSTANCE_UID => {
                self.ids.series_instance_uid = value;
                self.done = true;
            }
            _ => {}
        }
    }
}

fn is_interesting(tag: u32) -> bool {
    matches!(
        tag,
        SOP_CLASS_UID | SOP_INSTANCE_UID | STUDY_INSTANCE_UID | SERIES_INSTANCE_UID
    )
}

fn name_of(tag: u32) -> &'static str {
    match tag {
        SOP_CLASS_UID => "SOP Class UID (0008,0016)",
        SOP_INSTANCE_UID => "SOP Instance UID (0008,0018)",
        STUDY_INSTANCE_UID => "Study Instance UID (0020,000D)",
        _ => "Series Instance UID (0020,000E)",
    }
}

/// VRs whose explicit-VR header has two reserved bytes and a 32-bit length (PS3.5 §7.1.2).
fn has_long_header(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

fn read_u16(b: &[u8], big: bool) -> u16 {
    let a = [b[0], b[1]];
    if big {
        u16::from_be_bytes(a)
    } else {
        u16::from_le_bytes(a)
    }
}

fn read_u32(b: &[u8], big: bool) -> u32 {
    let a = [b[0], b[1], b[2], b[3]];
    if big {
        u32::from_be_bytes(a)
    } else {
        u32::from_le_bytes(a)
    }
}

fn read_tag(b: &[u8], big: bool) -> u32 {
    ((read_u16(&b[0..2], big) as u32) << 16) | read_u16(&b[2..4], big) as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A tiny data set encoder for tests: enough to write every shape the sniffer must handle.
    pub(crate) struct Enc {
        pub explicit: bool,
        pub big: bool,
        pub out: Vec<u8>,
    }

    impl Enc {
        pub(crate) fn new(explicit: bool, big: bool) -> Self {
            Enc {
                explicit,
                big,
                out: Vec::new(),
            }
        }
        fn u16(&mut self, v: u16) {
            self.out.extend(if self.big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        }
        fn u32(&mut self, v: u32) {
            self.out.extend(if self.big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        }
        pub(crate) fn header(&mut self, tag: u32, vr: &[u8; 2], len: u32) -> &mut Self {
            self.u16((tag >> 16) as u16);
            self.u16(tag as u16);
            if tag >> 16 == 0xFFFE || !self.explicit {
                self.u32(len);
            } else if has_long_header(vr) {
                self.out.extend_from_slice(vr);
                self.out.extend([0, 0]);
                self.u32(len);
            } else {
                self.out.extend_from_slice(vr);
                self.u16(len as u16);
            }
            self
        }
        pub(crate) fn el(&mut self, tag: u32, vr: &[u8; 2], value: &[u8]) -> &mut Self {
            let mut v = value.to_vec();
            if v.len() % 2 == 1 {
                v.push(if vr == b"UI" { 0 } else { b' ' });
            }
            self.header(tag, vr, v.len() as u32);
            self.out.extend(v);
            self
        }
    }

    /// A data set with the shapes found in real headers: group length, a defined-length and an
    /// undefined-length sequence (nested), a private UN element of undefined length, a large value
    /// to skip, then the UIDs and trailing pixel data.
    pub(crate) fn sample_dataset(explicit: bool, big: bool) -> Vec<u8> {
        let mut e = Enc::new(explicit, big);
        e.el(0x0008_0005, b"CS", b"ISO_IR 100");
        e.el(0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2");
        e.el(0x0008_0018, b"UI", b"1.2.3.4.5.6.7");
        e.el(0x0008_0060, b"CS", b"CT");
        // Defined-length sequence with one defined-length item.
        let mut inner = Enc::new(explicit, big);
        inner.el(0x0008_0100, b"SH", b"T-1");
        let item_len = inner.out.len() as u32;
        e.header(0x0008_1032, b"SQ", item_len + 8)
            .header(ITEM, b"  ", item_len);
        e.out.extend(inner.out.clone());
        // Undefined-length sequence, undefined-length item, nested undefined-length sequence.
        e.header(0x0008_1140, b"SQ", UNDEFINED_LENGTH)
            .header(ITEM, b"  ", UNDEFINED_LENGTH);
        e.el(0x0008_1150, b"UI", b"9.9.9");
        e.el(0x0008_1155, b"UI", b"9.9.9.1");
        e.header(0x0008_9215, b"SQ", UNDEFINED_LENGTH)
            .header(ITEM, b"  ", UNDEFINED_LENGTH);
        e.el(0x0008_0100, b"SH", b"X");
        e.header(ITEM_DELIMITATION, b"  ", 0)
            .header(SEQUENCE_DELIMITATION, b"  ", 0);
        e.header(ITEM_DELIMITATION, b"  ", 0)
            .header(SEQUENCE_DELIMITATION, b"  ", 0);
        e.el(0x0010_0010, b"PN", b"DOE^JANE");
        e.el(0x0018_0050, b"DS", b"1.25");
        // Private element with a big value, skipped without being held.
        e.el(0x0019_1001, b"OB", &vec![0xAB; 100_000]);
        if explicit {
            // UN of undefined length: content is implicit VR little endian whatever the syntax.
            e.header(0x0019_1010, b"UN", UNDEFINED_LENGTH);
            let mut un = Enc::new(false, false);
            un.header(ITEM, b"  ", UNDEFINED_LENGTH)
                .el(0x0019_0010, b"LO", b"PRIV")
                .header(ITEM_DELIMITATION, b"  ", 0)
                .header(SEQUENCE_DELIMITATION, b"  ", 0);
            e.out.extend(un.out);
        }
        e.el(0x0020_000D, b"UI", b"1.2.3.4.100");
        e.el(0x0020_000E, b"UI", b"1.2.3.4.100.1");
        e.el(0x0020_0013, b"IS", b"1");
        e.header(0x7FE0_0010, b"OW", 8);
        e.out.extend([0u8; 8]);
        e.out
    }

    fn expected() -> DatasetIds {
        DatasetIds {
            sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
            sop_instance_uid: Some("1.2.3.4.5.6.7".into()),
            study_instance_uid: Some("1.2.3.4.100".into()),
            series_instance_uid: Some("1.2.3.4.100.1".into()),
        }
    }

    fn sniff_in_chunks(
        enc: DatasetEncoding,
        data: &[u8],
        chunk: usize,
    ) -> Result<DatasetIds, SniffError> {
        let mut s = HeaderSniffer::new(enc);
        for c in data.chunks(chunk) {
            if s.feed(c)? {
                break;
            }
        }
        s.finish()
    }

    #[test]
    fn every_encoding_in_any_fragmentation() {
        use DatasetEncoding::*;
        for (enc, explicit, big) in [
            (ImplicitVrLittleEndian, false, false),
            (ExplicitVrLittleEndian, true, false),
            (ExplicitVrBigEndian, true, true),
        ] {
            let data = sample_dataset(explicit, big);
            for chunk in [1, 3, 7, 8, 12, 100, 16384, data.len()] {
                assert_eq!(
                    sniff_in_chunks(enc, &data, chunk).unwrap(),
                    expected(),
                    "{enc:?} chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn a_deflate_bomb_is_refused_once_its_header_inflates_past_the_bound() {
        // 80 MB of an uninteresting value before any UID, deflated to about 80 KB.
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut e = Enc::new(true, false);
        e.header(0x0009_1001, b"OB", 80_000_000);
        z.write_all(&e.out).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..77 {
            z.write_all(&zeros).unwrap();
        }
        let bomb = z.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let err = sniff_in_chunks(
            DatasetEncoding::DeflatedExplicitVrLittleEndian,
            &bomb,
            16384,
        )
        .unwrap_err();
        assert!(
            matches!(err, SniffError::Malformed(m) if m.contains("64 MiB")),
            "{err}"
        );
    }

    #[test]
    fn sequences_nested_beyond_the_bound_are_refused() {
        let mut e = Enc::new(true, false);
        for _ in 0..100 {
            e.header(0x0008_1140, b"SQ", UNDEFINED_LENGTH)
                .header(ITEM, b"  ", UNDEFINED_LENGTH);
        }
        let err =
            sniff_in_chunks(DatasetEncoding::ExplicitVrLittleEndian, &e.out, 1000).unwrap_err();
        assert_eq!(err, SniffError::Malformed("sequences nested too deeply"));
    }

    #[test]
    fn deflated_data_set() {
        let plain = sample_dataset(true, false);
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).unwrap();
        let deflated = z.finish().unwrap();
        for chunk in [1, 5, 1000, deflated.len()] {
            assert_eq!(
                sniff_in_chunks(
                    DatasetEncoding::DeflatedExplicitVrLittleEndian,
                    &deflated,
                    chunk
                )
                .unwrap(),
                expected()
            );
        }
    }

    #[test]
    fn stops_before_pixel_data_and_ignores_the_rest() {
        let mut data = sample_dataset(true, false);
        let mut s = HeaderSniffer::new(DatasetEncoding::ExplicitVrLittleEndian);
        let pos = data
            .windows(13)
            .position(|w| w == b"1.2.3.4.100.1")
            .unwrap()
            + 14;
        assert!(
            s.feed(&data[..pos]).unwrap(),
            "done right after Series Instance UID"
        );
        data.truncate(pos);
        assert!(s.feed(b"garbage that is never parsed").unwrap());
        assert_eq!(s.finish().unwrap(), expected());
    }

    #[test]
    fn data_set_ending_after_the_uids_is_complete() {
        let mut e = Enc::new(true, false);
        e.el(0x0008_0018, b"UI", b"1.2")
            .el(0x0020_000D, b"UI", b"1.3")
            .el(0x0020_000E, b"UI", b"1.4");
        let ids = sniff_in_chunks(DatasetEncoding::ExplicitVrLittleEndian, &e.out, 4)
            .unwrap()
            .require()
            .unwrap();
        assert_eq!(ids.series_instance_uid, "1.4");
    }

    #[test]
    fn missing_uids_are_reported() {
        let mut e = Enc::new(true, false);
        e.el(0x0008_0018, b"UI", b"1.2")
            .el(0x0028_0010, b"US", &[0, 2]);
        let ids = sniff_in_chunks(DatasetEncoding::ExplicitVrLittleEndian, &e.out, 64).unwrap();
        assert_eq!(
            ids.require(),
            Err(SniffError::Missing("Study Instance UID (0020,000D)"))
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        // Lower-case VR.
        assert!(
            sniff_in_chunks(
                DatasetEncoding::ExplicitVrLittleEndian,
                &[0x08, 0, 0x18, 0, b'u', b'i', 2, 0, b'1', 0],
                3
            )
            .is_err()
        );
        // Oversized UID.
        let mut e = Enc::new(false, false);
        e.header(0x0008_0018, b"UI", 4000);
        e.out.extend(vec![b'1'; 4000]);
        assert_eq!(
            sniff_in_chunks(DatasetEncoding::ImplicitVrLittleEndian, &e.out, 64),
            Err(SniffError::ValueTooLong("SOP Instance UID (0008,0018)"))
        );
        // Truncated value.
        let mut e = Enc::new(false, false);
        e.header(0x0008_0018, b"UI", 20);
        e.out.extend(b"1.2.3");
        assert!(sniff_in_chunks(DatasetEncoding::ImplicitVrLittleEndian, &e.out, 64).is_err());
        // Not deflate at all.
        assert_eq!(
            sniff_in_chunks(
                DatasetEncoding::DeflatedExplicitVrLittleEndian,
                &[0xFF; 64],
                64
            ),
            Err(SniffError::Inflate)
        );
        // Random bytes never panic.
        let mut x: u32 = 12345;
        for _ in 0..200 {
            let data: Vec<u8> = (0..300)
                .map(|_| {
                    x = x.wrapping_mul(1103515245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            for enc in [
                DatasetEncoding::ImplicitVrLittleEndian,
                DatasetEncoding::ExplicitVrBigEndian,
                DatasetEncoding::DeflatedExplicitVrLittleEndian,
            ] {
                let _ = sniff_in_chunks(enc, &data, 7);
            }
        }
    }
}

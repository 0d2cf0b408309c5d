//! The data sets of Storage Commitment (PS3.4 J.3.2, J.3.3): an N-ACTION's Action Information read
//! from the peer, and an N-EVENT-REPORT's Event Information written for it, in the transfer syntax
//! of the presentation context (implicit or explicit VR little endian: the only two a commitment
//! context is accepted with).
//!
//! Incoming data sets are read with a bounded element walk, like command sets ([`crate::dimse`]):
//! every value is a slice of the bytes received, every length is checked against what is left
//! before anything is taken, and nesting is limited, so a hostile data set costs at most its own
//! size. Outgoing ones are built with dicom-object.

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use thiserror::Error;

use super::{FailureReason, Report, SopReference};
use crate::uid::{trim_uid, validate_uid};

/// Most references one request may name: a large study, with room to spare. Beyond it the request
/// is refused (resource limitation) rather than held.
pub(crate) const MAX_REFERENCES: usize = 20_000;

/// Deepest nesting read: data set, Referenced SOP Sequence, item (and one level of anything an
/// item may carry).
const MAX_DEPTH: usize = 4;

/// Item, Item Delimitation and Sequence Delimitation tags (PS3.5 §7.5).
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_DELIMITATION: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_DELIMITATION: (u16, u16) = (0xFFFE, 0xE0DD);
const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;

/// How a data set's elements are encoded: the two syntaxes a commitment context is accepted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    ImplicitVrLittleEndian,
    ExplicitVrLittleEndian,
}

impl Encoding {
    /// The encoding of a commitment context's transfer syntax (negotiation accepts only these).
    pub(crate) fn of(transfer_syntax: &str) -> Encoding {
        if transfer_syntax == dicom_dictionary_std::uids::IMPLICIT_VR_LITTLE_ENDIAN {
            Encoding::ImplicitVrLittleEndian
        } else {
            Encoding::ExplicitVrLittleEndian
        }
    }
}

/// Why an N-ACTION's Action Information cannot be used: answered 0x0115 (invalid argument value)
/// or, for too many references, 0x0213 (resource limitation).
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum ActionInformationError {
    #[error("Action Information cannot be decoded: {0}")]
    Decode(&'static str),
    #[error("Action Information lacks Transaction UID (0008,1195)")]
    NoTransactionUid,
    #[error("Transaction UID is not a valid UID")]
    InvalidTransactionUid,
    #[error("Action Information lacks Referenced SOP Sequence (0008,1199)")]
    NoReferencedSops,
    #[error("Referenced SOP Sequence item {0} lacks a valid SOP Class or Instance UID")]
    InvalidReference(usize),
    #[error("more than {MAX_REFERENCES} references in one request")]
    TooManyReferences,
}

/// What an N-ACTION-RQ of Action Type 1 asks for (PS3.4 Table J.3-1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ActionInformation {
    pub transaction_uid: String,
    pub references: Vec<SopReference>,
}

/// One element read from the wire: its tag and either its value bytes or its items.
#[derive(Debug)]
struct Element<'a> {
    tag: (u16, u16),
    value: Value<'a>,
}

#[derive(Debug)]
enum Value<'a> {
    Bytes(&'a [u8]),
    Items(Vec<Vec<Element<'a>>>),
}

/// A cursor over bytes being walked.
struct Cursor<'a> {
    bytes: &'a [u8],
    encoding: Encoding,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ActionInformationError> {
        if n > self.bytes.len() {
            return Err(ActionInformationError::Decode(
                "an element announces more bytes than the data set holds",
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, ActionInformationError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ActionInformationError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn tag(&mut self) -> Result<(u16, u16), ActionInformationError> {
        Ok((self.u16()?, self.u16()?))
    }

    /// Elements until the bytes end, or until the `end` delimiter (then consumed).
    fn elements(
        &mut self,
        end: Option<(u16, u16)>,
        depth: usize,
    ) -> Result<Vec<Element<'a>>, ActionInformationError> {
        if depth > MAX_DEPTH {
            return Err(ActionInformationError::Decode(
                "sequences nested too deeply",
            ));
        }
        let mut out = Vec::new();
        loop {
            if self.bytes.is_empty() {
                return match end {
                    None => Ok(out),
                    Some(_) => Err(ActionInformationError::Decode(
                        "an undefined-length item ends without its delimiter",
                    )),
                };
            }
            let tag = self.tag()?;
            if Some(tag) == end {
                self.u32()?; // the delimiter's length, zero
                return Ok(out);
            }
            if tag.0 == 0xFFFE {
                return Err(ActionInformationError::Decode(
                    "an item tag where an element was expected",
                ));
            }
            let (sequence, length) = match self.encoding {
                Encoding::ExplicitVrLittleEndian => {
                    let vr = self.take(2)?;
                    let long = matches!(
                        vr,
                        b"OB"
                            | b"OD"
                            | b"OF"
                            | b"OL"
                            | b"OV"
                            | b"OW"
                            | b"SQ"
                            | b"UC"
                            | b"UN"
                            | b"UR"
                            | b"UT"
                            | b"SV"
                            | b"UV"
                    );
                    let length = if long {
                        self.take(2)?;
                        self.u32()?
                    } else {
                        u32::from(self.u16()?)
                    };
                    // UN of undefined length is a sequence in implicit VR (PS3.5 §6.2.2); read
                    // it as one in this encoding, which is enough to step over it.
                    (
                        vr == b"SQ" || (vr == b"UN" && length == UNDEFINED_LENGTH),
                        length,
                    )
                }
                Encoding::ImplicitVrLittleEndian => {
                    let length = self.u32()?;
                    let known_sequence = tag == pair(tags::REFERENCED_SOP_SEQUENCE)
                        || tag == pair(tags::FAILED_SOP_SEQUENCE);
                    (known_sequence || length == UNDEFINED_LENGTH, length)
                }
            };
            let value = if sequence {
                Value::Items(self.items(length, depth)?)
            } else if length == UNDEFINED_LENGTH {
                return Err(ActionInformationError::Decode(
                    "an undefined length on an element that is not a sequence",
                ));
            } else {
                Value::Bytes(self.take(length as usize)?)
            };
            out.push(Element { tag, value });
        }
    }

    /// The items of a sequence whose value length is `length`.
    fn items(
        &mut self,
        length: u32,
        depth: usize,
    ) -> Result<Vec<Vec<Element<'a>>>, ActionInformationError> {
        let mut items = Vec::new();
        if length == UNDEFINED_LENGTH {
            loop {
                let tag = self.tag()?;
                let item_length = self.u32()?;
                match tag {
                    SEQUENCE_DELIMITATION => return Ok(items),
                    ITEM => items.push(self.item(item_length, depth)?),
                    _ => {
                        return Err(ActionInformationError::Decode(
                            "a sequence holds a non-item",
                        ));
                    }
                }
            }
        }
        let mut inner = Cursor {
            bytes: self.take(length as usize)?,
            encoding: self.encoding,
        };
        while !inner.bytes.is_empty() {
            if inner.tag()? != ITEM {
                return Err(ActionInformationError::Decode(
                    "a sequence holds a non-item",
                ));
            }
            let item_length = inner.u32()?;
            items.push(inner.item(item_length, depth)?);
        }
        Ok(items)
    }

    fn item(
        &mut self,
        length: u32,
        depth: usize,
    ) -> Result<Vec<Element<'a>>, ActionInformationError> {
        if length == UNDEFINED_LENGTH {
            return self.elements(Some(ITEM_DELIMITATION), depth + 1);
        }
        Cursor {
            bytes: self.take(length as usize)?,
            encoding: self.encoding,
        }
        .elements(None, depth + 1)
    }
}

fn pair(tag: Tag) -> (u16, u16) {
    (tag.group(), tag.element())
}

/// A UI value of `elements`, without its padding.
fn uid_of(elements: &[Element<'_>], tag: Tag) -> Option<String> {
    elements
        .iter()
        .find(|e| e.tag == pair(tag))
        .and_then(|e| match e.value {
            Value::Bytes(b) => Some(trim_uid(&String::from_utf8_lossy(b)).to_string()),
            Value::Items(_) => None,
        })
}

fn items_of<'e, 'a>(elements: &'e [Element<'a>], tag: Tag) -> Option<&'e [Vec<Element<'a>>]> {
    elements
        .iter()
        .find(|e| e.tag == pair(tag))
        .and_then(|e| match &e.value {
            Value::Items(items) => Some(items.as_slice()),
            Value::Bytes(_) => None,
        })
}

/// The references of a Referenced (or Failed) SOP Sequence's items, each checked.
fn references(items: &[Vec<Element<'_>>]) -> Result<Vec<SopReference>, ActionInformationError> {
    if items.len() > MAX_REFERENCES {
        return Err(ActionInformationError::TooManyReferences);
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let class = uid_of(item, tags::REFERENCED_SOP_CLASS_UID);
            let instance = uid_of(item, tags::REFERENCED_SOP_INSTANCE_UID);
            match (class, instance) {
                (Some(c), Some(s)) if validate_uid(&c).is_ok() && validate_uid(&s).is_ok() => {
                    Ok(SopReference {
                        sop_class_uid: c,
                        sop_instance_uid: s,
                    })
                }
                _ => Err(ActionInformationError::InvalidReference(i + 1)),
            }
        })
        .collect()
}

impl ActionInformation {
    /// Reads the Action Information of an N-ACTION-RQ: Transaction UID and a non-empty Referenced
    /// SOP Sequence whose every item has valid UIDs. Anything else in it (Storage Media File-Set
    /// ID and UID) is stepped over.
    pub(crate) fn parse(
        bytes: &[u8],
        encoding: Encoding,
    ) -> Result<ActionInformation, ActionInformationError> {
        let elements = Cursor { bytes, encoding }.elements(None, 0)?;
        let transaction_uid = uid_of(&elements, tags::TRANSACTION_UID)
            .filter(|u| !u.is_empty())
            .ok_or(ActionInformationError::NoTransactionUid)?;
        validate_uid(&transaction_uid)
            .map_err(|_| ActionInformationError::InvalidTransactionUid)?;
        let items = items_of(&elements, tags::REFERENCED_SOP_SEQUENCE)
            .filter(|items| !items.is_empty())
            .ok_or(ActionInformationError::NoReferencedSops)?;
        Ok(ActionInformation {
            transaction_uid,
            references: references(items)?,
        })
    }

    /// The Action Information as an SCU sends it (for tests).
    #[cfg(test)]
    pub(crate) fn encode(&self, encoding: Encoding) -> Vec<u8> {
        let obj = InMemDicomObject::from_element_iter([
            ui(tags::TRANSACTION_UID, &self.transaction_uid),
            sequence(
                tags::REFERENCED_SOP_SEQUENCE,
                self.references.iter().map(|r| reference_item(r, None)),
            ),
        ]);
        write(&obj, encoding)
    }
}

fn ui(tag: Tag, uid: &str) -> dicom_object::mem::InMemElement {
    DataElement::new(tag, VR::UI, PrimitiveValue::from(uid))
}

fn reference_item(r: &SopReference, failure: Option<FailureReason>) -> InMemDicomObject {
    let mut elements = vec![
        ui(tags::REFERENCED_SOP_CLASS_UID, &r.sop_class_uid),
        ui(tags::REFERENCED_SOP_INSTANCE_UID, &r.sop_instance_uid),
    ];
    if let Some(reason) = failure {
        elements.push(DataElement::new(
            tags::FAILURE_REASON,
            VR::US,
            PrimitiveValue::from(reason.code()),
        ));
    }
    InMemDicomObject::from_element_iter(elements)
}

fn sequence(
    tag: Tag,
    items: impl Iterator<Item = InMemDicomObject>,
) -> dicom_object::mem::InMemElement {
    DataElement::new(
        tag,
        VR::SQ,
        DataSetSequence::from(items.collect::<Vec<_>>()),
    )
}

fn write(obj: &InMemDicomObject, encoding: Encoding) -> Vec<u8> {
    let ts = match encoding {
        Encoding::ImplicitVrLittleEndian => IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        Encoding::ExplicitVrLittleEndian => EXPLICIT_VR_LITTLE_ENDIAN.erased(),
    };
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts)
        .expect("writing a data set of valid UIDs to memory cannot fail");
    out
}

impl Report {
    /// The Event Information of the N-EVENT-REPORT-RQ (PS3.4 Tables J.3-2 and J.3-3): Transaction
    /// UID; Referenced SOP Sequence with the committed instances (left out when there are none);
    /// for Event Type 2, Failed SOP Sequence with each failure's reason.
    pub(crate) fn encode(&self, encoding: Encoding) -> Vec<u8> {
        let mut elements = vec![ui(tags::TRANSACTION_UID, &self.transaction_uid)];
        if !self.committed.is_empty() {
            elements.push(sequence(
                tags::REFERENCED_SOP_SEQUENCE,
                self.committed.iter().map(|r| reference_item(r, None)),
            ));
        }
        if !self.failed.is_empty() {
            elements.push(sequence(
                tags::FAILED_SOP_SEQUENCE,
                self.failed
                    .iter()
                    .map(|(r, why)| reference_item(r, Some(*why))),
            ));
        }
        write(&InMemDicomObject::from_element_iter(elements), encoding)
    }

    /// Reads an Event Information data set back (for the SCU side of tests).
    #[cfg(test)]
    pub(crate) fn parse(
        bytes: &[u8],
        encoding: Encoding,
    ) -> Result<Report, ActionInformationError> {
        let elements = Cursor { bytes, encoding }.elements(None, 0)?;
        let transaction_uid = uid_of(&elements, tags::TRANSACTION_UID)
            .ok_or(ActionInformationError::NoTransactionUid)?;
        let committed =
            references(items_of(&elements, tags::REFERENCED_SOP_SEQUENCE).unwrap_or(&[]))?;
        let failed_items = items_of(&elements, tags::FAILED_SOP_SEQUENCE).unwrap_or(&[]);
        let failed = references(failed_items)?
            .into_iter()
            .zip(failed_items)
            .map(|(r, item)| {
                let code = item
                    .iter()
                    .find(|e| e.tag == pair(tags::FAILURE_REASON))
                    .and_then(|e| match e.value {
                        Value::Bytes([a, b]) => Some(u16::from_le_bytes([*a, *b])),
                        _ => None,
                    })
                    .unwrap_or(0);
                (r, FailureReason::from_code(code))
            })
            .collect();
        Ok(Report {
            transaction_uid,
            committed,
            failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    fn reference(n: u32) -> SopReference {
        SopReference {
            sop_class_uid: CT.into(),
            sop_instance_uid: format!("1.2.826.0.1.3680043.2.1125.9.{n}"),
        }
    }

    fn action(n: u32) -> ActionInformation {
        ActionInformation {
            transaction_uid: "2.25.1234567890".into(),
            references: (1..=n).map(reference).collect(),
        }
    }

    #[test]
    fn action_information_round_trips_in_both_encodings() {
        for encoding in [
            Encoding::ImplicitVrLittleEndian,
            Encoding::ExplicitVrLittleEndian,
        ] {
            let a = action(3);
            assert_eq!(
                ActionInformation::parse(&a.encode(encoding), encoding),
                Ok(a)
            );
        }
    }

    #[test]
    fn undefined_length_sequences_and_items_are_read() {
        // Explicit VR LE: Transaction UID, then (0008,1199) SQ of undefined length holding one
        // item of undefined length, as DCMTK writes them.
        let mut b = Vec::new();
        let uid = b"2.25.7\0";
        let uid = &uid[..uid.len() - uid.len() % 2];
        b.extend([0x08, 0x00, 0x95, 0x11, b'U', b'I']);
        b.extend((uid.len() as u16).to_le_bytes());
        b.extend(uid);
        b.extend([
            0x08, 0x00, 0x99, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        b.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        for (elem, value) in [(0x1150u16, CT), (0x1155, "1.2.3.4")] {
            let mut v = value.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(0);
            }
            b.extend([0x08, 0x00]);
            b.extend(elem.to_le_bytes());
            b.extend(b"UI");
            b.extend((v.len() as u16).to_le_bytes());
            b.extend(v);
        }
        b.extend([0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        b.extend([0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let a = ActionInformation::parse(&b, Encoding::ExplicitVrLittleEndian).unwrap();
        assert_eq!(a.transaction_uid, "2.25.7");
        assert_eq!(a.references[0].sop_instance_uid, "1.2.3.4");
    }

    #[test]
    fn malformed_action_information_says_what_is_wrong() {
        let e = Encoding::ExplicitVrLittleEndian;
        let mut no_tx = action(1);
        no_tx.transaction_uid = String::new();
        assert_eq!(
            ActionInformation::parse(&no_tx.encode(e), e),
            Err(ActionInformationError::NoTransactionUid)
        );
        let mut bad = action(2);
        bad.references[1].sop_instance_uid = "1.2.x".into();
        assert_eq!(
            ActionInformation::parse(&bad.encode(e), e),
            Err(ActionInformationError::InvalidReference(2))
        );
        let empty = ActionInformation {
            references: vec![],
            ..action(0)
        };
        assert_eq!(
            ActionInformation::parse(&empty.encode(e), e),
            Err(ActionInformationError::NoReferencedSops)
        );
        // An element announcing far more than the data set holds: refused before anything is taken.
        let huge = [
            0x08, 0x00, 0x95, 0x11, b'U', b'T', 0, 0, 0xF0, 0xFF, 0xFF, 0x7F,
        ];
        assert!(matches!(
            ActionInformation::parse(&huge, e),
            Err(ActionInformationError::Decode(_))
        ));
        assert!(ActionInformation::parse(&[1, 2, 3], e).is_err());
        assert_eq!(
            ActionInformation::parse(&action(MAX_REFERENCES as u32 + 1).encode(e), e),
            Err(ActionInformationError::TooManyReferences)
        );
    }

    #[test]
    fn nesting_is_bounded() {
        // Sequences of undefined length nested in items, far deeper than allowed.
        let mut b = Vec::new();
        for _ in 0..64 {
            b.extend([
                0x08, 0x00, 0x99, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            ]);
            b.extend([0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert_eq!(
            ActionInformation::parse(&b, Encoding::ExplicitVrLittleEndian),
            Err(ActionInformationError::Decode(
                "sequences nested too deeply"
            ))
        );
    }

    #[test]
    fn a_report_lists_committed_and_failed_instances_with_reasons() {
        let report = Report {
            transaction_uid: "2.25.42".into(),
            committed: vec![reference(1), reference(2)],
            failed: vec![
                (reference(3), FailureReason::NoSuchObjectInstance),
                (reference(4), FailureReason::ClassInstanceConflict),
            ],
        };
        assert_eq!(report.event_type_id(), 2);
        for encoding in [
            Encoding::ImplicitVrLittleEndian,
            Encoding::ExplicitVrLittleEndian,
        ] {
            let bytes = report.encode(encoding);
            assert_eq!(Report::parse(&bytes, encoding).unwrap(), report);
            // And dicom-object reads the same thing.
            let ts = match encoding {
                Encoding::ImplicitVrLittleEndian => IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                Encoding::ExplicitVrLittleEndian => EXPLICIT_VR_LITTLE_ENDIAN.erased(),
            };
            let obj = InMemDicomObject::read_dataset_with_ts(&bytes[..], &ts).unwrap();
            let failed = obj.element(tags::FAILED_SOP_SEQUENCE).unwrap();
            let items = failed.items().unwrap();
            assert_eq!(
                items[0]
                    .element(tags::FAILURE_REASON)
                    .unwrap()
                    .to_int::<u16>()
                    .unwrap(),
                0x0112
            );
        }
        let all_good = Report {
            failed: vec![],
            ..report
        };
        assert_eq!(all_good.event_type_id(), 1);
        let bytes = all_good.encode(Encoding::ExplicitVrLittleEndian);
        let obj =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &EXPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
        assert!(obj.element(tags::FAILED_SOP_SEQUENCE).is_err());
    }
}

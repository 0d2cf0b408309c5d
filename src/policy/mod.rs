//! What the gateway accepts during association negotiation: SOP classes and transfer syntaxes.
//!
//! The defaults follow the product promise: every storage SOP class the standard dictionary knows
//! (plus Verification for C-ECHO and the Storage Commitment Push Model), and every transfer syntax
//! the standard defines, compressed ones included. Bytes are stored exactly as received, so accepting a syntax never costs a transcode.
//! The `healthimaging` preset ([`transfer_syntax_preset`]) narrows the transfer syntaxes to those
//! HealthImaging imports.

pub(crate) mod healthimaging;
mod uid_tables;

use std::collections::HashSet;

pub(crate) use healthimaging::transfer_syntax_preset;
pub(crate) use uid_tables::{STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES};

// Explicit VR Big Endian is retired (PS3.5 §A.3), hence deprecated in the dictionary, but older
// equipment still sends it and its data sets must still be read.
#[allow(deprecated)]
use dicom_dictionary_std::uids::EXPLICIT_VR_BIG_ENDIAN;
use dicom_dictionary_std::uids::{
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
    JPIP_REFERENCED_DEFLATE, STORAGE_COMMITMENT_PUSH_MODEL, VERIFICATION,
};

/// How the data set of a transfer syntax is encoded, which is all the header sniffer needs to know.
/// Every syntax other than the three uncompressed natives and the deflated ones encodes its data set
/// in explicit VR little endian (encapsulated pixel data sits at the end, after what we read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetEncoding {
    ImplicitVrLittleEndian,
    ExplicitVrLittleEndian,
    ExplicitVrBigEndian,
    /// Explicit VR little endian, compressed with raw deflate (RFC 1951).
    DeflatedExplicitVrLittleEndian,
}

impl DatasetEncoding {
    #[allow(deprecated)] // EXPLICIT_VR_BIG_ENDIAN: see its import
    pub(crate) fn of_transfer_syntax(ts: &str) -> Self {
        match ts {
            IMPLICIT_VR_LITTLE_ENDIAN => Self::ImplicitVrLittleEndian,
            EXPLICIT_VR_BIG_ENDIAN => Self::ExplicitVrBigEndian,
            DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN | JPIP_REFERENCED_DEFLATE => {
                Self::DeflatedExplicitVrLittleEndian
            }
            _ => Self::ExplicitVrLittleEndian,
        }
    }
}

/// The abstract syntaxes (SOP classes) and transfer syntaxes this gateway accepts in a
/// presentation context; the rest of what negotiation checks is in `AcceptancePolicy`.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxPolicy {
    sop_classes: HashSet<String>,
    transfer_syntaxes: HashSet<String>,
}

impl SyntaxPolicy {
    /// All storage SOP classes, Verification and Storage Commitment; all standard transfer syntaxes.
    #[cfg(test)]
    pub(crate) fn standard() -> Self {
        Self::new(None, None)
    }

    /// `None` means the standard default for that list.
    pub(crate) fn new(
        sop_classes: Option<&[String]>,
        transfer_syntaxes: Option<&[String]>,
    ) -> Self {
        let sop_classes = match sop_classes {
            Some(list) => list.iter().cloned().collect(),
            None => STORAGE_SOP_CLASSES
                .iter()
                .map(|(uid, _)| uid.to_string())
                .chain([
                    VERIFICATION.to_string(),
                    STORAGE_COMMITMENT_PUSH_MODEL.to_string(),
                ])
                .collect(),
        };
        let transfer_syntaxes = match transfer_syntaxes {
            Some(list) => list.iter().cloned().collect(),
            None => TRANSFER_SYNTAXES
                .iter()
                .map(|(uid, _)| uid.to_string())
                .collect(),
        };
        SyntaxPolicy {
            sop_classes,
            transfer_syntaxes,
        }
    }

    /// How many SOP classes are accepted (for the start-up log line).
    pub(crate) fn sop_class_count(&self) -> usize {
        self.sop_classes.len()
    }

    pub(crate) fn accepts_sop_class(&self, uid: &str) -> bool {
        self.sop_classes.contains(uid)
    }

    pub(crate) fn accepts_transfer_syntax(&self, uid: &str) -> bool {
        self.transfer_syntaxes.contains(uid)
    }

    /// The first of the proposed transfer syntaxes we accept, in the requestor's order of preference.
    pub(crate) fn choose_transfer_syntax<'a>(&self, proposed: &'a [String]) -> Option<&'a str> {
        proposed
            .iter()
            .map(|ts| crate::uid::trim_uid(ts))
            .find(|ts| self.accepts_transfer_syntax(ts))
    }

    /// The transfer syntax of a context for `abstract_syntax`. Storage Commitment's data sets are
    /// the gateway's own to read and write: its contexts take implicit or explicit VR little
    /// endian, whatever `--transfer-syntax-allow` says (that list is about the instances stored).
    pub(crate) fn choose_transfer_syntax_for<'a>(
        &self,
        abstract_syntax: &str,
        proposed: &'a [String],
    ) -> Option<&'a str> {
        if abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL {
            return proposed
                .iter()
                .map(|ts| crate::uid::trim_uid(ts))
                .find(|ts| [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN].contains(ts));
        }
        self.choose_transfer_syntax(proposed)
    }
}

/// A human-readable name for a SOP class or transfer syntax UID, for logs and `--help`.
pub(crate) fn uid_name(uid: &str) -> Option<&'static str> {
    STORAGE_SOP_CLASSES
        .iter()
        .chain(TRANSFER_SYNTAXES.iter())
        .find(|(u, _)| *u == uid)
        .map(|(_, name)| *name)
        .or((uid == VERIFICATION).then_some("Verification SOP Class"))
        .or((uid == STORAGE_COMMITMENT_PUSH_MODEL)
            .then_some("Storage Commitment Push Model SOP Class"))
}

#[cfg(test)]
#[allow(deprecated)] // EXPLICIT_VR_BIG_ENDIAN: see its import
mod tests {
    use super::*;
    use dicom_core::dictionary::{UidDictionary, UidDictionaryEntry};
    use dicom_dictionary_std::StandardSopClassDictionary;

    #[test]
    fn generated_tables_agree_with_the_standard_dictionary() {
        assert!(STORAGE_SOP_CLASSES.len() > 150);
        for (uid, name) in STORAGE_SOP_CLASSES {
            let entry = StandardSopClassDictionary
                .by_uid(uid)
                .expect("known SOP class");
            assert_eq!(entry.name(), *name);
            assert!(crate::uid::validate_uid(uid).is_ok());
        }
        for (uid, _) in TRANSFER_SYNTAXES {
            assert!(crate::uid::validate_uid(uid).is_ok());
        }
    }

    #[test]
    fn standard_policy_accepts_storage_verification_and_storage_commitment_only() {
        let p = SyntaxPolicy::standard();
        assert!(p.accepts_sop_class("1.2.840.10008.5.1.4.1.1.2")); // CT Image Storage
        assert!(p.accepts_sop_class(VERIFICATION));
        assert!(!p.accepts_sop_class("1.2.840.10008.5.1.4.1.2.1.1")); // Patient Root Q/R FIND
        assert!(p.accepts_sop_class(STORAGE_COMMITMENT_PUSH_MODEL));
        // An explicit list is the whole list: Storage Commitment only if named.
        let listed = SyntaxPolicy::new(Some(&["1.2.840.10008.5.1.4.1.1.2".to_string()]), None);
        assert!(!listed.accepts_sop_class(STORAGE_COMMITMENT_PUSH_MODEL));
        for ts in [
            IMPLICIT_VR_LITTLE_ENDIAN,
            EXPLICIT_VR_LITTLE_ENDIAN,
            EXPLICIT_VR_BIG_ENDIAN,
            DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.201",
        ] {
            assert!(p.accepts_transfer_syntax(ts), "{ts}");
        }
        assert!(!p.accepts_transfer_syntax("1.2.3.4"));
    }

    #[test]
    fn chooses_first_acceptable_in_requestor_order() {
        let p = SyntaxPolicy::new(
            None,
            Some(&[
                IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
                EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
            ]),
        );
        let proposed = vec![
            "1.2.840.10008.1.2.4.50".to_string(),
            format!("{EXPLICIT_VR_LITTLE_ENDIAN}\0"),
            IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
        ];
        assert_eq!(
            p.choose_transfer_syntax(&proposed),
            Some(EXPLICIT_VR_LITTLE_ENDIAN)
        );
        assert_eq!(
            p.choose_transfer_syntax(&["1.2.840.10008.1.2.4.50".to_string()]),
            None
        );
    }

    #[test]
    fn storage_commitment_contexts_take_little_endian_whatever_the_allow_list() {
        let jpeg_only = SyntaxPolicy::new(None, Some(&["1.2.840.10008.1.2.4.50".to_string()]));
        let proposed = vec![
            "1.2.840.10008.1.2.4.50".to_string(),
            IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
        ];
        assert_eq!(
            jpeg_only.choose_transfer_syntax_for(STORAGE_COMMITMENT_PUSH_MODEL, &proposed),
            Some(IMPLICIT_VR_LITTLE_ENDIAN)
        );
        assert_eq!(
            jpeg_only.choose_transfer_syntax_for("1.2.840.10008.5.1.4.1.1.2", &proposed),
            Some("1.2.840.10008.1.2.4.50")
        );
        assert_eq!(
            jpeg_only.choose_transfer_syntax_for(
                STORAGE_COMMITMENT_PUSH_MODEL,
                &["1.2.840.10008.1.2.4.50".to_string()]
            ),
            None
        );
    }

    #[test]
    fn dataset_encoding_follows_transfer_syntax() {
        use DatasetEncoding::*;
        assert_eq!(
            DatasetEncoding::of_transfer_syntax(IMPLICIT_VR_LITTLE_ENDIAN),
            ImplicitVrLittleEndian
        );
        assert_eq!(
            DatasetEncoding::of_transfer_syntax(EXPLICIT_VR_BIG_ENDIAN),
            ExplicitVrBigEndian
        );
        assert_eq!(
            DatasetEncoding::of_transfer_syntax(DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN),
            DeflatedExplicitVrLittleEndian
        );
        assert_eq!(
            DatasetEncoding::of_transfer_syntax("1.2.840.10008.1.2.4.50"),
            ExplicitVrLittleEndian
        );
    }
}

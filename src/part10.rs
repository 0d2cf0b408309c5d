//! The DICOM Part-10 file header: 128-byte preamble, "DICM", and the file meta information group.
//!
//! The data set that follows is written byte for byte as it came off the wire, so the header is the
//! only part of a stored object the gateway composes. It is built with dicom-object's
//! `FileMetaTableBuilder`, which computes the group length.

use dicom_object::meta::FileMetaTableBuilder;

/// Our Implementation Class UID (0002,0012), a UUID-derived UID (PS3.5 §B.2) fixed for this product.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.136401843381072026152765997567505998082";
/// Implementation Version Name (0002,0013): at most 16 characters.
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("DICOMGW_", env!("CARGO_PKG_VERSION"));

/// What goes into the file meta group of one stored instance.
#[derive(Debug, Clone)]
pub struct FileMeta<'a> {
    pub sop_class_uid: &'a str,
    pub sop_instance_uid: &'a str,
    pub transfer_syntax_uid: &'a str,
    /// The calling AE title of the association that sent the instance.
    pub source_ae_title: &'a str,
}

impl FileMeta<'_> {
    /// Preamble + "DICM" + file meta group, ready to be followed by the data set bytes.
    pub fn encode(&self) -> Result<Vec<u8>, dicom_object::meta::Error> {
        let mut builder = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(self.sop_class_uid)
            .media_storage_sop_instance_uid(self.sop_instance_uid)
            .transfer_syntax(self.transfer_syntax_uid)
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
        if !self.source_ae_title.trim().is_empty() {
            builder = builder.source_application_entity_title(self.source_ae_title.trim());
        }
        let table = builder.build()?;
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        table.write(&mut out)?;
        Ok(out)
    }
}

/// Splits a Part-10 file into (file meta table, offset where the data set starts). For tests and
/// tools that compare stored objects with what was sent.
pub fn split_part10(bytes: &[u8]) -> Option<(dicom_object::meta::FileMetaTable, usize)> {
    if bytes.len() < 132 + 12 || &bytes[128..132] != b"DICM" {
        return None;
    }
    // (0002,0000) UL 4 <group length>
    let group_len = u32::from_le_bytes(bytes[140..144].try_into().ok()?) as usize;
    let end = 144 + group_len;
    let meta = dicom_object::meta::FileMetaTable::from_reader(&bytes[128..end]).ok()?;
    Some((meta, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_readable_meta_group() {
        let meta = FileMeta {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid: "1.2.3.4.5",
            transfer_syntax_uid: "1.2.840.10008.1.2",
            source_ae_title: "MODALITY1 ",
        };
        let mut bytes = meta.encode().unwrap();
        assert!(bytes[..128].iter().all(|b| *b == 0));
        assert_eq!(&bytes[128..132], b"DICM");
        bytes.extend_from_slice(&[0x08, 0x00, 0x16, 0x00]); // start of a data set
        let (table, offset) = split_part10(&bytes).unwrap();
        assert_eq!(offset, bytes.len() - 4);
        assert_eq!(
            table.media_storage_sop_class_uid(),
            "1.2.840.10008.5.1.4.1.1.2"
        );
        assert_eq!(table.media_storage_sop_instance_uid(), "1.2.3.4.5");
        assert_eq!(table.transfer_syntax(), "1.2.840.10008.1.2");
        assert_eq!(table.implementation_class_uid(), IMPLEMENTATION_CLASS_UID);
        assert_eq!(
            table.implementation_version_name(),
            Some(IMPLEMENTATION_VERSION_NAME)
        );
        assert_eq!(table.source_application_entity_title(), Some("MODALITY1"));
        assert!(IMPLEMENTATION_VERSION_NAME.len() <= 16);
    }
}

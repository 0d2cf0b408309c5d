//! DIMSE command sets (PS3.7 §9, §E): parsing requests and building responses.
//!
//! Command sets are always implicit VR little endian and small, so they are parsed whole with
//! dicom-object; only data sets are streamed.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use thiserror::Error;

use crate::uid::trim_uid;

/// Command Field (0000,0100) values used here.
pub mod command_field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    /// Bit set in the command field of every response.
    pub const RESPONSE_BIT: u16 = 0x8000;
}

/// Status (0000,0900) values the gateway sends (PS3.4 Annex B, PS3.7 Annex C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Refused: not authorized.
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    /// Failure: duplicate SOP instance (PS3.7 Annex C), for `--duplicate-policy reject`.
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    /// Unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Refused: out of resources (the store could not make the object durable).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class (command and data set UIDs disagree).
    pub const DATASET_DOES_NOT_MATCH: u16 = 0xA900;
    /// Error: cannot understand (unparseable header, invalid UIDs).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// Command Data Set Type (0000,0800) value meaning "no data set follows".
const NO_DATASET: u16 = 0x0101;

#[derive(Debug, Error)]
pub enum CommandError {
    #[error("command set cannot be decoded: {0}")]
    Decode(String),
    #[error("command set lacks {0}")]
    Missing(&'static str),
}

/// The fields of a request command set the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class_uid: Option<String>,
    pub affected_sop_instance_uid: Option<String>,
    pub has_dataset: bool,
}

impl Command {
    pub fn parse(bytes: &[u8]) -> Result<Command, CommandError> {
        let obj =
            InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .map_err(|e| CommandError::Decode(e.to_string()))?;
        let u16_of = |tag: Tag, name: &'static str| -> Result<u16, CommandError> {
            obj.element_opt(tag)
                .ok()
                .flatten()
                .ok_or(CommandError::Missing(name))?
                .to_int::<u16>()
                .map_err(|_| CommandError::Decode(format!("{name} is not an unsigned short")))
        };
        let uid_of = |tag: Tag| -> Option<String> {
            let el = obj.element_opt(tag).ok().flatten()?;
            el.to_str().ok().map(|s| trim_uid(&s).to_string())
        };
        let command_field = u16_of(tags::COMMAND_FIELD, "Command Field (0000,0100)")?;
        // A C-CANCEL carries Message ID Being Responded To instead of Message ID.
        let message_id = u16_of(tags::MESSAGE_ID, "Message ID (0000,0110)").or_else(|_| {
            u16_of(
                tags::MESSAGE_ID_BEING_RESPONDED_TO,
                "Message ID (0000,0110)",
            )
        })?;
        let data_set_type = u16_of(
            tags::COMMAND_DATA_SET_TYPE,
            "Command Data Set Type (0000,0800)",
        )?;
        Ok(Command {
            command_field,
            message_id,
            affected_sop_class_uid: uid_of(tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance_uid: uid_of(tags::AFFECTED_SOP_INSTANCE_UID),
            has_dataset: data_set_type != NO_DATASET,
        })
    }
}

/// Encodes a response command set for `request` with `status`; `comment` goes into Error Comment
/// (0000,0902) for failures so the sender's log says why (never patient data, at most 64 chars).
pub fn response(request: &Command, status: u16, comment: Option<&str>) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(request.command_field | command_field::RESPONSE_BIT),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(request.message_id),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(NO_DATASET),
        ),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
    ];
    if let Some(uid) = &request.affected_sop_class_uid {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
    }
    if let Some(uid) = &request.affected_sop_instance_uid {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
    }
    if let (Some(comment), true) = (comment, status != status::SUCCESS) {
        let comment: String = comment
            .chars()
            .filter(|c| c.is_ascii() && *c != '\\')
            .take(64)
            .collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(comment),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::with_capacity(256);
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("writing a command set to memory cannot fail");
    out
}

/// A request command set, as a sender would build it. Used by the `echo` client and by tests.
pub fn request(
    command_field: u16,
    message_id: u16,
    sop_class: &str,
    sop_instance: Option<&str>,
    has_dataset: bool,
) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(command_field),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(if has_dataset { 0x0000 } else { NO_DATASET }),
        ),
    ];
    if command_field == command_field::C_STORE_RQ {
        elements.push(DataElement::new(
            tags::PRIORITY,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
    }
    if let Some(uid) = sop_instance {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid),
        ));
    }
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("writing a command set to memory cannot fail");
    out
}

/// Reads Status (0000,0900) from a response command set.
pub fn response_status(bytes: &[u8]) -> Result<u16, CommandError> {
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| CommandError::Decode(e.to_string()))?;
    obj.element_opt(tags::STATUS)
        .ok()
        .flatten()
        .ok_or(CommandError::Missing("Status (0000,0900)"))?
        .to_int::<u16>()
        .map_err(|_| CommandError::Decode("Status is not an unsigned short".into()))
}

/// A short description of a status for logs.
pub fn describe_status(code: u16) -> &'static str {
    match code {
        status::SUCCESS => "Success",
        status::SOP_CLASS_NOT_SUPPORTED => "Refused: SOP class not supported",
        status::NOT_AUTHORIZED => "Refused: not authorized",
        status::UNRECOGNIZED_OPERATION => "Unrecognized operation",
        status::DUPLICATE_SOP_INSTANCE => "Failure: duplicate SOP instance",
        status::OUT_OF_RESOURCES => "Refused: out of resources",
        status::DATASET_DOES_NOT_MATCH => "Error: data set does not match SOP class",
        status::CANNOT_UNDERSTAND => "Error: cannot understand",
        0xB000..=0xBFFF => "Warning",
        _ => "Failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    #[test]
    fn parses_a_c_store_request() {
        let bytes = request(command_field::C_STORE_RQ, 7, CT, Some("1.2.3.4"), true);
        let cmd = Command::parse(&bytes).unwrap();
        assert_eq!(cmd.command_field, command_field::C_STORE_RQ);
        assert_eq!(cmd.message_id, 7);
        assert_eq!(cmd.affected_sop_class_uid.as_deref(), Some(CT));
        assert_eq!(cmd.affected_sop_instance_uid.as_deref(), Some("1.2.3.4"));
        assert!(cmd.has_dataset);
    }

    #[test]
    fn parses_a_c_echo_request() {
        let cmd = Command::parse(&request(
            command_field::C_ECHO_RQ,
            1,
            crate::policy::VERIFICATION,
            None,
            false,
        ))
        .unwrap();
        assert_eq!(cmd.command_field, command_field::C_ECHO_RQ);
        assert!(!cmd.has_dataset);
        assert_eq!(cmd.affected_sop_instance_uid, None);
    }

    #[test]
    fn rejects_garbage_and_incomplete_commands() {
        assert!(Command::parse(&[0xde, 0xad, 0xbe, 0xef, 0x01]).is_err());
        // A command set with a group length only.
        let obj = InMemDicomObject::command_from_element_iter([DataElement::new(
            tags::MESSAGE_ID,
            VR::US,
            PrimitiveValue::from(1u16),
        )]);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        assert!(matches!(
            Command::parse(&out),
            Err(CommandError::Missing(_))
        ));
    }

    #[test]
    fn builds_responses_with_status_and_comment() {
        let cmd = Command::parse(&request(
            command_field::C_STORE_RQ,
            9,
            CT,
            Some("1.2.3"),
            true,
        ))
        .unwrap();
        let ok = response(&cmd, status::SUCCESS, Some("ignored"));
        assert_eq!(response_status(&ok).unwrap(), 0);
        let rsp = Command::parse(&ok).unwrap();
        assert_eq!(rsp.command_field, command_field::C_STORE_RSP);
        assert!(!rsp.has_dataset);
        let failed = response(
            &cmd,
            status::OUT_OF_RESOURCES,
            Some("object store unavailable"),
        );
        assert_eq!(response_status(&failed).unwrap(), 0xA700);
        let obj = InMemDicomObject::read_dataset_with_ts(
            &failed[..],
            &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        assert_eq!(
            obj.element(tags::ERROR_COMMENT)
                .unwrap()
                .to_str()
                .unwrap()
                .trim(),
            "object store unavailable"
        );
        assert_eq!(
            obj.element(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            9
        );
    }

    #[test]
    fn status_descriptions() {
        assert_eq!(describe_status(0xA700), "Refused: out of resources");
        assert_eq!(describe_status(0xC000), "Error: cannot understand");
        assert_eq!(
            describe_status(0xA900),
            "Error: data set does not match SOP class"
        );
    }
}

//! DIMSE command sets (PS3.7 §9, §E): parsing requests and building responses.
//!
//! Command sets are always implicit VR little endian and small. Incoming ones are parsed by a
//! bounded element walk (see [`Command::parse`]); responses are built with dicom-object. Only data
//! sets are streamed.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use thiserror::Error;

use crate::uid::trim_uid;

/// Command Field (0000,0100) values used here.
pub mod command_field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub(crate) const C_ECHO_RQ: u16 = 0x0030;
    pub(crate) const C_CANCEL_RQ: u16 = 0x0FFF;
    /// N-EVENT-REPORT-RQ: how a Storage Commitment result is reported (PS3.7 §10.3.1).
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    /// N-ACTION-RQ: how a Storage Commitment request arrives (PS3.7 §10.3.4).
    pub const N_ACTION_RQ: u16 = 0x0130;
    /// Bit set in the command field of every response.
    pub(crate) const RESPONSE_BIT: u16 = 0x8000;
}

/// A DIMSE status (0000,0900): what every response carries, and what logs and metrics show.
///
/// The named values are the ones the gateway sends (PS3.4 Annex B, PS3.7 Annex C); a peer's answer
/// (in `dicom-gateway echo`) may be any code. It prints as `0xA700`, the form senders' logs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

impl Status {
    /// Success.
    pub const SUCCESS: Status = Status(0x0000);
    /// Failure: processing failure (PS3.7 Annex C).
    pub const PROCESSING_FAILURE: Status = Status(0x0110);
    /// Failure: duplicate SOP instance (PS3.7 Annex C), for `--duplicate-policy reject`.
    pub const DUPLICATE_SOP_INSTANCE: Status = Status(0x0111);
    /// Failure: no such SOP instance.
    pub const NO_SUCH_SOP_INSTANCE: Status = Status(0x0112);
    /// Failure: invalid argument value (an N-ACTION's Action Information is malformed).
    pub const INVALID_ARGUMENT_VALUE: Status = Status(0x0115);
    /// Failure: invalid SOP instance (a UID that breaks the UID rules).
    pub const INVALID_OBJECT_INSTANCE: Status = Status(0x0117);
    /// Failure: no such SOP class.
    pub const NO_SUCH_SOP_CLASS: Status = Status(0x0118);
    /// Failure: no such action (an N-ACTION's Action Type ID).
    pub const NO_SUCH_ACTION: Status = Status(0x0123);
    /// Refused: not authorized.
    pub const NOT_AUTHORIZED: Status = Status(0x0124);
    /// Failure: resource limitation.
    pub const RESOURCE_LIMITATION: Status = Status(0x0213);
    /// Unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: Status = Status(0x0211);
    /// Refused: out of resources (the store could not make the object durable).
    pub const OUT_OF_RESOURCES: Status = Status(0xA700);
    /// Error: data set does not match SOP class (command and data set UIDs disagree).
    pub const DATASET_DOES_NOT_MATCH: Status = Status(0xA900);
    /// Error: cannot understand (unparseable header, invalid UIDs).
    pub const CANNOT_UNDERSTAND: Status = Status(0xC000);

    pub fn is_success(self) -> bool {
        self == Status::SUCCESS
    }

    /// A Warning status of a DIMSE-N response (PS3.7 Annex C: 0001, 0107, 0116, Bxxx): the
    /// request was carried out.
    pub fn is_warning(self) -> bool {
        matches!(self.0, 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF)
    }

    /// A short description for logs and error messages.
    pub fn description(self) -> &'static str {
        match self {
            Status::SUCCESS => "Success",
            Status::UNRECOGNIZED_OPERATION => "Unrecognized operation",
            Status::PROCESSING_FAILURE => "Failure: processing failure",
            Status::DUPLICATE_SOP_INSTANCE => "Failure: duplicate SOP instance",
            Status::NO_SUCH_SOP_INSTANCE => "Failure: no such SOP instance",
            Status::INVALID_ARGUMENT_VALUE => "Failure: invalid argument value",
            Status::INVALID_OBJECT_INSTANCE => "Failure: invalid SOP instance",
            Status::NO_SUCH_SOP_CLASS => "Failure: no such SOP class",
            Status::NO_SUCH_ACTION => "Failure: no such action",
            Status::RESOURCE_LIMITATION => "Failure: resource limitation",
            Status::OUT_OF_RESOURCES => "Refused: out of resources",
            Status::DATASET_DOES_NOT_MATCH => "Error: data set does not match SOP class",
            Status::CANNOT_UNDERSTAND => "Error: cannot understand",
            Status(0x0122) => "Refused: SOP class not supported",
            Status::NOT_AUTHORIZED => "Refused: not authorized",
            Status(0xB000..=0xBFFF) => "Warning",
            _ => "Failure",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#06X}", self.0)
    }
}

/// Command Data Set Type (0000,0800) value meaning "no data set follows" (PS3.7 §E.2).
const NO_DATASET: u16 = 0x0101;
/// Command Data Set Type value a sender uses when a data set follows (any value but 0x0101 means so).
const DATASET_PRESENT: u16 = 0x0000;

/// Why a command set could not be parsed (the association is then aborted).
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
    /// Requested SOP Class UID (0000,0003): what an N-ACTION acts on.
    pub requested_sop_class_uid: Option<String>,
    /// Requested SOP Instance UID (0000,1001).
    pub requested_sop_instance_uid: Option<String>,
    /// Action Type ID (0000,1008) of an N-ACTION.
    pub action_type_id: Option<u16>,
    /// Status (0000,0900), in a response.
    pub status: Option<Status>,
    pub has_dataset: bool,
}

/// The elements of an implicit VR little endian command set, as (element number, value) pairs.
/// Every tag must be in the command group (0000,xxxx) (PS3.7 §6.3) and every value must fit in the
/// bytes received, so nothing is ever allocated beyond the command set itself. Command sets come
/// from the network and are parsed here rather than with a general data set decoder: fuzzing
/// (fuzz/command) made dicom-object allocate gigabytes for a few bytes announcing a large element
/// or holding item tags.
fn command_elements(mut bytes: &[u8]) -> Result<Vec<(u16, &[u8])>, CommandError> {
    let mut elements = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 8 {
            return Err(CommandError::Decode(
                "command set ends inside an element header".into(),
            ));
        }
        if bytes[0] != 0 || bytes[1] != 0 {
            return Err(CommandError::Decode(
                "command set holds an element outside group 0000".into(),
            ));
        }
        let element = u16::from_le_bytes([bytes[2], bytes[3]]);
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        if len > bytes.len() - 8 {
            return Err(CommandError::Decode(format!(
                "element announces {len} bytes, more than the command set holds"
            )));
        }
        elements.push((element, &bytes[8..8 + len]));
        bytes = &bytes[8 + len..];
    }
    Ok(elements)
}

/// An US (unsigned short) value of a command element.
fn us_of(elements: &[(u16, &[u8])], tag: Tag, name: &'static str) -> Result<u16, CommandError> {
    match elements.iter().find(|(e, _)| *e == tag.element()) {
        None => Err(CommandError::Missing(name)),
        Some((_, v)) if v.len() == 2 => Ok(u16::from_le_bytes([v[0], v[1]])),
        Some(_) => Err(CommandError::Decode(format!(
            "{name} is not an unsigned short"
        ))),
    }
}

/// A UI value of a command element, without its padding.
fn ui_of(elements: &[(u16, &[u8])], tag: Tag) -> Option<String> {
    elements
        .iter()
        .find(|(e, _)| *e == tag.element())
        .map(|(_, v)| trim_uid(&String::from_utf8_lossy(v)).to_string())
}

impl Command {
    pub fn parse(bytes: &[u8]) -> Result<Command, CommandError> {
        let elements = command_elements(bytes)?;
        let command_field = us_of(&elements, tags::COMMAND_FIELD, "Command Field (0000,0100)")?;
        // A C-CANCEL carries Message ID Being Responded To instead of Message ID.
        let message_id =
            us_of(&elements, tags::MESSAGE_ID, "Message ID (0000,0110)").or_else(|_| {
                us_of(
                    &elements,
                    tags::MESSAGE_ID_BEING_RESPONDED_TO,
                    "Message ID (0000,0110)",
                )
            })?;
        let data_set_type = us_of(
            &elements,
            tags::COMMAND_DATA_SET_TYPE,
            "Command Data Set Type (0000,0800)",
        )?;
        Ok(Command {
            command_field,
            message_id,
            affected_sop_class_uid: ui_of(&elements, tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance_uid: ui_of(&elements, tags::AFFECTED_SOP_INSTANCE_UID),
            requested_sop_class_uid: ui_of(&elements, tags::REQUESTED_SOP_CLASS_UID),
            requested_sop_instance_uid: ui_of(&elements, tags::REQUESTED_SOP_INSTANCE_UID),
            action_type_id: us_of(
                &elements,
                tags::ACTION_TYPE_ID,
                "Action Type ID (0000,1008)",
            )
            .ok(),
            status: us_of(&elements, tags::STATUS, "Status (0000,0900)")
                .ok()
                .map(Status),
            has_dataset: data_set_type != NO_DATASET,
        })
    }
}

/// Encodes a response command set for `request` with `status`; `comment` goes into Error Comment
/// (0000,0902) for failures so the sender's log says why (never patient data, at most 64 chars).
pub fn response(request: &Command, status: Status, comment: Option<&str>) -> Vec<u8> {
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
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status.0)),
    ];
    // The request's UIDs are echoed only when they are UIDs: they come from the peer, and anything
    // else (found by fuzzing: a non-ASCII byte) cannot be encoded as UI.
    let valid = |uid: &&String| crate::uid::validate_uid(uid).is_ok();
    // An N-ACTION names its object in the Requested SOP Class/Instance UIDs; its response carries
    // them as the Affected ones, with the Action Type ID (PS3.7 §10.3.4).
    let sop_class = request
        .affected_sop_class_uid
        .as_ref()
        .or(request.requested_sop_class_uid.as_ref());
    let sop_instance = request
        .affected_sop_instance_uid
        .as_ref()
        .or(request.requested_sop_instance_uid.as_ref());
    if let Some(uid) = sop_class.filter(valid) {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
    }
    if let Some(uid) = sop_instance.filter(valid) {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
    }
    if let (command_field::N_ACTION_RQ, Some(action)) =
        (request.command_field, request.action_type_id)
    {
        elements.push(DataElement::new(
            tags::ACTION_TYPE_ID,
            VR::US,
            PrimitiveValue::from(action),
        ));
    }
    if let (Some(comment), false) = (comment, status.is_success()) {
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
            PrimitiveValue::from(if has_dataset {
                DATASET_PRESENT
            } else {
                NO_DATASET
            }),
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

/// An N-ACTION-RQ command set (a data set follows), as a Storage Commitment SCU sends it. Used by
/// tests; the gateway only answers N-ACTIONs.
pub fn n_action_request(
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    action_type_id: u16,
) -> Vec<u8> {
    normalized_request(
        command_field::N_ACTION_RQ,
        message_id,
        (tags::REQUESTED_SOP_CLASS_UID, sop_class),
        (tags::REQUESTED_SOP_INSTANCE_UID, sop_instance),
        (tags::ACTION_TYPE_ID, action_type_id),
    )
}

/// An N-EVENT-REPORT-RQ command set (a data set follows): how the gateway reports a Storage
/// Commitment result (PS3.7 §10.3.1).
pub fn n_event_report_request(
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    event_type_id: u16,
) -> Vec<u8> {
    normalized_request(
        command_field::N_EVENT_REPORT_RQ,
        message_id,
        (tags::AFFECTED_SOP_CLASS_UID, sop_class),
        (tags::AFFECTED_SOP_INSTANCE_UID, sop_instance),
        (tags::EVENT_TYPE_ID, event_type_id),
    )
}

/// A DIMSE-N request command set with a data set following: the SOP class and instance under the
/// tags its command uses (Requested for N-ACTION, Affected for N-EVENT-REPORT), and its action or
/// event type.
fn normalized_request(
    command: u16,
    message_id: u16,
    (class_tag, sop_class): (Tag, &str),
    (instance_tag, sop_instance): (Tag, &str),
    (type_tag, type_id): (Tag, u16),
) -> Vec<u8> {
    encode_command([
        DataElement::new(class_tag, VR::UI, PrimitiveValue::from(sop_class)),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(command)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(DATASET_PRESENT),
        ),
        DataElement::new(instance_tag, VR::UI, PrimitiveValue::from(sop_instance)),
        DataElement::new(type_tag, VR::US, PrimitiveValue::from(type_id)),
    ])
}

/// A command set of these elements, implicit VR little endian with its group length.
fn encode_command(elements: impl IntoIterator<Item = dicom_object::mem::InMemElement>) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("writing a command set to memory cannot fail");
    out
}

/// Reads Status (0000,0900) from a response command set.
pub fn response_status(bytes: &[u8]) -> Result<Status, CommandError> {
    us_of(
        &command_elements(bytes)?,
        tags::STATUS,
        "Status (0000,0900)",
    )
    .map(Status)
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
            dicom_dictionary_std::uids::VERIFICATION,
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
        let ok = response(&cmd, Status::SUCCESS, Some("ignored"));
        assert_eq!(response_status(&ok).unwrap(), Status::SUCCESS);
        let rsp = Command::parse(&ok).unwrap();
        assert_eq!(
            rsp.command_field,
            command_field::C_STORE_RQ | command_field::RESPONSE_BIT
        );
        assert!(!rsp.has_dataset);
        let failed = response(
            &cmd,
            Status::OUT_OF_RESOURCES,
            Some("object store unavailable"),
        );
        assert_eq!(response_status(&failed).unwrap(), Status(0xA700));
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
    fn an_n_action_is_parsed_and_answered_with_its_object_as_the_affected_one() {
        use dicom_dictionary_std::uids::{
            STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
        };
        let cmd = Command::parse(&n_action_request(
            5,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
            1,
        ))
        .unwrap();
        assert_eq!(cmd.command_field, command_field::N_ACTION_RQ);
        assert_eq!(
            cmd.requested_sop_class_uid.as_deref(),
            Some(STORAGE_COMMITMENT_PUSH_MODEL)
        );
        assert_eq!(
            cmd.requested_sop_instance_uid.as_deref(),
            Some(STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        );
        assert_eq!(cmd.action_type_id, Some(1));
        assert!(cmd.has_dataset);
        let rsp = Command::parse(&response(&cmd, Status::SUCCESS, None)).unwrap();
        assert_eq!(rsp.command_field, 0x8130);
        assert_eq!(rsp.status, Some(Status::SUCCESS));
        assert_eq!(
            rsp.affected_sop_class_uid.as_deref(),
            Some(STORAGE_COMMITMENT_PUSH_MODEL)
        );
        assert_eq!(
            rsp.affected_sop_instance_uid.as_deref(),
            Some(STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        );
        assert_eq!(rsp.action_type_id, Some(1));
        let report = Command::parse(&n_event_report_request(
            7,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
            2,
        ))
        .unwrap();
        assert_eq!(report.command_field, command_field::N_EVENT_REPORT_RQ);
        assert_eq!(report.message_id, 7);
        assert!(report.has_dataset);
    }

    #[test]
    fn status_descriptions_and_display() {
        assert_eq!(Status(0xA700).description(), "Refused: out of resources");
        assert_eq!(Status(0xC000).description(), "Error: cannot understand");
        assert_eq!(
            Status(0xA900).description(),
            "Error: data set does not match SOP class"
        );
        assert_eq!(Status(0xB007).description(), "Warning");
        assert_eq!(Status::OUT_OF_RESOURCES.to_string(), "0xA700");
        assert_eq!(Status::SUCCESS.to_string(), "0x0000");
    }

    #[test]
    fn an_element_length_beyond_the_command_set_is_refused_without_allocating() {
        // fuzz/command found this: (0000,0002) announcing 0x3F000012 bytes in a 43-byte command set.
        let input = [
            0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x38, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x02, 0x00, 0x12, 0x00, 0x00, 0x3f, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x01, 0x10,
            0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0x02, 0x00, 0x00, 0xae, 0x01,
            0x01,
        ];
        assert!(
            matches!(Command::parse(&input), Err(CommandError::Decode(m)) if m.contains("more than the command set holds"))
        );
        assert!(Command::parse(&[0, 0, 0, 0, 4]).is_err());
    }

    #[test]
    fn elements_outside_the_command_group_are_refused() {
        // fuzz/command found this: (0300,0000) then item tags (FFFE,...) sent the decoder allocating.
        let input = [
            0x00, 0x03, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0xfe, 0xff, 0x01, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x18, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
            0x00, 0x00, 0xfe, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert!(
            matches!(Command::parse(&input), Err(CommandError::Decode(m)) if m.contains("outside group 0000"))
        );
    }

    #[test]
    fn fuzzed_command_sets_that_exhausted_memory_are_refused_or_parsed_cheaply() {
        // fuzz/command: well-formed group 0000 elements on which a general decoder allocated gigabytes.
        let mut input = vec![
            0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00,
            0x00, 0x00,
        ];
        input.extend([0x00, 0x00, 0x00, 0x00, 0x2f, 0x4f, 0x00, 0x00]);
        input.extend([0u8; 13]);
        input.extend([0xff; 25]);
        input.extend([0x3f, 0x04]);
        assert!(Command::parse(&input).is_err());
    }

    #[test]
    fn responses_to_commands_with_unencodable_uids_do_not_panic() {
        // fuzz/command: a C-STORE-RQ whose Affected SOP Class UID holds a 0x80 byte.
        let mut cmd = Command::parse(&request(
            command_field::C_STORE_RQ,
            3,
            CT,
            Some("1.2.3"),
            true,
        ))
        .unwrap();
        cmd.affected_sop_class_uid =
            Some(String::from_utf8_lossy(&[b'1', 0x80, b'2']).into_owned());
        let rsp = response(&cmd, Status::CANNOT_UNDERSTAND, Some("bad UID"));
        assert_eq!(response_status(&rsp).unwrap(), Status(0xC000));
        let parsed = Command::parse(&rsp).unwrap();
        assert_eq!(parsed.affected_sop_class_uid, None, "not echoed");
        assert_eq!(parsed.affected_sop_instance_uid.as_deref(), Some("1.2.3"));
    }
}

//! DICOM unique identifiers as they arrive from the wire.
//!
//! A UID from a peer ends up in an object key and a file path, so it is validated before it is used
//! for anything: PS3.5 §9.1 allows 1–64 characters of digits and dots, with no empty component.
//! Leading zeros in a component are tolerated: real equipment sends them, and refusing such an
//! instance would lose an image over a cosmetic rule that HealthImaging does not enforce.

use thiserror::Error;

/// Why a string is not a UID. Carries no part of the value: UIDs are not patient data, but keeping
/// rejected input out of messages keeps every log line safe by construction.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum UidError {
    #[error("UID is empty")]
    Empty,
    #[error("UID is {0} characters long; at most 64 are allowed")]
    TooLong(usize),
    #[error("UID contains a character other than a digit or '.'")]
    BadCharacter,
    #[error("UID has an empty component")]
    EmptyComponent,
}

/// Removes the padding DICOM puts on UI values (a trailing NUL) and the spaces some senders use.
pub(crate) fn trim_uid(raw: &str) -> &str {
    raw.trim_end_matches(['\0', ' ']).trim_start_matches(' ')
}

/// Checks that `uid` (already trimmed) is a well-formed DICOM UID.
pub(crate) fn validate_uid(uid: &str) -> Result<(), UidError> {
    if uid.is_empty() {
        return Err(UidError::Empty);
    }
    if uid.len() > 64 {
        return Err(UidError::TooLong(uid.len()));
    }
    if !uid.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(UidError::BadCharacter);
    }
    if uid.split('.').any(str::is_empty) {
        return Err(UidError::EmptyComponent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_uids() {
        assert_eq!(validate_uid("1.2.840.10008.5.1.4.1.1.2"), Ok(()));
        assert_eq!(validate_uid("2.25.1234567890"), Ok(()));
        assert_eq!(
            validate_uid(
                &"1."
                    .repeat(31)
                    .chars()
                    .chain("12".chars())
                    .collect::<String>()
            ),
            Ok(())
        );
        assert_eq!(
            validate_uid("1.2.03"),
            Ok(()),
            "leading zeros are tolerated"
        );
    }

    #[test]
    fn rejects_what_is_not_a_uid() {
        assert_eq!(validate_uid(""), Err(UidError::Empty));
        assert_eq!(validate_uid(&"1".repeat(65)), Err(UidError::TooLong(65)));
        assert_eq!(validate_uid("1.2.abc"), Err(UidError::BadCharacter));
        assert_eq!(
            validate_uid("../../etc/passwd"),
            Err(UidError::BadCharacter)
        );
        assert_eq!(validate_uid("1.2/3"), Err(UidError::BadCharacter));
        assert_eq!(validate_uid("1..2"), Err(UidError::EmptyComponent));
        assert_eq!(validate_uid(".1.2"), Err(UidError::EmptyComponent));
        assert_eq!(validate_uid("1.2."), Err(UidError::EmptyComponent));
    }

    #[test]
    fn trims_padding() {
        assert_eq!(trim_uid("1.2.3\0"), "1.2.3");
        assert_eq!(trim_uid(" 1.2.3 "), "1.2.3");
    }
}

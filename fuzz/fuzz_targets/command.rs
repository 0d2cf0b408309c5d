//! DIMSE command set parsing: any bytes give a command or an error, and a parsed request always
//! yields an encodable response.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = dicom_gateway::dimse::Command::parse(data) {
        let rsp = dicom_gateway::dimse::response(&cmd, dicom_gateway::dimse::Status::CANNOT_UNDERSTAND, Some("fuzz"));
        assert!(dicom_gateway::dimse::response_status(&rsp).is_ok());
    }
});

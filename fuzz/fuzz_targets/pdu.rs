//! Upper Layer PDU framing: any byte stream must give PDUs or an error, never a panic or a huge
//! allocation (the length limit is checked before the body is read).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut input = data;
        let mut scratch = bytes::BytesMut::new();
        // Read PDUs until the input is used up or an error ends the association.
        for _ in 0..64 {
            match dicom_gateway::pdu::read_pdu_into(&mut input, 16384, &mut scratch).await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    });
    let _ = dicom_gateway::pdu::split_pdvs(bytes::Bytes::copy_from_slice(data));
});

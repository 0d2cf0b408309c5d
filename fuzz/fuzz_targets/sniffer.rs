//! The data set header sniffer, in every encoding and any fragmentation: the first byte picks the
//! transfer syntax, the second the fragment size. It must end in ids or an error, never a panic.
#![no_main]

use dicom_gateway::policy::DatasetEncoding;
use dicom_gateway::sniff::HeaderSniffer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let encoding = match data[0] % 4 {
        0 => DatasetEncoding::ImplicitVrLittleEndian,
        1 => DatasetEncoding::ExplicitVrLittleEndian,
        2 => DatasetEncoding::ExplicitVrBigEndian,
        _ => DatasetEncoding::DeflatedExplicitVrLittleEndian,
    };
    let chunk = (data[1] as usize).max(1);
    let mut sniffer = HeaderSniffer::new(encoding);
    for fragment in data[2..].chunks(chunk) {
        match sniffer.feed(fragment) {
            Ok(true) | Err(_) => break,
            Ok(false) => {}
        }
    }
    let _ = sniffer.finish().map(|ids| ids.require());
});

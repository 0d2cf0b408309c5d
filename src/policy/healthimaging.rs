//! The transfer syntaxes AWS HealthImaging imports: `--transfer-syntax-allow healthimaging`.
//!
//! Source: "Supported transfer syntaxes", AWS HealthImaging developer guide,
//! <https://docs.aws.amazon.com/healthimaging/latest/devguide/supported-transfer-syntaxes.html>
//! (the table "Transfer syntaxes supported by HealthImaging"; read for issue 9, see
//! docs/aws-facts.md). An instance in any other syntax is acknowledged by a Store SCP and then
//! refused by the import; refusing the syntax at negotiation instead lets the sender fall back to
//! one it also proposed (an uncompressed one, typically). Re-check the page when updating this list:
//! AWS adds syntaxes over time.

/// The preset's name, as given to `--transfer-syntax-allow`.
pub(crate) const PRESET_NAME: &str = "healthimaging";

/// Every transfer syntax UID on HealthImaging's supported list, in the page's order.
pub(crate) const HEALTHIMAGING_TRANSFER_SYNTAXES: &[&str] = &[
    "1.2.840.10008.1.2",         // Implicit VR Little Endian
    "1.2.840.10008.1.2.1",       // Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",    // Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",       // Explicit VR Big Endian
    "1.2.840.10008.1.2.4.50",    // JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",    // JPEG Extended (Processes 2 & 4)
    "1.2.840.10008.1.2.4.57",    // JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",    // JPEG Lossless, First-Order Prediction (Process 14 [SV1])
    "1.2.840.10008.1.2.4.80",    // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",    // JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.90",    // JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",    // JPEG 2000
    "1.2.840.10008.1.2.4.92",    // JPEG 2000 Part 2 Multi-component (Lossless Only)
    "1.2.840.10008.1.2.4.93",    // JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.201",   // HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202",   // HTJ2K with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.4.203",   // HTJ2K
    "1.2.840.10008.1.2.5",       // RLE Lossless
    "1.2.840.10008.1.2.4.100",   // MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.100.1", // (fragmentable)
    "1.2.840.10008.1.2.4.101",   // MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.101.1", // (fragmentable)
    "1.2.840.10008.1.2.4.102",   // MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.102.1", // (fragmentable)
    "1.2.840.10008.1.2.4.103",   // MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103.1", // (fragmentable)
    "1.2.840.10008.1.2.4.104",   // MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video
    "1.2.840.10008.1.2.4.104.1", // (fragmentable)
    "1.2.840.10008.1.2.4.105",   // MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video
    "1.2.840.10008.1.2.4.105.1", // (fragmentable)
    "1.2.840.10008.1.2.4.106",   // MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.106.1", // (fragmentable)
    "1.2.840.10008.1.2.4.107",   // HEVC/H.265 Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108",   // HEVC/H.265 Main 10 Profile / Level 5.1
];

/// The transfer syntaxes a preset name stands for (case-insensitive), if it names one.
pub(crate) fn transfer_syntax_preset(name: &str) -> Option<&'static [&'static str]> {
    name.trim()
        .eq_ignore_ascii_case(PRESET_NAME)
        .then_some(HEALTHIMAGING_TRANSFER_SYNTAXES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{SyntaxPolicy, TRANSFER_SYNTAXES};

    #[test]
    fn every_syntax_of_the_preset_is_a_standard_one_listed_once() {
        for uid in HEALTHIMAGING_TRANSFER_SYNTAXES {
            assert!(
                TRANSFER_SYNTAXES.iter().any(|(u, _)| u == uid),
                "{uid} is not a standard transfer syntax"
            );
        }
        let mut sorted = HEALTHIMAGING_TRANSFER_SYNTAXES.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), HEALTHIMAGING_TRANSFER_SYNTAXES.len());
    }

    #[test]
    fn the_preset_accepts_healthimaging_syntaxes_and_refuses_the_others() {
        let list: Vec<String> = transfer_syntax_preset("HealthImaging")
            .unwrap()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = SyntaxPolicy::new(None, Some(&list));
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.202",
            "1.2.840.10008.1.2.5",
        ] {
            assert!(p.accepts_transfer_syntax(ts), "{ts}");
        }
        // What the defaults accept and HealthImaging refuses (issue 9): JPEG processes 3-13 and
        // 15-29 (retired), JPIP, JPEG XL, encapsulated uncompressed, SMPTE ST 2110.
        for ts in [
            "1.2.840.10008.1.2.4.52",
            "1.2.840.10008.1.2.4.55",
            "1.2.840.10008.1.2.4.58",
            "1.2.840.10008.1.2.4.94",
            "1.2.840.10008.1.2.4.95",
            "1.2.840.10008.1.2.4.110",
            "1.2.840.10008.1.2.4.112",
            "1.2.840.10008.1.2.1.98",
            "1.2.840.10008.1.2.7.1",
        ] {
            assert!(!p.accepts_transfer_syntax(ts), "{ts}");
        }
        assert_eq!(
            p.choose_transfer_syntax(&[
                "1.2.840.10008.1.2.4.110".to_string(),
                "1.2.840.10008.1.2.1".to_string()
            ]),
            Some("1.2.840.10008.1.2.1"),
            "the sender's fallback is chosen"
        );
        assert!(transfer_syntax_preset("1.2.840.10008.1.2").is_none());
    }
}

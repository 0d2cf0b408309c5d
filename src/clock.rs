//! Timestamps in the one format the job records, the index and the logs share: RFC 3339 with
//! milliseconds, UTC (`2026-11-24T06:30:00.123Z`).

use std::time::SystemTime;

/// `t` in the records' format.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Now, in the records' format.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

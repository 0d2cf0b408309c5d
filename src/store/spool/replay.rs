//! What a start finds in the spool: every spool file a crash, a SIGKILL, a power cut or a stop with
//! uploads outstanding left behind is queued for upload again; a file that is torn or truncated
//! (its trailer missing or inconsistent, see [`super::file`]) is moved to `quarantine/` with an
//! ERROR line, never uploaded and never deleted. The checksum of a file that passes here is
//! verified again while it is uploaded, before S3 is asked to make the object visible.
//!
//! Also the read-only view of a spool directory behind `dicom-gateway spool status`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::{error, info};

use super::file::{Trailer, committed_at, is_spool_name};
use super::ledger::Ledger;
use crate::durable::INCOMING_DIR;

/// The directory of spool files waiting for upload, under the spool directory.
pub(crate) const OBJECTS_DIR: &str = "objects";
/// The directory of spool files that will never be uploaded, under the spool directory.
pub(crate) const QUARANTINE_DIR: &str = "quarantine";
/// The running uploader's report, under the spool directory (rewritten every few seconds).
pub(crate) const REPORT_FILE: &str = "uploader.json";

/// What the running uploader reports for `spool status`: the upload rate and whether uploads fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UploaderReport {
    /// When the report was written (a stopped gateway's report grows old).
    pub updated_at: String,
    /// Objects and bytes uploaded since the gateway started.
    pub uploaded_files: u64,
    pub uploaded_bytes: u64,
    /// Bytes uploaded per second over the last minute.
    pub bytes_per_second: u64,
    /// Since when uploads fail, and the last error, while they do.
    pub failing_since: Option<String>,
    pub last_error: Option<String>,
}

impl UploaderReport {
    /// Writes the report into the spool directory `dir` (a temporary file renamed over the last
    /// one; not fsynced: it is rewritten every few seconds and only ever informative). Blocking.
    pub(crate) fn write(&self, dir: &Path) -> std::io::Result<()> {
        let temp = dir.join(format!("{REPORT_FILE}.part"));
        std::fs::write(&temp, serde_json::to_vec_pretty(self).unwrap_or_default())?;
        std::fs::rename(temp, dir.join(REPORT_FILE))
    }

    fn read(dir: &Path) -> Option<UploaderReport> {
        serde_json::from_slice(&std::fs::read(dir.join(REPORT_FILE)).ok()?).ok()
    }
}

/// What a start found in the spool.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replayed {
    pub files: u64,
    pub bytes: u64,
    pub quarantined: u64,
}

/// Moves spool file `name` from `objects` to `quarantine` (both directories fsynced), with an
/// ERROR line saying why. Blocking.
pub(crate) fn quarantine(
    objects: &Path,
    quarantine: &Path,
    name: &str,
    why: &dyn std::fmt::Display,
) -> std::io::Result<()> {
    std::fs::create_dir_all(quarantine)?;
    std::fs::rename(objects.join(name), quarantine.join(name))?;
    for d in [quarantine, objects] {
        File::open(d)?.sync_all()?;
    }
    crate::metrics::metrics().spool_quarantined.inc();
    error!(file = %name, quarantine = %quarantine.display(), reason = %why, "spool file cannot be trusted: moved to quarantine, never uploaded (see docs/troubleshooting.md, spool quarantine)");
    Ok(())
}

/// Records every trustworthy spool file under `objects` in `ledger`, oldest first, and queues
/// their keys; quarantines the others. Blocking.
pub(crate) fn replay(
    objects: &Path,
    quarantine_dir: &Path,
    ledger: &Ledger,
) -> std::io::Result<Replayed> {
    let mut names: Vec<String> = std::fs::read_dir(objects)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut found = Replayed::default();
    let mut keys = Vec::new();
    for name in names {
        if !is_spool_name(&name) {
            quarantine(objects, quarantine_dir, &name, &"not a spool file name")?;
            found.quarantined += 1;
            continue;
        }
        let mut file = File::open(objects.join(&name))?;
        let len = file.metadata()?.len();
        match Trailer::read_from(&mut file, len)? {
            Ok(trailer) => {
                ledger.add(&trailer.key, name, len, None);
                keys.push(trailer.key);
                found.files += 1;
                found.bytes += len;
            }
            Err(torn) => {
                drop(file);
                quarantine(objects, quarantine_dir, &name, &torn)?;
                found.quarantined += 1;
            }
        }
    }
    for key in &keys {
        ledger.enqueue(key);
    }
    if found.files > 0 || found.quarantined > 0 {
        info!(
            files = found.files,
            bytes = found.bytes,
            quarantined = found.quarantined,
            "spool: instances acknowledged before this start are queued for upload"
        );
    }
    Ok(found)
}

/// Size and free space of the file system holding `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FsSpace {
    pub total: u64,
    /// Free to unprivileged users (what the spool may use).
    pub available: u64,
}

/// [`FsSpace`] of the file system holding `path` (statvfs(3)).
pub(crate) fn file_system_space(path: &Path) -> std::io::Result<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `st` is a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The fields' types differ between platforms (u32 or u64): widened, never narrowed.
    #[allow(clippy::useless_conversion)]
    let (frsize, blocks, available) = (
        u64::from(st.f_frsize),
        u64::from(st.f_blocks),
        u64::from(st.f_bavail),
    );
    Ok(FsSpace {
        total: blocks.saturating_mul(frsize),
        available: available.saturating_mul(frsize),
    })
}

/// A spool directory as `dicom-gateway spool status` shows it, read without a running gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SpoolStatus {
    pub dir: PathBuf,
    /// Spool files waiting for upload, and their bytes on disk.
    pub files: u64,
    pub bytes: u64,
    /// Age of the oldest waiting file, in seconds.
    pub oldest_age_seconds: Option<u64>,
    pub quarantined_files: u64,
    pub quarantined_bytes: u64,
    /// Files being written by a running gateway (or left by a crash: removed at the next start).
    pub incoming_files: u64,
    pub file_system_bytes: u64,
    pub file_system_free_bytes: u64,
    /// The uploader's last report (upload rate, failures), if a gateway ever ran on this spool.
    pub uploader: Option<UploaderReport>,
    /// How old that report is, in seconds: more than a few means no gateway is running.
    pub uploader_report_age_seconds: Option<u64>,
}

/// Count and bytes of the files in `dir`, and when the oldest spool file among them was committed.
fn tally(dir: &Path) -> std::io::Result<(u64, u64, Option<SystemTime>)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0, None)),
        Err(e) => return Err(e),
    };
    let (mut files, mut bytes, mut oldest) = (0, 0, None::<SystemTime>);
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        files += 1;
        bytes += meta.len();
        let at = committed_at(&entry.file_name().to_string_lossy()).or(meta.modified().ok());
        oldest = match (oldest, at) {
            (Some(o), Some(a)) => Some(o.min(a)),
            (o, a) => o.or(a),
        };
    }
    Ok((files, bytes, oldest))
}

/// Reads the spool directory `dir` (nothing is changed).
pub(crate) fn status(dir: &Path) -> std::io::Result<SpoolStatus> {
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a spool directory", dir.display()),
        ));
    }
    let (files, bytes, oldest) = tally(&dir.join(OBJECTS_DIR))?;
    let (quarantined_files, quarantined_bytes, _) = tally(&dir.join(QUARANTINE_DIR))?;
    let (incoming_files, _, _) = tally(&dir.join(INCOMING_DIR))?;
    let space = file_system_space(dir)?;
    let uploader = UploaderReport::read(dir);
    let uploader_report_age_seconds = uploader
        .as_ref()
        .and_then(|r| humantime::parse_rfc3339_weak(&r.updated_at).ok())
        .map(|t| {
            SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs()
        });
    Ok(SpoolStatus {
        dir: dir.to_path_buf(),
        files,
        bytes,
        oldest_age_seconds: oldest.map(|t| {
            SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs()
        }),
        quarantined_files,
        quarantined_bytes,
        incoming_files,
        file_system_bytes: space.total,
        file_system_free_bytes: space.available,
        uploader,
        uploader_report_age_seconds,
    })
}

impl SpoolStatus {
    /// Aligned `name: value` lines for people.
    pub(crate) fn text(&self) -> String {
        let age = self
            .oldest_age_seconds
            .map(|s| {
                format!(
                    ", oldest {}",
                    humantime::format_duration(std::time::Duration::from_secs(s))
                )
            })
            .unwrap_or_default();
        [
            ("Spool directory", self.dir.display().to_string()),
            (
                "Waiting for upload",
                format!("{} files, {} bytes{age}", self.files, self.bytes),
            ),
            (
                "Quarantined",
                format!(
                    "{} files, {} bytes (never uploaded; see docs/troubleshooting.md)",
                    self.quarantined_files, self.quarantined_bytes
                ),
            ),
            ("Being written", format!("{} files", self.incoming_files)),
            ("Uploads", self.uploads_text()),
            (
                "File system",
                format!(
                    "{} bytes free of {}",
                    self.file_system_free_bytes, self.file_system_bytes
                ),
            ),
        ]
        .iter()
        .map(|(k, v)| format!("{:<20}{v}\n", format!("{k}:")))
        .collect()
    }

    /// The uploader's rate and health, as far as its last report tells.
    fn uploads_text(&self) -> String {
        let (Some(r), Some(age)) = (&self.uploader, self.uploader_report_age_seconds) else {
            return "no report (no gateway has run on this spool)".into();
        };
        if age > STALE_REPORT {
            return format!(
                "no gateway running on this spool (its uploader last reported {age}s ago)"
            );
        }
        let mut text = format!(
            "{} bytes/s over the last minute; {} files ({} bytes) since the gateway started",
            r.bytes_per_second, r.uploaded_files, r.uploaded_bytes
        );
        if let Some(since) = &r.failing_since {
            text.push_str(&format!(
                "; FAILING since {since}: {}",
                r.last_error.as_deref().unwrap_or("(no error recorded)")
            ));
        }
        text
    }
}

/// A report older than this many seconds comes from a gateway that is no longer running (it is
/// rewritten every few seconds).
const STALE_REPORT: u64 = 30;

#[cfg(test)]
pub(crate) mod tests {
    use super::super::file::{Checksum, SUFFIX};
    use super::*;
    use crate::store::ObjectKey;

    const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

    /// Writes a whole spool file for `object` under `objects`; returns its name.
    pub(crate) fn write_spool_file(objects: &Path, sop: &str, object: &[u8]) -> String {
        let key = ObjectKey::new(JOB, "1.2", "1.2.3", sop).unwrap();
        let mut crc = Checksum::new();
        crc.update(object);
        let mut bytes = object.to_vec();
        bytes.extend(Trailer::encode(object.len() as u64, &key, crc));
        let name = format!("{}{SUFFIX}", ulid::Ulid::generate());
        std::fs::create_dir_all(objects).unwrap();
        std::fs::write(objects.join(&name), bytes).unwrap();
        name
    }

    #[test]
    fn replay_queues_whole_files_and_quarantines_torn_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (objects, q) = (
            dir.path().join(OBJECTS_DIR),
            dir.path().join(QUARANTINE_DIR),
        );
        let whole = write_spool_file(&objects, "1.2.3.1", &[1; 500]);
        let torn = write_spool_file(&objects, "1.2.3.2", &[2; 500]);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(objects.join(&torn))
            .unwrap();
        f.set_len(300).unwrap(); // a truncated write
        std::fs::write(objects.join("stray.txt"), b"?").unwrap();

        let ledger = Ledger::default();
        let found = replay(&objects, &q, &ledger).unwrap();
        assert_eq!(found.files, 1);
        assert_eq!(found.quarantined, 2);
        assert_eq!(ledger.unsettled(JOB), 1);
        assert!(objects.join(&whole).exists());
        assert!(!objects.join(&torn).exists());
        assert!(q.join(&torn).exists(), "quarantined, not deleted");
        assert_eq!(std::fs::metadata(q.join(&torn)).unwrap().len(), 300);
        assert!(q.join("stray.txt").exists());

        let s = status(dir.path()).unwrap();
        assert_eq!((s.files, s.quarantined_files), (1, 2));
        assert_eq!(s.quarantined_bytes, 301);
        assert!(s.oldest_age_seconds.is_some());
        assert!(s.file_system_bytes > 0);
        assert!(
            s.text().contains("Quarantined:        2 files"),
            "{}",
            s.text()
        );
        assert!(s.uploader.is_none());
        assert!(s.text().contains("no report"), "{}", s.text());

        let report = UploaderReport {
            updated_at: crate::clock::now_rfc3339(),
            uploaded_files: 12,
            uploaded_bytes: 6_000_000,
            bytes_per_second: 100_000,
            failing_since: Some("2026-11-24T06:30:00.000Z".into()),
            last_error: Some("S3 PutObject failed: dispatch failure".into()),
        };
        report.write(dir.path()).unwrap();
        let s = status(dir.path()).unwrap();
        assert_eq!(s.uploader.as_ref(), Some(&report));
        assert!(s.uploader_report_age_seconds.unwrap() < STALE_REPORT);
        let text = s.text();
        assert!(
            text.contains("100000 bytes/s over the last minute"),
            "{text}"
        );
        assert!(
            text.contains("FAILING since 2026-11-24T06:30:00.000Z: S3 PutObject"),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["uploader"]["bytesPerSecond"], 100_000);
        assert_eq!(json["files"], 1);
    }

    #[test]
    fn status_of_a_missing_directory_says_so() {
        let e = status(Path::new("/nonexistent/spool")).unwrap_err();
        assert!(e.to_string().contains("not a spool directory"));
    }
}

//! The local instance index: one append-only JSON-lines file per job, `{store}/index/{jobId}.jsonl`.
//!
//! A record is one line, written with a single append. A crash can leave at most the last line
//! torn; a line that is not a whole record is skipped when read, and the next append starts on a
//! new line, so a torn record is never read as valid. Nothing is fsynced: the index is derived
//! data, and [`LocalIndex::rebuild`] adds what a crash lost from the store's objects. A lookup
//! reads the files line by line (memory bounded by one line and the records found); a batch lookup
//! ([`InstanceIndex::find_many`]) reads them once for many UIDs.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{
    IndexError, InstanceIndex, InstanceOutcome, InstanceRecord, KeyParts, META_READ_LIMIT,
    OutcomesRecorded, meta_of,
};

/// Instance records as JSON lines in the local store directory: the embedded default.
#[derive(Clone)]
pub(crate) struct LocalIndex {
    /// `{store}/index`.
    dir: PathBuf,
    /// The store root, whose `{jobId}/{study}/{series}/{sop}.dcm` objects a rebuild reads.
    store_root: PathBuf,
    /// Serialises appends, rebuilds and outcome updates in this process, so a rebuild's view of a
    /// job's file holds while it adds the missing records; it guards the [`OutcomeCache`], which
    /// every append updates, so the cache stays what the file says.
    lock: Arc<Mutex<Option<OutcomeCache>>>,
}

/// The latest record per object key of the one job whose outcomes are being recorded. The outcome
/// reader hands a job's outcomes over in chunks; reading the job's whole file again for each chunk
/// made recording a job quadratic in its size, and held the lock the writer needs all along. The
/// file is read once per job instead, and each chunk only looks its keys up. Memory: one job's
/// records, kept until another job's outcomes are recorded. Only this process's writes are seen
/// (the lock is in-process, like the rest of the local index's guarantees).
struct OutcomeCache {
    job_id: String,
    latest: HashMap<String, InstanceRecord>,
}

impl LocalIndex {
    pub(crate) const DIR_NAME: &'static str = "index";

    /// The index of the local store rooted at `store_root`.
    pub(crate) fn new(store_root: impl Into<PathBuf>) -> Self {
        let store_root = store_root.into();
        LocalIndex {
            dir: store_root.join(Self::DIR_NAME),
            store_root,
            lock: Arc::new(Mutex::new(None)),
        }
    }

    fn path_of(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.jsonl"))
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, Option<OutcomeCache>> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends one job's records as lines (blocking), and keeps `cache` (the lock's) what the file
    /// says: updated when it holds this job, dropped if the write failed midway.
    fn append_job(
        &self,
        cache: &mut Option<OutcomeCache>,
        job_id: &str,
        records: &[InstanceRecord],
    ) -> Result<(), IndexError> {
        let written = self.append_lines(job_id, records);
        match (written.is_ok(), cache.as_mut()) {
            (true, Some(c)) if c.job_id == job_id => {
                for r in records {
                    c.latest.insert(r.object_key.clone(), r.clone());
                }
            }
            (false, Some(c)) if c.job_id == job_id => *cache = None,
            _ => {}
        }
        written
    }

    /// Appends one job's records as lines (blocking), after a newline if a torn line ends the file.
    fn append_lines(&self, job_id: &str, records: &[InstanceRecord]) -> Result<(), IndexError> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        std::fs::create_dir_all(&self.dir)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.path_of(job_id))?;
        let len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                buf.insert(0, b'\n');
            }
        }
        file.write_all(&buf)?;
        Ok(())
    }

    /// The whole records of one job's file, in order (blocking). Torn or foreign lines are skipped.
    pub(crate) fn read_job(&self, job_id: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        let mut out = Vec::new();
        read_lines(&self.path_of(job_id), |_| true, &mut out)?;
        Ok(out)
    }

    /// One job's records, the last written per object key (blocking).
    fn latest_of_job(&self, job_id: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        let mut records = self.read_job(job_id)?;
        records.reverse();
        let mut seen = HashSet::new();
        records.retain(|r| seen.insert(r.object_key.clone()));
        records.reverse();
        Ok(records)
    }

    /// Appends an updated copy of each record whose outcome changes (blocking); the last written
    /// record of an object key is the one lookups return. The job's records come from the
    /// [`OutcomeCache`], read from the file at the job's first chunk only.
    fn record_outcomes_blocking(
        &self,
        job_id: &str,
        outcomes: Vec<(String, InstanceOutcome)>,
    ) -> Result<OutcomesRecorded, IndexError> {
        let mut guard = self.locked();
        if guard.as_ref().is_none_or(|c| c.job_id != job_id) {
            // Dropped first: two jobs' records are never held at once.
            *guard = None;
            let latest = self
                .latest_of_job(job_id)?
                .into_iter()
                .map(|r| (r.object_key.clone(), r))
                .collect();
            *guard = Some(OutcomeCache {
                job_id: job_id.to_string(),
                latest,
            });
        }
        let Some(cache) = guard.as_ref() else {
            return Ok(OutcomesRecorded::default());
        };
        // Per key of the chunk, the outcome it ends with: each given one applied in turn where it
        // replaces the one before.
        let mut ends: HashMap<String, InstanceOutcome> = HashMap::new();
        let mut matched = 0;
        for (key, outcome) in outcomes {
            let Some(record) = cache.latest.get(&key) else {
                continue;
            };
            matched += 1;
            let current = ends.get(&key).unwrap_or(&record.outcome);
            if outcome.replaces(current) {
                ends.insert(key, outcome);
            }
        }
        let mut updated: Vec<InstanceRecord> = ends
            .into_iter()
            .filter_map(|(key, outcome)| {
                let record = cache.latest.get(&key)?;
                (record.outcome != outcome).then(|| InstanceRecord {
                    outcome,
                    ..record.clone()
                })
            })
            .collect();
        updated.sort_by(|a, b| a.object_key.cmp(&b.object_key));
        if !updated.is_empty() {
            self.append_job(&mut guard, job_id, &updated)?;
        }
        Ok(OutcomesRecorded {
            matched,
            changed: updated.len() as u64,
        })
    }

    fn find_blocking(&self, sop_instance_uid: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        let mut found = self.find_many_blocking(&[sop_instance_uid.to_string()])?;
        Ok(found.remove(sop_instance_uid).unwrap_or_default())
    }

    /// The records of every UID of `sop_instance_uids`, from one read of the index files
    /// (blocking): a line is parsed only if its SOP Instance UID is one of them.
    fn find_many_blocking(
        &self,
        sop_instance_uids: &[String],
    ) -> Result<HashMap<String, Vec<InstanceRecord>>, IndexError> {
        let mut by_uid: HashMap<String, Vec<InstanceRecord>> = HashMap::new();
        if sop_instance_uids.is_empty() {
            return Ok(by_uid);
        }
        let wanted: HashSet<&str> = sop_instance_uids.iter().map(String::as_str).collect();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(by_uid),
            Err(e) => return Err(e.into()),
        };
        let mut found = Vec::new();
        for entry in rd {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "jsonl") {
                // The UID as it appears in a line: a cheap filter before parsing.
                read_lines(
                    &path,
                    |line| sop_instance_uid_of(line).is_some_and(|uid| wanted.contains(uid)),
                    &mut found,
                )?;
            }
        }
        for record in found {
            if wanted.contains(record.sop_instance_uid.as_str()) {
                by_uid
                    .entry(record.sop_instance_uid.clone())
                    .or_default()
                    .push(record);
            }
        }
        for records in by_uid.values_mut() {
            // One record per object key, the last written: an overwrite (--duplicate-policy
            // overwrite) or the live record after a rebuild's copy.
            records.reverse();
            let mut seen = HashSet::new();
            records.retain(|r| seen.insert(r.object_key.clone()));
            records.sort_by(|a, b| a.received_at.cmp(&b.received_at));
        }
        Ok(by_uid)
    }

    /// Adds a record for every object of the store that its job's index file lacks (blocking).
    /// Returns how many were added. Memory is bounded by one job's keys, and the lock is taken one
    /// job at a time, so the writer waits for one job's scan at most.
    pub(crate) fn rebuild(&self) -> Result<u64, IndexError> {
        let mut added = 0;
        for job_id in job_dirs(&self.store_root)? {
            let mut guard = self.locked();
            let indexed: HashSet<String> = self
                .read_job(&job_id)?
                .into_iter()
                .map(|r| r.object_key)
                .collect();
            let mut missing = Vec::new();
            for key in object_keys(&self.store_root, &job_id)? {
                if !indexed.contains(&key)
                    && let Some(record) = record_from_object(&self.store_root, &key)?
                {
                    missing.push(record);
                }
            }
            if !missing.is_empty() {
                added += missing.len() as u64;
                self.append_job(&mut guard, &job_id, &missing)?;
            }
        }
        Ok(added)
    }

    /// [`LocalIndex::rebuild`] off the async threads.
    pub(crate) async fn rebuild_async(&self) -> Result<u64, IndexError> {
        let this = self.clone();
        off_thread(move || this.rebuild()).await
    }
}

#[async_trait]
impl InstanceIndex for LocalIndex {
    async fn append(&self, records: Vec<InstanceRecord>) -> Result<(), IndexError> {
        let this = self.clone();
        off_thread(move || -> Result<(), IndexError> {
            let mut guard = this.locked();
            let mut records = records;
            records.sort_by(|a, b| a.job_id.cmp(&b.job_id));
            for chunk in records.chunk_by(|a, b| a.job_id == b.job_id) {
                this.append_job(&mut guard, &chunk[0].job_id, chunk)?;
            }
            Ok(())
        })
        .await
    }

    async fn find(&self, sop_instance_uid: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        let this = self.clone();
        let uid = sop_instance_uid.to_string();
        off_thread(move || this.find_blocking(&uid)).await
    }

    async fn find_many(
        &self,
        sop_instance_uids: &[String],
    ) -> Result<HashMap<String, Vec<InstanceRecord>>, IndexError> {
        let this = self.clone();
        let uids = sop_instance_uids.to_vec();
        off_thread(move || this.find_many_blocking(&uids)).await
    }

    async fn record_outcomes(
        &self,
        job_id: &str,
        outcomes: Vec<(String, InstanceOutcome)>,
    ) -> Result<OutcomesRecorded, IndexError> {
        let this = self.clone();
        let job_id = job_id.to_string();
        off_thread(move || this.record_outcomes_blocking(&job_id, outcomes)).await
    }

    async fn failed(&self, job_id: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        let this = self.clone();
        let job_id = job_id.to_string();
        off_thread(move || {
            let mut failed: Vec<InstanceRecord> = this
                .latest_of_job(&job_id)?
                .into_iter()
                .filter(|r| matches!(r.outcome, InstanceOutcome::Failed { .. }))
                .collect();
            failed.sort_by(|a, b| a.object_key.cmp(&b.object_key));
            Ok(failed)
        })
        .await
    }

    async fn missing(&self, job_id: &str, keys: Vec<String>) -> Result<Vec<String>, IndexError> {
        let this = self.clone();
        let job_id = job_id.to_string();
        off_thread(move || {
            let indexed: HashSet<String> = this
                .read_job(&job_id)?
                .into_iter()
                .map(|r| r.object_key)
                .collect();
            Ok(keys.into_iter().filter(|k| !indexed.contains(k)).collect())
        })
        .await
    }

    async fn add_absent(&self, records: Vec<InstanceRecord>) -> Result<u64, IndexError> {
        let this = self.clone();
        off_thread(move || -> Result<u64, IndexError> {
            let mut guard = this.locked();
            let mut records = records;
            records.sort_by(|a, b| a.job_id.cmp(&b.job_id));
            let mut added = 0;
            for chunk in records.chunk_by(|a, b| a.job_id == b.job_id) {
                let job_id = &chunk[0].job_id;
                let mut indexed: HashSet<String> = this
                    .read_job(job_id)?
                    .into_iter()
                    .map(|r| r.object_key)
                    .collect();
                let absent: Vec<InstanceRecord> = chunk
                    .iter()
                    .filter(|r| indexed.insert(r.object_key.clone()))
                    .cloned()
                    .collect();
                if !absent.is_empty() {
                    added += absent.len() as u64;
                    this.append_job(&mut guard, job_id, &absent)?;
                }
            }
            Ok(added)
        })
        .await
    }

    fn describe(&self) -> String {
        format!("the local instance index in {}", self.dir.display())
    }
}

/// Runs `f` on the blocking threads (the index reads and writes files), a panic there reported as
/// an I/O error.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IndexError> + Send + 'static,
) -> Result<T, IndexError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// Appends to `out` the records of the lines of `path` that `keep` accepts and that parse; a
/// missing file has none. A torn line (cut by a crash) does not parse, and is skipped.
fn read_lines(
    path: &Path,
    keep: impl Fn(&str) -> bool,
    out: &mut Vec<InstanceRecord>,
) -> Result<(), IndexError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line?;
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        if keep(text)
            && let Ok(record) = serde_json::from_str::<InstanceRecord>(text)
        {
            out.push(record);
        }
    }
    Ok(())
}

/// The SOP Instance UID of a record's line, read without parsing the line (`None` if it has none).
fn sop_instance_uid_of(line: &str) -> Option<&str> {
    const FIELD: &str = "\"sopInstanceUid\":\"";
    let start = line.find(FIELD)? + FIELD.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// The job folders of the store root (names of 26 letters and digits, as ULIDs are).
fn job_dirs(root: &Path) -> Result<Vec<String>, IndexError> {
    let mut jobs = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(jobs),
        Err(e) => return Err(e.into()),
    };
    for entry in rd {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str()
            && name.len() == 26
            && name.bytes().all(|b| b.is_ascii_alphanumeric())
            && entry.file_type()?.is_dir()
        {
            jobs.push(name.to_string());
        }
    }
    jobs.sort();
    Ok(jobs)
}

/// The keys `{job}/{study}/{series}/{sop}.dcm` of a job's committed objects (temporary files of
/// uploads in progress do not end in `.dcm` there).
fn object_keys(root: &Path, job_id: &str) -> Result<Vec<String>, IndexError> {
    let mut keys = Vec::new();
    for study in sub_dirs(&root.join(job_id))? {
        for series in sub_dirs(&root.join(job_id).join(&study))? {
            let dir = root.join(job_id).join(&study).join(&series);
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if let Some(name) = entry.file_name().to_str()
                    && name.ends_with(".dcm")
                    && entry.file_type()?.is_file()
                {
                    keys.push(format!("{job_id}/{study}/{series}/{name}"));
                }
            }
        }
    }
    Ok(keys)
}

fn sub_dirs(dir: &Path) -> Result<Vec<String>, IndexError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// A record for a stored object, from its key, size, modification time and meta group (SOP Class
/// UID (0002,0002), Source Application Entity Title (0002,0016)). `None` if the key is not of the
/// store layout or the object vanished meanwhile.
fn record_from_object(root: &Path, key: &str) -> Result<Option<InstanceRecord>, IndexError> {
    let Some(parts) = KeyParts::parse(key) else {
        return Ok(None);
    };
    let path = root.join(key);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let metadata = file.metadata()?;
    let mut head = Vec::new();
    file.take(META_READ_LIMIT).read_to_end(&mut head)?;
    let (sop_class_uid, calling_ae_title) = match meta_of(&head) {
        Some((class, ae)) => (Some(class), ae),
        None => (None, None),
    };
    let received_at = metadata
        .modified()
        .map(crate::clock::rfc3339)
        .unwrap_or_else(|_| crate::clock::now_rfc3339());
    Ok(Some(parts.record(
        key,
        metadata.len(),
        sop_class_uid,
        calling_ae_title,
        received_at,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::part10::FileMeta;

    const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    fn record(sop: &str) -> InstanceRecord {
        let key = format!("{JOB}/1.2/1.2.3/{sop}.dcm");
        KeyParts::parse(&key).unwrap().record(
            &key,
            100,
            Some(CT.into()),
            Some("CT1".into()),
            "2026-11-24T06:00:00.000Z".into(),
        )
    }

    /// Writes a Part-10 object at `key` under `root`, as the store would.
    fn write_object(root: &Path, key: &str, ae: &str) {
        let sop = KeyParts::parse(key).unwrap().sop_instance_uid.to_string();
        let mut bytes = FileMeta {
            sop_class_uid: CT,
            sop_instance_uid: &sop,
            transfer_syntax_uid: "1.2.840.10008.1.2.1",
            source_ae_title: ae,
        }
        .encode()
        .unwrap();
        bytes.extend_from_slice(&[0u8; 64]);
        let path = root.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[tokio::test]
    async fn appended_records_are_found_by_sop_instance_uid() {
        let root = tempfile::tempdir().unwrap();
        let index = LocalIndex::new(root.path());
        index
            .append(vec![record("1.2.3.1"), record("1.2.3.2")])
            .await
            .unwrap();
        index.append(vec![record("1.2.3.3")]).await.unwrap();
        assert_eq!(
            index.find("1.2.3.2").await.unwrap(),
            vec![record("1.2.3.2")]
        );
        assert_eq!(
            index.find("1.2.3").await.unwrap(),
            vec![],
            "no prefix match"
        );
        assert_eq!(index.find("9.9").await.unwrap(), vec![]);
        // Many UIDs from one read: each with its records, an unknown one without.
        let many = index
            .find_many(&["1.2.3.1".into(), "1.2.3.3".into(), "9.9".into()])
            .await
            .unwrap();
        assert_eq!(many["1.2.3.1"], vec![record("1.2.3.1")]);
        assert_eq!(many["1.2.3.3"], vec![record("1.2.3.3")]);
        assert!(many.get("9.9").is_none_or(Vec::is_empty));
        assert_eq!(many.len(), 2);
        assert_eq!(index.read_job(JOB).unwrap().len(), 3);
        // The same object recorded twice (overwritten, or a rebuild raced the writer) is one
        // record: the last written.
        let mut again = record("1.2.3.2");
        again.size = 200;
        index.append(vec![again.clone()]).await.unwrap();
        assert_eq!(index.find("1.2.3.2").await.unwrap(), vec![again]);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped_and_the_next_append_starts_a_new_line() {
        let root = tempfile::tempdir().unwrap();
        let index = LocalIndex::new(root.path());
        index.append(vec![record("1.2.3.1")]).await.unwrap();
        let line = serde_json::to_string(&record("1.2.3.2")).unwrap();
        let torn = &line[..line.len() / 2];
        let path = index.path_of(JOB);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(torn.as_bytes()).unwrap();
        drop(f);
        assert_eq!(index.read_job(JOB).unwrap(), vec![record("1.2.3.1")]);
        assert_eq!(index.find("1.2.3.2").await.unwrap(), vec![]);
        index.append(vec![record("1.2.3.3")]).await.unwrap();
        assert_eq!(
            index.read_job(JOB).unwrap(),
            vec![record("1.2.3.1"), record("1.2.3.3")]
        );
    }

    #[tokio::test]
    async fn a_rebuild_adds_the_objects_the_index_lacks_from_their_keys_and_meta_groups() {
        let root = tempfile::tempdir().unwrap();
        let index = LocalIndex::new(root.path());
        let indexed = format!("{JOB}/1.2/1.2.3/1.2.3.1.dcm");
        let lost = format!("{JOB}/1.2/1.2.3/1.2.3.2.dcm");
        write_object(root.path(), &indexed, "CT1");
        write_object(root.path(), &lost, "MR7");
        // Not objects: a job journal, an upload in progress, a foreign folder.
        std::fs::create_dir_all(root.path().join("jobs")).unwrap();
        std::fs::write(root.path().join(format!("jobs/{JOB}.json")), "{}").unwrap();
        std::fs::write(root.path().join(format!("{JOB}/1.2/1.2.3/.x.tmp")), "x").unwrap();
        index.append(vec![record("1.2.3.1")]).await.unwrap();

        assert_eq!(index.rebuild_async().await.unwrap(), 1);
        let found = index.find("1.2.3.2").await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        let r = &found[0];
        assert_eq!(r.object_key, lost);
        assert_eq!(r.job_id, JOB);
        assert_eq!(r.study_instance_uid, "1.2");
        assert_eq!(r.series_instance_uid, "1.2.3");
        assert_eq!(r.sop_class_uid.as_deref(), Some(CT));
        assert_eq!(r.calling_ae_title.as_deref(), Some("MR7"));
        assert_eq!(
            r.size,
            std::fs::metadata(root.path().join(&lost)).unwrap().len()
        );
        assert_eq!(r.outcome, InstanceOutcome::Stored);
        // Nothing more to add the second time.
        assert_eq!(index.rebuild_async().await.unwrap(), 0);
        assert_eq!(index.read_job(JOB).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn outcomes_update_the_records_once_and_failed_ones_are_listed() {
        let root = tempfile::tempdir().unwrap();
        let index = LocalIndex::new(root.path());
        index
            .append(vec![record("1.2.3.1"), record("1.2.3.2")])
            .await
            .unwrap();
        let key = |sop: &str| format!("{JOB}/1.2/1.2.3/{sop}.dcm");
        let failed = InstanceOutcome::Failed {
            exception_type: "ValidationException".into(),
            message: "bad".into(),
        };
        let outcomes = vec![
            (
                key("1.2.3.1"),
                InstanceOutcome::Imported {
                    image_set_id: "a".repeat(32),
                    is_primary: true,
                },
            ),
            (key("1.2.3.2"), failed.clone()),
            (key("9.9"), failed.clone()),
        ];
        assert_eq!(
            index.record_outcomes(JOB, outcomes.clone()).await.unwrap(),
            OutcomesRecorded {
                matched: 2,
                changed: 2
            },
            "9.9 has no record"
        );
        // A resumed reader records the same again: nothing changes.
        assert_eq!(
            index.record_outcomes(JOB, outcomes).await.unwrap(),
            OutcomesRecorded {
                matched: 2,
                changed: 0
            }
        );
        assert_eq!(index.read_job(JOB).unwrap().len(), 4);
        let found = index.find("1.2.3.2").await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].outcome, failed);
        let listed = index.failed(JOB).await.unwrap();
        assert_eq!(listed, found);
        assert_eq!(
            index.find("1.2.3.1").await.unwrap()[0].outcome.name(),
            "IMPORTED"
        );
    }

    #[tokio::test]
    async fn chunks_of_one_job_see_every_write_made_since_its_file_was_read() {
        let root = tempfile::tempdir().unwrap();
        let index = LocalIndex::new(root.path());
        let other = |sop: &str| {
            let mut r = record(sop);
            r.job_id = "01JD6Y7Z8X9W0V1T2S3R4Q5P6M".into();
            r.object_key = format!("{}/1.2/1.2.3/{sop}.dcm", r.job_id);
            r
        };
        index
            .append(vec![record("1.2.3.1"), other("1.2.3.9")])
            .await
            .unwrap();
        let key = |sop: &str| format!("{JOB}/1.2/1.2.3/{sop}.dcm");
        let imported = InstanceOutcome::Imported {
            image_set_id: "a".repeat(32),
            is_primary: true,
        };
        let chunk = |sops: &[&str]| -> Vec<(String, InstanceOutcome)> {
            sops.iter().map(|s| (key(s), imported.clone())).collect()
        };
        assert_eq!(
            index
                .record_outcomes(JOB, chunk(&["1.2.3.1", "1.2.3.2"]))
                .await
                .unwrap(),
            OutcomesRecorded {
                matched: 1,
                changed: 1
            }
        );
        // The job's file has been read; the writer (or a repair) adds a record meanwhile, and the
        // next chunk finds it.
        index.append(vec![record("1.2.3.2")]).await.unwrap();
        assert_eq!(
            index
                .record_outcomes(JOB, chunk(&["1.2.3.1", "1.2.3.2"]))
                .await
                .unwrap(),
            OutcomesRecorded {
                matched: 2,
                changed: 1
            },
            "1.2.3.1 was recorded by the first chunk"
        );
        // Another job's chunk, then this job's again: each reads its own records.
        let other_outcome = vec![(other("1.2.3.9").object_key, imported.clone())];
        assert_eq!(
            index
                .record_outcomes("01JD6Y7Z8X9W0V1T2S3R4Q5P6M", other_outcome)
                .await
                .unwrap()
                .changed,
            1
        );
        assert_eq!(
            index
                .record_outcomes(JOB, chunk(&["1.2.3.1", "1.2.3.2"]))
                .await
                .unwrap(),
            OutcomesRecorded {
                matched: 2,
                changed: 0
            }
        );
        // The same key twice in a chunk is one record.
        let twice = vec![
            (
                key("1.2.3.1"),
                InstanceOutcome::Failed {
                    exception_type: "E".into(),
                    message: "m".into(),
                },
            ),
            (key("1.2.3.1"), imported.clone()),
        ];
        assert_eq!(index.record_outcomes(JOB, twice).await.unwrap().matched, 2);
        assert_eq!(
            index.find("1.2.3.1").await.unwrap()[0].outcome,
            imported,
            "the last one given, which it already was: nothing written"
        );
        assert_eq!(index.read_job(JOB).unwrap().len(), 4);

        // Warnings recorded, then the success file read again (a resumed reader): they stay.
        let warned = InstanceOutcome::ImportedWithWarnings {
            image_set_id: "a".repeat(32),
            is_primary: true,
            warnings: vec!["InvalidOffsetTable (45330): bad".into()],
        };
        let warn = vec![(key("1.2.3.1"), warned.clone())];
        assert_eq!(index.record_outcomes(JOB, warn).await.unwrap().changed, 1);
        assert_eq!(
            index
                .record_outcomes(JOB, chunk(&["1.2.3.1"]))
                .await
                .unwrap(),
            OutcomesRecorded {
                matched: 1,
                changed: 0
            }
        );
        assert_eq!(index.find("1.2.3.1").await.unwrap()[0].outcome, warned);
    }

    #[test]
    fn an_object_without_a_whole_meta_group_is_rebuilt_without_class_and_ae() {
        assert_eq!(meta_of(b"short"), None);
        let mut head = vec![0u8; 128];
        head.extend_from_slice(b"DICM");
        head.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0, 0xFF, 0xFF, 0xFF, 0x7F]);
        assert_eq!(meta_of(&head), None, "a group length past the data");
    }
}

//! What the spool holds, in memory: for each object key, the spool files (versions) waiting for
//! upload and who waits for their outcome; the queue of keys for the uploader; the totals that
//! metrics, the capacity check and recovery read.
//!
//! A key, not a file, is the unit of upload. The same key can be committed twice while its first
//! copy still waits (a sender repeating an instance, `--duplicate-policy overwrite`); each copy is a
//! spool file of its own, named by a ULID drawn in commit order. The uploader always sends the
//! newest, and S3's confirmation of it settles every older copy too: the key ends up holding the
//! copy acknowledged last, as in direct mode.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::{Notify, oneshot};

use super::file::{SUFFIX, committed_at};
use crate::store::{ObjectKey, UploadOutcome};

/// One spool file of a key.
#[derive(Debug)]
struct Version {
    /// The file's name in the objects directory (a ULID: older copies sort first).
    file: String,
    /// Its size on disk, trailer included.
    size: u64,
    /// Who counts this copy (its batch lease); none for a file found at start-up.
    waiter: Option<oneshot::Sender<UploadOutcome>>,
}

/// Where a key stands with the uploader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Committed, not yet handed to the uploader (its commit is still syncing the directory).
    Idle,
    /// In the uploader's queue.
    Queued,
    /// Being uploaded by a worker.
    Uploading,
}

/// The spool files of one key.
#[derive(Debug)]
struct KeyState {
    key: ObjectKey,
    /// Oldest first.
    versions: Vec<Version>,
    phase: Phase,
}

/// The ledger under its lock.
#[derive(Default)]
struct State {
    keys: HashMap<String, KeyState>,
    queue: VecDeque<String>,
    /// Every spool file waiting, by name (so the first is the oldest), with its size.
    files: BTreeMap<String, u64>,
    bytes: u64,
    /// Keys waiting, per job id.
    jobs: HashMap<String, u64>,
    names: ulid::Generator,
    /// The uploader stopped: no outcome will come, waiters are let go.
    stopped: bool,
}

/// What the uploader should send for a key: its newest spool file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pick {
    pub key: ObjectKey,
    pub file: String,
}

/// What settling one version freed: the files to remove and the waiters to tell. The key counts
/// as waiting (for [`Ledger::unsettled`]) until [`Settled::tell`], which comes after its files are
/// removed: a settled batch has nothing left in the spool.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    pub files: Vec<String>,
    waiters: Vec<oneshot::Sender<UploadOutcome>>,
    /// The job of a key that left the ledger.
    left_job: Option<String>,
}

impl Settled {
    /// Tells every waiter `outcome` (a waiter gone away is fine: its instance is no longer
    /// counted), and counts the key as settled.
    pub(crate) fn tell(self, ledger: &Ledger, outcome: UploadOutcome) {
        if let Some(job) = &self.left_job {
            let mut st = ledger.lock();
            if let Some(n) = st.jobs.get_mut(job) {
                *n -= 1;
                if *n == 0 {
                    st.jobs.remove(job);
                }
            }
            drop(st);
            ledger.settled.notify_waiters();
        }
        for w in self.waiters {
            let _ = w.send(outcome);
        }
    }
}

/// The spool's totals at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Levels {
    pub files: u64,
    pub bytes: u64,
    /// When the oldest waiting file was committed.
    pub oldest: Option<SystemTime>,
}

/// The in-memory state of the spool (see the module documentation).
#[derive(Default)]
pub(crate) struct Ledger {
    state: Mutex<State>,
    /// A key was queued.
    queued: Notify,
    /// A key left the ledger (for [`Ledger::settled`]).
    settled: Notify,
    /// Bytes of spool files being written (not yet in `files`).
    reserved: AtomicU64,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh spool file name, later than every name drawn before.
    pub(crate) fn new_name(&self) -> String {
        let mut st = self.lock();
        let ulid = st
            .names
            .generate()
            .unwrap_or_else(|_| ulid::Ulid::generate());
        format!("{ulid}{SUFFIX}")
    }

    /// Records spool file `file` (`size` bytes on disk) of `key`, told its outcome through
    /// `waiter`. The key waits [`Phase::Idle`] until [`Ledger::enqueue`].
    pub(crate) fn add(
        &self,
        key: &ObjectKey,
        file: String,
        size: u64,
        waiter: Option<oneshot::Sender<UploadOutcome>>,
    ) {
        let mut st = self.lock();
        let waiter = if st.stopped { None } else { waiter };
        st.files.insert(file.clone(), size);
        st.bytes += size;
        let is_new = !st.keys.contains_key(key.as_str());
        if is_new {
            *st.jobs.entry(key.job_id().to_string()).or_default() += 1;
        }
        let state = st
            .keys
            .entry(key.as_str().to_string())
            .or_insert_with(|| KeyState {
                key: key.clone(),
                versions: Vec::new(),
                phase: Phase::Idle,
            });
        let at = state.versions.partition_point(|v| v.file < file);
        state.versions.insert(at, Version { file, size, waiter });
    }

    /// Hands `key` to the uploader, unless it is queued or being uploaded already (the worker
    /// queues it again if a newer copy arrived meanwhile).
    pub(crate) fn enqueue(&self, key: &ObjectKey) {
        let mut st = self.lock();
        let Some(state) = st.keys.get_mut(key.as_str()) else {
            return; // uploaded already, by a worker that picked it up from an earlier copy
        };
        if state.phase == Phase::Idle {
            state.phase = Phase::Queued;
            st.queue.push_back(key.as_str().to_string());
            self.queued.notify_one();
        }
    }

    /// The next key to upload, waiting for one; it is [`Phase::Uploading`] from then on.
    pub(crate) async fn next(&self) -> ObjectKey {
        loop {
            let notified = self.queued.notified();
            {
                let mut st = self.lock();
                while let Some(k) = st.queue.pop_front() {
                    if let Some(state) = st.keys.get_mut(&k) {
                        state.phase = Phase::Uploading;
                        return state.key.clone();
                    }
                }
            }
            notified.await;
        }
    }

    /// The file to send now for `key`: its newest copy.
    pub(crate) fn pick(&self, key: &ObjectKey) -> Option<Pick> {
        let st = self.lock();
        let state = st.keys.get(key.as_str())?;
        state.versions.last().map(|v| Pick {
            key: state.key.clone(),
            file: v.file.clone(),
        })
    }

    /// S3 confirmed `pick`: it and every older copy of its key are settled. A newer copy that
    /// arrived meanwhile is queued again; otherwise the key leaves the ledger.
    pub(crate) fn uploaded(&self, pick: &Pick) -> Settled {
        self.settle(pick, |v| v.file <= pick.file)
    }

    /// `pick` will never be uploaded (quarantined, or its file vanished): only that copy is
    /// settled; older copies, if any, are uploaded instead.
    pub(crate) fn set_aside(&self, pick: &Pick) -> Settled {
        self.settle(pick, |v| v.file == pick.file)
    }

    fn settle(&self, pick: &Pick, which: impl Fn(&Version) -> bool) -> Settled {
        let mut st = self.lock();
        let mut settled = Settled::default();
        let Some(state) = st.keys.get_mut(pick.key.as_str()) else {
            return settled;
        };
        let (done, left): (Vec<Version>, Vec<Version>) = std::mem::take(&mut state.versions)
            .into_iter()
            .partition(which);
        state.versions = left;
        let remaining = !state.versions.is_empty();
        if remaining {
            state.phase = Phase::Queued;
        }
        for v in done {
            st.bytes = st.bytes.saturating_sub(v.size);
            st.files.remove(&v.file);
            settled.files.push(v.file);
            settled.waiters.extend(v.waiter);
        }
        if remaining {
            st.queue.push_back(pick.key.as_str().to_string());
            self.queued.notify_one();
        } else {
            st.keys.remove(pick.key.as_str());
            settled.left_job = Some(pick.key.job_id().to_string());
        }
        settled
    }

    /// Keys of batch `job_id` still waiting for upload.
    pub(crate) fn unsettled(&self, job_id: &str) -> u64 {
        self.lock().jobs.get(job_id).copied().unwrap_or(0)
    }

    /// Whether the spool holds a copy of `key` waiting for upload.
    pub(crate) fn holds(&self, key: &ObjectKey) -> bool {
        self.lock().keys.contains_key(key.as_str())
    }

    /// The batches with keys waiting.
    pub(crate) fn jobs(&self) -> Vec<String> {
        let mut jobs: Vec<String> = self.lock().jobs.keys().cloned().collect();
        jobs.sort();
        jobs
    }

    /// Waits until no key of batch `job_id` waits any more.
    pub(crate) async fn settled(&self, job_id: &str) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.unsettled(job_id) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The uploader stopped: every waiter is let go (its batch stays unfinished, for recovery at
    /// the next start), and copies committed from now on get none.
    pub(crate) fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        for state in st.keys.values_mut() {
            for v in &mut state.versions {
                v.waiter = None;
            }
        }
    }

    /// Files, bytes and the oldest file waiting.
    pub(crate) fn levels(&self) -> Levels {
        let st = self.lock();
        Levels {
            files: st.files.len() as u64,
            bytes: st.bytes,
            oldest: st.files.keys().next().and_then(|f| committed_at(f)),
        }
    }

    /// Bytes on disk: waiting files and files being written.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.lock().bytes + self.reserved.load(Ordering::Relaxed)
    }

    pub(crate) fn reserve(&self, n: u64) {
        self.reserved.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn release(&self, n: u64) {
        self.reserved.fetch_sub(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

    fn key(sop: &str) -> ObjectKey {
        ObjectKey::new(JOB, "1.2", "1.2.3", sop).unwrap()
    }

    #[tokio::test]
    async fn a_key_is_queued_once_and_its_newest_copy_settles_the_older_ones() {
        let ledger = Ledger::default();
        let k = key("1.2.3.4");
        let (first, second) = (ledger.new_name(), ledger.new_name());
        assert!(first < second, "names follow commit order");
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        ledger.add(&k, first.clone(), 10, Some(tx1));
        ledger.enqueue(&k);
        ledger.add(&k, second.clone(), 12, Some(tx2));
        ledger.enqueue(&k);
        assert_eq!(ledger.unsettled(JOB), 1, "one key");
        assert_eq!(ledger.levels().files, 2);
        assert_eq!(ledger.levels().bytes, 22);
        assert_eq!(ledger.next().await, k);
        let pick = ledger.pick(&k).unwrap();
        assert_eq!(pick.file, second, "the newest copy is sent");
        let settled = ledger.uploaded(&pick);
        assert_eq!(settled.files, vec![first, second]);
        assert_eq!(ledger.unsettled(JOB), 1, "until its files are removed");
        settled.tell(&ledger, UploadOutcome::Uploaded);
        assert_eq!(rx1.await, Ok(UploadOutcome::Uploaded));
        assert_eq!(rx2.await, Ok(UploadOutcome::Uploaded));
        assert_eq!(ledger.unsettled(JOB), 0);
        assert_eq!(ledger.levels(), Levels::default());
        ledger.settled(JOB).await;
    }

    #[tokio::test]
    async fn a_copy_committed_during_its_upload_is_uploaded_next() {
        let ledger = Ledger::default();
        let k = key("1.2.3.5");
        let first = ledger.new_name();
        ledger.add(&k, first.clone(), 10, None);
        ledger.enqueue(&k);
        ledger.next().await;
        let pick = ledger.pick(&k).unwrap();
        let second = ledger.new_name();
        ledger.add(&k, second.clone(), 10, None);
        ledger.enqueue(&k); // uploading: not queued twice
        let settled = ledger.uploaded(&pick);
        assert_eq!(settled.files, vec![first]);
        assert_eq!(ledger.unsettled(JOB), 1);
        assert_eq!(ledger.next().await, k, "queued again by the worker");
        assert_eq!(ledger.pick(&k).unwrap().file, second);
    }

    #[tokio::test]
    async fn a_quarantined_copy_leaves_the_older_one_to_upload() {
        let ledger = Ledger::default();
        let k = key("1.2.3.6");
        let (old, torn) = (ledger.new_name(), ledger.new_name());
        let (tx, rx) = oneshot::channel();
        ledger.add(&k, old.clone(), 10, None);
        ledger.add(&k, torn.clone(), 10, Some(tx));
        ledger.enqueue(&k);
        ledger.next().await;
        let pick = ledger.pick(&k).unwrap();
        ledger
            .set_aside(&pick)
            .tell(&ledger, UploadOutcome::NotUploaded);
        assert_eq!(rx.await, Ok(UploadOutcome::NotUploaded));
        assert_eq!(ledger.next().await, k);
        assert_eq!(ledger.pick(&k).unwrap().file, old);
    }

    #[tokio::test]
    async fn settled_waits_for_the_last_key_of_its_job() {
        let ledger = std::sync::Arc::new(Ledger::default());
        let (a, b) = (key("1.2.3.7"), key("1.2.3.8"));
        for k in [&a, &b] {
            ledger.add(k, ledger.new_name(), 1, None);
            ledger.enqueue(k);
        }
        let waiting = tokio::spawn({
            let ledger = ledger.clone();
            async move { ledger.settled(JOB).await }
        });
        for _ in 0..2 {
            let k = ledger.next().await;
            let pick = ledger.pick(&k).unwrap();
            assert!(!waiting.is_finished());
            ledger
                .uploaded(&pick)
                .tell(&ledger, UploadOutcome::Uploaded);
        }
        waiting.await.unwrap();
        assert_eq!(ledger.unsettled("01JD6Y7Z8X9W0V1T2S3R4Q5P6M"), 0);
    }

    #[tokio::test]
    async fn stopping_lets_every_waiter_go_without_an_outcome() {
        let ledger = Ledger::default();
        let k = key("1.2.3.9");
        let (tx, rx) = oneshot::channel();
        ledger.add(&k, ledger.new_name(), 1, Some(tx));
        ledger.stop();
        assert!(rx.await.is_err(), "no outcome: the batch stays unfinished");
        let (tx, rx) = oneshot::channel();
        ledger.add(&k, ledger.new_name(), 1, Some(tx));
        assert!(rx.await.is_err());
    }
}

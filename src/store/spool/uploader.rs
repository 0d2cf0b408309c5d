//! The background uploader: sends each spooled object to its final key in the store behind the
//! spool (S3), at most `--spool-upload-concurrency` at once, and removes its spool file only once
//! the store confirmed it.
//!
//! Each object is streamed from its spool file into the inner store's upload (so a large one goes
//! in multipart parts, as in direct mode) while its CRC32C is computed; the upload is committed,
//! i.e. the object made visible, only if the checksum matches the trailer's. A mismatch aborts the
//! upload and quarantines the file ([`super::replay::quarantine`]).
//!
//! A failed upload is retried with exponential backoff and full jitter
//! ([`crate::import::full_jitter`], the AWS SDKs' retry behaviour), forever: the object was
//! acknowledged, so giving up would lose it. Every store error counts as retryable: a missing bucket
//! or a denied PutObject is an operator's to fix, and the upload must then go through without a
//! restart. An outage is one WARN line when it starts, a reminder every minute while it lasts, and
//! one INFO line when the first upload succeeds again, which also wakes the workers waiting in
//! backoff so that catching up starts at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Shared;
use super::file::{Checksum, TornFile, Trailer};
use super::ledger::Pick;
use super::replay::{UploaderReport, quarantine};
use crate::clock::{now_rfc3339, rfc3339};
use crate::durable::blocking;
use crate::import::full_jitter;
use crate::metrics::metrics;
use crate::store::{ObjectKey, StoreError, UploadOutcome};

/// First pause after a failed upload; it doubles with each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between two attempts of one object.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Bytes read from a spool file at a time.
const READ_CHUNK: u64 = 1024 * 1024;
/// While uploads keep failing, a WARN line this often.
const OUTAGE_REMINDER: Duration = Duration::from_secs(60);
/// How often the spool gauges (files, bytes, oldest age) are refreshed.
const LEVELS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the store's answer at start-up.
const STARTUP_CHECK: Duration = Duration::from_secs(10);

/// Why one attempt at uploading a spool file failed.
#[derive(Debug)]
enum SendError {
    /// The file cannot be trusted: quarantine it.
    Torn(TornFile),
    /// The file is gone (removed by hand): nothing to upload.
    Vanished,
    /// The store (or reading the file) failed: try again later.
    Retry(StoreError),
}

/// Whether uploads are failing, for the outage's log lines and the uploader's report.
#[derive(Debug, Default)]
struct Outage {
    failing_since: Option<Instant>,
    /// The same moment on the wall clock, for the report.
    failing_since_wall: Option<SystemTime>,
    last_warned: Option<Instant>,
    last_error: Option<String>,
}

/// How often the uploader's report ([`UploaderReport`]) is rewritten, in [`LEVELS_EVERY`] ticks.
const REPORT_EVERY_TICKS: u32 = 5;
/// The window of the reported upload rate, in [`LEVELS_EVERY`] ticks.
const RATE_WINDOW_TICKS: usize = 60;

/// Uploads spooled objects to the inner store (see the module documentation).
pub(crate) struct Uploader {
    shared: Arc<Shared>,
    concurrency: usize,
    outage: Mutex<Outage>,
    /// Uploads succeed again after an outage: workers waiting in backoff try at once.
    back: Notify,
    /// Objects and bytes uploaded since start (for the report; the global metrics are shared by
    /// every spool of a test process).
    uploaded_files: AtomicU64,
    uploaded_bytes: AtomicU64,
}

impl Uploader {
    pub(crate) fn new(shared: Arc<Shared>, concurrency: usize) -> Arc<Self> {
        Arc::new(Uploader {
            shared,
            concurrency: concurrency.max(1),
            outage: Mutex::new(Outage::default()),
            back: Notify::new(),
            uploaded_files: AtomicU64::new(0),
            uploaded_bytes: AtomicU64::new(0),
        })
    }

    fn outage(&self) -> MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Uploads until `stop` is cancelled. Then uploads in progress are abandoned (their multipart
    /// uploads aborted, their spool files kept for the next start) and every waiter is let go.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        tokio::spawn({
            let me = self.clone();
            async move { me.startup_check().await }
        });
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut workers = JoinSet::new();
        let dispatch = async {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let key = self.shared.ledger.next().await;
                let me = self.clone();
                workers.spawn(async move {
                    me.upload(key).await;
                    drop(slot);
                });
                while workers.try_join_next().is_some() {}
            }
        };
        let levels = async {
            let mut every = tokio::time::interval(LEVELS_EVERY);
            let mut uploaded = std::collections::VecDeque::with_capacity(RATE_WINDOW_TICKS + 1);
            for tick in 0u32.. {
                every.tick().await;
                self.publish_levels();
                uploaded.push_back((Instant::now(), self.uploaded_bytes.load(Ordering::Relaxed)));
                if uploaded.len() > RATE_WINDOW_TICKS {
                    uploaded.pop_front();
                }
                if tick % REPORT_EVERY_TICKS == 0 {
                    self.write_report(&uploaded).await;
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = dispatch => {}
            _ = levels => {}
        }
        workers.abort_all();
        while workers.join_next().await.is_some() {}
        self.shared.ledger.stop();
        self.publish_levels();
        let left = self.shared.ledger.levels();
        if left.files > 0 {
            info!(
                files = left.files,
                bytes = left.bytes,
                "spool: stopping with instances still to upload; they are uploaded at the next start"
            );
        }
    }

    /// One ERROR line if the store behind the spool does not answer at start-up.
    async fn startup_check(&self) {
        let inner = &self.shared.inner;
        let problem = match tokio::time::timeout(STARTUP_CHECK, inner.check()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {STARTUP_CHECK:?}"),
        };
        error!(error = %problem, "{} does not answer at start-up; instances are acknowledged from the spool and uploaded once it does", inner.describe());
    }

    /// Rewrites the report `spool status` reads; `uploaded` holds (time, bytes uploaded so far)
    /// samples over the rate's window, oldest first.
    async fn write_report(&self, uploaded: &std::collections::VecDeque<(Instant, u64)>) {
        let bytes_per_second = match (uploaded.front(), uploaded.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                ((b1 - b0) as f64 / t1.duration_since(*t0).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let report = {
            let outage = self.outage();
            UploaderReport {
                updated_at: now_rfc3339(),
                uploaded_files: self.uploaded_files.load(Ordering::Relaxed),
                uploaded_bytes: self.uploaded_bytes.load(Ordering::Relaxed),
                bytes_per_second,
                failing_since: outage.failing_since_wall.map(rfc3339),
                last_error: outage.failing_since.and(outage.last_error.clone()),
            }
        };
        let dir = self.shared.dir.clone();
        if let Err(e) = blocking(move || report.write(&dir)).await {
            debug!(error = %e, "spool: the uploader's report could not be written");
        }
    }

    /// Sets the spool gauges from the ledger.
    fn publish_levels(&self) {
        let levels = self.shared.ledger.levels();
        let m = metrics();
        m.spool_files.set(levels.files as i64);
        m.spool_bytes.set(levels.bytes as i64);
        let age = levels.oldest.map_or(0, |t| {
            SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs()
        });
        m.spool_oldest_age_seconds.set(age as i64);
    }

    /// Uploads `key` (its newest spool file) until the store confirms it or the file turns out
    /// torn or gone.
    async fn upload(&self, key: ObjectKey) {
        let mut attempt = 0u32;
        let mut woken_early = false;
        loop {
            let Some(pick) = self.shared.ledger.pick(&key) else {
                return;
            };
            let started = Instant::now();
            match self.send(&pick).await {
                Ok(bytes) => {
                    self.succeeded();
                    metrics().spool_uploaded.inc();
                    metrics().spool_bytes_uploaded.inc_by(bytes);
                    self.uploaded_files.fetch_add(1, Ordering::Relaxed);
                    self.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
                    let settled = self.shared.ledger.uploaded(&pick);
                    // Removed before the batch counts the object: a crash in between uploads it
                    // again (the same bytes to the same key), never leaves it uncounted.
                    let objects = self.shared.objects.clone();
                    let files = settled.files.clone();
                    let removed = blocking(move || {
                        for f in files {
                            std::fs::remove_file(objects.join(f))?;
                        }
                        Ok(())
                    })
                    .await;
                    if let Err(e) = removed {
                        warn!(key = %pick.key, error = %e, "spool: uploaded, but its spool file could not be removed; the next start uploads it again");
                    }
                    settled.tell(&self.shared.ledger, UploadOutcome::Uploaded);
                    debug!(key = %pick.key, bytes, attempt, duration_ms = started.elapsed().as_millis() as u64, "spool: uploaded");
                    return;
                }
                Err(SendError::Torn(why)) => {
                    let (objects, q, file) = (
                        self.shared.objects.clone(),
                        self.shared.quarantine.clone(),
                        pick.file.clone(),
                    );
                    let why_text = why.to_string();
                    if let Err(e) =
                        blocking(move || quarantine(&objects, &q, &file, &why_text)).await
                    {
                        error!(file = %pick.file, reason = %why, error = %e, "spool file cannot be trusted and could not be moved to quarantine; it is not uploaded");
                    }
                    let ledger = &self.shared.ledger;
                    ledger
                        .set_aside(&pick)
                        .tell(ledger, UploadOutcome::NotUploaded);
                    return;
                }
                Err(SendError::Vanished) => {
                    error!(file = %pick.file, key = %pick.key, "spool file vanished before its upload (removed by hand?): this acknowledged instance is not uploaded");
                    let ledger = &self.shared.ledger;
                    ledger
                        .set_aside(&pick)
                        .tell(ledger, UploadOutcome::NotUploaded);
                    return;
                }
                Err(SendError::Retry(e)) => {
                    attempt = attempt.saturating_add(1);
                    metrics().spool_upload_errors.inc();
                    self.failed(&pick, &e);
                    let delay = full_jitter(FIRST_BACKOFF, MAX_BACKOFF, attempt);
                    // A worker woken early that failed again waits its full backoff next time,
                    // so one failing object cannot spin on the successes of the others.
                    let listen = !woken_early;
                    let back = self.back.notified();
                    woken_early = false;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = back, if listen => woken_early = true,
                    }
                }
            }
        }
    }

    /// One attempt: streams the spool file into the inner store, verifying its checksum before
    /// the commit. Returns the object's size.
    async fn send(&self, pick: &Pick) -> Result<u64, SendError> {
        let path = self.shared.objects.join(&pick.file);
        let opened = blocking(move || {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            let trailer = Trailer::read_from(&mut file, len)?;
            std::io::Seek::rewind(&mut file)?;
            Ok(Some((file, trailer)))
        })
        .await
        .map_err(|e| SendError::Retry(e.into()))?;
        let Some((file, trailer)) = opened else {
            return Err(SendError::Vanished);
        };
        let trailer = trailer.map_err(SendError::Torn)?;
        if trailer.key != pick.key {
            return Err(SendError::Torn(TornFile::OtherKey {
                found: trailer.key.to_string(),
                expected: pick.key.to_string(),
            }));
        }
        let mut file = tokio::fs::File::from_std(file);
        let mut upload = self
            .shared
            .inner
            .begin(&pick.key)
            .await
            .map_err(SendError::Retry)?;
        let mut checksum = Checksum::new();
        let mut left = trailer.object_len;
        let mut buf = vec![0u8; left.clamp(1, READ_CHUNK) as usize];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match file.read(&mut buf[..want]).await {
                Ok(0) => {
                    upload.abort().await;
                    return Err(SendError::Torn(TornFile::ShortRead));
                }
                Ok(n) => n,
                Err(e) => {
                    upload.abort().await;
                    return Err(SendError::Retry(e.into()));
                }
            };
            checksum.update(&buf[..n]);
            // A failed write drops the upload, which aborts it.
            upload.write(&buf[..n]).await.map_err(SendError::Retry)?;
            left -= n as u64;
        }
        if let Err(why) = trailer.verify(checksum) {
            upload.abort().await;
            return Err(SendError::Torn(why));
        }
        upload.commit().await.map_err(SendError::Retry)?;
        Ok(trailer.object_len)
    }

    /// An attempt failed: the outage's log lines (see the module documentation).
    fn failed(&self, pick: &Pick, error: &StoreError) {
        let now = Instant::now();
        let mut outage = self.outage();
        let levels = self.shared.ledger.levels();
        outage.last_error = Some(error.to_string());
        match (outage.failing_since, outage.last_warned) {
            (None, _) => {
                outage.failing_since = Some(now);
                outage.failing_since_wall = Some(SystemTime::now());
                outage.last_warned = Some(now);
                warn!(error = %error, key = %pick.key, waiting_files = levels.files, waiting_bytes = levels.bytes, "spool: uploads to {} are failing; instances stay in the spool and are retried with backoff, receiving goes on", self.shared.inner.describe());
            }
            (Some(since), Some(warned)) if now.duration_since(warned) >= OUTAGE_REMINDER => {
                outage.last_warned = Some(now);
                warn!(error = %error, failing_for = ?now.duration_since(since), waiting_files = levels.files, waiting_bytes = levels.bytes, "spool: uploads still failing");
            }
            _ => debug!(key = %pick.key, error = %error, "spool: upload failed; will retry"),
        }
    }

    /// An attempt succeeded: ends an outage (one INFO line, and the waiting workers try at once).
    fn succeeded(&self) {
        let mut outage = self.outage();
        if let Some(since) = outage.failing_since.take() {
            outage.last_warned = None;
            outage.failing_since_wall = None;
            outage.last_error = None;
            let levels = self.shared.ledger.levels();
            info!(failed_for = ?since.elapsed(), waiting_files = levels.files, waiting_bytes = levels.bytes, "spool: uploads resumed");
            self.back.notify_waiters();
        }
    }
}

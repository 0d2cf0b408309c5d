//! Edge mode: a local spool in front of S3 (`--spool-dir`).
//!
//! A gateway on premises reaches S3 over a link with tens of milliseconds of round trip, and
//! sometimes not at all. In edge mode an instance is acknowledged once it is durable in the spool,
//! written exactly as the local store writes ([`super::durable`]: temporary file, fsync, rename,
//! directory fsync), so a C-STORE costs local-disk time and an outage of the link or of S3 fails
//! none. The uploader ([`uploader`]) puts each object at its final S3 key in the background and
//! removes its spool file only once S3 confirmed it; a start replays whatever a crash left
//! ([`replay`]).
//!
//! Layout of the spool directory:
//!
//! ```text
//! DIR/.incoming/   files being written (removed at start: never acknowledged)
//! DIR/objects/     {ULID}.spool: one per acknowledged copy, waiting for upload (format: [`file`])
//! DIR/quarantine/  spool files that cannot be trusted: never uploaded, never deleted
//! DIR/uploader.json the running uploader's report (rate, failures) for `spool status`
//! ```
//!
//! The spool is bounded ([`SpoolCapacity`]): when full, a new instance gets 0xA700 with the
//! Error Comment "spool full" and the association goes on; nothing acknowledged is ever dropped
//! to make room.
//!
//! Batches keep their contract because the batch counts a spooled instance only once the uploader
//! says it is in S3 ([`crate::store::Placement::Spooled`]): a batch closes, and its import starts,
//! only with every instance it holds in S3. Recovery closes a batch left open by a stopped gateway
//! only once the spool holds nothing more of it ([`ObjectStore::unsettled`]).

mod file;
pub(crate) mod ledger;
pub(crate) mod replay;
mod uploader;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use self::file::{Checksum, Trailer};
use self::ledger::Ledger;
use self::replay::{OBJECTS_DIR, QUARANTINE_DIR, file_system_space};
use self::uploader::Uploader;
use super::{
    BatchContents, Committed, ObjectKey, ObjectStore, ObjectUpload, Placement, StoreError,
    StoredObject, UploadTicket,
};
use crate::durable::{DurableFile, Incoming, blocking};

pub(crate) use self::replay::status;

/// The default of `--spool-max-bytes`: leave this percentage of the spool's file system free.
pub(crate) const DEFAULT_FREE_PERCENT: u8 = 10;
/// With [`SpoolCapacity::LeaveFree`], the file system is asked again after this much growth of one
/// instance (statvfs(3) is cheap, but not free at every PDV).
const FREE_SPACE_EVERY: u64 = 1024 * 1024;

/// How much the spool may hold (`--spool-max-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpoolCapacity {
    /// At most this many bytes of spool files, those being written included.
    MaxBytes(u64),
    /// Whatever keeps this percentage of the spool's file system free (the default).
    LeaveFree { percent: u8 },
}

impl std::fmt::Display for SpoolCapacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolCapacity::MaxBytes(n) => write!(f, "at most {n} bytes"),
            SpoolCapacity::LeaveFree { percent } => {
                write!(f, "leaving {percent}% of its file system free")
            }
        }
    }
}

/// What the spool's parts share: its directories, its ledger, and the store behind it.
pub(crate) struct Shared {
    dir: PathBuf,
    objects: PathBuf,
    quarantine: PathBuf,
    ledger: Ledger,
    /// Where objects go (S3).
    inner: Arc<dyn ObjectStore>,
    capacity: SpoolCapacity,
}

impl Shared {
    /// Why the spool cannot take `more` bytes now, if it cannot.
    fn full(&self, more: u64) -> Option<String> {
        match self.capacity {
            SpoolCapacity::MaxBytes(max) => {
                let used = self.ledger.used_bytes();
                (used.saturating_add(more) > max).then(|| {
                    format!("{used} bytes spooled, at most {max} allowed (--spool-max-bytes)")
                })
            }
            SpoolCapacity::LeaveFree { percent } => {
                let space = match file_system_space(&self.dir) {
                    Ok(s) => s,
                    // Unknown: the write itself will say if the disk is full.
                    Err(_) => return None,
                };
                let keep = space.total / 100 * u64::from(percent);
                (space.available.saturating_sub(more) < keep).then(|| {
                    format!(
                        "{} of {} bytes free on the spool's file system, and it leaves {percent}% free",
                        space.available, space.total
                    )
                })
            }
        }
    }
}

/// The edge spool: an [`ObjectStore`] whose commit is local and whose uploads to `inner` follow.
pub(crate) struct Spool {
    shared: Arc<Shared>,
    incoming: Incoming,
    upload_concurrency: usize,
}

impl Spool {
    /// Opens (creating) the spool directory `dir` in front of `inner`, and replays what it holds:
    /// every trustworthy spool file is queued for upload, every torn one quarantined.
    pub(crate) async fn open(
        dir: PathBuf,
        capacity: SpoolCapacity,
        upload_concurrency: usize,
        inner: Arc<dyn ObjectStore>,
    ) -> Result<Arc<Spool>, StoreError> {
        let dir = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()?.join(dir)
        };
        let objects = dir.join(OBJECTS_DIR);
        let quarantine = dir.join(QUARANTINE_DIR);
        for d in [&objects, &quarantine] {
            tokio::fs::create_dir_all(d).await?;
        }
        let incoming = Incoming::open(&dir).await?;
        let shared = Arc::new(Shared {
            dir,
            objects,
            quarantine,
            ledger: Ledger::default(),
            inner,
            capacity,
        });
        {
            let shared = shared.clone();
            blocking(move || replay::replay(&shared.objects, &shared.quarantine, &shared.ledger))
                .await?;
        }
        crate::metrics::metrics().spool_on();
        Ok(Arc::new(Spool {
            shared,
            incoming,
            upload_concurrency,
        }))
    }

    /// The batches the spool holds instances of; right after [`Spool::open`], those a crash or a
    /// stop left behind.
    pub(crate) fn pending_jobs(&self) -> Vec<String> {
        self.shared.ledger.jobs()
    }

    /// Runs the uploader until `stop` is cancelled; then the instances still in the spool wait for
    /// the next start.
    pub(crate) async fn run_uploader(&self, stop: CancellationToken) {
        Uploader::new(self.shared.clone(), self.upload_concurrency)
            .run(stop)
            .await;
    }
}

#[async_trait]
impl ObjectStore for Spool {
    async fn begin(&self, key: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError> {
        if let Some(why) = self.shared.full(1) {
            return Err(StoreError::SpoolFull(why));
        }
        Ok(Box::new(SpoolUpload {
            file: self.incoming.create().await.map_err(spool_io)?,
            checksum: Checksum::new(),
            key: key.clone(),
            reservation: Reservation {
                shared: self.shared.clone(),
                bytes: 0,
            },
            checked_at: 0,
        }))
    }

    /// The final S3 location: batches are imported from S3, never from the spool.
    fn input_s3_uri(&self, job_id: &str) -> String {
        self.shared.inner.input_s3_uri(job_id)
    }

    /// Ready while the spool accepts instances, whether or not S3 answers (edge mode receives
    /// through an outage).
    async fn check(&self) -> Result<(), StoreError> {
        let meta = tokio::fs::metadata(self.incoming.dir()).await?;
        if meta.permissions().readonly() {
            return Err(std::io::Error::other("spool directory is read-only").into());
        }
        match self.shared.full(1) {
            Some(why) => Err(StoreError::SpoolFull(why)),
            None => Ok(()),
        }
    }

    /// What S3 holds of the batch (recovery asks only once [`ObjectStore::unsettled`] is zero).
    async fn batch_contents(&self, job_id: &str) -> Result<BatchContents, StoreError> {
        self.shared.inner.batch_contents(job_id).await
    }

    /// In the spool (durable, fsynced, waiting for upload) or already in S3: either way the
    /// object is safe, which is what Storage Commitment asks.
    async fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        if self.shared.ledger.holds(key) {
            return Ok(true);
        }
        self.shared.inner.exists(key).await
    }

    /// What S3 holds of the batch (the index repair runs once the batch has settled).
    async fn list_objects(
        &self,
        job_id: &str,
    ) -> Result<Vec<crate::store::ListedObject>, StoreError> {
        self.shared.inner.list_objects(job_id).await
    }

    async fn read_head(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.shared.inner.read_head(key, limit).await
    }

    fn describe(&self) -> String {
        format!(
            "edge spool {} ({}) in front of {}",
            self.shared.dir.display(),
            self.shared.capacity,
            self.shared.inner.describe()
        )
    }

    fn unsettled(&self, job_id: &str) -> u64 {
        self.shared.ledger.unsettled(job_id)
    }

    async fn settled(&self, job_id: &str) {
        self.shared.ledger.settled(job_id).await
    }
}

/// A full disk is a full spool: the sender gets the same clear answer.
fn spool_io(e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        StoreError::SpoolFull(e.to_string())
    } else {
        StoreError::Io(e)
    }
}

/// Bytes of a spool file being written, counted against the capacity until it is committed or
/// abandoned.
struct Reservation {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared.ledger.release(self.bytes);
    }
}

/// One object being written to the spool.
struct SpoolUpload {
    file: DurableFile,
    /// CRC32C of the object's bytes so far.
    checksum: Checksum,
    key: ObjectKey,
    reservation: Reservation,
    /// The reservation when the file system's free space was last asked.
    checked_at: u64,
}

#[async_trait]
impl ObjectUpload for SpoolUpload {
    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let n = data.len() as u64;
        let shared = &self.reservation.shared;
        let ask = match shared.capacity {
            SpoolCapacity::MaxBytes(_) => true,
            SpoolCapacity::LeaveFree { .. } => {
                self.reservation.bytes + n - self.checked_at >= FREE_SPACE_EVERY
            }
        };
        if ask {
            if let Some(why) = shared.full(n) {
                return Err(StoreError::SpoolFull(why));
            }
            self.checked_at = self.reservation.bytes + n;
        }
        shared.ledger.reserve(n);
        self.reservation.bytes += n;
        self.checksum.update(data);
        self.file.write(data).await.map_err(spool_io)
    }

    async fn commit(self: Box<Self>) -> Result<StoredObject, StoreError> {
        // Whoever commits without asking where the object is cannot count it on upload.
        Ok(self.commit_placed().await?.stored)
    }

    async fn commit_placed(self: Box<Self>) -> Result<Committed, StoreError> {
        let SpoolUpload {
            mut file,
            checksum,
            key,
            reservation,
            ..
        } = *self;
        let size = file.size();
        let trailer = Trailer::encode(size, &key, checksum);
        file.write(&trailer).await.map_err(spool_io)?;
        let on_disk = file.size();
        let shared = reservation.shared.clone();
        let published = key.clone();
        let ticket = file
            .commit_with(move |temp| {
                let name = shared.ledger.new_name();
                std::fs::rename(temp, shared.objects.join(&name))?;
                let (tx, ticket) = UploadTicket::new();
                shared.ledger.add(&published, name, on_disk, Some(tx));
                Ok((vec![shared.objects.clone()], ticket))
            })
            .await
            .map_err(spool_io)?;
        // Durable, directory entry included: the uploader may take it (and remove it) now.
        reservation.shared.ledger.enqueue(&key);
        drop(reservation);
        Ok(Committed {
            stored: StoredObject { size },
            placement: Placement::Spooled(ticket),
        })
    }

    async fn abort(self: Box<Self>) {
        self.file.abort().await;
    }
}

#[cfg(test)]
mod tests;

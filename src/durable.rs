//! The durable-write recipe shared by the local store, the edge spool, the job journal and the
//! pending Storage Commitment requests.
//!
//! A file is written to a temporary name in `{root}/.incoming/` (the same file system as its
//! destination), fsynced, renamed into place, and then the directories whose entries changed are
//! fsynced. A reader therefore sees whole files or nothing, and a file that was renamed into place
//! survives a crash or a power cut. Bytes are gathered in a large buffer and written in blocks, so a
//! small file costs three trips to the blocking pool in all (create, commit, and nothing between).
//! Small records written whole (the job journal, pending Storage Commitment requests) use
//! [`replace_file`], the same recipe with the temporary file beside its destination.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Name of the directory holding files being written; never part of a batch or the spool.
pub const INCOMING_DIR: &str = ".incoming";
/// Write buffer: a 0.5 MB instance is written with one system call, at commit.
const WRITE_BUFFER: usize = 1024 * 1024;
/// Most buffers kept for reuse (one per concurrently receiving association is plenty).
const POOLED_BUFFERS: usize = 64;

/// Runs blocking file-system work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// Replaces `dest` with `bytes` atomically and durably: written to `{dest}.tmp` beside it, fsynced,
/// renamed over `dest`, then its directory fsynced. A reader sees the old file or the new, whole.
pub(crate) async fn replace_file(dest: PathBuf, bytes: Vec<u8>) -> std::io::Result<()> {
    blocking(move || {
        let dir = dest
            .parent()
            .ok_or_else(|| std::io::Error::other("destination has no directory"))?;
        std::fs::create_dir_all(dir)?;
        let mut temp = dest.clone().into_os_string();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let mut f = File::create(&temp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&temp, &dest)?;
        File::open(dir)?.sync_all()
    })
    .await
}

/// The `.incoming` directory of a root, and the write buffers its files share.
pub(crate) struct Incoming {
    dir: PathBuf,
    /// Write buffers handed back by finished files. Reusing them avoids a fresh 1 MiB allocation
    /// (and its page faults) per instance.
    buffers: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Incoming {
    /// Creates `{root}/.incoming` and removes what a crash left in it: files never renamed into
    /// place were never acknowledged, so removing them loses nothing.
    pub(crate) async fn open(root: &Path) -> std::io::Result<Self> {
        let dir = root.join(INCOMING_DIR);
        tokio::fs::create_dir_all(&dir).await?;
        let mut entries = tokio::fs::read_dir(&dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
        Ok(Incoming {
            dir,
            buffers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The directory itself (for readiness checks).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a new file under a fresh temporary name.
    pub(crate) async fn create(&self) -> std::io::Result<DurableFile> {
        let temp = self.dir.join(format!("{}.part", ulid::Ulid::generate()));
        let file = blocking({
            let temp = temp.clone();
            move || File::create(temp)
        })
        .await?;
        let buf = self
            .buffers
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop())
            .unwrap_or_else(|| Vec::with_capacity(WRITE_BUFFER));
        Ok(DurableFile {
            pool: self.buffers.clone(),
            file: Some(file),
            buf,
            temp,
            size: 0,
        })
    }
}

/// Moves the fsynced temporary file `temp` to `dest` below `root`, creating the directories it
/// needs; returns the directories whose entries changed, which the caller must fsync (the one
/// holding `dest`, and each directory created for it).
pub(crate) fn place(temp: &Path, root: &Path, dest: &Path) -> std::io::Result<Vec<PathBuf>> {
    let parent = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("destination has no directory"))?;
    let mut to_sync = vec![parent.to_path_buf()];
    let mut dir = parent;
    while dir != root && !dir.exists() {
        dir = match dir.parent() {
            Some(p) => p,
            None => break,
        };
        to_sync.push(dir.to_path_buf());
    }
    std::fs::create_dir_all(parent)?;
    std::fs::rename(temp, dest)?;
    Ok(to_sync)
}

/// One file being written durably: streamed in, then committed (fsynced and renamed into place)
/// or aborted (removed). Dropping it uncommitted removes the temporary file.
pub(crate) struct DurableFile {
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    file: Option<File>,
    buf: Vec<u8>,
    /// The temporary file; empty once renamed into place or removed.
    temp: PathBuf,
    size: u64,
}

impl DurableFile {
    /// Bytes written so far.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    async fn flush_buffer(&mut self) -> std::io::Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("file already finished"))?;
        let buf = std::mem::take(&mut self.buf);
        let (file, mut buf) = blocking(move || {
            file.write_all(&buf)?;
            Ok((file, buf))
        })
        .await?;
        buf.clear();
        self.buf = buf;
        self.file = Some(file);
        Ok(())
    }

    /// Appends bytes; they reach the file in blocks of the buffer's size.
    pub(crate) async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= WRITE_BUFFER {
            self.flush_buffer().await?;
        }
        Ok(())
    }

    /// Writes what is buffered, fsyncs the file, then calls `publish` with the temporary path:
    /// it moves the file into place (usually with [`place`]) and returns the directories to fsync
    /// and a value handed back to the caller. All of it is one trip to the blocking pool.
    pub(crate) async fn commit_with<T: Send + 'static>(
        mut self,
        publish: impl FnOnce(&Path) -> std::io::Result<(Vec<PathBuf>, T)> + Send + 'static,
    ) -> std::io::Result<T> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("file already finished"))?;
        let mut buf = std::mem::take(&mut self.buf);
        let temp = self.temp.clone();
        let (buf, renamed, value) = blocking(move || {
            file.write_all(&buf)?;
            buf.clear();
            file.sync_all()?;
            drop(file);
            let (dirs, value) = match publish(&temp) {
                Ok(placed) => placed,
                // Not renamed: the temporary file is still ours to remove (by Drop).
                Err(e) => return Ok((buf, Err(e), None)),
            };
            for d in dirs {
                File::open(&d)?.sync_all()?;
            }
            Ok((buf, Ok(()), Some(value)))
        })
        .await?;
        self.buf = buf;
        renamed?;
        self.temp = PathBuf::new(); // renamed: nothing left to clean up
        value.ok_or_else(|| std::io::Error::other("published without a value"))
    }

    /// [`DurableFile::commit_with`] to `dest` below `root`.
    pub(crate) async fn commit(self, root: PathBuf, dest: PathBuf) -> std::io::Result<()> {
        self.commit_with(move |temp| Ok((place(temp, &root, &dest)?, ())))
            .await
    }

    /// Discards everything written.
    pub(crate) async fn abort(mut self) {
        self.file.take();
        if !self.temp.as_os_str().is_empty() {
            let _ = tokio::fs::remove_file(&self.temp).await;
            self.temp = PathBuf::new();
        }
    }
}

impl Drop for DurableFile {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() >= WRITE_BUFFER
            && let Ok(mut pool) = self.pool.lock()
            && pool.len() < POOLED_BUFFERS
        {
            pool.push(buf);
        }
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

//! The local-directory store, the embedded default when no bucket is configured.
//!
//! Durability follows the classic recipe: write to a temporary file in `{root}/.incoming/` (same
//! file system as the destination), fsync it, rename it into place, then fsync the directories whose
//! entries changed. A reader of the tree therefore sees whole objects or nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use std::fs::File;
use std::io::Write;

use async_trait::async_trait;

use super::{
    BatchContents, ListedObject, ObjectKey, ObjectStore, ObjectUpload, StoreError, StoredObject,
};

/// Name of the directory holding uploads in progress; never part of a batch.
pub const INCOMING_DIR: &str = ".incoming";
/// Write buffer: a 0.5 MB instance is written with one system call, at commit.
const WRITE_BUFFER: usize = 1024 * 1024;

/// Objects as files under a directory: temp file, fsync, rename, directory fsync.
pub(crate) struct LocalStore {
    root: PathBuf,
    /// Write buffers handed back by finished uploads. Reusing them avoids a fresh 1 MiB allocation
    /// (and its page faults) per instance.
    buffers: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Most buffers kept for reuse (one per concurrently receiving association is plenty).
const POOLED_BUFFERS: usize = 64;

impl LocalStore {
    /// Creates the root and its incoming directory, and removes uploads left behind by a crash
    /// (they were never acknowledged, so removing them loses nothing).
    pub(crate) async fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()?.join(root)
        };
        let incoming = root.join(INCOMING_DIR);
        tokio::fs::create_dir_all(&incoming).await?;
        let mut entries = tokio::fs::read_dir(&incoming).await?;
        while let Some(entry) = entries.next_entry().await? {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
        Ok(LocalStore {
            root,
            buffers: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn begin(&self, key: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError> {
        let temp = self
            .root
            .join(INCOMING_DIR)
            .join(format!("{}.part", ulid::Ulid::generate()));
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
        Ok(Box::new(LocalUpload {
            pool: self.buffers.clone(),
            file: Some(file),
            buf,
            temp,
            root: self.root.clone(),
            dest: self.root.join(key.as_str()),
            size: 0,
        }))
    }

    fn input_s3_uri(&self, job_id: &str) -> String {
        format!("{}/{job_id}/", self.root.display())
    }

    async fn check(&self) -> Result<(), StoreError> {
        let meta = tokio::fs::metadata(self.root.join(INCOMING_DIR)).await?;
        if meta.permissions().readonly() {
            return Err(std::io::Error::other("store directory is read-only").into());
        }
        Ok(())
    }

    async fn batch_contents(&self, job_id: &str) -> Result<BatchContents, StoreError> {
        let dir = self.root.join(job_id);
        Ok(blocking(move || {
            let mut contents = BatchContents::default();
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                let entries = match std::fs::read_dir(&d) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for entry in entries {
                    let entry = entry?;
                    let meta = entry.metadata()?;
                    if meta.is_dir() {
                        stack.push(entry.path());
                    } else if let Ok(rel) = entry.path().strip_prefix(&dir) {
                        contents.add(&rel.to_string_lossy(), meta.len());
                    }
                }
            }
            contents.study_instance_uids.sort();
            Ok(contents)
        })
        .await?)
    }

    async fn list_objects(&self, job_id: &str) -> Result<Vec<ListedObject>, StoreError> {
        let dir = self.root.join(job_id);
        let job_id = job_id.to_string();
        Ok(blocking(move || {
            let mut objects = Vec::new();
            let mut stack = vec![dir.clone()];
            while let Some(d) = stack.pop() {
                let entries = match std::fs::read_dir(&d) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for entry in entries {
                    let entry = entry?;
                    let meta = entry.metadata()?;
                    if meta.is_dir() {
                        stack.push(entry.path());
                    } else if let Ok(rel) = entry.path().strip_prefix(&dir)
                        && let Some(listed) = ListedObject::of_batch(
                            &job_id,
                            &rel.to_string_lossy(),
                            meta.len(),
                            meta.modified().ok(),
                        )
                    {
                        objects.push(listed);
                    }
                }
            }
            Ok(objects)
        })
        .await?)
    }

    async fn read_head(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.root.join(key);
        Ok(blocking(move || {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut head = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, limit), &mut head)?;
            Ok(Some(head))
        })
        .await?)
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// An upload in progress. Bytes are gathered in `buf` and written in large blocks; the whole commit
/// (last write, fsync, directories, rename, directory fsync) is one trip to the blocking pool, so a
/// small instance costs three such trips in all.
struct LocalUpload {
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    file: Option<File>,
    buf: Vec<u8>,
    temp: PathBuf,
    root: PathBuf,
    dest: PathBuf,
    size: u64,
}

impl LocalUpload {
    async fn flush_buffer(&mut self) -> std::io::Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("upload already finished"))?;
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
}

#[async_trait]
impl ObjectUpload for LocalUpload {
    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= WRITE_BUFFER {
            self.flush_buffer().await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<StoredObject, StoreError> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| std::io::Error::other("upload already finished"))?;
        let mut buf = std::mem::take(&mut self.buf);
        let (temp, root, dest) = (self.temp.clone(), self.root.clone(), self.dest.clone());
        self.buf = blocking(move || {
            file.write_all(&buf)?;
            buf.clear();
            file.sync_all()?;
            drop(file);
            let parent = dest
                .parent()
                .ok_or_else(|| std::io::Error::other("object key has no directory"))?;
            // Directories created for this object need their own entries made durable too.
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
            std::fs::rename(&temp, &dest)?;
            for d in to_sync {
                File::open(&d)?.sync_all()?;
            }
            Ok(buf)
        })
        .await?;
        self.temp = PathBuf::new(); // renamed: nothing left to clean up
        Ok(StoredObject { size: self.size })
    }

    async fn abort(mut self: Box<Self>) {
        self.file.take();
        if !self.temp.as_os_str().is_empty() {
            let _ = tokio::fs::remove_file(&self.temp).await;
            self.temp = PathBuf::new();
        }
    }
}

impl Drop for LocalUpload {
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

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

    #[tokio::test]
    async fn commit_makes_the_object_visible_and_abort_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).await.unwrap();
        let key = ObjectKey::new(BATCH, "1.2", "1.2.3", "1.2.3.4").unwrap();
        let mut up = store.begin(&key).await.unwrap();
        up.write(b"hello ").await.unwrap();
        up.write(b"world").await.unwrap();
        assert!(
            !dir.path().join(key.as_str()).exists(),
            "not visible before commit"
        );
        let stored = up.commit().await.unwrap();
        assert_eq!(stored.size, 11);
        assert_eq!(
            std::fs::read(dir.path().join(key.as_str())).unwrap(),
            b"hello world"
        );

        let key2 = ObjectKey::new(BATCH, "1.2", "1.2.3", "1.2.3.5").unwrap();
        let mut up = store.begin(&key2).await.unwrap();
        up.write(b"partial").await.unwrap();
        up.abort().await;
        let mut up = store.begin(&key2).await.unwrap();
        up.write(b"dropped").await.unwrap();
        drop(up);
        assert!(!dir.path().join(key2.as_str()).exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join(INCOMING_DIR))
                .unwrap()
                .count(),
            0,
            "no temp files left"
        );
    }

    #[tokio::test]
    async fn leftovers_from_a_crash_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(INCOMING_DIR)).unwrap();
        std::fs::write(dir.path().join(INCOMING_DIR).join("x.part"), b"junk").unwrap();
        LocalStore::open(dir.path()).await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join(INCOMING_DIR))
                .unwrap()
                .count(),
            0
        );
    }
}

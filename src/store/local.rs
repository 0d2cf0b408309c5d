//! The local-directory store, the embedded default when no bucket is configured.
//!
//! Durability follows the classic recipe: write to a temporary file in `{root}/.incoming/` (same
//! file system as the destination), fsync it, rename it into place, then fsync the directories whose
//! entries changed. A reader of the tree therefore sees whole objects or nothing.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::fs::File;
use tokio::io::{AsyncWriteExt, BufWriter};

use super::{ObjectKey, ObjectStore, ObjectUpload, StoreError, StoredObject};

/// Name of the directory holding uploads in progress; never part of a batch.
pub const INCOMING_DIR: &str = ".incoming";
/// Write buffer: large enough that a 0.5 MB instance costs a handful of system calls.
const WRITE_BUFFER: usize = 1024 * 1024;

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Creates the root and its incoming directory, and removes uploads left behind by a crash
    /// (they were never acknowledged, so removing them loses nothing).
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let root = if root.is_absolute() { root } else { std::env::current_dir()?.join(root) };
        let incoming = root.join(INCOMING_DIR);
        tokio::fs::create_dir_all(&incoming).await?;
        let mut entries = tokio::fs::read_dir(&incoming).await?;
        while let Some(entry) = entries.next_entry().await? {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn begin(&self, key: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError> {
        let temp = self.root.join(INCOMING_DIR).join(format!("{}.part", ulid::Ulid::generate()));
        let file = File::create(&temp).await?;
        Ok(Box::new(LocalUpload {
            file: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
            temp,
            root: self.root.clone(),
            dest: self.root.join(key.as_str()),
            size: 0,
        }))
    }

    fn batch_location(&self, batch_id: &str) -> String {
        format!("{}/{batch_id}/", self.root.display())
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}

struct LocalUpload {
    file: Option<BufWriter<File>>,
    temp: PathBuf,
    root: PathBuf,
    dest: PathBuf,
    size: u64,
}

#[async_trait]
impl ObjectUpload for LocalUpload {
    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let file = self.file.as_mut().ok_or_else(|| std::io::Error::other("upload already finished"))?;
        file.write_all(data).await?;
        self.size += data.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<StoredObject, StoreError> {
        let mut file = self.file.take().ok_or_else(|| std::io::Error::other("upload already finished"))?;
        file.flush().await?;
        let file = file.into_inner();
        file.sync_all().await?;
        drop(file);
        let parent = self.dest.parent().ok_or_else(|| std::io::Error::other("object key has no directory"))?.to_path_buf();
        // Directories created for this object need their own entries made durable too.
        let mut created = Vec::new();
        let mut dir = parent.as_path();
        while dir != self.root && !tokio::fs::try_exists(dir).await.unwrap_or(false) {
            created.push(dir.to_path_buf());
            dir = match dir.parent() {
                Some(p) => p,
                None => break,
            };
        }
        tokio::fs::create_dir_all(&parent).await?;
        tokio::fs::rename(&self.temp, &self.dest).await?;
        let mut to_sync = vec![parent.clone()];
        to_sync.extend(created.iter().filter_map(|d| d.parent().map(Path::to_path_buf)));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for dir in to_sync {
                std::fs::File::open(&dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        self.temp = PathBuf::new(); // renamed: nothing left to clean up
        Ok(StoredObject { location: self.dest.display().to_string(), size: self.size })
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
        assert!(!dir.path().join(key.as_str()).exists(), "not visible before commit");
        let stored = up.commit().await.unwrap();
        assert_eq!(stored.size, 11);
        assert_eq!(std::fs::read(dir.path().join(key.as_str())).unwrap(), b"hello world");

        let key2 = ObjectKey::new(BATCH, "1.2", "1.2.3", "1.2.3.5").unwrap();
        let mut up = store.begin(&key2).await.unwrap();
        up.write(b"partial").await.unwrap();
        up.abort().await;
        let mut up = store.begin(&key2).await.unwrap();
        up.write(b"dropped").await.unwrap();
        drop(up);
        assert!(!dir.path().join(key2.as_str()).exists());
        assert_eq!(std::fs::read_dir(dir.path().join(INCOMING_DIR)).unwrap().count(), 0, "no temp files left");
    }

    #[tokio::test]
    async fn leftovers_from_a_crash_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(INCOMING_DIR)).unwrap();
        std::fs::write(dir.path().join(INCOMING_DIR).join("x.part"), b"junk").unwrap();
        LocalStore::open(dir.path()).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(INCOMING_DIR)).unwrap().count(), 0);
    }
}

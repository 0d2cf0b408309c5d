//! The local-directory store, the embedded default when no bucket is configured.
//!
//! Durability follows the classic recipe ([`super::durable`], shared with the edge spool): write to
//! a temporary file in `{root}/.incoming/` (same file system as the destination), fsync it, rename
//! it into place, then fsync the directories whose entries changed. A reader of the tree therefore
//! sees whole objects or nothing.

use std::path::PathBuf;

use async_trait::async_trait;

use super::{
    BatchContents, ListedObject, ObjectKey, ObjectStore, ObjectUpload, StoreError, StoredObject,
};
use crate::durable::{DurableFile, Incoming, blocking};

/// Name of the directory holding uploads in progress; never part of a batch.
pub use crate::durable::INCOMING_DIR;

/// Objects as files under a directory: temp file, fsync, rename, directory fsync.
pub(crate) struct LocalStore {
    root: PathBuf,
    incoming: Incoming,
}

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
        let incoming = Incoming::open(&root).await?;
        Ok(LocalStore { root, incoming })
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn begin(&self, key: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError> {
        Ok(Box::new(LocalUpload {
            file: self.incoming.create().await?,
            root: self.root.clone(),
            dest: self.root.join(key.as_str()),
        }))
    }

    fn input_s3_uri(&self, job_id: &str) -> String {
        format!("{}/{job_id}/", self.root.display())
    }

    async fn check(&self) -> Result<(), StoreError> {
        let meta = tokio::fs::metadata(self.incoming.dir()).await?;
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

    async fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        // Committed objects appear by rename, whole: a file at the key is a committed object.
        match tokio::fs::metadata(self.root.join(key.as_str())).await {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
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
            let file = match std::fs::File::open(&path) {
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

/// An upload in progress: a durable file that becomes `dest` at commit.
struct LocalUpload {
    file: DurableFile,
    root: PathBuf,
    dest: PathBuf,
}

#[async_trait]
impl ObjectUpload for LocalUpload {
    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        Ok(self.file.write(data).await?)
    }

    async fn commit(self: Box<Self>) -> Result<StoredObject, StoreError> {
        let LocalUpload { file, root, dest } = *self;
        let size = file.size();
        file.commit(root, dest).await?;
        Ok(StoredObject { size })
    }

    async fn abort(self: Box<Self>) {
        self.file.abort().await;
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
        assert!(store.exists(&key).await.unwrap(), "committed");
        assert!(!store.exists(&key2).await.unwrap(), "aborted and dropped");
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

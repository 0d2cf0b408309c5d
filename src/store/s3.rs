//! The S3 store.
//!
//! An object smaller than the part size is sent with one `PutObject`; a larger one becomes a
//! multipart upload whose parts are sent while the rest of the instance is still arriving, with at
//! most `parts_in_flight` parts buffered at once. Memory per upload is therefore bounded by
//! `part_size * (parts_in_flight + 1)` whatever the instance size, and writes wait (which stops
//! reading the socket, which slows the sender through TCP) when S3 is slower than the network.
//! Any failure, an explicit abort, or dropping an uncommitted upload sends
//! `AbortMultipartUpload`, so no partial object and no orphaned parts are left behind.

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;

use super::{
    BatchContents, ListedObject, ObjectKey, ObjectStore, ObjectUpload, StoreError, StoredObject,
};

/// S3's smallest allowed part (except the last one).
pub(crate) const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest allowed part.
pub(crate) const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3's limit on parts per upload.
const MAX_PARTS: i32 = 10_000;

/// Objects in an S3 bucket: PutObject for small ones, multipart upload for large ones.
#[derive(Clone)]
pub(crate) struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    parts_in_flight: usize,
}

impl S3Store {
    /// `prefix` is used as given (include a trailing '/' to make it a folder).
    pub(crate) fn new(
        client: Client,
        bucket: String,
        prefix: String,
        part_size: usize,
        parts_in_flight: usize,
    ) -> Self {
        S3Store {
            client,
            bucket,
            prefix,
            part_size,
            parts_in_flight: parts_in_flight.max(1),
        }
    }

    fn full_key(&self, key: &ObjectKey) -> String {
        format!("{}{}", self.prefix, key.as_str())
    }
}

fn s3_error<E, R>(operation: &'static str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    StoreError::S3 {
        operation,
        message: crate::aws::describe(&err),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn begin(&self, key: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError> {
        Ok(Box::new(S3Upload {
            store: self.clone(),
            key: self.full_key(key),
            buf: BytesMut::with_capacity(self.part_size),
            upload_id: None,
            next_part: 1,
            in_flight: JoinSet::new(),
            parts: Vec::new(),
            size: 0,
        }))
    }

    fn input_s3_uri(&self, job_id: &str) -> String {
        format!("s3://{}/{}{job_id}/", self.bucket, self.prefix)
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| s3_error("ListObjectsV2", e))?;
        Ok(())
    }

    async fn batch_contents(&self, job_id: &str) -> Result<BatchContents, StoreError> {
        let prefix = format!("{}{job_id}/", self.prefix);
        let mut contents = BatchContents::default();
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| s3_error("ListObjectsV2", e))?;
            for obj in out.contents() {
                if let Some(key) = obj.key().and_then(|k| k.strip_prefix(&prefix)) {
                    contents.add(key, obj.size().unwrap_or(0).max(0) as u64);
                }
            }
            token = out.next_continuation_token().map(String::from);
            if token.is_none() {
                break;
            }
        }
        contents.study_instance_uids.sort();
        Ok(contents)
    }

    async fn list_objects(&self, job_id: &str) -> Result<Vec<ListedObject>, StoreError> {
        let prefix = format!("{}{job_id}/", self.prefix);
        let mut objects = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| s3_error("ListObjectsV2", e))?;
            for obj in out.contents() {
                let modified = obj
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok());
                if let Some(listed) =
                    obj.key()
                        .and_then(|k| k.strip_prefix(&prefix))
                        .and_then(|rel| {
                            ListedObject::of_batch(
                                job_id,
                                rel,
                                obj.size().unwrap_or(0).max(0) as u64,
                                modified,
                            )
                        })
                {
                    objects.push(listed);
                }
            }
            token = out.next_continuation_token().map(String::from);
            if token.is_none() {
                return Ok(objects);
            }
        }
    }

    /// The gateway's role may write objects under the import prefix but not read them back
    /// (infra/gateway.yaml grants `s3:PutObject` there, `s3:GetObject` only on the results
    /// prefix): a repaired index record of an S3 object has no SOP Class UID and calling AE
    /// rather than the role gaining read access to every stored image.
    async fn read_head(&self, _key: &str, _limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    fn describe(&self) -> String {
        format!(
            "S3 bucket {} prefix '{}' (part size {} MiB)",
            self.bucket,
            self.prefix,
            self.part_size / (1024 * 1024)
        )
    }
}

/// One object on its way to S3: buffered up to a part, then sent in parts with bounded concurrency.
struct S3Upload {
    store: S3Store,
    key: String,
    buf: BytesMut,
    upload_id: Option<String>,
    next_part: i32,
    in_flight: JoinSet<Result<CompletedPart, StoreError>>,
    parts: Vec<CompletedPart>,
    size: u64,
}

impl S3Upload {
    async fn ensure_multipart(&mut self) -> Result<String, StoreError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let out = self
            .store
            .client
            .create_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .content_type("application/dicom")
            // Every part carries a CRC32 that S3 verifies, and the parts' checksums are checked
            // again at completion: corruption between here and S3 fails the C-STORE.
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", e))?;
        let id = out
            .upload_id()
            .ok_or_else(|| StoreError::S3 {
                operation: "CreateMultipartUpload",
                message: "no upload id in the response".into(),
            })?
            .to_string();
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    /// Sends the buffered bytes as the next part, after waiting for room among the parts in flight.
    async fn send_part(&mut self) -> Result<(), StoreError> {
        let upload_id = self.ensure_multipart().await?;
        while self.in_flight.len() >= self.store.parts_in_flight {
            self.reap_one().await?;
        }
        if self.next_part > MAX_PARTS {
            return Err(StoreError::S3 {
                operation: "UploadPart",
                message: format!("object needs more than {MAX_PARTS} parts; raise --part-size"),
            });
        }
        let body: Bytes = self.buf.split().freeze();
        self.buf.reserve(self.store.part_size);
        let part_number = self.next_part;
        self.next_part += 1;
        let (client, bucket, key) = (
            self.store.client.clone(),
            self.store.bucket.clone(),
            self.key.clone(),
        );
        self.in_flight.spawn(async move {
            let out = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(part_number)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| s3_error("UploadPart", e))?;
            Ok(CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                .build())
        });
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<(), StoreError> {
        match self.in_flight.join_next().await {
            Some(Ok(Ok(part))) => {
                self.parts.push(part);
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(join)) => Err(StoreError::S3 {
                operation: "UploadPart",
                message: join.to_string(),
            }),
            None => Ok(()),
        }
    }

    async fn finish(&mut self) -> Result<(), StoreError> {
        let Some(upload_id) = self.upload_id.clone() else {
            let body = self.buf.split().freeze();
            self.store
                .client
                .put_object()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .content_type("application/dicom")
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| s3_error("PutObject", e))?;
            return Ok(());
        };
        if !self.buf.is_empty() {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        self.store
            .client
            .complete_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error("CompleteMultipartUpload", e))?;
        self.upload_id = None; // completed: nothing to abort
        Ok(())
    }

    /// Starts `AbortMultipartUpload` for an unfinished upload; returns its handle.
    fn spawn_abort(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.in_flight.abort_all();
        let upload_id = self.upload_id.take()?;
        let (client, bucket, key) = (
            self.store.client.clone(),
            self.store.bucket.clone(),
            self.key.clone(),
        );
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(handle.spawn(async move {
            if let Err(e) = client.abort_multipart_upload().bucket(bucket).key(&key).upload_id(upload_id).send().await {
                tracing::warn!(key = %key, error = %DisplayErrorContext(&e), "AbortMultipartUpload failed; the bucket's lifecycle rule for incomplete uploads will remove the parts");
            }
        }))
    }
}

#[async_trait]
impl ObjectUpload for S3Upload {
    async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let room = self.store.part_size - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.store.part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<StoredObject, StoreError> {
        match self.finish().await {
            Ok(()) => Ok(StoredObject { size: self.size }),
            Err(e) => {
                if let Some(h) = self.spawn_abort() {
                    let _ = h.await;
                }
                Err(e)
            }
        }
    }

    async fn abort(mut self: Box<Self>) {
        if let Some(h) = self.spawn_abort() {
            let _ = h.await;
        }
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // A dropped, uncommitted upload (connection lost, association aborted, shutdown deadline)
        // is aborted in the background; the caller has already answered or gone.
        let _ = self.spawn_abort();
    }
}

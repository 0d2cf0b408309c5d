//! The S3 store.
//!
//! An object smaller than the part size is sent with one `PutObject`; a larger one becomes a
//! multipart upload whose parts are sent while the rest of the instance is still arriving, with at
//! most `parts_in_flight` parts buffered at once. Memory per upload is therefore bounded by
//! `part_size * (parts_in_flight + 1)` whatever the instance size, and writes wait (which stops
//! reading the socket, which slows the sender through TCP) when S3 is slower than the network.
//! Any failure, an explicit abort, or dropping an uncommitted upload sends
//! `AbortMultipartUpload`, so no partial object and no orphaned parts are left behind.
//!
//! CPU per byte (issue 11; the figures are in the README's benchmark section). Every byte is
//! touched once by the gateway on its way to S3: copied from the PDU into a pooled part buffer,
//! and CRC32'd in the same pass. That CRC32 is sent as `x-amz-checksum-crc32` with the PutObject
//! or UploadPart, and S3 rejects the request if its own CRC32 of the body differs, so the check is
//! end to end and does not depend on the SDK's `request_checksum_calculation` setting. The payload
//! is sent unsigned (`UNSIGNED-PAYLOAD`): the SigV4 payload hash would be a second pass over every
//! byte (SHA-256, the largest single cost in a profile), and adds nothing over HTTPS, where TLS
//! already authenticates the body. Over plain HTTP (local emulators only: the stack's bucket policy
//! refuses non-TLS requests) the CRC32 still catches corruption but not a deliberate rewrite; see
//! docs/aws-facts.md, "Issue 11", for the sources.

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use std::sync::{Arc, Mutex};
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
/// Most part buffers kept for reuse. A fresh buffer costs a page fault per 4 KiB the first time it
/// is written (over a quarter of the gateway's CPU per byte before buffers were reused: see the
/// README's benchmark section); a pooled one is already mapped. Sixteen covers sixteen associations storing small instances at once, or three
/// large instances with four parts in flight; idle, they hold what was written into them.
const POOLED_BUFFERS: usize = 16;

/// Part buffers handed back once S3 has answered, so the next instance writes into memory that is
/// already mapped instead of a fresh `part_size` allocation.
struct BufferPool {
    part_size: usize,
    free: Mutex<Vec<BytesMut>>,
}

impl BufferPool {
    fn new(part_size: usize) -> Self {
        BufferPool {
            part_size,
            free: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer with room for a whole part.
    fn take(&self) -> BytesMut {
        self.free
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_else(|| BytesMut::with_capacity(self.part_size))
    }

    /// Takes a sent body back, if nothing else holds it any more (the SDK keeps a clone for
    /// retries until the operation has ended; a body still shared is simply dropped).
    fn give_back(&self, body: Bytes) {
        let Ok(mut buf) = body.try_into_mut() else {
            return;
        };
        buf.clear();
        if buf.capacity() < self.part_size {
            return;
        }
        if let Ok(mut free) = self.free.lock()
            && free.len() < POOLED_BUFFERS
        {
            free.push(buf);
        }
    }
}

/// The bytes of one part (or of a whole small object) and their CRC32, computed as they are
/// appended: the body of one PutObject or UploadPart.
struct PartBuffer {
    buf: BytesMut,
    crc32: crc_fast::Digest,
}

impl PartBuffer {
    fn new(buf: BytesMut) -> Self {
        PartBuffer {
            buf,
            crc32: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32IsoHdlc),
        }
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn extend(&mut self, data: &[u8]) {
        self.crc32.update(data);
        self.buf.extend_from_slice(data);
    }

    /// The body and its `x-amz-checksum-crc32` value; the buffer is replaced by `next`.
    fn take(&mut self, next: BytesMut) -> (Bytes, String) {
        let body = std::mem::replace(&mut self.buf, next).freeze();
        let crc = self.crc32.finalize_reset();
        (body, crc32_header(crc))
    }
}

/// The `x-amz-checksum-crc32` header value: the big-endian CRC32, base64-encoded
/// ("Checking object integrity", Amazon S3 User Guide: the checksum headers carry the
/// base64-encoded checksum).
fn crc32_header(crc: u64) -> String {
    aws_smithy_types::base64::encode((crc as u32).to_be_bytes())
}

/// Objects in an S3 bucket: PutObject for small ones, multipart upload for large ones.
#[derive(Clone)]
pub(crate) struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: usize,
    parts_in_flight: usize,
    buffers: Arc<BufferPool>,
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
            buffers: Arc::new(BufferPool::new(part_size)),
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
            part: PartBuffer::new(self.buffers.take()),
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

    /// ListObjectsV2 with the key as prefix rather than HeadObject: HeadObject needs
    /// s3:GetObject ("HeadObject", Amazon S3 API Reference, Permissions,
    /// https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadObject.html), which the gateway's
    /// role does not have on the import prefix, while s3:ListBucket on it it has (infra/gateway.yaml).
    /// Listings are strongly consistent with writes ("Amazon S3 Strong Consistency",
    /// https://aws.amazon.com/s3/consistency/).
    async fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        let full = self.full_key(key);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| s3_error("ListObjectsV2", e))?;
        Ok(out
            .contents()
            .iter()
            .any(|o| o.key() == Some(full.as_str())))
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
    part: PartBuffer,
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
    /// `last`: no part follows, so no fresh buffer is taken for one.
    async fn send_part(&mut self, last: bool) -> Result<(), StoreError> {
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
        let next = if last {
            BytesMut::new()
        } else {
            self.store.buffers.take()
        };
        let (body, crc32) = self.part.take(next);
        let part_number = self.next_part;
        self.next_part += 1;
        let (client, bucket, key, buffers) = (
            self.store.client.clone(),
            self.store.bucket.clone(),
            self.key.clone(),
            self.store.buffers.clone(),
        );
        self.in_flight.spawn(async move {
            let out = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(part_number)
                .checksum_crc32(&crc32)
                .body(ByteStream::from(body.clone()))
                .customize()
                .disable_payload_signing()
                .send()
                .await;
            buffers.give_back(body);
            let out = out.map_err(|e| s3_error("UploadPart", e))?;
            Ok(CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .checksum_crc32(crc32)
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
            let (body, crc32) = self.part.take(BytesMut::new());
            let out = self
                .store
                .client
                .put_object()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .content_type("application/dicom")
                .checksum_crc32(crc32)
                .body(ByteStream::from(body.clone()))
                .customize()
                .disable_payload_signing()
                .send()
                .await;
            self.store.buffers.give_back(body);
            out.map_err(|e| s3_error("PutObject", e))?;
            return Ok(());
        };
        if !self.part.is_empty() {
            self.send_part(true).await?;
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
            let room = self.store.part_size - self.part.len();
            let n = room.min(data.len());
            self.part.extend(&data[..n]);
            data = &data[n..];
            if self.part.len() == self.store.part_size {
                self.send_part(false).await?;
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
        // A buffer not sent (an aborted instance, or one taken for a part that never came).
        let unsent = std::mem::take(&mut self.part.buf);
        self.store.buffers.give_back(unsent.freeze());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32_of(data: &[u8]) -> String {
        let mut part = PartBuffer::new(BytesMut::new());
        part.extend(data);
        part.take(BytesMut::new()).1
    }

    #[test]
    fn the_checksum_header_is_the_base64_of_the_big_endian_crc32() {
        // CRC-32 (ISO-HDLC, the one S3 calls CRC32) of "123456789" is 0xCBF43926.
        assert_eq!(crc32_of(b"123456789"), "y/Q5Jg==");
        // The empty body: CRC32 0.
        assert_eq!(crc32_of(b""), "AAAAAA==");
    }

    #[test]
    fn a_part_written_in_pieces_has_the_checksum_of_its_bytes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut part = PartBuffer::new(BytesMut::new());
        for piece in data.chunks(4093) {
            part.extend(piece);
        }
        let (body, crc) = part.take(BytesMut::new());
        assert_eq!(&body[..], &data[..]);
        assert_eq!(crc, crc32_of(&data));
    }

    #[test]
    fn each_part_has_its_own_checksum() {
        let (a, b) = (b"first part".as_slice(), b"second part".as_slice());
        let mut part = PartBuffer::new(BytesMut::new());
        part.extend(a);
        let (body_a, crc_a) = part.take(BytesMut::new());
        part.extend(b);
        let (body_b, crc_b) = part.take(BytesMut::new());
        assert_eq!((&body_a[..], crc_a), (a, crc32_of(a)));
        assert_eq!((&body_b[..], crc_b), (b, crc32_of(b)));
    }

    #[test]
    fn a_sent_body_goes_back_to_the_pool_once_nothing_else_holds_it() {
        let pool = BufferPool::new(1 << 20);
        let mut part = PartBuffer::new(pool.take());
        part.extend(&[1; 1000]);
        let (body, _) = part.take(BytesMut::new());
        let held = body.clone(); // as the SDK holds its clone until the request ended
        pool.give_back(body);
        assert_eq!(
            pool.free.lock().unwrap().len(),
            0,
            "a shared body is not reused"
        );
        pool.give_back(held);
        let reused = pool.take();
        assert!(reused.is_empty() && reused.capacity() >= 1 << 20);
        assert_eq!(pool.free.lock().unwrap().len(), 0);
    }

    #[test]
    fn the_pool_keeps_only_whole_part_buffers_and_at_most_its_bound() {
        let pool = BufferPool::new(1 << 16);
        pool.give_back(Bytes::from(vec![0u8; 10]));
        assert_eq!(pool.free.lock().unwrap().len(), 0, "too small for a part");
        for _ in 0..POOLED_BUFFERS + 3 {
            pool.give_back(BytesMut::with_capacity(1 << 16).freeze());
        }
        assert_eq!(pool.free.lock().unwrap().len(), POOLED_BUFFERS);
    }
}

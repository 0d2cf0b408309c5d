//! The spool against a local directory standing in for S3: acknowledgement, upload, retry, replay,
//! quarantine and capacity.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::*;
use crate::store::UploadOutcome;
use crate::store::local::LocalStore;

const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

fn key(sop: &str) -> ObjectKey {
    ObjectKey::new(JOB, "1.2", "1.2.3", sop).unwrap()
}

/// A store that refuses the first `failures` uploads (as S3 does while it is unreachable).
struct Flaky {
    inner: LocalStore,
    failures: AtomicU32,
}

#[async_trait]
impl ObjectStore for Flaky {
    async fn begin(&self, key: &ObjectKey) -> Result<Box<dyn ObjectUpload>, StoreError> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(StoreError::S3 {
                operation: "PutObject",
                message: "dispatch failure: connection refused".into(),
            });
        }
        self.inner.begin(key).await
    }
    fn input_s3_uri(&self, job_id: &str) -> String {
        self.inner.input_s3_uri(job_id)
    }
    async fn check(&self) -> Result<(), StoreError> {
        self.inner.check().await
    }
    async fn batch_contents(&self, job_id: &str) -> Result<BatchContents, StoreError> {
        self.inner.batch_contents(job_id).await
    }
    async fn exists(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }
    async fn list_objects(
        &self,
        job_id: &str,
    ) -> Result<Vec<crate::store::ListedObject>, StoreError> {
        self.inner.list_objects(job_id).await
    }

    async fn read_head(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.read_head(key, limit).await
    }

    fn describe(&self) -> String {
        "flaky local directory".into()
    }
}

/// A spool in `spool_dir` in front of a local directory `target` that fails `failures` times.
async fn spool(
    spool_dir: &std::path::Path,
    target: &std::path::Path,
    failures: u32,
    capacity: SpoolCapacity,
) -> Arc<Spool> {
    let inner = Arc::new(Flaky {
        inner: LocalStore::open(target).await.unwrap(),
        failures: AtomicU32::new(failures),
    });
    Spool::open(spool_dir.to_path_buf(), capacity, 2, inner)
        .await
        .unwrap()
}

fn roomy() -> SpoolCapacity {
    SpoolCapacity::MaxBytes(1 << 30)
}

/// Commits `object` under `key` to the spool; returns its upload ticket.
async fn put(spool: &Spool, key: &ObjectKey, object: &[u8]) -> UploadTicket {
    let mut up = spool.begin(key).await.unwrap();
    for chunk in object.chunks(64 * 1024) {
        up.write(chunk).await.unwrap();
    }
    let committed = up.commit_placed().await.unwrap();
    assert_eq!(committed.stored.size, object.len() as u64);
    match committed.placement {
        Placement::Spooled(ticket) => ticket,
        Placement::Final => panic!("a spooled object is not at its final key yet"),
    }
}

fn spool_files(dir: &std::path::Path, sub: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join(sub))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Runs the spool's uploader until the returned token is cancelled.
fn start_uploader(spool: &Arc<Spool>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (spool, stop) = (spool.clone(), stop.clone());
        async move { spool.run_uploader(stop).await }
    });
    (stop, task)
}

async fn outcome(ticket: UploadTicket) -> Option<UploadOutcome> {
    tokio::time::timeout(Duration::from_secs(20), ticket.outcome())
        .await
        .expect("an outcome within 20 s")
}

#[tokio::test]
async fn an_acknowledged_object_reaches_its_final_key_byte_for_byte_and_leaves_the_spool() {
    let (dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spool = spool(dir.path(), target.path(), 0, roomy()).await;
    let small = key("1.2.3.4");
    // Larger than a read chunk: it is streamed through in pieces.
    let large = key("1.2.3.5");
    let large_bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let t1 = put(&spool, &small, b"DICM small object").await;
    let t2 = put(&spool, &large, &large_bytes).await;
    assert_eq!(spool.unsettled(JOB), 2);
    assert_eq!(spool_files(dir.path(), OBJECTS_DIR).len(), 2);
    assert!(
        !target.path().join(small.as_str()).exists(),
        "nothing uploaded before the uploader runs"
    );

    let (stop, task) = start_uploader(&spool);
    assert_eq!(outcome(t1).await, Some(UploadOutcome::Uploaded));
    assert_eq!(outcome(t2).await, Some(UploadOutcome::Uploaded));
    spool.settled(JOB).await;
    assert_eq!(
        std::fs::read(target.path().join(small.as_str())).unwrap(),
        b"DICM small object"
    );
    assert_eq!(
        std::fs::read(target.path().join(large.as_str())).unwrap(),
        large_bytes
    );
    assert!(spool_files(dir.path(), OBJECTS_DIR).is_empty());
    assert_eq!(
        spool.input_s3_uri(JOB),
        format!("{}/{JOB}/", target.path().display())
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn uploads_are_retried_until_the_store_answers() {
    let (dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spool = spool(dir.path(), target.path(), 3, roomy()).await;
    let k = key("1.2.3.6");
    let ticket = put(&spool, &k, b"retry me").await;
    let (stop, task) = start_uploader(&spool);
    assert_eq!(outcome(ticket).await, Some(UploadOutcome::Uploaded));
    assert_eq!(
        std::fs::read(target.path().join(k.as_str())).unwrap(),
        b"retry me"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_corrupted_spool_file_is_quarantined_and_never_made_visible() {
    let (dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spool = spool(dir.path(), target.path(), 0, roomy()).await;
    let (bad, good) = (key("1.2.3.7"), key("1.2.3.8"));
    let bad_ticket = put(&spool, &bad, &[0x42; 10_000]).await;
    let good_ticket = put(&spool, &good, &[0x43; 10_000]).await;
    // A bit flips in the first file after its commit (its trailer still looks whole).
    let mut files = spool_files(dir.path(), OBJECTS_DIR);
    files.sort();
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[5000] ^= 0x01;
    std::fs::write(&files[0], bytes).unwrap();

    let (stop, task) = start_uploader(&spool);
    assert_eq!(outcome(bad_ticket).await, Some(UploadOutcome::NotUploaded));
    assert_eq!(outcome(good_ticket).await, Some(UploadOutcome::Uploaded));
    assert!(
        !target.path().join(bad.as_str()).exists(),
        "a torn object is never committed"
    );
    assert!(target.path().join(good.as_str()).exists());
    let quarantined = spool_files(dir.path(), QUARANTINE_DIR);
    assert_eq!(quarantined.len(), 1, "kept, not deleted");
    assert_eq!(quarantined[0].file_name(), files[0].file_name());
    assert_eq!(spool.unsettled(JOB), 0);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_restart_uploads_what_the_last_run_acknowledged_and_quarantines_a_truncated_file() {
    let (dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    {
        // The first run acknowledges three objects and stops before uploading any.
        let first = spool(dir.path(), target.path(), 0, roomy()).await;
        for sop in ["1.2.3.10", "1.2.3.11", "1.2.3.12"] {
            drop(put(&first, &key(sop), sop.as_bytes()).await);
        }
    }
    let mut files = spool_files(dir.path(), OBJECTS_DIR);
    files.sort();
    let truncated = &files[1];
    let len = std::fs::metadata(truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    // A leftover from a crash mid-write: never acknowledged, removed.
    std::fs::write(dir.path().join(".incoming").join("x.part"), b"partial").unwrap();

    let second = spool(dir.path(), target.path(), 0, roomy()).await;
    assert_eq!(second.unsettled(JOB), 2, "two whole files replayed");
    assert_eq!(spool_files(dir.path(), QUARANTINE_DIR).len(), 1);
    assert!(spool_files(dir.path(), ".incoming").is_empty());
    let (stop, task) = start_uploader(&second);
    tokio::time::timeout(Duration::from_secs(20), second.settled(JOB))
        .await
        .unwrap();
    for (sop, expected) in [("1.2.3.10", true), ("1.2.3.11", false), ("1.2.3.12", true)] {
        assert_eq!(
            target.path().join(key(sop).as_str()).exists(),
            expected,
            "{sop}"
        );
    }
    assert!(spool_files(dir.path(), OBJECTS_DIR).is_empty());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_full_spool_refuses_new_instances_and_keeps_what_it_acknowledged() {
    let (dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spool = spool(
        dir.path(),
        target.path(),
        0,
        SpoolCapacity::MaxBytes(25_000),
    )
    .await;
    let kept = put(&spool, &key("1.2.3.20"), &[1; 20_000]).await;
    // The next one fills the spool while it streams.
    let mut up = spool.begin(&key("1.2.3.21")).await.unwrap();
    let e = up.write(&[2; 10_000]).await.unwrap_err();
    assert!(matches!(e, StoreError::SpoolFull(_)), "{e}");
    up.abort().await;
    // Now the spool is at its limit: a new instance is refused at once, and readiness says so.
    let small = put(&spool, &key("1.2.3.22"), &[3; 4_900]).await; // with trailers: over 25,000
    assert!(matches!(
        spool.begin(&key("1.2.3.23")).await.err(),
        Some(StoreError::SpoolFull(_))
    ));
    assert!(matches!(spool.check().await, Err(StoreError::SpoolFull(_))));
    assert_eq!(spool.unsettled(JOB), 2, "nothing acknowledged was dropped");

    // Uploads make room again.
    let (stop, task) = start_uploader(&spool);
    assert_eq!(outcome(kept).await, Some(UploadOutcome::Uploaded));
    assert_eq!(outcome(small).await, Some(UploadOutcome::Uploaded));
    assert!(spool.check().await.is_ok());
    assert!(spool.begin(&key("1.2.3.24")).await.is_ok());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_default_capacity_leaves_a_tenth_of_the_file_system_free() {
    let dir = tempfile::tempdir().unwrap();
    let space = file_system_space(dir.path()).unwrap();
    assert!(space.total > 0 && space.available <= space.total);
    let (spool_dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let all_but_nothing = SpoolCapacity::LeaveFree { percent: 100 };
    let spool = spool(spool_dir.path(), target.path(), 0, all_but_nothing).await;
    assert!(
        matches!(spool.check().await, Err(StoreError::SpoolFull(why)) if why.contains("leaves 100% free"))
    );
}

#[tokio::test]
async fn stopping_the_uploader_lets_the_waiters_go_and_keeps_the_files() {
    let (dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spool = spool(dir.path(), target.path(), u32::MAX, roomy()).await;
    let ticket = put(&spool, &key("1.2.3.30"), b"stuck behind an outage").await;
    let (stop, task) = start_uploader(&spool);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        outcome(ticket).await,
        None,
        "no outcome: the batch stays open"
    );
    assert_eq!(spool_files(dir.path(), OBJECTS_DIR).len(), 1);
}

#[tokio::test]
async fn an_object_exists_while_spooled_and_after_upload_but_not_before() {
    let (dir, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spool = spool(dir.path(), target.path(), 0, roomy()).await;
    let k = key("1.2.3.9");
    assert!(!spool.exists(&k).await.unwrap());
    let ticket = put(&spool, &k, b"DICM spooled").await;
    assert!(spool.exists(&k).await.unwrap(), "in the spool: safe");
    let (stop, task) = start_uploader(&spool);
    assert_eq!(outcome(ticket).await, Some(UploadOutcome::Uploaded));
    spool.settled(JOB).await;
    assert!(spool.exists(&k).await.unwrap(), "at its final key");
    stop.cancel();
    task.await.unwrap();
}

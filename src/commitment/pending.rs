//! Commitment requests not answered yet, kept where the job records are so that they survive a
//! restart: JSON files in `{jobs}/commitments/` beside the local journal ([`LocalPending`]), or
//! items of the DynamoDB job table ([`super::dynamodb::DynamoPending`]).
//!
//! Each request is worked on by one gateway at a time, the holder of its claim: the gateway that
//! received it, until its claim expires without being renewed (the gateway stopped); then any
//! gateway takes it over. A restarted gateway with the same `--gateway-id` takes its own back at
//! once.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Mutex;

use super::SopReference;

/// One commitment request, as kept until its report is delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PendingRequest {
    pub transaction_uid: String,
    /// The requesting AE: where the report goes (`--commitment-peer`).
    pub calling_ae_title: String,
    pub references: Vec<SopReference>,
    /// RFC 3339 UTC with milliseconds, like every record's times (so strings compare as times).
    pub received_at: String,
    /// When what is still undecided fails (`--commitment-timeout` after receipt).
    pub deadline: String,
    /// Who works on it, until when.
    pub claim: Claim,
}

/// The right to work on one request, held by one gateway until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Claim {
    pub gateway_id: String,
    pub expires_at: String,
}

impl PendingRequest {
    /// Whether `gateway_id` may take the request at `now`: it holds the claim, or the claim expired.
    pub(crate) fn claimable_by(&self, gateway_id: &str, now: &str) -> bool {
        self.claim.gateway_id == gateway_id || self.claim.expires_at.as_str() < now
    }
}

/// Why pending requests could not be read or written.
#[derive(Debug, Error)]
pub(crate) enum PendingError {
    #[error("commitment journal I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("commitment request cannot be encoded or decoded: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("DynamoDB {operation} failed: {message}")]
    Dynamo {
        operation: &'static str,
        message: String,
    },
    #[error("commitment request item is malformed: {0}")]
    Malformed(String),
}

/// Where pending requests are kept: the seam between the commitment worker and the local journal
/// or DynamoDB.
#[async_trait]
pub(crate) trait PendingStore: Send + Sync + 'static {
    /// Records a request (replacing one with the same Transaction UID). Returns once it is durable.
    async fn put(&self, request: &PendingRequest) -> Result<(), PendingError>;

    /// Every pending request.
    async fn list(&self) -> Result<Vec<PendingRequest>, PendingError>;

    /// Takes (or renews) the claim of a request, if [`PendingRequest::claimable_by`] holds at
    /// `now`, atomically. `Ok(false)`: another gateway holds it, or it is gone.
    async fn claim(
        &self,
        transaction_uid: &str,
        claim: &Claim,
        now: &str,
    ) -> Result<bool, PendingError>;

    /// Forgets a request whose report was delivered (or given up on), if `gateway_id` holds it.
    async fn remove(&self, transaction_uid: &str, gateway_id: &str) -> Result<(), PendingError>;

    fn describe(&self) -> String;
}

/// Pending requests as JSON files in a directory beside the local job journal.
pub(crate) struct LocalPending {
    dir: PathBuf,
    /// Serialises this process's read-modify-writes (a claim is a check and a write).
    lock: Mutex<()>,
}

impl LocalPending {
    /// The directory's name inside the local job journal's (`jobs/commitments/`): the journal
    /// reads only the `.json` files of its own directory, so it never sees these.
    pub(crate) const DIR_NAME: &'static str = "commitments";

    pub(crate) fn new(journal_dir: impl Into<PathBuf>) -> Self {
        LocalPending {
            dir: journal_dir.into().join(Self::DIR_NAME),
            lock: Mutex::new(()),
        }
    }

    /// The file of a request. Transaction UIDs are checked UIDs (digits and dots), safe as names.
    fn path_of(&self, transaction_uid: &str) -> PathBuf {
        self.dir.join(format!("{transaction_uid}.json"))
    }

    async fn read(&self, transaction_uid: &str) -> Result<Option<PendingRequest>, PendingError> {
        match tokio::fs::read(self.path_of(transaction_uid)).await {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the request's file atomically: temp file, fsync, rename, directory fsync.
    async fn write(&self, request: &PendingRequest) -> Result<(), PendingError> {
        let json = serde_json::to_vec(request)?;
        let dir = self.dir.clone();
        let dest = self.path_of(&request.transaction_uid);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let temp = dest.with_extension("json.tmp");
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&temp, &dest)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }
}

#[async_trait]
impl PendingStore for LocalPending {
    async fn put(&self, request: &PendingRequest) -> Result<(), PendingError> {
        let _guard = self.lock.lock().await;
        self.write(request).await
    }

    async fn list(&self) -> Result<Vec<PendingRequest>, PendingError> {
        let mut out = Vec::new();
        let mut rd = match tokio::fs::read_dir(&self.dir).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = rd.next_entry().await? {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match serde_json::from_slice(&tokio::fs::read(&path).await?) {
                    Ok(request) => out.push(request),
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "unreadable commitment request file skipped")
                    }
                }
            }
        }
        out.sort_by(|a: &PendingRequest, b| a.received_at.cmp(&b.received_at));
        Ok(out)
    }

    async fn claim(
        &self,
        transaction_uid: &str,
        claim: &Claim,
        now: &str,
    ) -> Result<bool, PendingError> {
        let _guard = self.lock.lock().await;
        let Some(mut request) = self.read(transaction_uid).await? else {
            return Ok(false);
        };
        if !request.claimable_by(&claim.gateway_id, now) {
            return Ok(false);
        }
        request.claim = claim.clone();
        self.write(&request).await?;
        Ok(true)
    }

    async fn remove(&self, transaction_uid: &str, gateway_id: &str) -> Result<(), PendingError> {
        let _guard = self.lock.lock().await;
        match self.read(transaction_uid).await? {
            Some(r) if r.claim.gateway_id == gateway_id => {
                match tokio::fs::remove_file(self.path_of(transaction_uid)).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(()),
        }
    }

    fn describe(&self) -> String {
        format!("the local commitment journal in {}", self.dir.display())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn request(tx: &str, gateway: &str, expires_at: &str) -> PendingRequest {
        PendingRequest {
            transaction_uid: tx.into(),
            calling_ae_title: "CT1".into(),
            references: vec![SopReference {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: "1.2.3.4".into(),
            }],
            received_at: "2026-11-24T06:00:00.000Z".into(),
            deadline: "2026-11-25T06:00:00.000Z".into(),
            claim: Claim {
                gateway_id: gateway.into(),
                expires_at: expires_at.into(),
            },
        }
    }

    #[tokio::test]
    async fn the_local_journal_keeps_requests_and_hands_expired_claims_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalPending::new(dir.path());
        assert!(store.list().await.unwrap().is_empty());
        let r = request("2.25.1", "gw-a", "2026-11-24T06:02:00.000Z");
        store.put(&r).await.unwrap();
        assert_eq!(store.list().await.unwrap(), vec![r.clone()]);
        let b = |expires: &str| Claim {
            gateway_id: "gw-b".into(),
            expires_at: expires.into(),
        };
        assert!(
            !store
                .claim(
                    "2.25.1",
                    &b("2026-11-24T06:05:00.000Z"),
                    "2026-11-24T06:01:00.000Z"
                )
                .await
                .unwrap(),
            "gw-a's claim runs"
        );
        store.remove("2.25.1", "gw-b").await.unwrap();
        assert_eq!(store.list().await.unwrap().len(), 1, "not gw-b's to remove");
        assert!(
            store
                .claim(
                    "2.25.1",
                    &b("2026-11-24T06:05:00.000Z"),
                    "2026-11-24T06:03:00.000Z"
                )
                .await
                .unwrap(),
            "expired: taken over"
        );
        assert_eq!(store.list().await.unwrap()[0].claim.gateway_id, "gw-b");
        assert!(
            !store
                .claim("2.25.9", &b("x"), "2026-11-24T06:03:00.000Z")
                .await
                .unwrap()
        );
        store.remove("2.25.1", "gw-b").await.unwrap();
        assert!(store.list().await.unwrap().is_empty());
        // The job journal in the same directory does not see the requests.
        let journal = crate::jobs::local::LocalJournal::new(dir.path());
        store.put(&r).await.unwrap();
        assert!(
            crate::jobs::JobStore::list_recent(&journal, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

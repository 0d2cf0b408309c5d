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
use crate::durable::replace_file;

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
        self.claim.allows(gateway_id, now)
    }
}

impl PendingRequest {
    /// Checks the UIDs of a request read back from the journal or DynamoDB (they were checked on
    /// receipt, but the store is not ours alone): a report of them must be encodable.
    pub(crate) fn check_uids(&self) -> Result<(), String> {
        let check = |what: &str, uid: &str| {
            crate::uid::validate_uid(uid).map_err(|e| format!("{what} is not a valid UID: {e}"))
        };
        check("Transaction UID", &self.transaction_uid)?;
        for r in &self.references {
            check("a Referenced SOP Class UID", &r.sop_class_uid)?;
            check("a Referenced SOP Instance UID", &r.sop_instance_uid)?;
        }
        Ok(())
    }
}

impl Claim {
    /// Whether `gateway_id` may take a request with this claim at `now`: it holds it, or it expired.
    pub(crate) fn allows(&self, gateway_id: &str, now: &str) -> bool {
        self.gateway_id == gateway_id || self.expires_at.as_str() < now
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
    #[error("commitment request too large to record: {bytes} bytes packed, at most {limit}")]
    TooLarge { bytes: usize, limit: usize },
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

/// Pending requests as JSON files in a directory beside the local job journal: `{tx}.json`, written
/// once, and its claim in `{tx}.claim`, rewritten at each renewal (small: a renewal never rewrites
/// the references).
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

    /// The file of a request's current claim.
    fn claim_path_of(&self, transaction_uid: &str) -> PathBuf {
        self.dir.join(format!("{transaction_uid}.claim"))
    }

    async fn read(&self, transaction_uid: &str) -> Result<Option<PendingRequest>, PendingError> {
        match tokio::fs::read(self.path_of(transaction_uid)).await {
            Ok(bytes) => {
                let mut request: PendingRequest = serde_json::from_slice(&bytes)?;
                if let Some(claim) = self.read_claim(transaction_uid).await? {
                    request.claim = claim;
                }
                Ok(Some(request))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The claim file of a request, if it has one (the request file's claim holds until then).
    async fn read_claim(&self, transaction_uid: &str) -> Result<Option<Claim>, PendingError> {
        match tokio::fs::read(self.claim_path_of(transaction_uid)).await {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The claim of a request, `None` if the request is gone. Reads the small claim file; the
    /// request file only when there is none.
    async fn current_claim(&self, transaction_uid: &str) -> Result<Option<Claim>, PendingError> {
        if !tokio::fs::try_exists(self.path_of(transaction_uid)).await? {
            return Ok(None);
        }
        match self.read_claim(transaction_uid).await? {
            Some(claim) => Ok(Some(claim)),
            None => Ok(self.read(transaction_uid).await?.map(|r| r.claim)),
        }
    }

    /// Writes the request's file, then its claim's.
    async fn write(&self, request: &PendingRequest) -> Result<(), PendingError> {
        let json = serde_json::to_vec(request)?;
        replace_file(self.path_of(&request.transaction_uid), json).await?;
        self.write_claim(&request.transaction_uid, &request.claim)
            .await
    }

    async fn write_claim(&self, transaction_uid: &str, claim: &Claim) -> Result<(), PendingError> {
        let json = serde_json::to_vec(claim)?;
        Ok(replace_file(self.claim_path_of(transaction_uid), json).await?)
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
                let read = serde_json::from_slice::<PendingRequest>(&tokio::fs::read(&path).await?)
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.check_uids().map(|()| r));
                match read {
                    Ok(mut request) => {
                        match self.read_claim(&request.transaction_uid).await {
                            Ok(Some(claim)) => request.claim = claim,
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(transaction_uid = %request.transaction_uid, error = %e, "unreadable commitment claim file: the request file's claim holds")
                            }
                        }
                        out.push(request)
                    }
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
        let Some(current) = self.current_claim(transaction_uid).await? else {
            return Ok(false);
        };
        if !current.allows(&claim.gateway_id, now) {
            return Ok(false);
        }
        self.write_claim(transaction_uid, claim).await?;
        Ok(true)
    }

    async fn remove(&self, transaction_uid: &str, gateway_id: &str) -> Result<(), PendingError> {
        let _guard = self.lock.lock().await;
        match self.current_claim(transaction_uid).await? {
            Some(c) if c.gateway_id == gateway_id => {
                // The request first: a claim file without its request is ignored (and removed).
                for path in [
                    self.path_of(transaction_uid),
                    self.claim_path_of(transaction_uid),
                ] {
                    match tokio::fs::remove_file(path).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
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
        // The renewal wrote the claim file only: the request file (with its references) is as put.
        let on_disk: PendingRequest =
            serde_json::from_slice(&std::fs::read(store.path_of("2.25.1")).unwrap()).unwrap();
        assert_eq!(on_disk, r);
        assert!(
            !store
                .claim("2.25.9", &b("x"), "2026-11-24T06:03:00.000Z")
                .await
                .unwrap()
        );
        store.remove("2.25.1", "gw-b").await.unwrap();
        assert!(store.list().await.unwrap().is_empty());
        // A request whose UIDs are not UIDs (the journal is not ours alone) is skipped on load:
        // its report could not be encoded.
        let mut bad = request("2.25.2", "gw-a", "2026-11-24T06:02:00.000Z");
        bad.references[0].sop_instance_uid = "1.2.x".into();
        std::fs::write(store.path_of("2.25.2"), serde_json::to_vec(&bad).unwrap()).unwrap();
        assert!(store.list().await.unwrap().is_empty());
        std::fs::remove_file(store.path_of("2.25.2")).unwrap();
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

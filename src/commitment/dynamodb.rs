//! Pending commitment requests as items of the DynamoDB job table, so a fleet needs no new table
//! and no new permission beyond `dynamodb:DeleteItem` (infra/gateway.yaml).
//!
//! The items live in their own key space: `jobId` is `commitment/{TransactionUID}`, and `status` is
//! [`PENDING_STATUS`], a partition of the `status-createdAt` index that job listings never query
//! (they query the job statuses, [`crate::jobs::JobStatus::ALL`]), so neither `jobs list`,
//! recovery nor the metrics see them. The owner is `claimedBy`, not `gatewayId`, so nothing that
//! looks for a gateway's jobs mistakes one for a job. The references are gzipped JSON in a binary
//! attribute: a DynamoDB item is at most 400 KB, attribute names included, and binary values
//! count their raw bytes ("Constraints in Amazon DynamoDB",
//! https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Constraints.html; "DynamoDB
//! item sizes and formats",
//! https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html),
//! while a study's UIDs, sharing their roots, compress several times over. Random UIDs
//! (`2.25.{uuid}`, 39 random digits) do not: 20,000 of them gzip to more than 400 KB, so a request
//! whose packed references pass [`MAX_PACKED_REFERENCES`] is refused (0x0213, Resource limitation)
//! rather than failing in DynamoDB with a ValidationException.

use std::collections::HashMap;
use std::io::{Read, Write};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

use crate::aws::{dynamo_string as s, is_condition_failure};

use super::SopReference;
use super::pending::{Claim, PendingError, PendingRequest, PendingStore};

/// The `status` of a pending commitment request item: its partition of the status index.
pub(crate) const PENDING_STATUS: &str = "COMMITMENT_PENDING";
/// Prefix of a pending request's `jobId` (the IAM policy lets the gateway delete only these).
pub(crate) const KEY_PREFIX: &str = "commitment/";
/// Name of the job table's global secondary index on (status, createdAt).
const STATUS_INDEX: &str = "status-createdAt";
/// Largest decompressed reference list read back (a request holds at most
/// [`super::dataset::MAX_REFERENCES`] references of two UIDs of at most 64 characters each).
const MAX_REFERENCES_JSON: u64 = 8 * 1024 * 1024;

/// Largest packed reference list stored in one item: the item limit of 400 KB, attribute names and
/// values included, where 1 KB is 1024 bytes ("Constraints in Amazon DynamoDB", section Items,
/// https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Constraints.html), a binary
/// value counting its raw bytes ("DynamoDB item sizes and formats", cited above), less room for
/// the other attributes (a few hundred bytes).
pub(crate) const MAX_PACKED_REFERENCES: usize = 390 * 1024;

/// Pending commitment requests in the job table.
pub(crate) struct DynamoPending {
    client: Client,
    table: String,
}

impl DynamoPending {
    pub(crate) fn new(client: Client, table: String) -> Self {
        DynamoPending { client, table }
    }
}

fn dynamo_error<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> PendingError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    PendingError::Dynamo {
        operation,
        message: crate::aws::describe(&err),
    }
}

fn key(transaction_uid: &str) -> AttributeValue {
    s(&format!("{KEY_PREFIX}{transaction_uid}"))
}

/// The references, gzipped JSON.
fn pack(references: &[SopReference]) -> Result<Vec<u8>, PendingError> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&serde_json::to_vec(references)?)?;
    Ok(gz.finish()?)
}

fn unpack(bytes: &[u8]) -> Result<Vec<SopReference>, PendingError> {
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_REFERENCES_JSON)
        .read_to_end(&mut json)?;
    Ok(serde_json::from_slice(&json)?)
}

/// A pending request as an item.
pub(crate) fn to_item(r: &PendingRequest) -> Result<HashMap<String, AttributeValue>, PendingError> {
    let packed = pack(&r.references)?;
    if packed.len() > MAX_PACKED_REFERENCES {
        return Err(PendingError::TooLarge {
            bytes: packed.len(),
            limit: MAX_PACKED_REFERENCES,
        });
    }
    Ok(HashMap::from([
        ("jobId".to_string(), key(&r.transaction_uid)),
        ("status".to_string(), s(PENDING_STATUS)),
        // The index's sort key: without it the item would not be in the index.
        ("createdAt".to_string(), s(&r.received_at)),
        ("transactionUid".to_string(), s(&r.transaction_uid)),
        ("callingAeTitle".to_string(), s(&r.calling_ae_title)),
        (
            "references".to_string(),
            AttributeValue::B(Blob::new(packed)),
        ),
        ("deadline".to_string(), s(&r.deadline)),
        ("claimedBy".to_string(), s(&r.claim.gateway_id)),
        ("claimExpiresAt".to_string(), s(&r.claim.expires_at)),
    ]))
}

pub(crate) fn from_item(
    item: &HashMap<String, AttributeValue>,
) -> Result<PendingRequest, PendingError> {
    let get = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| PendingError::Malformed(format!("no {name}")))
    };
    let references = match item.get("references") {
        Some(AttributeValue::B(b)) => unpack(b.as_ref())?,
        _ => return Err(PendingError::Malformed("no references".into())),
    };
    let request = PendingRequest {
        transaction_uid: get("transactionUid")?,
        calling_ae_title: get("callingAeTitle")?,
        references,
        received_at: get("createdAt")?,
        deadline: get("deadline")?,
        claim: Claim {
            gateway_id: get("claimedBy")?,
            expires_at: get("claimExpiresAt")?,
        },
    };
    request.check_uids().map_err(PendingError::Malformed)?;
    Ok(request)
}

#[async_trait]
impl PendingStore for DynamoPending {
    async fn put(&self, request: &PendingRequest) -> Result<(), PendingError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(request)?))
            .send()
            .await
            .map_err(|e| dynamo_error("PutItem", e))?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<PendingRequest>, PendingError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(STATUS_INDEX)
                .key_condition_expression("#status = :s")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":s", s(PENDING_STATUS))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| dynamo_error("Query", e))?;
            for item in page.items() {
                match from_item(item) {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable commitment request item skipped")
                    }
                }
            }
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                return Ok(out);
            }
        }
    }

    async fn claim(
        &self,
        transaction_uid: &str,
        claim: &Claim,
        now: &str,
    ) -> Result<bool, PendingError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("jobId", key(transaction_uid))
            .update_expression("SET claimedBy = :gw, claimExpiresAt = :exp")
            .condition_expression(
                "attribute_exists(jobId) AND (claimedBy = :gw OR claimExpiresAt < :now)",
            )
            .expression_attribute_values(":gw", s(&claim.gateway_id))
            .expression_attribute_values(":exp", s(&claim.expires_at))
            .expression_attribute_values(":now", s(now))
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(dynamo_error("UpdateItem", e)),
        }
    }

    /// A conditional DeleteItem ("DeleteItem", Amazon DynamoDB API Reference,
    /// https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_DeleteItem.html).
    async fn remove(&self, transaction_uid: &str, gateway_id: &str) -> Result<(), PendingError> {
        let r = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("jobId", key(transaction_uid))
            .condition_expression("claimedBy = :gw")
            .expression_attribute_values(":gw", s(gateway_id))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Ok(()), // gone, or taken over
            Err(e) => Err(dynamo_error("DeleteItem", e)),
        }
    }

    fn describe(&self) -> String {
        format!("DynamoDB table {} ({PENDING_STATUS} items)", self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commitment::pending::tests::request;

    #[test]
    fn an_item_round_trips_and_stays_out_of_the_job_listings() {
        let r = request("2.25.77", "gw-a", "2026-11-24T06:02:00.000Z");
        let item = to_item(&r).unwrap();
        assert_eq!(item["jobId"], s("commitment/2.25.77"));
        assert!(
            crate::jobs::JobStatus::parse(item["status"].as_s().unwrap()).is_none(),
            "no job status: job listings never query this partition"
        );
        assert!(!item.contains_key("gatewayId"));
        assert!(crate::jobs::dynamodb::from_item(&item).is_err());
        assert_eq!(from_item(&item).unwrap(), r);
    }

    /// Against the job table of the stack scripts/test.sh deploys to LocalStack: the conditions,
    /// the index query and the listings as DynamoDB evaluates them.
    #[tokio::test]
    #[ignore = "needs LocalStack: run scripts/test.sh"]
    async fn pending_requests_live_beside_the_jobs_on_localstack() {
        use crate::jobs::JobStore;
        assert!(
            std::env::var_os("DICOM_GATEWAY_TEST_LOCALSTACK").is_some(),
            "this test needs LocalStack: run scripts/test.sh"
        );
        let table = std::env::var("DICOM_GATEWAY_TEST_STACK_JobTableName").unwrap();
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let client = Client::new(&config);
        let store = DynamoPending::new(client.clone(), table.clone());
        let tx = format!("2.25.{}", ulid::Ulid::generate().0);
        let mine = |list: Vec<PendingRequest>| -> Vec<PendingRequest> {
            list.into_iter()
                .filter(|r| r.transaction_uid == tx)
                .collect()
        };
        let r = request(&tx, "gw-a", "2026-11-24T06:02:00.000Z");
        store.put(&r).await.unwrap();
        assert_eq!(mine(store.list().await.unwrap()), vec![r.clone()]);
        let b = Claim {
            gateway_id: "gw-b".into(),
            expires_at: "2026-11-24T06:05:00.000Z".into(),
        };
        assert!(
            !store
                .claim(&tx, &b, "2026-11-24T06:01:00.000Z")
                .await
                .unwrap(),
            "gw-a's claim runs"
        );
        store.remove(&tx, "gw-b").await.unwrap();
        assert_eq!(
            mine(store.list().await.unwrap()).len(),
            1,
            "not gw-b's to remove"
        );
        assert!(
            store
                .claim(&tx, &b, "2026-11-24T06:03:00.000Z")
                .await
                .unwrap(),
            "expired: taken over"
        );
        assert!(
            !store.claim("2.25.0", &b, "x").await.unwrap(),
            "no such request"
        );
        // Job listings never see it.
        let jobs = crate::jobs::dynamodb::DynamoJobStore::new(client, table);
        assert!(
            !jobs
                .list_recent(1000)
                .await
                .unwrap()
                .iter()
                .any(|j| j.job_id.contains(&tx))
        );
        store.remove(&tx, "gw-b").await.unwrap();
        assert!(mine(store.list().await.unwrap()).is_empty());
    }

    #[test]
    fn a_large_study_fits_in_one_item() {
        let mut r = request("2.25.78", "gw-a", "2026-11-24T06:02:00.000Z");
        r.references = (0..super::super::dataset::MAX_REFERENCES)
            .map(|i| SopReference {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: format!("1.2.826.0.1.3680043.8.498.1234567890123.{i}"),
            })
            .collect();
        let packed = pack(&r.references).unwrap();
        assert!(packed.len() < 300 * 1024, "{} bytes", packed.len());
        assert_eq!(unpack(&packed).unwrap(), r.references);
        assert!(to_item(&r).is_ok());
    }

    /// `2.25.{n}` UIDs with 128-bit pseudo-random `n` (as UUID-derived UIDs are), reproducible.
    fn random_uids(count: usize) -> Vec<SopReference> {
        let mut x: u128 = 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834;
        (0..count)
            .map(|_| {
                // xorshift128
                x ^= x << 35;
                x ^= x >> 59;
                x ^= x << 21;
                SopReference {
                    sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                    sop_instance_uid: format!("2.25.{x}"),
                }
            })
            .collect()
    }

    #[test]
    fn random_uids_past_the_item_limit_are_refused_not_sent_to_dynamodb() {
        let mut r = request("2.25.79", "gw-a", "2026-11-24T06:02:00.000Z");
        r.references = random_uids(super::super::dataset::MAX_REFERENCES);
        let packed = pack(&r.references).unwrap().len();
        assert!(
            packed > 400 * 1024,
            "{packed} bytes: random UIDs do not compress"
        );
        match to_item(&r) {
            Err(e @ PendingError::TooLarge { .. }) => {
                assert_eq!(
                    super::super::SubmitError::Store(e).status(),
                    crate::dimse::Status::RESOURCE_LIMITATION
                )
            }
            other => panic!("{other:?}"),
        }
        // A few thousand random UIDs still fit.
        r.references = random_uids(5000);
        assert!(to_item(&r).is_ok());
    }
}

//! The DynamoDB instance index: one item per stored object, in the table `--instance-table`
//! (infra/gateway.yaml creates it beside the job table).
//!
//! # Table design
//!
//! - **Key**: partition key `sopInstanceUid`, sort key `objectKey`. `instances show <uid>` is one
//!   Query on the partition; an instance stored in several jobs (or under several study/series
//!   UIDs) is several items of it, one per object key. The outcome reader, which knows an object
//!   key, derives the SOP Instance UID from it ([`KeyParts`]), so every write addresses one item.
//! - **Attributes** are the record's camelCase JSON names (`jobId`, `receivedAt`, `outcome`,
//!   `imageSetId`, `warnings`, ...), converted generically from its serde form ([`to_item`],
//!   [`from_item`]): a new outcome variant or detail needs no code here, only [`OUTCOME_DETAILS`]
//!   (checked by a test) so that an update removes the details of the outcome it replaces.
//! - **Failures by job**: the global secondary index `failedJobId-objectKey` has as partition key
//!   the attribute `failedJobId`, which an item holds only while its outcome is FAILED (it is the
//!   job id). Global secondary indexes are sparse: only items holding the index's key attributes
//!   appear in it ("Take advantage of sparse indexes",
//!   <https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/bp-indexes-general-sparse-indexes.html>),
//!   so `failed(job)` reads that job's failures and nothing else, in object key order. Reads of a
//!   global secondary index are eventually consistent ("DynamoDB read consistency",
//!   <https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html>):
//!   a failure recorded a moment ago may be missing from it for that moment.
//! - On-demand capacity (PAY_PER_REQUEST): the index is written in bursts (a study arriving, an
//!   import's results) and idle in between.
//!
//! # Writes, and why a STORED record never overwrites an outcome
//!
//! - [`InstanceIndex::append`] (the writer, records of instances just stored) uses
//!   BatchWriteItem, 25 puts a request, which cannot carry conditions: a put replaces the item.
//!   That is safe because a record reaches the writer before its job is recorded CLOSED (the
//!   close waits for the job's records, [`super::repair`]), and an outcome exists only once the
//!   CLOSED job has been imported. When that wait runs out, the close repairs the index instead
//!   and the writer skips what it still holds of the job ([`super::Tally`]).
//! - [`InstanceIndex::add_absent`] (the repair after a crash or a dropped record, which may run
//!   while another gateway records outcomes) is a PutItem conditional on
//!   `attribute_not_exists(objectKey)`: it only creates items, never replaces one.
//! - [`InstanceIndex::record_outcomes`] is an UpdateItem per object conditional on the item
//!   existing (an UpdateItem without a condition would create a partial item for a key the index
//!   lacks), with `ReturnValues=ALL_OLD` to count the items whose outcome changed, at no read
//!   cost (UpdateItem API reference, ReturnValues: "No read capacity units are consumed"). Up to
//!   [`WRITES_IN_FLIGHT`] run at once. Recording the same outcome again writes the same values:
//!   idempotent. An IMPORTED outcome is also conditional on the item not being
//!   IMPORTED_WITH_WARNINGS of the same image set ([`InstanceOutcome::replaces`]); when a
//!   condition fails, `ReturnValuesOnConditionCheckFailure=ALL_OLD` returns the item if there is
//!   one (UpdateItem API reference, ReturnValuesOnConditionCheckFailure: "returns the item
//!   attributes for an UpdateItem operation that failed a condition check", at no read cost), to
//!   tell an item kept as it is from a key the index lacks.
//!
//! Limits relied on (BatchWriteItem, BatchGetItem API references, quoted in docs/aws-facts.md,
//! "Issue 10"): at most 25 put requests and 16 MB per BatchWriteItem, no two of them for the
//! same key; at most 100 keys and 16 MB per BatchGetItem; an item at most 400 KB; unprocessed
//! items and keys are retried with exponential backoff.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, PutRequest, ReturnValue,
    ReturnValuesOnConditionCheckFailure, WriteRequest,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

use crate::aws::{dynamo_string as s, is_condition_failure};
use serde_json::Value;
use tokio::task::JoinSet;

use super::{
    IndexError, InstanceIndex, InstanceOutcome, InstanceRecord, KeyParts, OutcomesRecorded,
};

/// The sparse global secondary index of failed instances: partition key `failedJobId`, sort key
/// `objectKey`.
pub(crate) const FAILED_INDEX: &str = "failedJobId-objectKey";
/// The attribute an item holds (the job id) only while its outcome is FAILED.
const FAILED_JOB_ID: &str = "failedJobId";
const SOP_INSTANCE_UID: &str = "sopInstanceUid";
const OBJECT_KEY: &str = "objectKey";
const JOB_ID: &str = "jobId";

/// The attributes an outcome may add to a record beside `outcome` (the camelCase fields of the
/// variants of [`InstanceOutcome`]); an update removes those the new outcome does not have.
pub(crate) const OUTCOME_DETAILS: [&str; 5] = [
    "imageSetId",
    "isPrimary",
    "warnings",
    "exceptionType",
    "message",
];

/// Most put requests in one BatchWriteItem.
const BATCH_WRITE_ITEMS: usize = 25;
/// Most keys in one BatchGetItem.
const BATCH_GET_KEYS: usize = 100;
/// BatchWriteItem requests of one append sent at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// UpdateItem or PutItem calls sent at once.
pub(crate) const WRITES_IN_FLIGHT: usize = 16;
/// Attempts at a batch's unprocessed items or keys before the call fails (retriable).
const UNPROCESSED_ATTEMPTS: u32 = 8;
/// First pause before resending unprocessed items, and the longest.
const UNPROCESSED_BACKOFF: Duration = Duration::from_millis(50);
const UNPROCESSED_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Keep an item well under DynamoDB's 400 KB: at most this many warnings are kept (and a last
/// entry saying how many more there were), each text at most [`MAX_TEXT`] bytes.
const MAX_WARNINGS: usize = 100;
const MAX_TEXT: usize = 2048;

type Item = HashMap<String, AttributeValue>;

/// What one outcome update did to its item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Updated {
    Changed,
    /// The item is there, and keeps (or already had) its outcome.
    Unchanged,
    /// The index has no item for the key.
    Absent,
}

/// Instance records in a DynamoDB table, shared by the gateways of a fleet.
#[derive(Clone)]
pub struct DynamoIndex {
    client: Client,
    table: String,
}

impl DynamoIndex {
    pub fn new(client: Client, table: String) -> Self {
        DynamoIndex { client, table }
    }
}

fn dynamo_error<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> IndexError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    IndexError::Dynamo {
        operation,
        message: crate::aws::describe(&err),
        retriable: crate::aws::is_retriable(&err),
    }
}

/// A JSON value as an attribute value; `null` is left out (as an absent attribute).
pub(crate) fn to_attr(value: &Value) -> Option<AttributeValue> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(text) => AttributeValue::S(text.clone()),
        Value::Array(values) => AttributeValue::L(values.iter().filter_map(to_attr).collect()),
        Value::Object(map) => AttributeValue::M(
            map.iter()
                .filter_map(|(k, v)| to_attr(v).map(|a| (k.clone(), a)))
                .collect(),
        ),
    })
}

/// An attribute value as JSON; binary and number sets, which the index never writes, are `None`.
pub(crate) fn from_attr(attr: &AttributeValue) -> Option<Value> {
    Some(match attr {
        AttributeValue::S(text) => Value::String(text.clone()),
        AttributeValue::N(n) => Value::Number(n.parse().ok()?),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::L(values) => Value::Array(values.iter().filter_map(from_attr).collect()),
        AttributeValue::Ss(values) => {
            Value::Array(values.iter().cloned().map(Value::String).collect())
        }
        AttributeValue::M(map) => Value::Object(
            map.iter()
                .filter_map(|(k, v)| from_attr(v).map(|j| (k.clone(), j)))
                .collect(),
        ),
        _ => return None,
    })
}

/// A record as an item: its JSON fields as attributes, and `failedJobId` when it is FAILED.
pub(crate) fn to_item(record: &InstanceRecord) -> Result<Item, IndexError> {
    let Value::Object(fields) = serde_json::to_value(record)? else {
        return Err(IndexError::Malformed(
            "a record is not a JSON object".into(),
        ));
    };
    let mut item: Item = fields
        .iter()
        .filter_map(|(k, v)| to_attr(v).map(|a| (k.clone(), a)))
        .collect();
    if matches!(record.outcome, InstanceOutcome::Failed { .. }) {
        item.insert(FAILED_JOB_ID.into(), s(&record.job_id));
    }
    Ok(item)
}

/// An item as a record (`failedJobId` is the index's, not the record's).
pub(crate) fn from_item(item: &Item) -> Result<InstanceRecord, IndexError> {
    let fields: serde_json::Map<String, Value> = item
        .iter()
        .filter(|(k, _)| k.as_str() != FAILED_JOB_ID)
        .filter_map(|(k, v)| from_attr(v).map(|j| (k.clone(), j)))
        .collect();
    let key = fields
        .get(OBJECT_KEY)
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    serde_json::from_value(Value::Object(fields))
        .map_err(|e| IndexError::Malformed(format!("item {key}: {e}")))
}

/// The primary key of the item of `object_key`, if the key has the store layout.
fn key_of(object_key: &str) -> Option<Item> {
    let parts = KeyParts::parse(object_key)?;
    Some(HashMap::from([
        (SOP_INSTANCE_UID.to_string(), s(parts.sop_instance_uid)),
        (OBJECT_KEY.to_string(), s(object_key)),
    ]))
}

/// Of records for the same object key, the last one (BatchWriteItem refuses a request with two
/// puts for one key), in the order of their last occurrence.
pub(crate) fn last_per_key(records: Vec<InstanceRecord>) -> Vec<InstanceRecord> {
    let mut seen = HashSet::new();
    let mut kept: Vec<InstanceRecord> = records
        .into_iter()
        .rev()
        .filter(|r| seen.insert(r.object_key.clone()))
        .collect();
    kept.reverse();
    kept
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The outcome with its texts and warnings bounded, so the item stays far below 400 KB whatever
/// HealthImaging reported.
pub(crate) fn bounded(outcome: InstanceOutcome) -> InstanceOutcome {
    match outcome {
        InstanceOutcome::ImportedWithWarnings {
            image_set_id,
            is_primary,
            warnings,
        } => {
            let more = warnings.len().saturating_sub(MAX_WARNINGS);
            let mut kept: Vec<String> = warnings
                .iter()
                .take(MAX_WARNINGS)
                .map(|w| clip(w, MAX_TEXT))
                .collect();
            if more > 0 {
                kept.push(format!("… and {more} more warnings"));
            }
            InstanceOutcome::ImportedWithWarnings {
                image_set_id,
                is_primary,
                warnings: kept,
            }
        }
        InstanceOutcome::Failed {
            exception_type,
            message,
        } => InstanceOutcome::Failed {
            exception_type: clip(&exception_type, MAX_TEXT),
            message: clip(&message, MAX_TEXT),
        },
        other => other,
    }
}

/// What an outcome update sends: the update expression, its condition, and their attribute names
/// and values.
pub(crate) struct OutcomeUpdate {
    pub expression: String,
    pub condition: String,
    pub names: HashMap<String, String>,
    pub values: Item,
}

/// The condition of every outcome update: the item exists and belongs to the job (`#k`, `#job`
/// and `:job` of [`outcome_update`]).
pub(crate) const OUTCOME_CONDITION: &str = "attribute_exists(#k) AND #job = :job";

/// Added to the condition of an IMPORTED outcome: the item is not IMPORTED_WITH_WARNINGS of the
/// same image set, which IMPORTED never replaces ([`InstanceOutcome::replaces`]).
pub(crate) const KEEPS_WARNINGS: &str = " AND NOT (#o = :iww AND #isid = :isid)";

/// The update that records `outcome` on an item of job `job_id`: SET `outcome` and its details,
/// REMOVE the details of other outcomes, and SET or REMOVE `failedJobId`.
pub(crate) fn outcome_update(
    job_id: &str,
    outcome: &InstanceOutcome,
) -> Result<OutcomeUpdate, IndexError> {
    let Value::Object(fields) = serde_json::to_value(outcome)? else {
        return Err(IndexError::Malformed(
            "an outcome is not a JSON object".into(),
        ));
    };
    let mut names = HashMap::from([
        ("#k".to_string(), OBJECT_KEY.to_string()),
        ("#job".to_string(), JOB_ID.to_string()),
        ("#f".to_string(), FAILED_JOB_ID.to_string()),
    ]);
    let mut values = HashMap::from([(":job".to_string(), s(job_id))]);
    let mut condition = OUTCOME_CONDITION.to_string();
    if let InstanceOutcome::Imported { image_set_id, .. } = outcome {
        condition.push_str(KEEPS_WARNINGS);
        names.insert("#o".into(), "outcome".into());
        names.insert("#isid".into(), "imageSetId".into());
        values.insert(":iww".into(), s("IMPORTED_WITH_WARNINGS"));
        values.insert(":isid".into(), s(image_set_id));
    }
    let mut sets = Vec::new();
    for (i, (name, value)) in fields.iter().enumerate() {
        if let Some(attr) = to_attr(value) {
            names.insert(format!("#a{i}"), name.clone());
            values.insert(format!(":a{i}"), attr);
            sets.push(format!("#a{i} = :a{i}"));
        }
    }
    let mut removes: Vec<String> = Vec::new();
    for (i, detail) in OUTCOME_DETAILS.iter().enumerate() {
        if !fields.contains_key(*detail) {
            names.insert(format!("#r{i}"), detail.to_string());
            removes.push(format!("#r{i}"));
        }
    }
    if matches!(outcome, InstanceOutcome::Failed { .. }) {
        sets.push("#f = :job".into());
    } else {
        removes.push("#f".into());
    }
    let mut expression = format!("SET {}", sets.join(", "));
    if !removes.is_empty() {
        expression.push_str(&format!(" REMOVE {}", removes.join(", ")));
    }
    Ok(OutcomeUpdate {
        expression,
        condition,
        names,
        values,
    })
}

/// Runs `tasks`, at most `limit` at once; the first failure ends the rest.
async fn bounded_all<T, F>(
    tasks: impl IntoIterator<Item = F>,
    limit: usize,
) -> Result<Vec<T>, IndexError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, IndexError>> + Send + 'static,
{
    let joined = |r: Result<Result<T, IndexError>, tokio::task::JoinError>| {
        r.map_err(|e| IndexError::Io(std::io::Error::other(e.to_string())))?
    };
    let mut running = JoinSet::new();
    let mut out = Vec::new();
    for task in tasks {
        if running.len() >= limit
            && let Some(r) = running.join_next().await
        {
            out.push(joined(r)?);
        }
        running.spawn(task);
    }
    while let Some(r) = running.join_next().await {
        out.push(joined(r)?);
    }
    Ok(out)
}

/// The pause before resending unprocessed items or keys (attempt 1 is the first resend).
fn unprocessed_backoff(attempt: u32) -> Duration {
    crate::import::full_jitter(UNPROCESSED_BACKOFF, UNPROCESSED_BACKOFF_CAP, attempt)
}

impl DynamoIndex {
    /// One BatchWriteItem of at most 25 items, resending unprocessed items with backoff.
    async fn batch_write(&self, items: Vec<Item>) -> Result<(), IndexError> {
        let mut requests = items
            .into_iter()
            .map(|item| {
                PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .map(|put| WriteRequest::builder().put_request(put).build())
                    .map_err(|e| IndexError::Malformed(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut attempt = 0;
        loop {
            let out = self
                .client
                .batch_write_item()
                .request_items(&self.table, requests)
                .send()
                .await
                .map_err(|e| dynamo_error("BatchWriteItem", e))?;
            requests = out
                .unprocessed_items()
                .and_then(|m| m.get(&self.table))
                .cloned()
                .unwrap_or_default();
            if requests.is_empty() {
                return Ok(());
            }
            attempt += 1;
            if attempt >= UNPROCESSED_ATTEMPTS {
                return Err(IndexError::Dynamo {
                    operation: "BatchWriteItem",
                    message: format!(
                        "{} items still unprocessed after {attempt} attempts",
                        requests.len()
                    ),
                    retriable: true,
                });
            }
            tokio::time::sleep(unprocessed_backoff(attempt)).await;
        }
    }

    /// The object keys among `keys` (at most 100) that have an item, resending unprocessed keys
    /// with backoff.
    async fn batch_present(&self, keys: Vec<Item>) -> Result<Vec<String>, IndexError> {
        let mut request = KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .projection_expression("#k")
            .expression_attribute_names("#k", OBJECT_KEY)
            .consistent_read(true)
            .build()
            .map_err(|e| IndexError::Malformed(e.to_string()))?;
        let mut present = Vec::new();
        let mut attempt = 0;
        loop {
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| dynamo_error("BatchGetItem", e))?;
            for item in out
                .responses()
                .and_then(|r| r.get(&self.table))
                .into_iter()
                .flatten()
            {
                if let Some(AttributeValue::S(key)) = item.get(OBJECT_KEY) {
                    present.push(key.clone());
                }
            }
            match out.unprocessed_keys().and_then(|u| u.get(&self.table)) {
                Some(rest) if !rest.keys().is_empty() => request = rest.clone(),
                _ => return Ok(present),
            }
            attempt += 1;
            if attempt >= UNPROCESSED_ATTEMPTS {
                return Err(IndexError::Dynamo {
                    operation: "BatchGetItem",
                    message: format!("keys still unprocessed after {attempt} attempts"),
                    retriable: true,
                });
            }
            tokio::time::sleep(unprocessed_backoff(attempt)).await;
        }
    }

    /// Creates the item of `record` unless one exists for its key; whether it did.
    async fn put_absent(&self, item: Item) -> Result<bool, IndexError> {
        let r = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", OBJECT_KEY)
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(dynamo_error("PutItem", e)),
        }
    }

    /// Records `outcome` on the item of `key` if it exists and the outcome replaces its own.
    async fn update_outcome(
        &self,
        job_id: String,
        key: Item,
        outcome: InstanceOutcome,
    ) -> Result<Updated, IndexError> {
        let update = outcome_update(&job_id, &outcome)?;
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(update.expression)
            .condition_expression(update.condition)
            .set_expression_attribute_names(Some(update.names))
            .set_expression_attribute_values(Some(update.values))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match r {
            Ok(out) => Ok(
                if out
                    .attributes()
                    .and_then(|old| from_item(old).ok())
                    .is_none_or(|old| old.outcome != outcome)
                {
                    Updated::Changed
                } else {
                    Updated::Unchanged
                },
            ),
            // The item as it is comes with the failure when there is one: kept as it is
            // (IMPORTED_WITH_WARNINGS); else the index has no record of this object (skipped,
            // and no partial item created).
            Err(e) if is_condition_failure(&e) => Ok(match e.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(c)) if c.item().is_some() => {
                    Updated::Unchanged
                }
                _ => Updated::Absent,
            }),
            Err(e) => Err(dynamo_error("UpdateItem", e)),
        }
    }

    /// Every item of a Query (following its pages) as records.
    async fn query_all(
        &self,
        index: Option<&str>,
        attribute: &str,
        value: &str,
    ) -> Result<Vec<InstanceRecord>, IndexError> {
        let mut records = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(index.map(String::from))
                .key_condition_expression("#a = :v")
                .expression_attribute_names("#a", attribute)
                .expression_attribute_values(":v", s(value))
                // Strongly consistent reads exist on the table only, not on a global secondary
                // index (Query API reference, ConsistentRead).
                .consistent_read(index.is_none())
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| dynamo_error("Query", e))?;
            for item in out.items() {
                records.push(from_item(item)?);
            }
            start = out.last_evaluated_key().cloned();
            if start.is_none() {
                return Ok(records);
            }
        }
    }
}

#[async_trait]
impl InstanceIndex for DynamoIndex {
    async fn append(&self, records: Vec<InstanceRecord>) -> Result<(), IndexError> {
        let items = last_per_key(records)
            .iter()
            .map(to_item)
            .collect::<Result<Vec<_>, _>>()?;
        let batches: Vec<Vec<Item>> = items
            .chunks(BATCH_WRITE_ITEMS)
            .map(<[Item]>::to_vec)
            .collect();
        bounded_all(
            batches.into_iter().map(|batch| {
                let this = self.clone();
                async move { this.batch_write(batch).await }
            }),
            BATCHES_IN_FLIGHT,
        )
        .await?;
        Ok(())
    }

    async fn find(&self, sop_instance_uid: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        let mut records = self
            .query_all(None, SOP_INSTANCE_UID, sop_instance_uid)
            .await?;
        records.sort_by(|a, b| {
            (a.received_at.as_str(), a.object_key.as_str())
                .cmp(&(b.received_at.as_str(), b.object_key.as_str()))
        });
        Ok(records)
    }

    async fn record_outcomes(
        &self,
        job_id: &str,
        outcomes: Vec<(String, InstanceOutcome)>,
    ) -> Result<OutcomesRecorded, IndexError> {
        let updates = outcomes.into_iter().filter_map(|(object_key, outcome)| {
            // A key of another job or not of the store layout has no item here: skipped.
            let belongs = KeyParts::parse(&object_key).is_some_and(|p| p.job_id == job_id);
            let key = key_of(&object_key).filter(|_| belongs)?;
            let (this, job_id) = (self.clone(), job_id.to_string());
            Some(async move { this.update_outcome(job_id, key, bounded(outcome)).await })
        });
        let mut recorded = OutcomesRecorded::default();
        for updated in bounded_all(updates, WRITES_IN_FLIGHT).await? {
            match updated {
                Updated::Changed => {
                    recorded.matched += 1;
                    recorded.changed += 1;
                }
                Updated::Unchanged => recorded.matched += 1,
                Updated::Absent => {}
            }
        }
        Ok(recorded)
    }

    async fn failed(&self, job_id: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        let mut records = self
            .query_all(Some(FAILED_INDEX), FAILED_JOB_ID, job_id)
            .await?;
        records.sort_by(|a, b| a.object_key.cmp(&b.object_key));
        Ok(records)
    }

    async fn missing(&self, _job_id: &str, keys: Vec<String>) -> Result<Vec<String>, IndexError> {
        let mut seen = HashSet::new();
        let wanted: Vec<(String, Item)> = keys
            .into_iter()
            .filter(|k| seen.insert(k.clone()))
            .filter_map(|k| key_of(&k).map(|item| (k, item)))
            .collect();
        let mut present = HashSet::new();
        for chunk in wanted.chunks(BATCH_GET_KEYS) {
            let keys = chunk.iter().map(|(_, item)| item.clone()).collect();
            present.extend(self.batch_present(keys).await?);
        }
        Ok(wanted
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !present.contains(k))
            .collect())
    }

    async fn add_absent(&self, records: Vec<InstanceRecord>) -> Result<u64, IndexError> {
        let items = last_per_key(records)
            .iter()
            .map(to_item)
            .collect::<Result<Vec<_>, _>>()?;
        let added = bounded_all(
            items.into_iter().map(|item| {
                let this = self.clone();
                async move { this.put_absent(item).await }
            }),
            WRITES_IN_FLIGHT,
        )
        .await?;
        Ok(added.into_iter().filter(|a| *a).count() as u64)
    }

    fn describe(&self) -> String {
        format!("the DynamoDB instance table {}", self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";

    fn record(sop: &str) -> InstanceRecord {
        let key = format!("{JOB}/1.2/1.2.3/{sop}.dcm");
        KeyParts::parse(&key).unwrap().record(
            &key,
            512,
            Some("1.2.840.10008.5.1.4.1.1.2".into()),
            Some("CT1".into()),
            "2026-11-24T06:00:00.000Z".into(),
        )
    }

    /// One of each outcome; the match makes a new variant a compile error here, so that
    /// [`OUTCOME_DETAILS`] is checked for it too.
    fn every_outcome() -> Vec<InstanceOutcome> {
        let all = vec![
            InstanceOutcome::Stored,
            InstanceOutcome::Imported {
                image_set_id: "a".repeat(32),
                is_primary: true,
            },
            InstanceOutcome::ImportedWithWarnings {
                image_set_id: "b".repeat(32),
                is_primary: false,
                warnings: vec!["InvalidOffsetTable (45330): offsets".into()],
            },
            InstanceOutcome::Failed {
                exception_type: "ValidationException".into(),
                message: "bad".into(),
            },
        ];
        for o in &all {
            match o {
                InstanceOutcome::Stored
                | InstanceOutcome::Imported { .. }
                | InstanceOutcome::ImportedWithWarnings { .. }
                | InstanceOutcome::Failed { .. } => {}
            }
        }
        all
    }

    #[test]
    fn a_record_is_an_item_of_its_json_fields_and_back() {
        for outcome in every_outcome() {
            let mut r = record("1.2.3.4");
            r.outcome = outcome.clone();
            let item = to_item(&r).unwrap();
            assert_eq!(item["sopInstanceUid"], s("1.2.3.4"));
            assert_eq!(item["objectKey"], s(&r.object_key));
            assert_eq!(item["size"], AttributeValue::N("512".into()));
            assert_eq!(item["outcome"], s(outcome.name()));
            assert_eq!(
                item.contains_key("failedJobId"),
                matches!(outcome, InstanceOutcome::Failed { .. }),
                "only a FAILED item is in the failures index"
            );
            assert_eq!(from_item(&item).unwrap(), r);
        }
        let mut r = record("1.2.3.5");
        r.sop_class_uid = None;
        r.calling_ae_title = None;
        let item = to_item(&r).unwrap();
        assert!(!item.contains_key("sopClassUid") && !item.contains_key("callingAeTitle"));
        assert_eq!(from_item(&item).unwrap(), r);
        let mut r = record("1.2.3.6");
        r.outcome = every_outcome().remove(2);
        let item = to_item(&r).unwrap();
        assert_eq!(item["isPrimary"], AttributeValue::Bool(false));
        assert_eq!(
            item["warnings"],
            AttributeValue::L(vec![s("InvalidOffsetTable (45330): offsets")])
        );
    }

    #[test]
    fn an_item_this_version_cannot_read_is_an_error_naming_it() {
        let mut item = to_item(&record("1.2.3.4")).unwrap();
        item.insert("outcome".into(), s("SOMETHING_NEW"));
        let e = from_item(&item).unwrap_err().to_string();
        assert!(e.contains("1.2.3.4.dcm"), "{e}");
        assert!(!IndexError::Malformed(e).is_retriable());
    }

    #[test]
    fn outcome_details_cover_every_outcome() {
        for outcome in every_outcome() {
            let Value::Object(fields) = serde_json::to_value(&outcome).unwrap() else {
                panic!()
            };
            for name in fields.keys().filter(|k| *k != "outcome") {
                assert!(OUTCOME_DETAILS.contains(&name.as_str()), "{name}");
            }
        }
    }

    #[test]
    fn an_outcome_update_sets_its_details_and_removes_the_others() {
        let imported = &every_outcome()[1];
        let u = outcome_update(JOB, imported).unwrap();
        let named = |placeholder: &str| u.names[placeholder].clone();
        let (set, remove) = u.expression.split_once(" REMOVE ").unwrap();
        let mut set_names: Vec<String> = set
            .trim_start_matches("SET ")
            .split(", ")
            .map(|a| named(a.split(" = ").next().unwrap()))
            .collect();
        set_names.sort();
        let removed: Vec<String> = remove.split(", ").map(named).collect();
        assert_eq!(
            set_names,
            ["imageSetId", "isPrimary", "outcome"].map(String::from)
        );
        assert_eq!(
            removed,
            ["warnings", "exceptionType", "message", "failedJobId"].map(String::from)
        );
        assert_eq!(u.values[":job"], s(JOB));
        // Every placeholder is used, as DynamoDB requires.
        assert_eq!(u.condition, format!("{OUTCOME_CONDITION}{KEEPS_WARNINGS}"));
        assert_eq!(u.values[":iww"], s("IMPORTED_WITH_WARNINGS"));
        for outcome in every_outcome() {
            let u = outcome_update(JOB, &outcome).unwrap();
            let all = format!("{} {}", u.expression, u.condition);
            for p in u.names.keys().chain(u.values.keys()) {
                assert!(all.contains(p.as_str()), "{p} unused in {all}");
            }
            assert_eq!(
                u.condition.contains(KEEPS_WARNINGS),
                matches!(outcome, InstanceOutcome::Imported { .. }),
                "only IMPORTED may be kept out: {outcome:?}"
            );
        }

        let failed = &every_outcome()[3];
        let u = outcome_update(JOB, failed).unwrap();
        assert!(u.expression.contains("#f = :job"), "{}", u.expression);
        assert!(!u.expression.contains("REMOVE #f"), "{}", u.expression);
        let stored = outcome_update(JOB, &InstanceOutcome::Stored).unwrap();
        assert!(stored.expression.starts_with("SET #a0 = :a0 REMOVE "));
    }

    #[test]
    fn a_batch_keeps_the_last_record_per_key() {
        let mut again = record("1.2.3.1");
        again.size = 999;
        let kept = last_per_key(vec![
            record("1.2.3.1"),
            record("1.2.3.2"),
            again.clone(),
            record("1.2.3.3"),
        ]);
        assert_eq!(kept, vec![record("1.2.3.2"), again, record("1.2.3.3")]);
        let many: Vec<InstanceRecord> = (0..60).map(|i| record(&format!("1.2.3.{i}"))).collect();
        let items: Vec<Item> = last_per_key(many)
            .iter()
            .map(|r| to_item(r).unwrap())
            .collect();
        let sizes: Vec<usize> = items.chunks(BATCH_WRITE_ITEMS).map(<[Item]>::len).collect();
        assert_eq!(sizes, [25, 25, 10]);
    }

    #[test]
    fn outcomes_are_bounded_far_below_the_item_size_limit() {
        let huge = InstanceOutcome::ImportedWithWarnings {
            image_set_id: "a".repeat(32),
            is_primary: true,
            warnings: vec!["é".repeat(5000); 500],
        };
        let InstanceOutcome::ImportedWithWarnings { warnings, .. } = bounded(huge) else {
            panic!()
        };
        assert_eq!(warnings.len(), MAX_WARNINGS + 1);
        assert!(warnings[0].len() <= MAX_TEXT + "…".len());
        assert_eq!(warnings[MAX_WARNINGS], "… and 400 more warnings");
        let mut r = record("1.2.3.4");
        r.outcome = InstanceOutcome::ImportedWithWarnings {
            image_set_id: "a".repeat(32),
            is_primary: true,
            warnings,
        };
        let size = serde_json::to_vec(&r).unwrap().len();
        assert!(size < 300 * 1024, "{size} bytes");
        let small = every_outcome().remove(3);
        assert_eq!(bounded(small.clone()), small);
    }

    #[test]
    fn numbers_and_nested_values_convert_both_ways() {
        let v = serde_json::json!({"n": 18446744073709551615u64, "f": 1.5, "l": [1, "x", true], "m": {"a": null, "b": "c"}});
        let back = from_attr(&to_attr(&v).unwrap()).unwrap();
        assert_eq!(back["n"], v["n"]);
        assert_eq!(back["f"], v["f"]);
        assert_eq!(back["l"], v["l"]);
        assert_eq!(back["m"], serde_json::json!({"b": "c"}), "null is left out");
        assert_eq!(to_attr(&Value::Null), None);
    }
}

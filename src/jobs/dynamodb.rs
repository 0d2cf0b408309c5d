//! The DynamoDB job store: one item per job, key `jobId`, attributes named as the fields of [`Job`].
//!
//! Forward-only status is enforced by DynamoDB itself: every write carries a condition on the
//! current status. The table has a global secondary index `status-createdAt` (partition key
//! `status`, sort key `createdAt`) used for start-up recovery and `dicom-gateway jobs list`; the
//! CloudFormation template in `infra/` creates it.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;

use crate::aws::{dynamo_string as s, is_condition_failure};

use super::{ImportOutcome, Job, JobStatus, JobStore, JobStoreError, OutcomeClaim, Transition};
use crate::batch::CloseReason;

/// Name of the global secondary index on (status, createdAt).
pub(crate) const STATUS_INDEX: &str = "status-createdAt";

/// Job records in a DynamoDB table, shared by the gateways and the import state machine.
pub(crate) struct DynamoJobStore {
    client: Client,
    table: String,
}

impl DynamoJobStore {
    pub(crate) fn new(client: Client, table: String) -> Self {
        DynamoJobStore { client, table }
    }
}

fn dynamo_error<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> JobStoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    JobStoreError::Dynamo {
        operation,
        message: crate::aws::describe(&err),
        retriable: crate::aws::is_retriable(&err),
    }
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A job as a DynamoDB item. Empty sets are left out (DynamoDB does not store empty sets).
pub fn to_item(job: &Job) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::new();
    item.insert("jobId".into(), s(&job.job_id));
    item.insert("status".into(), s(job.status.as_str()));
    item.insert("createdAt".into(), s(&job.created_at));
    item.insert("inputS3Uri".into(), s(&job.input_s3_uri));
    if let Some(reason) = job.close_reason {
        item.insert("closeReason".into(), s(reason.as_str()));
    }
    let strings = [
        ("closedAt", &job.closed_at),
        ("outputS3Uri", &job.output_s3_uri),
        ("datastoreId", &job.datastore_id),
        ("executionArn", &job.execution_arn),
        ("importJobId", &job.import_job_id),
        ("submittedAt", &job.submitted_at),
        ("endedAt", &job.ended_at),
        ("importEndedAt", &job.import_ended_at),
        ("outcomeClaimedAt", &job.outcome_claimed_at),
        ("message", &job.message),
        ("gatewayId", &job.gateway_id),
    ];
    for (name, value) in strings {
        if let Some(v) = value {
            item.insert(name.into(), s(v));
        }
    }
    let numbers = [
        ("instanceCount", job.instance_count),
        ("totalBytes", job.total_bytes),
        ("scannedCount", job.scanned_count),
        ("importedCount", job.imported_count),
        ("failedCount", job.failed_count),
        ("customerErrorCount", job.customer_error_count),
        ("serverErrorCount", job.server_error_count),
        ("imageSetCount", job.image_set_count),
    ];
    for (name, value) in numbers {
        if let Some(v) = value {
            item.insert(name.into(), n(v));
        }
    }
    for (name, set) in [
        ("studyInstanceUids", &job.study_instance_uids),
        ("callingAeTitles", &job.calling_ae_titles),
        ("imageSetIds", &job.image_set_ids),
    ] {
        if !set.is_empty() {
            item.insert(name.into(), AttributeValue::Ss(set.clone()));
        }
    }
    if let Some(claim) = &job.claim {
        item.insert("claim".into(), claim_value(claim));
    }
    item
}

/// An outcome claim as a DynamoDB map, `{gatewayId, expiresAt}` like its serde form.
fn claim_value(claim: &OutcomeClaim) -> AttributeValue {
    AttributeValue::M(HashMap::from([
        ("gatewayId".to_string(), s(&claim.gateway_id)),
        ("expiresAt".to_string(), s(&claim.expires_at)),
    ]))
}

fn claim_from(value: &AttributeValue) -> Option<OutcomeClaim> {
    let map = value.as_m().ok()?;
    let get = |k: &str| map.get(k).and_then(|v| v.as_s().ok()).cloned();
    Some(OutcomeClaim {
        gateway_id: get("gatewayId")?,
        expires_at: get("expiresAt")?,
    })
}

/// A DynamoDB item as a job. String lists are read from a string set, a list, or a string holding a
/// JSON array (which is how earlier versions of the state machine wrote `imageSetIds`).
pub fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Job, JobStoreError> {
    let get_s = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let get_n = |name: &str| -> Option<u64> {
        item.get(name).and_then(|v| match v {
            AttributeValue::N(x) => x.parse().ok(),
            AttributeValue::S(x) => x.parse().ok(),
            _ => None,
        })
    };
    let get_list = |name: &str| -> Vec<String> {
        match item.get(name) {
            Some(AttributeValue::Ss(v)) => v.clone(),
            Some(AttributeValue::L(v)) => v.iter().filter_map(|x| x.as_s().ok().cloned()).collect(),
            // A JSON array, or a single JSON string: JSONPath engines differ on whether a wildcard
            // path with one match (`imageSetsSummary[*].imageSetId`) yields a list or the value.
            Some(AttributeValue::S(x)) => serde_json::from_str::<Vec<String>>(x)
                .or_else(|_| serde_json::from_str::<String>(x).map(|one| vec![one]))
                .unwrap_or_else(|_| {
                    if x.is_empty() {
                        Vec::new()
                    } else {
                        vec![x.clone()]
                    }
                }),
            _ => Vec::new(),
        }
    };
    let job_id =
        get_s("jobId").ok_or_else(|| JobStoreError::Malformed("item has no jobId".into()))?;
    let status = get_s("status")
        .and_then(|st| JobStatus::parse(&st))
        .ok_or_else(|| JobStoreError::Malformed(format!("job {job_id} has no valid status")))?;
    Ok(Job {
        job_id,
        status,
        created_at: get_s("createdAt").unwrap_or_default(),
        closed_at: get_s("closedAt"),
        close_reason: get_s("closeReason").and_then(|r| CloseReason::parse(&r)),
        instance_count: get_n("instanceCount"),
        total_bytes: get_n("totalBytes"),
        study_instance_uids: get_list("studyInstanceUids"),
        calling_ae_titles: get_list("callingAeTitles"),
        input_s3_uri: get_s("inputS3Uri").unwrap_or_default(),
        output_s3_uri: get_s("outputS3Uri"),
        datastore_id: get_s("datastoreId"),
        execution_arn: get_s("executionArn"),
        import_job_id: get_s("importJobId"),
        submitted_at: get_s("submittedAt"),
        ended_at: get_s("endedAt"),
        import_ended_at: get_s("importEndedAt"),
        scanned_count: get_n("scannedCount"),
        imported_count: get_n("importedCount"),
        failed_count: get_n("failedCount"),
        customer_error_count: get_n("customerErrorCount"),
        server_error_count: get_n("serverErrorCount"),
        image_set_count: get_n("imageSetCount"),
        image_set_ids: get_list("imageSetIds"),
        message: get_s("message"),
        gateway_id: get_s("gatewayId"),
        claim: item.get("claim").and_then(claim_from),
        outcome_claimed_at: get_s("outcomeClaimedAt"),
    })
}

/// The update expression and values for a transition to `to`, conditional on a predecessor status.
pub(crate) fn transition_update(
    to: JobStatus,
    t: &Transition,
) -> (String, String, HashMap<String, AttributeValue>) {
    let mut sets = vec!["#status = :to".to_string()];
    let mut values = HashMap::from([(":to".to_string(), s(to.as_str()))]);
    for (name, value) in [
        ("executionArn", &t.execution_arn),
        ("submittedAt", &t.submitted_at),
        ("message", &t.message),
        ("outputS3Uri", &t.output_s3_uri),
        ("datastoreId", &t.datastore_id),
    ] {
        if let Some(v) = value {
            sets.push(format!("{name} = :{name}"));
            values.insert(format!(":{name}"), s(v));
        }
    }
    let preds = to.predecessors();
    let mut names = Vec::new();
    for (i, p) in preds.iter().enumerate() {
        values.insert(format!(":p{i}"), s(p.as_str()));
        names.push(format!(":p{i}"));
    }
    (
        format!("SET {}", sets.join(", ")),
        format!("#status IN ({})", names.join(", ")),
        values,
    )
}

/// The condition of an adoption, and its values: the job is still OPEN and still owned by the
/// gateway recovery found it with (a job written before gateway ids existed has none).
pub(crate) fn adopt_condition(
    previous_owner: Option<&str>,
) -> (String, HashMap<String, AttributeValue>) {
    let mut values = HashMap::from([(":open".to_string(), s(JobStatus::Open.as_str()))]);
    let owner = match previous_owner {
        Some(owner) => {
            values.insert(":owner".into(), s(owner));
            "gatewayId = :owner"
        }
        None => "attribute_not_exists(gatewayId)",
    };
    (format!("#status = :open AND {owner}"), values)
}

/// Placeholders of the claim's attribute names (`claim` may be a reserved word some day; these
/// are used in every claim expression).
const CLAIM_NAMES: [(&str, &str); 4] = [
    ("#status", "status"),
    ("#claim", "claim"),
    ("#gw", "gatewayId"),
    ("#exp", "expiresAt"),
];

/// The update of [`JobStore::claim_outcome`]: the claim, and the time of the job's first claim
/// unless it has one. `if_not_exists(path, value)` evaluates to the attribute when the item has
/// it, else to `value` ("Using update expressions in DynamoDB", Preventing overwrites of an
/// existing attribute,
/// https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/Expressions.UpdateExpressions.html#Expressions.UpdateExpressions.SET.PreventingAttributeOverwrites).
/// Its `:now` is the condition's.
pub(crate) const CLAIM_UPDATE: &str =
    "SET #claim = :claim, outcomeClaimedAt = if_not_exists(outcomeClaimedAt, :now)";

/// The condition of [`JobStore::claim_outcome`]: [`Job::outcome_claimable_by`] as DynamoDB checks
/// it (`:gw` the claiming gateway, `:now` the time).
pub(crate) const CLAIM_CONDITION: &str = "#status = :imported AND (attribute_not_exists(#claim) OR #claim.#gw = :gw OR #claim.#exp < :now)";

/// The update and values that end an IMPORTED job with `outcome`, conditional on the job being
/// IMPORTED with its claim held by `gateway_id`; the claim is removed.
pub(crate) fn outcome_update(
    gateway_id: &str,
    outcome: &ImportOutcome,
) -> (String, String, HashMap<String, AttributeValue>) {
    let mut sets = vec![
        "#status = :to".to_string(),
        "endedAt = :endedAt".to_string(),
    ];
    let mut values = HashMap::from([
        (":to".to_string(), s(outcome.status.as_str())),
        (":endedAt".to_string(), s(&outcome.ended_at)),
        (":imported".to_string(), s(JobStatus::Imported.as_str())),
        (":gw".to_string(), s(gateway_id)),
    ]);
    let mut set = |name: &str, value: AttributeValue| {
        sets.push(format!("{name} = :{name}"));
        values.insert(format!(":{name}"), value);
    };
    if let Some(m) = &outcome.message {
        set("message", s(m));
    }
    if let Some(c) = outcome.counts {
        let numbers = [
            ("scannedCount", c.scanned),
            ("importedCount", Some(c.imported)),
            ("failedCount", Some(c.failed())),
            ("customerErrorCount", Some(c.customer_errors)),
            ("serverErrorCount", Some(c.server_errors)),
            ("imageSetCount", c.image_sets),
        ];
        for (name, value) in numbers {
            if let Some(v) = value {
                set(name, n(v));
            }
        }
    }
    if !outcome.image_set_ids.is_empty() {
        set(
            "imageSetIds",
            AttributeValue::Ss(outcome.image_set_ids.clone()),
        );
    }
    (
        format!("SET {} REMOVE #claim", sets.join(", ")),
        "#status = :imported AND #claim.#gw = :gw".to_string(),
        values,
    )
}

impl DynamoJobStore {
    /// Jobs in `status` from the `status-createdAt` index: every one, oldest first, or at most
    /// `limit` of the newest.
    async fn query_status(
        &self,
        status: JobStatus,
        newest_first: bool,
        limit: Option<usize>,
    ) -> Result<Vec<Job>, JobStoreError> {
        let mut jobs = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(STATUS_INDEX)
                .key_condition_expression("#status = :s")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":s", s(status.as_str()))
                .scan_index_forward(!newest_first)
                .set_limit(limit.map(|l| l.clamp(1, 1000) as i32))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| dynamo_error("Query", e))?;
            for item in out.items() {
                jobs.push(from_item(item)?);
            }
            start = out.last_evaluated_key().cloned();
            if start.is_none() || limit.is_some_and(|l| jobs.len() >= l) {
                return Ok(jobs);
            }
        }
    }
}

#[async_trait]
impl JobStore for DynamoJobStore {
    async fn record_open(&self, job: &Job) -> Result<(), JobStoreError> {
        let r = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(job)))
            .condition_expression("attribute_not_exists(jobId)")
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(dynamo_error("PutItem", e)),
        }
    }

    async fn record_closed(&self, job: &Job) -> Result<(), JobStoreError> {
        let r = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(job)))
            .condition_expression("attribute_not_exists(jobId) OR #status = :open")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":open", s(JobStatus::Open.as_str()))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Ok(()), // already CLOSED or beyond
            Err(e) => Err(dynamo_error("PutItem", e)),
        }
    }

    async fn adopt(
        &self,
        closed: &Job,
        previous_owner: Option<&str>,
    ) -> Result<bool, JobStoreError> {
        let (condition, values) = adopt_condition(previous_owner);
        let r = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(to_item(closed)))
            .condition_expression(condition)
            .expression_attribute_names("#status", "status")
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            // Another gateway adopted it first, or its owner closed it after all.
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(dynamo_error("PutItem", e)),
        }
    }

    async fn transition(
        &self,
        job_id: &str,
        to: JobStatus,
        t: Transition,
    ) -> Result<(), JobStoreError> {
        let (update, condition, values) = transition_update(to, &t);
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("jobId", s(job_id))
            .update_expression(update)
            .condition_expression(format!("attribute_exists(jobId) AND {condition}"))
            .expression_attribute_names("#status", "status")
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => {
                let current = self.get(job_id).await?.map(|j| j.status.to_string());
                match current {
                    None => Err(JobStoreError::NotFound(job_id.to_string())),
                    Some(current) => Err(JobStoreError::NotForward {
                        job_id: job_id.to_string(),
                        current,
                        wanted: to,
                    }),
                }
            }
            Err(e) => Err(dynamo_error("UpdateItem", e)),
        }
    }

    async fn claim_outcome(
        &self,
        job_id: &str,
        claim: &OutcomeClaim,
        now: &str,
    ) -> Result<bool, JobStoreError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("jobId", s(job_id))
            .update_expression(CLAIM_UPDATE)
            .condition_expression(CLAIM_CONDITION)
            .set_expression_attribute_names(Some(
                CLAIM_NAMES
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ))
            .expression_attribute_values(":imported", s(JobStatus::Imported.as_str()))
            .expression_attribute_values(":claim", claim_value(claim))
            .expression_attribute_values(":gw", s(&claim.gateway_id))
            .expression_attribute_values(":now", s(now))
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(dynamo_error("UpdateItem", e)),
        }
    }

    async fn release_outcome(&self, job_id: &str, gateway_id: &str) -> Result<(), JobStoreError> {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("jobId", s(job_id))
            .update_expression("REMOVE #claim")
            .condition_expression("#claim.#gw = :gw")
            .expression_attribute_names("#claim", "claim")
            .expression_attribute_names("#gw", "gatewayId")
            .expression_attribute_values(":gw", s(gateway_id))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Ok(()), // not ours (any more)
            Err(e) => Err(dynamo_error("UpdateItem", e)),
        }
    }

    async fn record_outcome(
        &self,
        job_id: &str,
        gateway_id: &str,
        outcome: &ImportOutcome,
    ) -> Result<(), JobStoreError> {
        let (update, condition, values) = outcome_update(gateway_id, outcome);
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("jobId", s(job_id))
            .update_expression(update)
            .condition_expression(condition)
            // Every name given must appear in the expressions: not #exp here.
            .set_expression_attribute_names(Some(
                CLAIM_NAMES[..3]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ))
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => match self.get(job_id).await? {
                None => Err(JobStoreError::NotFound(job_id.to_string())),
                Some(job) if job.status == JobStatus::Imported => {
                    Err(JobStoreError::ClaimLost(job_id.to_string()))
                }
                Some(job) => Err(JobStoreError::NotForward {
                    job_id: job_id.to_string(),
                    current: job.status.to_string(),
                    wanted: outcome.status,
                }),
            },
            Err(e) => Err(dynamo_error("UpdateItem", e)),
        }
    }

    async fn get(&self, job_id: &str) -> Result<Option<Job>, JobStoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("jobId", s(job_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| dynamo_error("GetItem", e))?;
        out.item().map(from_item).transpose()
    }

    async fn list_by_status(&self, status: JobStatus) -> Result<Vec<Job>, JobStoreError> {
        self.query_status(status, false, None).await
    }

    async fn list_recent(&self, limit: usize) -> Result<Vec<Job>, JobStoreError> {
        let mut jobs = Vec::new();
        for status in JobStatus::ALL {
            jobs.extend(self.query_status(status, true, Some(limit)).await?);
        }
        jobs.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.job_id.cmp(&a.job_id))
        });
        jobs.truncate(limit);
        Ok(jobs)
    }

    async fn check(&self) -> Result<(), JobStoreError> {
        self.client
            .get_item()
            .table_name(&self.table)
            .key("jobId", s("readiness-check"))
            .send()
            .await
            .map_err(|e| dynamo_error("GetItem", e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("DynamoDB table {}", self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Job {
        let mut job = Job::opened(
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N",
            "2026-11-23T10:00:00.000Z",
            "s3://b/import/01JD6Y7Z8X9W0V1T2S3R4Q5P6N/",
            "gw-1",
        );
        job.status = JobStatus::Closed;
        job.instance_count = Some(12);
        job.total_bytes = Some(6_000_000);
        job.study_instance_uids = vec!["1.2.3".into(), "1.2.4".into()];
        job.calling_ae_titles = vec!["CT1".into()];
        job
    }

    #[test]
    fn item_mapping_round_trips() {
        let job = sample();
        let item = to_item(&job);
        assert_eq!(item["status"], AttributeValue::S("CLOSED".into()));
        assert_eq!(item["instanceCount"], AttributeValue::N("12".into()));
        assert_eq!(
            item["studyInstanceUids"],
            AttributeValue::Ss(vec!["1.2.3".into(), "1.2.4".into()])
        );
        assert!(!item.contains_key("imageSetIds"), "no empty sets");
        assert!(!item.contains_key("executionArn"));
        assert_eq!(from_item(&item).unwrap(), job);
    }

    #[test]
    fn image_set_ids_written_by_the_state_machine_are_read_back() {
        let mut item = to_item(&sample());
        item.insert(
            "imageSetIds".into(),
            AttributeValue::S("[\"a1\",\"b2\"]".into()),
        );
        item.insert("importedCount".into(), AttributeValue::N("11".into()));
        item.insert(
            "status".into(),
            AttributeValue::S("COMPLETED_WITH_ERRORS".into()),
        );
        let job = from_item(&item).unwrap();
        assert_eq!(job.image_set_ids, vec!["a1", "b2"]);
        let mut one = item.clone();
        one.insert("imageSetIds".into(), AttributeValue::S("\"a1\"".into()));
        assert_eq!(
            from_item(&one).unwrap().image_set_ids,
            vec!["a1"],
            "a single match written as a JSON string"
        );
        assert_eq!(job.imported_count, Some(11));
        assert_eq!(job.status, JobStatus::CompletedWithErrors);
        item.insert("status".into(), AttributeValue::S("WHATEVER".into()));
        assert!(from_item(&item).is_err());
    }

    #[test]
    fn adoption_is_conditional_on_the_job_still_open_under_its_owner() {
        let (condition, values) = adopt_condition(Some("gw-dead"));
        assert_eq!(condition, "#status = :open AND gatewayId = :owner");
        assert_eq!(values[":open"], AttributeValue::S("OPEN".into()));
        assert_eq!(values[":owner"], AttributeValue::S("gw-dead".into()));
        let (condition, values) = adopt_condition(None);
        assert_eq!(
            condition,
            "#status = :open AND attribute_not_exists(gatewayId)"
        );
        assert_eq!(values.len(), 1);
    }

    #[test]
    fn counts_and_claim_round_trip() {
        let mut job = sample();
        job.status = JobStatus::Imported;
        job.import_ended_at = Some("2026-11-23T10:05:00.000Z".into());
        job.scanned_count = Some(12);
        job.customer_error_count = Some(0);
        job.image_set_count = Some(3);
        job.claim = Some(OutcomeClaim {
            gateway_id: "gw-2".into(),
            expires_at: "2026-11-23T10:07:00.000Z".into(),
        });
        job.outcome_claimed_at = Some("2026-11-23T10:06:30.000Z".into());
        let item = to_item(&job);
        assert_eq!(item["status"], AttributeValue::S("IMPORTED".into()));
        assert_eq!(item["scannedCount"], AttributeValue::N("12".into()));
        assert!(
            item["claim"]
                .as_m()
                .is_ok_and(|m| m.contains_key("expiresAt"))
        );
        assert_eq!(from_item(&item).unwrap(), job);
    }

    #[test]
    fn an_outcome_is_conditional_on_imported_and_the_claim() {
        let (update, condition, values) = outcome_update(
            "gw-2",
            &ImportOutcome {
                status: JobStatus::CompletedWithErrors,
                counts: Some(super::super::ImportCounts {
                    scanned: Some(3),
                    imported: 2,
                    customer_errors: 1,
                    server_errors: 0,
                    image_sets: None,
                }),
                image_set_ids: vec!["a1".into()],
                message: Some("1 file(s) failed".into()),
                ended_at: "t".into(),
            },
        );
        assert_eq!(
            update,
            "SET #status = :to, endedAt = :endedAt, message = :message, scannedCount = :scannedCount, \
             importedCount = :importedCount, failedCount = :failedCount, \
             customerErrorCount = :customerErrorCount, serverErrorCount = :serverErrorCount, \
             imageSetIds = :imageSetIds REMOVE #claim"
        );
        assert_eq!(condition, "#status = :imported AND #claim.#gw = :gw");
        assert_eq!(values[":failedCount"], AttributeValue::N("1".into()));
        assert_eq!(
            values[":to"],
            AttributeValue::S("COMPLETED_WITH_ERRORS".into())
        );
        assert_eq!(values[":gw"], AttributeValue::S("gw-2".into()));
        for placeholder in [":imported", ":gw"] {
            assert!(CLAIM_CONDITION.contains(placeholder));
        }
        // Every name and value the claim call gives is used by its update or condition.
        for (placeholder, _) in CLAIM_NAMES {
            assert!(
                CLAIM_UPDATE.contains(placeholder) || CLAIM_CONDITION.contains(placeholder),
                "{placeholder}"
            );
        }
        for placeholder in [":imported", ":claim", ":gw", ":now"] {
            assert!(
                CLAIM_UPDATE.contains(placeholder) || CLAIM_CONDITION.contains(placeholder),
                "{placeholder}"
            );
        }
    }

    #[test]
    fn transitions_are_conditional_on_an_earlier_status() {
        let (update, condition, values) = transition_update(
            JobStatus::Submitted,
            &Transition {
                execution_arn: Some("arn:e".into()),
                submitted_at: Some("t".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            update,
            "SET #status = :to, executionArn = :executionArn, submittedAt = :submittedAt"
        );
        assert_eq!(condition, "#status IN (:p0, :p1)");
        assert_eq!(values[":p0"], AttributeValue::S("OPEN".into()));
        assert_eq!(values[":p1"], AttributeValue::S("CLOSED".into()));
        assert_eq!(values[":to"], AttributeValue::S("SUBMITTED".into()));
    }
}

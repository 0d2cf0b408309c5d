//! Storage Commitment Push Model SCP (SOP Class 1.2.840.10008.1.20.1, PS3.4 Annex J): a modality
//! asks the gateway to take responsibility for instances it sent, and is told later which ones it
//! may delete.
//!
//! The association handler reads the N-ACTION-RQ, checks its Action Information
//! ([`dataset::ActionInformation`]) and hands it to [`Commitments::submit`], which records it with
//! the job store ([`pending`]) before the N-ACTION-RSP says Success. The [`Worker`] then decides
//! each referenced instance from the instance index ([`decision`]): under `--commit-when stored`
//! once the index says stored and the object is in the store, under `imported` once HealthImaging
//! reported it imported. When every instance is decided (or `--commitment-timeout` has passed) it
//! sends the N-EVENT-REPORT-RQ: on the association that carried the request if it is still open
//! (through that association's [`LiveAssociation`] channel), otherwise on a new association to the
//! requesting AE's `--commitment-peer` address ([`scu`]). Requests survive a restart and move to
//! another gateway of the fleet when their gateway stops (claims, see [`pending`]).

pub(crate) mod dataset;
mod decision;
pub(crate) mod dynamodb;
pub(crate) mod pending;
pub(crate) mod scu;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::rfc3339;
use crate::dimse::{Command, Status};
use crate::index::{InstanceIndex, KeyParts};
use crate::store::{ObjectKey, ObjectStore};
use dataset::ActionInformation;
use decision::{Phase, Presence, Verdict};
use pending::{Claim, PendingError, PendingRequest, PendingStore};

/// When the gateway commits to an instance (`--commit-when`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CommitWhen {
    /// Once the object is durable in the store and the index says so.
    Stored,
    /// Once HealthImaging reported the instance imported.
    Imported,
}

/// One instance a request names: Referenced SOP Class and Instance UIDs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SopReference {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

/// Failure Reason (0008,1197) of an instance the gateway does not commit to (PS3.4 J.3.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureReason {
    /// 0x0110: the store could not be checked, or HealthImaging refused the instance, or the
    /// outcome did not come within `--commitment-timeout`.
    ProcessingFailure,
    /// 0x0112: the gateway has no such instance.
    NoSuchObjectInstance,
    /// 0x0119: the gateway has the instance under another SOP Class.
    ClassInstanceConflict,
    /// Any other code (only read back from a report, in tests).
    #[cfg(test)]
    Other(u16),
}

impl FailureReason {
    pub(crate) fn code(self) -> u16 {
        match self {
            FailureReason::ProcessingFailure => 0x0110,
            FailureReason::NoSuchObjectInstance => 0x0112,
            FailureReason::ClassInstanceConflict => 0x0119,
            #[cfg(test)]
            FailureReason::Other(code) => code,
        }
    }

    #[cfg(test)]
    pub(crate) fn from_code(code: u16) -> FailureReason {
        match code {
            0x0110 => FailureReason::ProcessingFailure,
            0x0112 => FailureReason::NoSuchObjectInstance,
            0x0119 => FailureReason::ClassInstanceConflict,
            other => FailureReason::Other(other),
        }
    }
}

/// The result of one request: what the N-EVENT-REPORT-RQ says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub transaction_uid: String,
    pub committed: Vec<SopReference>,
    pub failed: Vec<(SopReference, FailureReason)>,
}

impl Report {
    /// Event Type ID: 1 when every instance is committed, 2 when some failed (PS3.4 J.3.3).
    pub(crate) fn event_type_id(&self) -> u16 {
        if self.failed.is_empty() { 1 } else { 2 }
    }
}

/// How Storage Commitment runs (`--commit-when`, `--commitment-peer`, `--commitment-timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommitmentSettings {
    pub commit_when: CommitWhen,
    /// Requesting AE title (without padding) → host:port, for reports on a new association.
    pub peers: HashMap<String, String>,
    /// After this long, what is still undecided fails with 0x0110.
    pub timeout: Duration,
    /// How long after a request an instance the index does not know may still be one whose record
    /// is on its way (the index writer runs after the C-STORE response).
    pub index_grace: Duration,
    /// Longest pause between two looks at an undecided request.
    pub check_interval: Duration,
}

/// How often the worker lists the pending requests: renews its claims, takes over those of
/// stopped gateways (and, at start-up, its own from before a restart).
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How long a claim lasts: several sweeps, so a live gateway never loses one; a stopped gateway's
/// requests are taken over within this plus one sweep.
const CLAIM_TTL: Duration = Duration::from_secs(120);
/// First pause between two looks at an undecided request; doubled each time up to
/// [`CommitmentSettings::check_interval`].
const FIRST_CHECK_PAUSE: Duration = Duration::from_millis(50);
/// Longest wait for a live association to send a report and get its response.
const LIVE_DELIVERY_WAIT: Duration = Duration::from_secs(30);
/// Longest a delivery on a new association may take, connection to release.
const NEW_ASSOCIATION_WAIT: Duration = Duration::from_secs(30);
/// Longest pause between two attempts to deliver a report.
const MAX_DELIVERY_PAUSE: Duration = Duration::from_secs(300);
/// Reports waiting for one association (it sends them one at a time).
const LIVE_QUEUE: usize = 16;

/// Largest Action Information accepted: [`dataset::MAX_REFERENCES`] references with room to spare.
pub(crate) const MAX_ACTION_INFORMATION: usize = 8 * 1024 * 1024;

/// Why an N-ACTION is refused: the N-ACTION-RSP status, and the reason for the Error Comment and
/// the log (no patient data: UIDs and element names only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: Status,
    pub reason: String,
}

impl Refusal {
    fn new(status: Status, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

/// Checks the command of an N-ACTION-RQ on a Storage Commitment context (PS3.4 J.3.2): the
/// Storage Commitment Push Model SOP Class and its well-known instance, Action Type 1, a data set.
pub(crate) fn check_action_command(command: &Command) -> Result<(), Refusal> {
    use dicom_dictionary_std::uids::{
        STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    };
    if command.requested_sop_class_uid.as_deref() != Some(STORAGE_COMMITMENT_PUSH_MODEL) {
        return Err(Refusal::new(
            Status::NO_SUCH_SOP_CLASS,
            "Requested SOP Class UID is not the Storage Commitment Push Model",
        ));
    }
    match command.requested_sop_instance_uid.as_deref() {
        Some(STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE) => {}
        Some(uid) if crate::uid::validate_uid(uid).is_ok() => {
            return Err(Refusal::new(
                Status::NO_SUCH_SOP_INSTANCE,
                "Requested SOP Instance UID is not the well-known 1.2.840.10008.1.20.1.1",
            ));
        }
        _ => {
            return Err(Refusal::new(
                Status::INVALID_OBJECT_INSTANCE,
                "Requested SOP Instance UID missing or not a UID",
            ));
        }
    }
    if command.action_type_id != Some(1) {
        return Err(Refusal::new(
            Status::NO_SUCH_ACTION,
            "Action Type ID must be 1 (request storage commitment)",
        ));
    }
    if !command.has_dataset {
        return Err(Refusal::new(
            Status::INVALID_ARGUMENT_VALUE,
            "N-ACTION without Action Information",
        ));
    }
    Ok(())
}

/// Reads the Action Information of an N-ACTION-RQ received in `transfer_syntax`.
pub(crate) fn read_action_information(
    bytes: &[u8],
    transfer_syntax: &str,
) -> Result<ActionInformation, Refusal> {
    if bytes.len() > MAX_ACTION_INFORMATION {
        return Err(Refusal::new(
            Status::RESOURCE_LIMITATION,
            format!(
                "Action Information larger than {} MiB",
                MAX_ACTION_INFORMATION >> 20
            ),
        ));
    }
    ActionInformation::parse(bytes, dataset::Encoding::of(transfer_syntax)).map_err(|e| {
        let status = match e {
            dataset::ActionInformationError::TooManyReferences => Status::RESOURCE_LIMITATION,
            _ => Status::INVALID_ARGUMENT_VALUE,
        };
        Refusal::new(status, e.to_string())
    })
}

/// Identifies an open association for live delivery.
pub(crate) type AssociationId = u64;

/// A report for a live association, and where it says how its delivery went.
pub(crate) struct LiveReport {
    pub report: Report,
    /// The N-EVENT-REPORT-RSP status; dropped if the association ends first.
    pub delivered: oneshot::Sender<Status>,
}

/// The open associations that accepted a Storage Commitment context, by id.
type Registry = Mutex<HashMap<AssociationId, mpsc::Sender<LiveReport>>>;

/// An association's end of live delivery: reports for it arrive here while it is open. Dropping it
/// (the association ended) makes later reports go on a new association.
pub(crate) struct LiveAssociation {
    pub id: AssociationId,
    pub reports: mpsc::Receiver<LiveReport>,
    registry: Arc<Registry>,
}

impl Drop for LiveAssociation {
    fn drop(&mut self) {
        if let Ok(mut r) = self.registry.lock() {
            r.remove(&self.id);
        }
    }
}

/// Why a request was not taken: answered in the N-ACTION-RSP.
#[derive(Debug, Error)]
pub(crate) enum SubmitError {
    #[error("calling AE title {0} has no --commitment-peer address")]
    UnknownPeer(String),
    #[error("cannot record the request: {0}")]
    Store(PendingError),
}

impl SubmitError {
    /// The N-ACTION-RSP status (PS3.7 §10.1.4.1.10).
    pub(crate) fn status(&self) -> Status {
        match self {
            SubmitError::UnknownPeer(_) => Status::NOT_AUTHORIZED,
            SubmitError::Store(_) => Status::PROCESSING_FAILURE,
        }
    }

    /// The Error Comment (no store details: those are for our log).
    pub(crate) fn comment(&self) -> &'static str {
        match self {
            SubmitError::UnknownPeer(_) => "calling AE title has no --commitment-peer address",
            SubmitError::Store(_) => "cannot record the commitment request",
        }
    }
}

/// What the association handlers and the worker share.
struct Inner {
    settings: CommitmentSettings,
    /// Our AE title, calling the peer on a new association.
    our_ae_title: String,
    gateway_id: String,
    index: Arc<dyn InstanceIndex>,
    store: Arc<dyn ObjectStore>,
    pending: Arc<dyn PendingStore>,
    registry: Arc<Registry>,
}

/// The associations' side of Storage Commitment: takes requests, gives live associations their
/// report channel.
pub(crate) struct Commitments {
    inner: Arc<Inner>,
    next_association: AtomicU64,
    submissions: mpsc::UnboundedSender<Tracked>,
}

/// The background task that decides pending requests and delivers their reports.
pub(crate) struct Worker {
    inner: Arc<Inner>,
    submissions: mpsc::UnboundedReceiver<Tracked>,
}

impl Commitments {
    pub(crate) fn new(
        settings: CommitmentSettings,
        our_ae_title: String,
        gateway_id: String,
        index: Arc<dyn InstanceIndex>,
        store: Arc<dyn ObjectStore>,
        pending: Arc<dyn PendingStore>,
    ) -> (Arc<Commitments>, Worker) {
        let inner = Arc::new(Inner {
            settings,
            our_ae_title,
            gateway_id,
            index,
            store,
            pending,
            registry: Arc::new(Mutex::new(HashMap::new())),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Commitments {
                inner: inner.clone(),
                next_association: AtomicU64::new(1),
                submissions: tx,
            }),
            Worker {
                inner,
                submissions: rx,
            },
        )
    }

    /// Registers an association that accepted a Storage Commitment context for live delivery.
    pub(crate) fn open_association(&self) -> LiveAssociation {
        let id = self.next_association.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(LIVE_QUEUE);
        if let Ok(mut r) = self.inner.registry.lock() {
            r.insert(id, tx);
        }
        LiveAssociation {
            id,
            reports: rx,
            registry: self.inner.registry.clone(),
        }
    }

    /// Takes a request received on `association` from `calling_ae`: refused for an AE without a
    /// `--commitment-peer` address (its report might have to go on a new association), otherwise
    /// recorded durably, then handed to the worker. A Transaction UID already pending is the same
    /// request again (a retry after a lost N-ACTION-RSP): it replaces the earlier one.
    pub(crate) async fn submit(
        &self,
        action: ActionInformation,
        calling_ae: &str,
        association: AssociationId,
    ) -> Result<(), SubmitError> {
        let calling_ae = calling_ae.trim();
        if !self.inner.settings.peers.contains_key(calling_ae) {
            return Err(SubmitError::UnknownPeer(calling_ae.to_string()));
        }
        let now = SystemTime::now();
        let request = PendingRequest {
            transaction_uid: action.transaction_uid,
            calling_ae_title: calling_ae.to_string(),
            references: action.references,
            received_at: rfc3339(now),
            deadline: rfc3339(now + self.inner.settings.timeout),
            claim: Claim {
                gateway_id: self.inner.gateway_id.clone(),
                expires_at: rfc3339(now + CLAIM_TTL),
            },
        };
        self.inner
            .pending
            .put(&request)
            .await
            .map_err(SubmitError::Store)?;
        info!(
            transaction_uid = %request.transaction_uid,
            references = request.references.len(),
            commit_when = ?self.inner.settings.commit_when,
            "storage commitment request recorded"
        );
        // The worker only stops at shutdown; then the request waits in the store for the next start.
        let _ = self
            .submissions
            .send(Tracked::new(request, Some(association)));
        Ok(())
    }
}

/// A request the worker holds the claim of.
struct Tracked {
    request: PendingRequest,
    /// The association it came on, while live delivery is still worth trying.
    association: Option<AssociationId>,
    /// Each reference's verdict once decided (Committed or Failed), in request order.
    verdicts: Vec<Option<Verdict>>,
    /// The report, once every reference is decided.
    report: Option<Report>,
    next_check: Instant,
    /// Looks (then deliveries) so far, for the growing pause.
    attempts: u32,
    /// A delivery of its report is under way.
    delivering: bool,
    /// The same Transaction UID received again with other references while the report was being
    /// delivered: worked on once that delivery ends.
    replacement: Option<Box<Tracked>>,
}

impl Tracked {
    fn new(request: PendingRequest, association: Option<AssociationId>) -> Tracked {
        Tracked {
            verdicts: vec![None; request.references.len()],
            request,
            association,
            report: None,
            next_check: Instant::now(),
            attempts: 0,
            delivering: false,
            replacement: None,
        }
    }
}

/// Takes a request handed over by an association. The sweep may have found it in the store first
/// (it is this gateway's): then it only gains its association. The same Transaction UID with
/// other references replaces the request, after the delivery under way if there is one.
fn submitted(tracked: &mut HashMap<String, Tracked>, new: Tracked) {
    match tracked.get_mut(&new.request.transaction_uid) {
        Some(t) if t.request.references == new.request.references => {
            if t.association.is_none() && !t.delivering {
                t.association = new.association;
            }
        }
        Some(t) if t.delivering => t.replacement = Some(Box::new(new)),
        _ => {
            tracked.insert(new.request.transaction_uid.clone(), new);
        }
    }
}

/// `first`, doubled per attempt, at most `max`.
fn backoff(first: Duration, attempts: u32, max: Duration) -> Duration {
    first.saturating_mul(1 << attempts.min(20)).min(max)
}

fn parse_time(t: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(t).ok()
}

/// The index lookups and store checks of one look at a request that failed: counted, the last
/// one kept for the log line.
#[derive(Default)]
struct Trouble {
    count: usize,
    last: Option<String>,
}

impl Trouble {
    fn add(&mut self, error: String) {
        self.count += 1;
        self.last = Some(error);
    }

    fn summary(self) -> Option<(usize, String)> {
        self.last.map(|last| (self.count, last))
    }
}

/// How a report was delivered.
#[derive(Debug)]
enum Via {
    SameAssociation,
    NewAssociation,
}

/// What a delivery task reports back.
struct Delivery {
    transaction_uid: String,
    outcome: Result<(Via, Status), String>,
    /// The peer cannot be reached at all any more (no `--commitment-peer` address): give up.
    hopeless: bool,
}

impl Worker {
    /// Decides and delivers until `stop` is cancelled. Requests still pending then stay recorded
    /// for the next start (or another gateway).
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut tracked: HashMap<String, Tracked> = HashMap::new();
        let mut deliveries: JoinSet<Delivery> = JoinSet::new();
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_due = tracked
                .values()
                .filter(|t| !t.delivering)
                .map(|t| t.next_check)
                .min();
            let due = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(t) = self.submissions.recv() => submitted(&mut tracked, t),
                _ = sweep.tick() => self.sweep(&mut tracked).await,
                Some(done) = deliveries.join_next() => {
                    if let Ok(done) = done {
                        self.delivered(done, &mut tracked).await;
                    }
                }
                _ = due => {}
            }
            self.check_due(&mut tracked, &mut deliveries).await;
        }
    }

    /// Renews this gateway's claims and takes over requests whose claim expired.
    async fn sweep(&self, tracked: &mut HashMap<String, Tracked>) {
        let inner = &self.inner;
        let list = match inner.pending.list().await {
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, store = %inner.pending.describe(), "cannot list pending storage commitment requests; trying again later");
                return;
            }
        };
        let now = SystemTime::now();
        let now_s = rfc3339(now);
        let claim = Claim {
            gateway_id: inner.gateway_id.clone(),
            expires_at: rfc3339(now + CLAIM_TTL),
        };
        for mut request in list {
            let tx = request.transaction_uid.clone();
            let ours = tracked.contains_key(&tx);
            if !ours && !request.claimable_by(&inner.gateway_id, &now_s) {
                continue;
            }
            match inner.pending.claim(&tx, &claim, &now_s).await {
                Ok(true) if !ours => {
                    info!(transaction_uid = %tx, previous_gateway = %request.claim.gateway_id, "storage commitment request taken over");
                    request.claim = claim.clone();
                    tracked.insert(tx, Tracked::new(request, None));
                }
                Ok(true) => {}
                Ok(false) if ours => {
                    if tracked.get(&tx).is_some_and(|t| !t.delivering) {
                        info!(transaction_uid = %tx, "storage commitment request taken over by another gateway");
                        tracked.remove(&tx);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(transaction_uid = %tx, error = %e, "cannot claim a storage commitment request; trying again later")
                }
            }
        }
    }

    /// Looks at every request that is due: decides what it can, and starts the delivery of
    /// complete reports.
    async fn check_due(
        &self,
        tracked: &mut HashMap<String, Tracked>,
        deliveries: &mut JoinSet<Delivery>,
    ) {
        let now = Instant::now();
        let due: Vec<String> = tracked
            .iter()
            .filter(|(_, t)| !t.delivering && t.next_check <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for tx in due {
            let Some(t) = tracked.get_mut(&tx) else {
                continue;
            };
            if t.report.is_none() {
                self.evaluate(t).await;
            }
            match &t.report {
                Some(report) => {
                    t.delivering = true;
                    let inner = self.inner.clone();
                    let (report, calling_ae, association) = (
                        report.clone(),
                        t.request.calling_ae_title.clone(),
                        t.association,
                    );
                    deliveries.spawn(deliver(inner, report, calling_ae, association));
                }
                None => {
                    t.next_check = Instant::now()
                        + backoff(
                            FIRST_CHECK_PAUSE,
                            t.attempts,
                            self.inner.settings.check_interval,
                        );
                    t.attempts += 1;
                }
            }
        }
    }

    /// Decides the references not decided yet; makes the report once all are.
    async fn evaluate(&self, t: &mut Tracked) {
        let inner = &self.inner;
        let now = SystemTime::now();
        let received = parse_time(&t.request.received_at).unwrap_or(now);
        let deadline = parse_time(&t.request.deadline).unwrap_or(now);
        let phase = if now >= deadline {
            Phase::PastDeadline
        } else if now < received + inner.settings.index_grace {
            Phase::IndexGrace
        } else {
            Phase::Waiting
        };
        let mut trouble = Trouble::default();
        for (reference, slot) in t.request.references.iter().zip(t.verdicts.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let v = self.decide(reference, phase, &mut trouble).await;
            if v != Verdict::Pending {
                *slot = Some(v);
            }
        }
        // One line per look, however many instances could not be checked.
        if let Some((count, last)) = trouble.summary() {
            warn!(
                transaction_uid = %t.request.transaction_uid,
                instances = count,
                error = %last,
                "storage commitment: instances could not be checked; looking again later"
            );
        }
        if t.verdicts.iter().all(Option::is_some) {
            let mut report = Report {
                transaction_uid: t.request.transaction_uid.clone(),
                committed: Vec::new(),
                failed: Vec::new(),
            };
            for (reference, v) in t.request.references.iter().zip(&t.verdicts) {
                match v {
                    Some(Verdict::Failed(why)) => report.failed.push((reference.clone(), *why)),
                    _ => report.committed.push(reference.clone()),
                }
            }
            for (r, why) in &report.failed {
                info!(transaction_uid = %report.transaction_uid, sop_instance_uid = %r.sop_instance_uid, failure_reason = format_args!("{:#06X}", why.code()), "storage commitment: instance not committed");
            }
            t.report = Some(report);
        }
    }

    /// One reference's verdict now.
    async fn decide(
        &self,
        reference: &SopReference,
        phase: Phase,
        trouble: &mut Trouble,
    ) -> Verdict {
        let inner = &self.inner;
        let records = match inner.index.find(&reference.sop_instance_uid).await {
            Ok(records) => records,
            Err(e) => {
                trouble.add(format!(
                    "instance index lookup ({}): {e}",
                    inner.index.describe()
                ));
                return if phase == Phase::PastDeadline {
                    Verdict::Failed(FailureReason::ProcessingFailure)
                } else {
                    Verdict::Pending
                };
            }
        };
        let mut presence = Vec::new();
        if inner.settings.commit_when == CommitWhen::Stored
            && let Ok(matching) = decision::matching(reference, &records)
        {
            for record in matching {
                let p = self.presence(&record.object_key, trouble).await;
                let found = p == Presence::Present;
                presence.push(p);
                if found {
                    break;
                }
            }
        }
        decision::verdict(
            inner.settings.commit_when,
            reference,
            &records,
            &presence,
            phase,
        )
    }

    /// Whether the object of an index record is in the store.
    async fn presence(&self, object_key: &str, trouble: &mut Trouble) -> Presence {
        let key = KeyParts::parse(object_key).and_then(|p| {
            ObjectKey::new(
                p.job_id,
                p.study_instance_uid,
                p.series_instance_uid,
                p.sop_instance_uid,
            )
            .ok()
        });
        let Some(key) = key else {
            return Presence::Missing;
        };
        match self.inner.store.exists(&key).await {
            Ok(true) => Presence::Present,
            Ok(false) => Presence::Missing,
            Err(e) => {
                trouble.add(format!("object store ({key}): {e}"));
                Presence::Unknown
            }
        }
    }

    /// A delivery ended: forget the request, or try again later.
    async fn delivered(&self, done: Delivery, tracked: &mut HashMap<String, Tracked>) {
        let inner = &self.inner;
        let Some(t) = tracked.get_mut(&done.transaction_uid) else {
            return;
        };
        t.delivering = false;
        let report = t.report.as_ref();
        match done.outcome {
            Ok((via, status)) => {
                if status.is_success() {
                    info!(
                        transaction_uid = %done.transaction_uid,
                        via = ?via,
                        committed = report.map_or(0, |r| r.committed.len()),
                        failed = report.map_or(0, |r| r.failed.len()),
                        "storage commitment report delivered"
                    );
                } else {
                    warn!(transaction_uid = %done.transaction_uid, via = ?via, status = %status, "storage commitment report answered with a failure status; not sent again");
                }
                self.forget(&done.transaction_uid, tracked).await;
            }
            Err(e) => {
                let give_up_at = parse_time(&t.request.deadline)
                    .map(|d| d + inner.settings.timeout)
                    .unwrap_or_else(SystemTime::now);
                if done.hopeless || SystemTime::now() >= give_up_at {
                    tracing::error!(transaction_uid = %done.transaction_uid, calling_ae = %t.request.calling_ae_title, error = %e, "storage commitment report could not be delivered; given up");
                    self.forget(&done.transaction_uid, tracked).await;
                    return;
                }
                let pause = backoff(Duration::from_secs(1), t.attempts, MAX_DELIVERY_PAUSE);
                warn!(transaction_uid = %done.transaction_uid, calling_ae = %t.request.calling_ae_title, error = %e, retry_in = ?pause, "storage commitment report not delivered; trying again");
                t.association = None;
                t.attempts += 1;
                t.next_check = Instant::now() + pause;
            }
        }
    }

    async fn forget(&self, transaction_uid: &str, tracked: &mut HashMap<String, Tracked>) {
        if let Some(replacement) = tracked.remove(transaction_uid).and_then(|t| t.replacement) {
            // Its record replaced the delivered one in the store: keep it.
            tracked.insert(transaction_uid.to_string(), *replacement);
            return;
        }
        if let Err(e) = self
            .inner
            .pending
            .remove(transaction_uid, &self.inner.gateway_id)
            .await
        {
            // Left recorded: the next sweep takes it again and delivers it once more, which a
            // modality matching reports by Transaction UID takes in its stride.
            warn!(transaction_uid, error = %e, "cannot remove a delivered storage commitment request");
        }
    }
}

/// Delivers `report`: on its association if still open, else on a new one.
async fn deliver(
    inner: Arc<Inner>,
    report: Report,
    calling_ae: String,
    association: Option<AssociationId>,
) -> Delivery {
    let transaction_uid = report.transaction_uid.clone();
    let live =
        association.and_then(|id| inner.registry.lock().ok().and_then(|r| r.get(&id).cloned()));
    if let Some(live) = live {
        let (tx, rx) = oneshot::channel();
        let sent = live.try_send(LiveReport {
            report: report.clone(),
            delivered: tx,
        });
        if sent.is_ok()
            && let Ok(Ok(status)) = tokio::time::timeout(LIVE_DELIVERY_WAIT, rx).await
        {
            return Delivery {
                transaction_uid,
                outcome: Ok((Via::SameAssociation, status)),
                hopeless: false,
            };
        }
        debug!(transaction_uid = %transaction_uid, "the requesting association ended before its report went out; using a new association");
    }
    let Some(address) = inner.settings.peers.get(&calling_ae) else {
        return Delivery {
            transaction_uid,
            outcome: Err(format!("no --commitment-peer address for {calling_ae}")),
            hopeless: true,
        };
    };
    let peer = scu::Peer {
        address,
        ae_title: &calling_ae,
        our_ae_title: &inner.our_ae_title,
    };
    let outcome = scu::deliver(&peer, &report, NEW_ASSOCIATION_WAIT)
        .await
        .map(|status| (Via::NewAssociation, status))
        .map_err(|e| e.to_string());
    Delivery {
        transaction_uid,
        outcome,
        hopeless: false,
    }
}

#[cfg(test)]
mod tests;

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

use std::collections::{HashMap, HashSet};
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
use crate::index::{IndexProgress, InstanceIndex, InstanceRecord, KeyParts};
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

/// How often the claim task lists the pending requests: renews its claims, takes over those of
/// stopped gateways (and, at start-up, its own from before a restart).
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// How long a claim lasts: several sweeps, so a live gateway never loses one; a stopped gateway's
/// requests are taken over within this plus one sweep.
const CLAIM_TTL: Duration = Duration::from_secs(120);
/// First pause between two looks at an undecided request; doubled each time up to
/// [`CommitmentSettings::check_interval`].
const FIRST_CHECK_PAUSE: Duration = Duration::from_millis(50);
/// Longest wait for a live association's response to a report, from when it took the report.
const LIVE_DELIVERY_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a live association to take a queued report: the reports ahead of it each take
/// at most [`LIVE_DELIVERY_WAIT`].
const LIVE_QUEUE_WAIT: Duration = LIVE_DELIVERY_WAIT.saturating_mul(LIVE_QUEUE as u32 + 1);
/// Longest a delivery on a new association may take, connection to release.
const NEW_ASSOCIATION_WAIT: Duration = Duration::from_secs(30);
/// Longest pause between two attempts to deliver a report.
const MAX_DELIVERY_PAUSE: Duration = Duration::from_secs(300);
/// Reports waiting for one association (it sends them one at a time).
const LIVE_QUEUE: usize = 16;
/// Most undecided references looked up in one pass of the worker: bounds how long a pass keeps
/// submissions and finished deliveries waiting (the rest are looked up in the next pass, at once).
const MAX_REFERENCES_PER_PASS: usize = 4096;
/// Most object-store checks (`--commit-when stored`) under way at once.
const STORE_CHECKS_AT_ONCE: usize = 16;
/// Findings of the claim task waiting for the worker.
const CLAIM_NEWS_QUEUE: usize = 64;
/// Most requests pending at once on this gateway, and from one AE: more are refused with 0x0213
/// (Resource limitation) until reports went out. Also bounds the worker's submission queue.
const MAX_PENDING_REQUESTS: usize = 1000;
const MAX_PENDING_REQUESTS_PER_AE: usize = 200;
/// Most references of all pending requests together, and of one AE's.
const MAX_PENDING_REFERENCES: usize = 1_000_000;
const MAX_PENDING_REFERENCES_PER_AE: usize = 250_000;

/// How many requests and references are pending, in all and per requesting AE.
#[derive(Debug, Default)]
struct Load {
    requests: usize,
    references: usize,
    per_ae: HashMap<String, (usize, usize)>,
}

/// One request's share of the [`Load`], given back when it is dropped (the request was delivered,
/// given up, replaced, or lost to another gateway): every [`Tracked`] holds one.
struct Reservation {
    load: Arc<Mutex<Load>>,
    ae: String,
    references: usize,
}

impl Reservation {
    /// Takes a share for a new request, unless it would pass a limit.
    fn try_new(load: &Arc<Mutex<Load>>, ae: &str, references: usize) -> Option<Reservation> {
        let l = load.lock().unwrap_or_else(|e| e.into_inner());
        let (ae_requests, ae_references) = l.per_ae.get(ae).copied().unwrap_or_default();
        if l.requests >= MAX_PENDING_REQUESTS
            || l.references + references > MAX_PENDING_REFERENCES
            || ae_requests >= MAX_PENDING_REQUESTS_PER_AE
            || ae_references + references > MAX_PENDING_REFERENCES_PER_AE
        {
            return None;
        }
        drop(l);
        Some(Reservation::forced(load, ae, references))
    }

    /// Takes a share whatever the limits: for a request already accepted (taken over from the
    /// store), which must be answered.
    fn forced(load: &Arc<Mutex<Load>>, ae: &str, references: usize) -> Reservation {
        let mut l = load.lock().unwrap_or_else(|e| e.into_inner());
        l.requests += 1;
        l.references += references;
        let e = l.per_ae.entry(ae.to_string()).or_default();
        e.0 += 1;
        e.1 += references;
        Reservation {
            load: load.clone(),
            ae: ae.to_string(),
            references,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut l = self.load.lock().unwrap_or_else(|e| e.into_inner());
        l.requests = l.requests.saturating_sub(1);
        l.references = l.references.saturating_sub(self.references);
        if let Some(e) = l.per_ae.get_mut(&self.ae) {
            e.0 = e.0.saturating_sub(1);
            e.1 = e.1.saturating_sub(self.references);
            if e.0 == 0 {
                l.per_ae.remove(&self.ae);
            }
        }
    }
}

/// Largest Action Information accepted: [`dataset::MAX_REFERENCES`] references of two 64-character
/// UIDs take about 3 MiB in explicit VR (152 bytes an item), so 4 MiB leaves room and bounds what an
/// association may make the gateway hold.
pub(crate) const MAX_ACTION_INFORMATION: usize = 4 * 1024 * 1024;

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
    /// Whether the association took it, or the delivery task stopped waiting for it.
    hand_over: Arc<HandOver>,
    /// The N-EVENT-REPORT-RSP status; dropped if the association ends first.
    pub delivered: oneshot::Sender<Status>,
}

impl LiveReport {
    /// Takes the report for sending now. `false`: the delivery task stopped waiting for it (it
    /// goes, or went, on a new association), so sending it would deliver it twice.
    pub(crate) fn take(&self) -> bool {
        !self.delivered.is_closed() && self.hand_over.take()
    }
}

/// Who decides the fate of a queued live report: the association taking it, or the delivery task
/// giving up on it — whichever comes first, atomically, so a report is never sent on both the
/// requesting association and a new one.
#[derive(Default)]
struct HandOver {
    /// [`HandOver::QUEUED`], [`HandOver::TAKEN`] or [`HandOver::ABANDONED`].
    state: std::sync::atomic::AtomicU8,
    taken: tokio::sync::Notify,
}

impl HandOver {
    const QUEUED: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    fn take(&self) -> bool {
        let won = self
            .state
            .compare_exchange(
                Self::QUEUED,
                Self::TAKEN,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok();
        if won {
            self.taken.notify_one();
        }
        won
    }

    /// Gives up on the report; `false` if the association took it first.
    fn abandon(&self) -> bool {
        self.state
            .compare_exchange(
                Self::QUEUED,
                Self::ABANDONED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }
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
    #[error("too many storage commitment requests or references pending")]
    Busy,
    #[error("cannot record the request: {0}")]
    Store(PendingError),
}

impl SubmitError {
    /// The N-ACTION-RSP status (PS3.7 §10.1.4.1.10).
    pub(crate) fn status(&self) -> Status {
        match self {
            SubmitError::UnknownPeer(_) => Status::NOT_AUTHORIZED,
            SubmitError::Busy => Status::RESOURCE_LIMITATION,
            SubmitError::Store(PendingError::TooLarge { .. }) => Status::RESOURCE_LIMITATION,
            SubmitError::Store(_) => Status::PROCESSING_FAILURE,
        }
    }

    /// The Error Comment (no store details: those are for our log).
    pub(crate) fn comment(&self) -> &'static str {
        match self {
            SubmitError::UnknownPeer(_) => "calling AE title has no --commitment-peer address",
            SubmitError::Busy => "too many storage commitment requests pending; try again later",
            SubmitError::Store(PendingError::TooLarge { .. }) => {
                "too many references to record in one request; send fewer per request"
            }
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
    /// How far the index is behind: an instance it lacks fails with 0x0112 only once it has
    /// caught up with the request.
    index_progress: Arc<IndexProgress>,
    store: Arc<dyn ObjectStore>,
    pending: Arc<dyn PendingStore>,
    registry: Arc<Registry>,
    /// What the pending requests add up to, for the limits.
    load: Arc<Mutex<Load>>,
}

/// The associations' side of Storage Commitment: takes requests, gives live associations their
/// report channel.
pub(crate) struct Commitments {
    inner: Arc<Inner>,
    next_association: AtomicU64,
    submissions: mpsc::Sender<Tracked>,
}

/// The background task that decides pending requests and delivers their reports.
pub(crate) struct Worker {
    inner: Arc<Inner>,
    submissions: mpsc::Receiver<Tracked>,
}

impl Commitments {
    pub(crate) fn new(
        settings: CommitmentSettings,
        our_ae_title: String,
        gateway_id: String,
        index: Arc<dyn InstanceIndex>,
        index_progress: Arc<IndexProgress>,
        store: Arc<dyn ObjectStore>,
        pending: Arc<dyn PendingStore>,
    ) -> (Arc<Commitments>, Worker) {
        let inner = Arc::new(Inner {
            settings,
            our_ae_title,
            gateway_id,
            index,
            index_progress,
            store,
            pending,
            registry: Arc::new(Mutex::new(HashMap::new())),
            load: Arc::default(),
        });
        let (tx, rx) = mpsc::channel(MAX_PENDING_REQUESTS);
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
        let reservation =
            Reservation::try_new(&self.inner.load, calling_ae, action.references.len())
                .ok_or(SubmitError::Busy)?;
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
        // Never waits: a full queue (a burst of retries of the same requests) leaves the request
        // to the claim task, which finds it in the store within a sweep.
        // Every record of an instance stored before this request was handed to the index writer
        // before its C-STORE response, so before this mark.
        let mut t = Tracked::new(request, Some(association), reservation);
        t.index_mark = Some(self.inner.index_progress.mark());
        if self.submissions.try_send(t).is_err() {
            debug!(
                "commitment worker queue full: the request waits in the store for the next sweep"
            );
        }
        Ok(())
    }
}

/// A request the worker holds the claim of.
struct Tracked {
    request: PendingRequest,
    /// The association it came on, while live delivery is still worth trying.
    association: Option<AssociationId>,
    stage: Stage,
    /// When it is looked at next (deciding) or its delivery tried (ready).
    next_check: Instant,
    /// Looks (then deliveries) so far, for the growing pause.
    attempts: u32,
    /// Its share of the pending load, given back when it is dropped.
    _reservation: Reservation,
    /// The index writer's position once every record of the instances it names had been handed
    /// over; `None` when not known (received by another gateway, whose writer may have lost some).
    index_mark: Option<u64>,
}

/// Where a request stands.
enum Stage {
    /// Some references undecided: each one's verdict once decided (Committed or Failed), in
    /// request order.
    Deciding(Vec<Option<Verdict>>),
    /// Every reference decided: the report, delivered at `next_check` (again after a delivery
    /// failed).
    Ready(Report),
    /// A delivery task has the report. `replacement`: the same Transaction UID received again
    /// with other references meanwhile, which supersedes this report once the delivery ends.
    Delivering {
        report: Report,
        replacement: Option<Box<Tracked>>,
    },
}

impl Tracked {
    fn delivering(&self) -> bool {
        matches!(self.stage, Stage::Delivering { .. })
    }

    fn new(
        request: PendingRequest,
        association: Option<AssociationId>,
        reservation: Reservation,
    ) -> Tracked {
        Tracked {
            _reservation: reservation,
            index_mark: None,
            stage: Stage::Deciding(vec![None; request.references.len()]),
            request,
            association,
            next_check: Instant::now(),
            attempts: 0,
        }
    }
}

/// The requests this gateway works on, and the set of their Transaction UIDs that the claim task
/// ([`renew_claims`]) renews, shared with it so that renewals never wait for the worker.
#[derive(Default)]
struct Tracking {
    map: HashMap<String, Tracked>,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Tracking {
    fn insert(&mut self, t: Tracked) {
        let tx = t.request.transaction_uid.clone();
        if let Ok(mut held) = self.held.lock() {
            held.insert(tx.clone());
        }
        self.map.insert(tx, t);
    }

    /// Stops renewing the claim of a request no longer in `map`.
    fn release(&self, transaction_uid: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(transaction_uid);
        }
    }
}

/// Takes a request handed over by an association. The claim task may have found it in the store
/// first (it is this gateway's): then it only gains its association. The same Transaction UID with
/// other references replaces the request, after the delivery under way if there is one.
fn submitted(tracked: &mut Tracking, new: Tracked) {
    match tracked.map.get_mut(&new.request.transaction_uid) {
        Some(t) if t.request.references == new.request.references => {
            if t.association.is_none() && !t.delivering() {
                t.association = new.association;
            }
        }
        Some(Tracked {
            stage: Stage::Delivering { replacement, .. },
            ..
        }) => *replacement = Some(Box::new(new)),
        _ => tracked.insert(new),
    }
}

/// What the claim task found out about one request.
enum ClaimNews {
    /// Claimed for this gateway: a stopped gateway's, or this one's from before a restart.
    TakenOver {
        request: PendingRequest,
        previous_gateway: String,
    },
    /// Another gateway holds it now (this one's claim expired), or it is gone.
    Lost(String),
}

/// Every [`SWEEP_INTERVAL`] until `stop`: renews the claims of the requests in `held`, takes over
/// requests whose claim expired, and tells the worker ([`ClaimNews`]).
async fn renew_claims(
    inner: Arc<Inner>,
    held: Arc<Mutex<HashSet<String>>>,
    news: mpsc::Sender<ClaimNews>,
    stop: CancellationToken,
) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sweep.tick() => {}
        }
        let list = match inner.pending.list().await {
            Ok(list) => list,
            Err(e) => {
                warn!(error = %e, store = %inner.pending.describe(), "cannot list pending storage commitment requests; trying again later");
                continue;
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
            // A request leaves `held` only after the worker removed it from the store, so a
            // delivered request is never taken over again (its claim below finds it gone).
            let ours = held.lock().is_ok_and(|h| h.contains(&tx));
            if !ours && !request.claimable_by(&inner.gateway_id, &now_s) {
                continue;
            }
            let finding = match inner.pending.claim(&tx, &claim, &now_s).await {
                Ok(true) if !ours => {
                    if let Ok(mut h) = held.lock() {
                        h.insert(tx.clone());
                    }
                    let previous = std::mem::replace(&mut request.claim, claim.clone());
                    Some(ClaimNews::TakenOver {
                        request,
                        previous_gateway: previous.gateway_id,
                    })
                }
                Ok(false) if ours => Some(ClaimNews::Lost(tx)),
                Ok(_) => None,
                Err(e) => {
                    warn!(transaction_uid = %tx, error = %e, "cannot claim a storage commitment request; trying again later");
                    None
                }
            };
            if let Some(finding) = finding
                && news.send(finding).await.is_err()
            {
                return;
            }
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

/// The delivery tasks under way, and the Transaction UID each works on (to tell which request a
/// task that panicked leaves undelivered).
#[derive(Default)]
struct Deliveries {
    tasks: JoinSet<Delivery>,
    of: HashMap<tokio::task::Id, String>,
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
        let mut tracked = Tracking::default();
        let mut deliveries = Deliveries::default();
        // Claims are renewed by their own task, so a long pass of lookups never lets one expire.
        let (news_tx, mut news) = mpsc::channel(CLAIM_NEWS_QUEUE);
        let claims_stop = stop.child_token();
        let claims = tokio::spawn(renew_claims(
            self.inner.clone(),
            tracked.held.clone(),
            news_tx,
            claims_stop.clone(),
        ));
        loop {
            let next_due = tracked
                .map
                .values()
                .filter(|t| !t.delivering())
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
                Some(n) = news.recv() => self.claim_news(&mut tracked, n).await,
                Some(done) = deliveries.tasks.join_next_with_id() => {
                    let done = match done {
                        Ok((id, done)) => {
                            deliveries.of.remove(&id);
                            Some(done)
                        }
                        // A delivery task that panicked: its request is retried like any
                        // delivery that failed, not left waiting for ever.
                        Err(e) => deliveries.of.remove(&e.id()).map(|transaction_uid| Delivery {
                            transaction_uid,
                            outcome: Err(format!("delivery task failed: {e}")),
                            hopeless: false,
                        }),
                    };
                    if let Some(done) = done {
                        self.delivered(done, &mut tracked).await;
                    }
                }
                _ = due => {}
            }
            self.check_due(&mut tracked, &mut deliveries).await;
        }
        claims_stop.cancel();
        let _ = claims.await;
    }

    /// Applies what the claim task found.
    async fn claim_news(&self, tracked: &mut Tracking, news: ClaimNews) {
        match news {
            ClaimNews::TakenOver {
                request,
                previous_gateway,
            } => {
                let tx = request.transaction_uid.clone();
                if tracked.map.contains_key(&tx) {
                    return;
                }
                // The claim task may have claimed it just before this worker delivered it and
                // removed it from the store: claimed again here, after any such removal, it is
                // taken only if it is still there.
                let now = SystemTime::now();
                let claim = Claim {
                    gateway_id: self.inner.gateway_id.clone(),
                    expires_at: rfc3339(now + CLAIM_TTL),
                };
                match self.inner.pending.claim(&tx, &claim, &rfc3339(now)).await {
                    Ok(true) => {
                        info!(transaction_uid = %tx, previous_gateway = %previous_gateway, "storage commitment request taken over");
                        let reservation = Reservation::forced(
                            &self.inner.load,
                            &request.calling_ae_title,
                            request.references.len(),
                        );
                        let ours = previous_gateway == self.inner.gateway_id;
                        let mut t = Tracked::new(request, None, reservation);
                        // This gateway's own (from before a restart, or one the full submission
                        // queue left to the sweep) was received before now.
                        t.index_mark = ours.then(|| self.inner.index_progress.mark());
                        tracked.insert(t);
                    }
                    Ok(false) => tracked.release(&tx),
                    Err(e) => {
                        // The next sweep tries again.
                        warn!(transaction_uid = %tx, error = %e, "cannot claim a storage commitment request; trying again later");
                        tracked.release(&tx);
                    }
                }
            }
            ClaimNews::Lost(tx) => {
                if tracked.map.get(&tx).is_some_and(|t| !t.delivering()) {
                    info!(transaction_uid = %tx, "storage commitment request taken over by another gateway");
                    tracked.map.remove(&tx);
                    tracked.release(&tx);
                }
            }
        }
    }

    /// Looks at the requests that are due, at most [`MAX_REFERENCES_PER_PASS`] undecided
    /// references in all (the rest stay due for the next pass): one index lookup for all of them,
    /// the store checks of the `stored` policy a few at a time. Starts the delivery of complete
    /// reports.
    async fn check_due(&self, tracked: &mut Tracking, deliveries: &mut Deliveries) {
        let now = Instant::now();
        let mut due: Vec<(Instant, String)> = tracked
            .map
            .iter()
            .filter(|(_, t)| !t.delivering() && t.next_check <= now)
            .map(|(k, t)| (t.next_check, k.clone()))
            .collect();
        // Longest waiting first, so a large request cannot starve the others.
        due.sort();
        let mut budget = MAX_REFERENCES_PER_PASS;
        let mut looks: Vec<(String, Vec<usize>, bool)> = Vec::new();
        for (_, tx) in due {
            let Some(t) = tracked.map.get_mut(&tx) else {
                continue;
            };
            let Stage::Deciding(verdicts) = &t.stage else {
                self.start_delivery(t, deliveries);
                continue;
            };
            if budget == 0 {
                continue;
            }
            let undecided: Vec<usize> = verdicts
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_none())
                .map(|(i, _)| i)
                .collect();
            let whole = undecided.len() <= budget;
            let part: Vec<usize> = undecided.into_iter().take(budget).collect();
            budget -= part.len();
            looks.push((tx, part, whole));
        }
        if looks.is_empty() {
            return;
        }
        let mut uids: Vec<String> = looks
            .iter()
            .flat_map(|(tx, part, _)| {
                let refs = &tracked.map[tx].request.references;
                part.iter().map(|&i| refs[i].sop_instance_uid.clone())
            })
            .collect();
        uids.sort();
        uids.dedup();
        let inner = &self.inner;
        let found = inner
            .index
            .find_many(&uids)
            .await
            .map_err(|e| format!("instance index lookup ({}): {e}", inner.index.describe()));
        let presence = match (&found, inner.settings.commit_when) {
            (Ok(found), CommitWhen::Stored) => {
                let mut keys: Vec<String> = looks
                    .iter()
                    .flat_map(|(tx, part, _)| {
                        let refs = &tracked.map[tx].request.references;
                        part.iter().map(|&i| &refs[i])
                    })
                    .filter_map(|r| {
                        let records = found.get(&r.sop_instance_uid)?;
                        decision::matching(r, records).ok().map(|m| {
                            m.into_iter()
                                .map(|rec| rec.object_key.clone())
                                .collect::<Vec<_>>()
                        })
                    })
                    .flatten()
                    .collect();
                keys.sort();
                keys.dedup();
                self.presence_of(keys).await
            }
            _ => HashMap::new(),
        };
        for (tx, part, whole) in looks {
            let Some(t) = tracked.map.get_mut(&tx) else {
                continue;
            };
            self.evaluate(t, &part, &found, &presence);
            if matches!(t.stage, Stage::Ready(_)) {
                self.start_delivery(t, deliveries);
            } else if whole {
                t.next_check = Instant::now()
                    + backoff(FIRST_CHECK_PAUSE, t.attempts, inner.settings.check_interval);
                t.attempts += 1;
            }
        }
    }

    /// Hands a complete report to a delivery task.
    fn start_delivery(&self, t: &mut Tracked, deliveries: &mut Deliveries) {
        let report = match std::mem::replace(&mut t.stage, Stage::Deciding(Vec::new())) {
            Stage::Ready(report) => report,
            other => {
                t.stage = other;
                return;
            }
        };
        let task = deliveries.tasks.spawn(deliver(
            self.inner.clone(),
            report.clone(),
            t.request.calling_ae_title.clone(),
            t.association,
        ));
        deliveries
            .of
            .insert(task.id(), t.request.transaction_uid.clone());
        t.stage = Stage::Delivering {
            report,
            replacement: None,
        };
    }

    /// Decides the references `part` of a request from the pass's index lookup (`found`) and
    /// store checks (`presence`, by object key); makes the report once all are decided.
    fn evaluate(
        &self,
        t: &mut Tracked,
        part: &[usize],
        found: &Result<HashMap<String, Vec<InstanceRecord>>, String>,
        presence: &HashMap<String, Presence>,
    ) {
        let inner = &self.inner;
        let now = SystemTime::now();
        let received = parse_time(&t.request.received_at).unwrap_or(now);
        let deadline = parse_time(&t.request.deadline).unwrap_or(now);
        let caught_up = t
            .index_mark
            .is_some_and(|mark| inner.index_progress.caught_up_to(mark));
        let phase = match (now >= deadline, caught_up) {
            (true, true) => Phase::PastDeadline,
            (true, false) => Phase::PastDeadlineIndexBehind,
            (false, true) if now >= received + inner.settings.index_grace => Phase::Waiting,
            (false, _) => Phase::IndexGrace,
        };
        let Stage::Deciding(verdicts) = &mut t.stage else {
            return;
        };
        let mut trouble = Trouble::default();
        for &i in part {
            let reference = &t.request.references[i];
            let v = match found {
                Err(e) => {
                    trouble.add(e.clone());
                    if phase.is_past_deadline() {
                        Verdict::Failed(FailureReason::ProcessingFailure)
                    } else {
                        Verdict::Pending
                    }
                }
                Ok(found) => {
                    let records = found
                        .get(&reference.sop_instance_uid)
                        .map_or(&[][..], Vec::as_slice);
                    let seen: Vec<Presence> = match decision::matching(reference, records) {
                        Ok(m) if inner.settings.commit_when == CommitWhen::Stored => m
                            .iter()
                            .map(|r| {
                                presence
                                    .get(&r.object_key)
                                    .cloned()
                                    .unwrap_or(Presence::Unknown)
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    decision::verdict(inner.settings.commit_when, reference, records, &seen, phase)
                }
            };
            if v != Verdict::Pending {
                verdicts[i] = Some(v);
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
        if verdicts.iter().all(Option::is_some) {
            let mut report = Report {
                transaction_uid: t.request.transaction_uid.clone(),
                committed: Vec::new(),
                failed: Vec::new(),
            };
            for (reference, v) in t.request.references.iter().zip(verdicts.iter()) {
                match v {
                    Some(Verdict::Failed(why)) => report.failed.push((reference.clone(), *why)),
                    _ => report.committed.push(reference.clone()),
                }
            }
            for (r, why) in &report.failed {
                info!(transaction_uid = %report.transaction_uid, sop_instance_uid = %r.sop_instance_uid, failure_reason = format_args!("{:#06X}", why.code()), "storage commitment: instance not committed");
            }
            t.stage = Stage::Ready(report);
            // The delivery back-off starts afresh, whatever the looks before.
            t.attempts = 0;
        }
    }

    /// Whether the objects of these index records' keys are in the store, at most
    /// [`STORE_CHECKS_AT_ONCE`] checks under way at once. A key the store could not answer for is
    /// [`Presence::Unknown`] (one WARN line for the pass).
    async fn presence_of(&self, object_keys: Vec<String>) -> HashMap<String, Presence> {
        let mut out = HashMap::with_capacity(object_keys.len());
        let mut trouble = Trouble::default();
        let mut checks = JoinSet::new();
        let mut keys = object_keys.into_iter();
        loop {
            while checks.len() < STORE_CHECKS_AT_ONCE
                && let Some(object_key) = keys.next()
            {
                let store = self.inner.store.clone();
                checks.spawn(async move {
                    let key = KeyParts::parse(&object_key).and_then(|p| {
                        ObjectKey::new(
                            p.job_id,
                            p.study_instance_uid,
                            p.series_instance_uid,
                            p.sop_instance_uid,
                        )
                        .ok()
                    });
                    let answer = match key {
                        None => Ok(Presence::Missing),
                        Some(key) => match store.exists(&key).await {
                            Ok(true) => Ok(Presence::Present),
                            Ok(false) => Ok(Presence::Missing),
                            Err(e) => Err(format!("object store ({key}): {e}")),
                        },
                    };
                    (object_key, answer)
                });
            }
            match checks.join_next().await {
                None => break,
                Some(Ok((object_key, Ok(p)))) => {
                    out.insert(object_key, p);
                }
                Some(Ok((object_key, Err(e)))) => {
                    trouble.add(e);
                    out.insert(object_key, Presence::Unknown);
                }
                // A check that panicked leaves its key out: Unknown, asked again next look.
                Some(Err(e)) => trouble.add(format!("object store check failed: {e}")),
            }
        }
        if let Some((count, last)) = trouble.summary() {
            warn!(objects = count, error = %last, "storage commitment: objects could not be checked in the store; looking again later");
        }
        out
    }

    /// A delivery ended: forget the request (or go on with the request that superseded it), or
    /// try again later.
    async fn delivered(&self, done: Delivery, tracked: &mut Tracking) {
        let inner = &self.inner;
        let tx = done.transaction_uid.as_str();
        let Some(t) = tracked.map.get_mut(tx) else {
            return;
        };
        let (report, replacement) =
            match std::mem::replace(&mut t.stage, Stage::Deciding(Vec::new())) {
                Stage::Delivering {
                    report,
                    replacement,
                } => (report, replacement),
                other => {
                    t.stage = other;
                    return;
                }
            };
        let e = match done.outcome {
            // Success or Warning: the modality has the report.
            Ok((via, status)) if status.is_success() || status.is_warning() => {
                info!(
                    transaction_uid = %tx,
                    via = ?via,
                    status = %status,
                    committed = report.committed.len(),
                    failed = report.failed.len(),
                    "storage commitment report delivered"
                );
                self.forget(tx, replacement, tracked).await;
                return;
            }
            // The modality could not take it now: like a delivery that failed, sent again.
            Ok((via, status))
                if status == Status::PROCESSING_FAILURE
                    || status == Status::RESOURCE_LIMITATION =>
            {
                format!("the peer answered {status} ({via:?})")
            }
            Ok((via, status)) => {
                warn!(transaction_uid = %tx, via = ?via, status = %status, "storage commitment report refused by the peer; not sent again");
                self.forget(tx, replacement, tracked).await;
                return;
            }
            Err(e) => e,
        };
        if let Some(replacement) = replacement {
            // The modality sent the request again with other references: that is the one it
            // waits for, not this report.
            info!(transaction_uid = %tx, error = %e, "storage commitment report not delivered, and superseded by a newer request with the same Transaction UID");
            tracked.insert(*replacement);
            return;
        }
        let give_up_at = parse_time(&t.request.deadline)
            .map(|d| d + inner.settings.timeout)
            .unwrap_or_else(SystemTime::now);
        if done.hopeless || SystemTime::now() >= give_up_at {
            tracing::error!(transaction_uid = %tx, calling_ae = %t.request.calling_ae_title, error = %e, "storage commitment report could not be delivered; given up");
            self.forget(tx, None, tracked).await;
            return;
        }
        let pause = backoff(Duration::from_secs(1), t.attempts, MAX_DELIVERY_PAUSE);
        warn!(transaction_uid = %tx, calling_ae = %t.request.calling_ae_title, error = %e, retry_in = ?pause, "storage commitment report not delivered; trying again");
        t.stage = Stage::Ready(report);
        t.association = None;
        t.attempts += 1;
        t.next_check = Instant::now() + pause;
    }

    /// Forgets a request whose report went out (or was given up on), unless a `replacement`
    /// supersedes it: its record replaced the delivered one in the store, so it is kept.
    async fn forget(
        &self,
        transaction_uid: &str,
        replacement: Option<Box<Tracked>>,
        tracked: &mut Tracking,
    ) {
        tracked.map.remove(transaction_uid);
        if let Some(replacement) = replacement {
            tracked.insert(*replacement);
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
        // Only now: the claim task must not take over a request still in the store.
        tracked.release(transaction_uid);
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
        let (tx, mut rx) = oneshot::channel();
        let hand_over = Arc::new(HandOver::default());
        let sent = live.try_send(LiveReport {
            report: report.clone(),
            hand_over: hand_over.clone(),
            delivered: tx,
        });
        if sent.is_ok() {
            // The response clock starts once the association took the report, not while it
            // waits behind others; a report not taken in time is abandoned, and the association
            // then drops it instead of sending it after the new association did.
            let response = |rx: oneshot::Receiver<Status>| async move {
                tokio::time::timeout(LIVE_DELIVERY_WAIT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok)
            };
            let status = tokio::select! {
                _ = hand_over.taken.notified() => response(rx).await,
                _ = tokio::time::sleep(LIVE_QUEUE_WAIT) => {
                    if hand_over.abandon() { None } else { response(rx).await }
                }
                // The association ended (or took and answered it already).
                r = &mut rx => {
                    hand_over.abandon();
                    r.ok()
                }
            };
            if let Some(status) = status {
                return Delivery {
                    transaction_uid,
                    outcome: Ok((Via::SameAssociation, status)),
                    hopeless: false,
                };
            }
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

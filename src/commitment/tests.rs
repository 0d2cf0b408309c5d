//! The worker end to end in-process: a fake instance index, a local store in a temporary
//! directory, the local commitment journal, and a fake modality on a TCP port that accepts the
//! gateway's association and records the N-EVENT-REPORT it receives.

use std::sync::Mutex as StdMutex;

use async_trait::async_trait;
use dicom_dictionary_std::uids::{
    EXPLICIT_VR_LITTLE_ENDIAN, STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
};
use dicom_ul::pdu::{
    AssociationAC, Pdu, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};
use tokio::net::TcpListener;

use super::*;
use crate::connection::Connection;
use crate::index::{IndexError, InstanceOutcome, InstanceRecord};
use crate::pdu::Incoming;
use crate::store::local::LocalStore;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const JOB: &str = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N";
const STUDY: &str = "1.2.826.0.1.3680043.2.1125.7";
const SERIES: &str = "1.2.826.0.1.3680043.2.1125.7.1";
const WAIT: Duration = Duration::from_secs(10);

/// An instance index held in memory.
#[derive(Default)]
struct FakeIndex {
    records: StdMutex<Vec<InstanceRecord>>,
    /// Lookups so far: tests wait on them instead of sleeping.
    lookups: std::sync::atomic::AtomicUsize,
}

impl FakeIndex {
    fn add(&self, record: InstanceRecord) {
        self.records.lock().unwrap().push(record);
    }

    fn set_outcome(&self, sop: &str, outcome: InstanceOutcome) {
        for r in self.records.lock().unwrap().iter_mut() {
            if r.sop_instance_uid == sop {
                r.outcome = outcome.clone();
            }
        }
    }
}

#[async_trait]
impl InstanceIndex for FakeIndex {
    async fn append(&self, records: Vec<InstanceRecord>) -> Result<(), IndexError> {
        self.records.lock().unwrap().extend(records);
        Ok(())
    }

    async fn find(&self, sop: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.sop_instance_uid == sop)
            .cloned()
            .collect())
    }

    async fn record_outcomes(
        &self,
        _job_id: &str,
        _outcomes: Vec<(String, InstanceOutcome)>,
    ) -> Result<crate::index::OutcomesRecorded, IndexError> {
        Ok(Default::default())
    }

    async fn failed(&self, _job_id: &str) -> Result<Vec<InstanceRecord>, IndexError> {
        Ok(vec![])
    }

    async fn missing(
        &self,
        _: &str,
        _: Vec<String>,
    ) -> Result<Vec<String>, crate::index::IndexError> {
        Ok(Vec::new())
    }
    async fn add_absent(
        &self,
        _: Vec<crate::index::InstanceRecord>,
    ) -> Result<u64, crate::index::IndexError> {
        Ok(0)
    }
    fn describe(&self) -> String {
        "a fake index".into()
    }
}

fn sop(n: u32) -> String {
    format!("{SERIES}.{n}")
}

fn reference(n: u32) -> SopReference {
    SopReference {
        sop_class_uid: CT.into(),
        sop_instance_uid: sop(n),
    }
}

/// A gateway's commitment side on a fake index, a local store and the local journal, with `CT1`
/// reporting to `peer`.
struct Rig {
    dir: tempfile::TempDir,
    index: Arc<FakeIndex>,
    commitments: Arc<Commitments>,
    stop: CancellationToken,
    worker: Option<tokio::task::JoinHandle<()>>,
}

fn settings(commit_when: CommitWhen, peer: &str, grace: Duration) -> CommitmentSettings {
    CommitmentSettings {
        commit_when,
        peers: HashMap::from([("CT1".to_string(), peer.to_string())]),
        timeout: Duration::from_secs(3600),
        index_grace: grace,
        check_interval: Duration::from_millis(200),
    }
}

impl Rig {
    async fn start(settings: CommitmentSettings) -> Rig {
        Rig::start_in(tempfile::tempdir().unwrap(), settings, Arc::default()).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        settings: CommitmentSettings,
        index: Arc<FakeIndex>,
    ) -> Rig {
        let store = Arc::new(LocalStore::open(dir.path()).await.unwrap());
        let pending = Arc::new(pending::LocalPending::new(dir.path().join("jobs")));
        let (commitments, worker) = Commitments::new(
            settings,
            "DICOM_GATEWAY".into(),
            "gw-1".into(),
            index.clone(),
            crate::index::IndexProgress::caught_up(),
            store,
            pending,
        );
        let stop = CancellationToken::new();
        let worker = Some(tokio::spawn(worker.run(stop.clone())));
        Rig {
            dir,
            index,
            commitments,
            stop,
            worker,
        }
    }

    /// Stops the worker (as a shutdown does) and hands back the directory and index.
    async fn stop(mut self) -> (tempfile::TempDir, Arc<FakeIndex>) {
        self.stop.cancel();
        self.worker.take().unwrap().await.unwrap();
        (self.dir, self.index)
    }

    /// Instance `n` stored: its index record, and (if `object`) its file in the store.
    fn stored(&self, n: u32, class: &str, object: bool) {
        let key = format!("{JOB}/{STUDY}/{SERIES}/{}.dcm", sop(n));
        if object {
            let path = self.dir.path().join(&key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"DICM").unwrap();
        }
        self.index.add(KeyParts::parse(&key).unwrap().record(
            &key,
            4,
            Some(class.to_string()),
            Some("CT1".into()),
            crate::clock::now_rfc3339(),
        ));
    }

    async fn submit(&self, tx: &str, references: Vec<SopReference>, association: AssociationId) {
        self.commitments
            .submit(
                ActionInformation {
                    transaction_uid: tx.into(),
                    references,
                },
                "CT1",
                association,
            )
            .await
            .unwrap();
    }

    /// The requests in the local commitment journal (`{tx}.json`; claims are `{tx}.claim`).
    /// Waits until the worker asked the index about `n` instances in all.
    async fn looked_up(&self, n: usize) {
        until("the worker to look the instances up", || {
            self.index.lookups.load(std::sync::atomic::Ordering::SeqCst) >= n
        })
        .await;
    }

    fn pending_files(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("jobs").join("commitments"))
            .map(|rd| {
                rd.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
                })
                .count()
            })
            .unwrap_or(0)
    }
}

/// A modality's Storage Commitment SCU waiting for reports on its own port: accepts each
/// association (granting the SCP role asked for), hands over the report, answers Success.
struct FakeModality {
    address: String,
    reports: mpsc::UnboundedReceiver<(Vec<UserVariableItem>, Report)>,
}

impl FakeModality {
    async fn start() -> FakeModality {
        FakeModality::answering(vec![]).await
    }

    /// A modality answering its first reports with `statuses`, then Success.
    async fn answering(statuses: Vec<Status>) -> FakeModality {
        let statuses = Arc::new(StdMutex::new(std::collections::VecDeque::from(statuses)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let tx = tx.clone();
                let status = statuses
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Status::SUCCESS);
                tokio::spawn(async move {
                    if let Some(got) = serve_one(socket, status).await {
                        let _ = tx.send(got);
                    }
                });
            }
        });
        FakeModality {
            address,
            reports: rx,
        }
    }

    async fn report(&mut self) -> (Vec<UserVariableItem>, Report) {
        tokio::time::timeout(WAIT, self.reports.recv())
            .await
            .expect("a report within the wait")
            .unwrap()
    }
}

async fn serve_one(
    socket: tokio::net::TcpStream,
    status: Status,
) -> Option<(Vec<UserVariableItem>, Report)> {
    let mut c = Connection::new(socket, 1 << 20, WAIT);
    let Ok(Some(Incoming::Other(Pdu::AssociationRQ(rq)))) = c.read_pdu(WAIT).await else {
        return None;
    };
    c.write_pdu(&Pdu::AssociationAC(AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: rq.application_context_name.clone(),
        presentation_contexts: vec![PresentationContextResult {
            id: rq.presentation_contexts[0].id,
            reason: PresentationContextResultReason::Acceptance,
            transfer_syntax: EXPLICIT_VR_LITTLE_ENDIAN.into(),
        }],
        user_variables: vec![
            UserVariableItem::MaxLength(16384),
            UserVariableItem::ScuScpRoleSelectionSubItem(
                STORAGE_COMMITMENT_PUSH_MODEL.into(),
                dicom_ul::pdu::RequestorRoles {
                    scu: false,
                    scp: true,
                },
            ),
        ],
    }))
    .await
    .ok()?;
    let (mut command, mut data) = (Vec::new(), Vec::new());
    loop {
        match c.read_pdu(WAIT).await.ok()?? {
            Incoming::PData(pdvs) => {
                let mut done = false;
                for pdv in pdvs {
                    if pdv.is_command {
                        command.extend_from_slice(&pdv.data);
                    } else {
                        data.extend_from_slice(&pdv.data);
                        done = pdv.is_last;
                    }
                }
                if done {
                    break;
                }
            }
            _ => return None,
        }
    }
    let cmd = Command::parse(&command).ok()?;
    assert_eq!(
        cmd.command_field,
        crate::dimse::command_field::N_EVENT_REPORT_RQ
    );
    assert_eq!(
        cmd.affected_sop_instance_uid.as_deref(),
        Some(STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
    );
    let report = Report::parse(&data, dataset::Encoding::ExplicitVrLittleEndian).ok()?;
    c.set_peer_max_pdu(16384);
    c.write_message(1, true, &scu::response(cmd.message_id, status))
        .await
        .ok()?;
    if let Ok(Some(Incoming::Other(Pdu::ReleaseRQ))) = c.read_pdu(WAIT).await {
        let _ = c.write_pdu(&Pdu::ReleaseRP).await;
    }
    Some((rq.user_variables, report))
}

/// Waits until `cond` holds, probing every few milliseconds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn stored_instances_are_committed_and_unknown_ones_fail_on_a_new_association() {
    let mut modality = FakeModality::start().await;
    let rig = Rig::start(settings(
        CommitWhen::Stored,
        &modality.address,
        Duration::from_millis(100),
    ))
    .await;
    rig.stored(1, CT, true);
    rig.stored(2, CT, true);
    rig.stored(3, CT, false); // in the index, but the object is gone
    rig.stored(4, MR, true); // stored under another class
    rig.submit(
        "2.25.100",
        vec![
            reference(1),
            reference(2),
            reference(3),
            reference(4),
            reference(5),
        ],
        0,
    )
    .await;
    assert_eq!(
        rig.pending_files(),
        1,
        "recorded before Success is answered"
    );
    let (user_variables, report) = modality.report().await;
    assert!(
        user_variables.iter().any(|v| matches!(v,
            UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles)
                if uid == STORAGE_COMMITMENT_PUSH_MODEL && roles.scp && !roles.scu)),
        "the SCP role is asked for: {user_variables:?}"
    );
    assert_eq!(report.transaction_uid, "2.25.100");
    assert_eq!(report.committed, vec![reference(1), reference(2)]);
    assert_eq!(
        report.failed,
        vec![
            (reference(3), FailureReason::NoSuchObjectInstance),
            (reference(4), FailureReason::ClassInstanceConflict),
            (reference(5), FailureReason::NoSuchObjectInstance),
        ]
    );
    until("the delivered request to be forgotten", || {
        rig.pending_files() == 0
    })
    .await;
    rig.stop().await;
}

#[tokio::test]
async fn an_instance_whose_index_record_is_late_is_still_committed() {
    let mut modality = FakeModality::start().await;
    let rig = Rig::start(settings(
        CommitWhen::Stored,
        &modality.address,
        Duration::from_secs(3600),
    ))
    .await;
    rig.submit("2.25.101", vec![reference(1)], 0).await;
    // The index writer catches up after the worker looked at the request once.
    rig.looked_up(1).await;
    rig.stored(1, CT, true);
    let (_, report) = modality.report().await;
    assert_eq!(report.committed, vec![reference(1)]);
    assert!(report.failed.is_empty());
    assert_eq!(report.event_type_id(), 1);
    rig.stop().await;
}

#[tokio::test]
async fn a_report_goes_on_the_requesting_association_while_it_is_open() {
    // Nothing listens at the peer address: a delivery on a new association would fail.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let rig = Rig::start(settings(
        CommitWhen::Stored,
        &address,
        Duration::from_millis(100),
    ))
    .await;
    rig.stored(1, CT, true);
    let mut live = rig.commitments.open_association();
    rig.submit("2.25.102", vec![reference(1), reference(2)], live.id)
        .await;
    let got = tokio::time::timeout(WAIT, live.reports.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.report.committed, vec![reference(1)]);
    assert_eq!(
        got.report.failed,
        vec![(reference(2), FailureReason::NoSuchObjectInstance)]
    );
    got.delivered.send(Status::SUCCESS).unwrap();
    until("the delivered request to be forgotten", || {
        rig.pending_files() == 0
    })
    .await;
    rig.stop().await;
}

#[tokio::test]
async fn a_report_whose_association_ended_goes_on_a_new_one() {
    let mut modality = FakeModality::start().await;
    let rig = Rig::start(settings(
        CommitWhen::Stored,
        &modality.address,
        Duration::from_millis(50),
    ))
    .await;
    rig.stored(1, CT, true);
    let live = rig.commitments.open_association();
    rig.submit("2.25.103", vec![reference(1)], live.id).await;
    drop(live); // released before the report was ready
    let (_, report) = modality.report().await;
    assert_eq!(report.committed, vec![reference(1)]);
    // And when the association takes the report but ends before answering it.
    rig.stored(2, CT, true);
    let mut live = rig.commitments.open_association();
    rig.submit("2.25.104", vec![reference(2)], live.id).await;
    let got = tokio::time::timeout(WAIT, live.reports.recv())
        .await
        .unwrap()
        .unwrap();
    drop(got); // the association ended with the report unanswered
    drop(live);
    let (_, report) = modality.report().await;
    assert_eq!(report.transaction_uid, "2.25.104");
    rig.stop().await;
}

#[tokio::test]
async fn imported_waits_for_the_outcome_and_reports_failures_as_processing_failures() {
    let mut modality = FakeModality::start().await;
    let rig = Rig::start(settings(
        CommitWhen::Imported,
        &modality.address,
        Duration::from_millis(50),
    ))
    .await;
    rig.stored(1, CT, true);
    rig.stored(2, CT, true);
    rig.submit("2.25.105", vec![reference(1), reference(2)], 0)
        .await;
    // Stored is not enough: no report while HealthImaging has not answered, however often the
    // worker looks (a report would be made at the look that decided it).
    rig.looked_up(3 * 2).await;
    assert!(
        modality.reports.try_recv().is_err(),
        "no report before the import outcome"
    );
    rig.index.set_outcome(
        &sop(1),
        InstanceOutcome::Imported {
            image_set_id: "a".into(),
            is_primary: true,
        },
    );
    rig.index.set_outcome(
        &sop(2),
        InstanceOutcome::Failed {
            exception_type: "InvalidDicomFile".into(),
            message: "bad".into(),
        },
    );
    let (_, report) = modality.report().await;
    assert_eq!(report.committed, vec![reference(1)]);
    assert_eq!(
        report.failed,
        vec![(reference(2), FailureReason::ProcessingFailure)]
    );
    rig.stop().await;
}

#[tokio::test]
async fn imported_gives_up_at_the_timeout() {
    let mut modality = FakeModality::start().await;
    let mut s = settings(
        CommitWhen::Imported,
        &modality.address,
        Duration::from_millis(10),
    );
    s.timeout = Duration::from_millis(300);
    let rig = Rig::start(s).await;
    rig.stored(1, CT, true);
    rig.submit("2.25.106", vec![reference(1)], 0).await;
    let (_, report) = modality.report().await;
    assert_eq!(
        report.failed,
        vec![(reference(1), FailureReason::ProcessingFailure)]
    );
    rig.stop().await;
}

/// A store that cannot be reached.
struct UnreachableStore;

#[async_trait]
impl ObjectStore for UnreachableStore {
    async fn begin(
        &self,
        _key: &ObjectKey,
    ) -> Result<Box<dyn crate::store::ObjectUpload>, crate::store::StoreError> {
        Err(std::io::Error::other("unreachable").into())
    }

    fn input_s3_uri(&self, job_id: &str) -> String {
        job_id.into()
    }

    async fn check(&self) -> Result<(), crate::store::StoreError> {
        Err(std::io::Error::other("unreachable").into())
    }

    async fn batch_contents(
        &self,
        _job_id: &str,
    ) -> Result<crate::store::BatchContents, crate::store::StoreError> {
        Err(std::io::Error::other("unreachable").into())
    }

    async fn exists(&self, _key: &ObjectKey) -> Result<bool, crate::store::StoreError> {
        Err(std::io::Error::other("unreachable").into())
    }

    async fn list_objects(
        &self,
        _: &str,
    ) -> Result<Vec<crate::store::ListedObject>, crate::store::StoreError> {
        Ok(Vec::new())
    }
    async fn read_head(
        &self,
        _: &str,
        _: u64,
    ) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
        Ok(None)
    }
    fn describe(&self) -> String {
        "an unreachable store".into()
    }
}

#[tokio::test]
async fn an_object_the_store_cannot_confirm_fails_as_a_processing_failure_at_the_timeout() {
    let mut modality = FakeModality::start().await;
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(FakeIndex::default());
    let key = format!("{JOB}/{STUDY}/{SERIES}/{}.dcm", sop(1));
    index.add(KeyParts::parse(&key).unwrap().record(
        &key,
        4,
        Some(CT.into()),
        None,
        crate::clock::now_rfc3339(),
    ));
    let mut s = settings(
        CommitWhen::Stored,
        &modality.address,
        Duration::from_millis(10),
    );
    s.timeout = Duration::from_millis(500);
    let (commitments, worker) = Commitments::new(
        s,
        "DICOM_GATEWAY".into(),
        "gw-1".into(),
        index,
        crate::index::IndexProgress::caught_up(),
        Arc::new(UnreachableStore),
        Arc::new(pending::LocalPending::new(dir.path().join("jobs"))),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone()));
    commitments
        .submit(
            ActionInformation {
                transaction_uid: "2.25.109".into(),
                references: vec![reference(1)],
            },
            "CT1",
            0,
        )
        .await
        .unwrap();
    let (_, report) = modality.report().await;
    assert_eq!(
        report.failed,
        vec![(reference(1), FailureReason::ProcessingFailure)]
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_pending_request_is_answered_after_a_restart() {
    let mut modality = FakeModality::start().await;
    let s = settings(
        CommitWhen::Imported,
        &modality.address,
        Duration::from_millis(10),
    );
    let rig = Rig::start(s.clone()).await;
    rig.stored(1, CT, true);
    rig.submit("2.25.107", vec![reference(1)], 0).await;
    let (dir, index) = rig.stop().await;
    // Imported while the gateway was down; the new worker finds the request at start-up.
    index.set_outcome(
        &sop(1),
        InstanceOutcome::Imported {
            image_set_id: "a".into(),
            is_primary: true,
        },
    );
    let rig = Rig::start_in(dir, s, index).await;
    let (_, report) = modality.report().await;
    assert_eq!(report.transaction_uid, "2.25.107");
    assert_eq!(report.committed, vec![reference(1)]);
    until("the delivered request to be forgotten", || {
        rig.pending_files() == 0
    })
    .await;
    rig.stop().await;
}

#[tokio::test]
async fn an_ae_without_a_peer_address_is_refused() {
    let rig = Rig::start(settings(
        CommitWhen::Stored,
        "127.0.0.1:1",
        Duration::from_millis(10),
    ))
    .await;
    let e = rig
        .commitments
        .submit(
            ActionInformation {
                transaction_uid: "2.25.108".into(),
                references: vec![reference(1)],
            },
            "MR9",
            0,
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Status::NOT_AUTHORIZED);
    assert_eq!(rig.pending_files(), 0);
    rig.stop().await;
}

#[test]
fn n_action_commands_are_checked_before_their_data_set() {
    let parse = |bytes: Vec<u8>| Command::parse(&bytes).unwrap();
    let ok = parse(crate::dimse::n_action_request(
        1,
        STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
        1,
    ));
    assert_eq!(check_action_command(&ok), Ok(()));
    for (command, status) in [
        (
            crate::dimse::n_action_request(1, CT, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE, 1),
            Status::NO_SUCH_SOP_CLASS,
        ),
        (
            crate::dimse::n_action_request(1, STORAGE_COMMITMENT_PUSH_MODEL, "1.2.3", 1),
            Status::NO_SUCH_SOP_INSTANCE,
        ),
        (
            crate::dimse::n_action_request(1, STORAGE_COMMITMENT_PUSH_MODEL, "1.2.x", 1),
            Status::INVALID_OBJECT_INSTANCE,
        ),
        (
            crate::dimse::n_action_request(
                1,
                STORAGE_COMMITMENT_PUSH_MODEL,
                STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
                2,
            ),
            Status::NO_SUCH_ACTION,
        ),
    ] {
        assert_eq!(
            check_action_command(&parse(command)).map_err(|r| r.status),
            Err(status)
        );
    }
    let mut no_data = ok.clone();
    no_data.has_dataset = false;
    assert_eq!(
        check_action_command(&no_data).map_err(|r| r.status),
        Err(Status::INVALID_ARGUMENT_VALUE)
    );
    assert_eq!(
        read_action_information(&[0u8; 7], EXPLICIT_VR_LITTLE_ENDIAN).map_err(|r| r.status),
        Err(Status::INVALID_ARGUMENT_VALUE)
    );
}

#[test]
fn pending_requests_and_references_are_capped_globally_and_per_ae() {
    let load: Arc<Mutex<Load>> = Arc::default();
    let held: Vec<_> = (0..MAX_PENDING_REQUESTS_PER_AE)
        .map(|_| Reservation::try_new(&load, "CT1", 1).unwrap())
        .collect();
    assert!(
        Reservation::try_new(&load, "CT1", 1).is_none(),
        "CT1 is at its limit"
    );
    let other = Reservation::try_new(&load, "MR1", 1).expect("another AE is not");
    drop(held);
    assert!(Reservation::try_new(&load, "CT1", MAX_PENDING_REFERENCES_PER_AE + 1).is_none());
    let big = Reservation::try_new(&load, "CT1", MAX_PENDING_REFERENCES_PER_AE).unwrap();
    assert!(
        Reservation::try_new(&load, "CT1", 1).is_none(),
        "references at their limit"
    );
    drop((big, other));
    assert_eq!(load.lock().unwrap().requests, 0, "given back when dropped");
    assert_eq!(SubmitError::Busy.status(), Status::RESOURCE_LIMITATION);
}

#[tokio::test]
async fn an_instance_the_index_lacks_while_it_is_behind_fails_as_a_processing_failure() {
    let mut modality = FakeModality::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(CommitWhen::Stored, &modality.address, Duration::ZERO);
    s.timeout = Duration::from_millis(300);
    // A record handed to a writer that never writes it: the index stays behind the request.
    let (sender, _writer_never_runs, _tally) = crate::index::IndexSender::channel(4);
    let progress = sender.progress().unwrap();
    progress.set_rebuilt();
    let key = format!("{JOB}/{STUDY}/{SERIES}/{}.dcm", sop(1));
    sender.record(KeyParts::parse(&key).unwrap().record(
        &key,
        4,
        Some(CT.into()),
        None,
        crate::clock::now_rfc3339(),
    ));
    let (commitments, worker) = Commitments::new(
        s,
        "DICOM_GATEWAY".into(),
        "gw-1".into(),
        Arc::new(FakeIndex::default()),
        progress,
        Arc::new(LocalStore::open(dir.path()).await.unwrap()),
        Arc::new(pending::LocalPending::new(dir.path().join("jobs"))),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone()));
    commitments
        .submit(
            ActionInformation {
                transaction_uid: "2.25.110".into(),
                references: vec![reference(1)],
            },
            "CT1",
            0,
        )
        .await
        .unwrap();
    let (_, report) = modality.report().await;
    assert_eq!(
        report.failed,
        vec![(reference(1), FailureReason::ProcessingFailure)],
        "not 0x0112: the index may only be behind"
    );
    stop.cancel();
    task.await.unwrap();
}

#[test]
fn a_queued_live_report_is_either_taken_by_the_association_or_abandoned_never_both() {
    let taken_first = HandOver::default();
    assert!(taken_first.take());
    assert!(
        !taken_first.abandon(),
        "taken: the delivery task waits for it"
    );
    let abandoned_first = HandOver::default();
    assert!(abandoned_first.abandon());
    assert!(
        !abandoned_first.take(),
        "abandoned: the association drops it"
    );
    // A report whose delivery task is gone is not taken either.
    let (tx, rx) = oneshot::channel();
    drop(rx);
    let report = LiveReport {
        report: Report {
            transaction_uid: "2.25.1".into(),
            committed: vec![],
            failed: vec![],
        },
        hand_over: Arc::default(),
        delivered: tx,
    };
    assert!(!report.take());
}

#[test]
fn report_responses_with_a_warning_status_count_as_delivered() {
    for warning in [0x0001, 0x0107, 0x0116, 0xB000, 0xBFFF] {
        assert!(Status(warning).is_warning(), "{warning:#06X}");
    }
    for other in [0x0000, 0x0110, 0x0213, 0xA700, 0xC000] {
        assert!(!Status(other).is_warning(), "{other:#06X}");
    }
}

#[tokio::test]
async fn a_report_answered_with_a_transient_failure_is_sent_again_and_a_warning_delivers_it() {
    let mut modality =
        FakeModality::answering(vec![Status::RESOURCE_LIMITATION, Status(0xB000)]).await;
    let rig = Rig::start(settings(
        CommitWhen::Stored,
        &modality.address,
        Duration::from_secs(3600),
    ))
    .await;
    rig.stored(1, CT, true);
    rig.submit("2.25.111", vec![reference(1)], 0).await;
    let (_, first) = modality.report().await;
    let (_, again) = modality.report().await;
    assert_eq!(first, again, "0x0213: the same report again");
    until("the request to be forgotten after the Warning", || {
        rig.pending_files() == 0
    })
    .await;
    rig.stop().await;
}

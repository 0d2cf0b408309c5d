//! The DIMSE state machine of [`Handler`], driven in-process over an in-memory stream: the test plays
//! the SCU with raw PDUs and checks what comes back on the wire and what lands in a local store.
//! No socket, no binary, no DCMTK; each test takes milliseconds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_dictionary_std::uids::{
    CT_IMAGE_STORAGE, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    VERIFICATION,
};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationRQ, Pdu, PresentationContextProposed,
    UserVariableItem,
};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{AcceptancePolicy, Handler, Services, Timeouts};
use crate::batch::{BatchLimits, Batcher, DuplicatePolicy};
use crate::commitment::dataset::{ActionInformation, Encoding};
use crate::commitment::pending::LocalPending;
use crate::commitment::{
    CommitWhen, CommitmentSettings, Commitments, FailureReason, Report, SopReference,
};
use crate::dimse::{self, Status, command_field};
use crate::index::InstanceIndex;
use crate::index::local::LocalIndex;
use crate::pdu::{self, Incoming};
use crate::policy::SyntaxPolicy;
use crate::store::local::{INCOMING_DIR, LocalStore};

const AE: &str = "GATEWAY";
/// Presentation context ids the SCU proposes: CT_IMAGE_STORAGE Image Storage and Verification.
const CT_CONTEXT: u8 = 1;
const ECHO_CONTEXT: u8 = 3;
/// The Storage Commitment Push Model context, proposed too (accepted when commitment is on).
const COMMITMENT_CONTEXT: u8 = 5;
const STUDY: &str = "1.2.826.0.1.3680043.2.1125.5";
const SERIES: &str = "1.2.826.0.1.3680043.2.1125.5.1";
const SOP: &str = "1.2.826.0.1.3680043.2.1125.5.1.1";

/// One association: the SCU's end of the stream, the gateway's [`Handler`] running on the other
/// end, and the local store it writes to.
struct Association {
    scu: DuplexStream,
    handler: JoinHandle<()>,
    store: tempfile::TempDir,
}

impl Association {
    /// Builds the services as src/server.rs does, on a local store in a temporary directory, and
    /// runs a [`Handler`] on one end of an in-memory stream. The only place that knows how. With
    /// `commitment`, Storage Commitment is on with these settings: the real instance index of the
    /// local store (its writer behind the C-STORE response, as in the gateway) and the local
    /// commitment journal.
    async fn start_with(commitment: Option<CommitmentSettings>) -> Association {
        let store = tempfile::tempdir().unwrap();
        let local: Arc<LocalStore> = Arc::new(LocalStore::open(store.path()).await.unwrap());
        let (index, commitments) = match commitment {
            None => (crate::index::IndexSender::disabled(), None),
            Some(settings) => {
                let index: Arc<dyn InstanceIndex> = Arc::new(LocalIndex::new(store.path()));
                let (sender, rx, tally) = crate::index::IndexSender::channel(64);
                tokio::spawn(crate::index::run_writer(index.clone(), rx, tally));
                let (commitments, worker) = Commitments::new(
                    settings,
                    AE.into(),
                    "gw-test".into(),
                    index,
                    local.clone(),
                    Arc::new(LocalPending::new(store.path().join("jobs"))),
                );
                tokio::spawn(worker.run(CancellationToken::new()));
                (sender, Some(commitments))
            }
        };
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let services = Arc::new(Services {
            acceptance: AcceptancePolicy {
                ae_title: AE.into(),
                accept_any_called_ae: false,
                calling_ae_allow: vec![],
                syntaxes: SyntaxPolicy::standard(),
                max_pdu: 64 * 1024,
                ae_bindings: vec![],
            },
            timeouts: Timeouts {
                request: Duration::from_secs(5),
                idle: Duration::from_secs(5),
                io: Duration::from_secs(5),
            },
            store: local,
            batcher: Batcher::new(BatchLimits::default(), |id| id.to_string(), events),
            duplicates: DuplicatePolicy::Overwrite,
            index,
            commitments,
        });
        let (scu, gateway) = tokio::io::duplex(1 << 20);
        let mut handler = Handler::new(gateway, services, CancellationToken::new());
        let handler = tokio::spawn(async move {
            if let Ok(rq) = handler.read_request(Duration::from_secs(5)).await {
                handler.run(rq).await;
            }
        });
        Association {
            scu,
            handler,
            store,
        }
    }

    /// [`Association::start_with`], then an A-ASSOCIATE-RQ for CT Image Storage, Verification and
    /// Storage Commitment, all in explicit VR little endian; panics unless accepted.
    async fn associate() -> Association {
        Association::associate_with(None).await
    }

    /// [`Association::associate`], with a Storage Commitment context too when `commitment` is given.
    async fn associate_with(commitment: Option<CommitmentSettings>) -> Association {
        let mut a = Association::start_with(commitment).await;
        let context = |id, abstract_syntax: &str| PresentationContextProposed {
            id,
            abstract_syntax: abstract_syntax.into(),
            transfer_syntaxes: vec![dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN.into()],
        };
        a.send_pdu(&Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "SCU".into(),
            called_ae_title: AE.into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![
                context(CT_CONTEXT, CT_IMAGE_STORAGE),
                context(ECHO_CONTEXT, VERIFICATION),
                context(COMMITMENT_CONTEXT, STORAGE_COMMITMENT_PUSH_MODEL),
            ],
            user_variables: vec![UserVariableItem::MaxLength(16 * 1024)],
        }))
        .await;
        match a.read().await {
            Incoming::Other(Pdu::AssociationAC(_)) => a,
            other => panic!("association not accepted: {other:?}"),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.scu.write_all(bytes).await.unwrap();
    }

    async fn send_pdu(&mut self, p: &Pdu) {
        let mut bytes = Vec::new();
        dicom_ul::pdu::write_pdu(&mut bytes, p).unwrap();
        self.send(&bytes).await;
    }

    /// Sends one PDV: a whole command set, or a data set fragment.
    async fn send_pdv(&mut self, context_id: u8, is_command: bool, is_last: bool, data: &[u8]) {
        self.send(&pdu::encode_pdata(context_id, is_command, is_last, data))
            .await;
    }

    /// Sends the command of a C-STORE of [`SOP`] on the CT_IMAGE_STORAGE context.
    async fn send_store_command(&mut self) {
        let command = dimse::request(
            command_field::C_STORE_RQ,
            1,
            CT_IMAGE_STORAGE,
            Some(SOP),
            true,
        );
        self.send_pdv(CT_CONTEXT, true, true, &command).await;
    }

    /// The next PDU from the gateway.
    async fn read(&mut self) -> Incoming {
        let read = pdu::read_pdu(&mut self.scu, 1 << 20);
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(Some(incoming))) => incoming,
            other => panic!("expected a PDU from the gateway, got {other:?}"),
        }
    }

    /// Reads a DIMSE response; returns its Command Field and Status.
    async fn read_response(&mut self) -> (u16, Status) {
        let Incoming::PData(pdvs) = self.read().await else {
            panic!("expected a response in a P-DATA-TF");
        };
        assert!(pdvs.len() == 1 && pdvs[0].is_command && pdvs[0].is_last);
        let command = InMemDicomObject::read_dataset_with_ts(
            &pdvs[0].data[..],
            &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        let field = command
            .element(tags::COMMAND_FIELD)
            .unwrap()
            .to_int()
            .unwrap();
        (field, dimse::response_status(&pdvs[0].data).unwrap())
    }

    /// Waits for the handler to end (the association is over); returns the store's directory.
    async fn end(self) -> tempfile::TempDir {
        tokio::time::timeout(Duration::from_secs(5), self.handler)
            .await
            .expect("the association ends")
            .unwrap();
        self.store
    }
}

/// An explicit VR little endian CT_IMAGE_STORAGE data set of [`SOP`] with `pixel_bytes` of pixel data.
fn dataset(pixel_bytes: usize) -> Vec<u8> {
    let ui = |tag, uid: &str| DataElement::new(tag, VR::UI, PrimitiveValue::from(uid));
    let obj = InMemDicomObject::from_element_iter([
        ui(tags::SOP_CLASS_UID, CT_IMAGE_STORAGE),
        ui(tags::SOP_INSTANCE_UID, SOP),
        ui(tags::STUDY_INSTANCE_UID, STUDY),
        ui(tags::SERIES_INSTANCE_UID, SERIES),
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![0x5Au8; pixel_bytes]),
        ),
    ]);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

/// Where the store puts [`SOP`], in whichever batch: `{batch}/{study}/{series}/{sop}.dcm`.
fn stored(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store)
        .unwrap()
        .map(|batch| {
            batch
                .unwrap()
                .path()
                .join(format!("{STUDY}/{SERIES}/{SOP}.dcm"))
        })
        .filter(|p| p.exists())
        .collect()
}

fn incoming(store: &Path) -> usize {
    std::fs::read_dir(store.join(INCOMING_DIR)).unwrap().count()
}

/// Sends the C-STORE command and the first part of a data set, past the UIDs, so the upload has
/// begun (the handler works through PDUs in order: whatever the test sends next finds it begun).
async fn store_half_an_instance() -> Association {
    let mut a = Association::associate().await;
    a.send_store_command().await;
    a.send_pdv(CT_CONTEXT, false, false, &dataset(20_000)[..10_000])
        .await;
    a
}

/// The association ended with the instance in flight discarded: no object, no upload left.
async fn assert_nothing_stored(a: Association) {
    let store = a.end().await;
    assert_eq!(stored(store.path()), Vec::<PathBuf>::new());
    assert_eq!(incoming(store.path()), 0, "the partial upload was removed");
}

#[tokio::test]
async fn c_echo_is_answered_success_and_release_is_confirmed() {
    let mut a = Association::associate().await;
    let echo = dimse::request(command_field::C_ECHO_RQ, 1, VERIFICATION, None, false);
    a.send_pdv(ECHO_CONTEXT, true, true, &echo).await;
    assert_eq!(
        a.read_response().await,
        (
            command_field::C_ECHO_RQ | command_field::RESPONSE_BIT,
            Status::SUCCESS
        )
    );
    a.send_pdu(&Pdu::ReleaseRQ).await;
    assert!(matches!(a.read().await, Incoming::Other(Pdu::ReleaseRP)));
    a.end().await;
}

#[tokio::test]
async fn c_store_is_answered_success_once_the_object_is_on_disk() {
    let mut a = Association::associate().await;
    a.send_store_command().await;
    let data = dataset(20_000);
    let (first, rest) = data.split_at(10_000);
    a.send_pdv(CT_CONTEXT, false, false, first).await;
    a.send_pdv(CT_CONTEXT, false, true, rest).await;
    assert_eq!(
        a.read_response().await,
        (
            command_field::C_STORE_RQ | command_field::RESPONSE_BIT,
            Status::SUCCESS
        )
    );
    let objects = stored(a.store.path());
    assert_eq!(objects.len(), 1);
    let bytes = std::fs::read(&objects[0]).unwrap();
    let (meta, offset) = crate::part10::split_part10(&bytes).expect("a Part-10 file");
    assert_eq!(meta.media_storage_sop_instance_uid(), SOP);
    assert_eq!(&bytes[offset..], &data[..], "the data set as sent");
    assert_eq!(incoming(a.store.path()), 0);
    a.send_pdu(&Pdu::ReleaseRQ).await;
    assert!(matches!(a.read().await, Incoming::Other(Pdu::ReleaseRP)));
    a.end().await;
}

#[tokio::test]
async fn a_command_on_another_context_while_a_data_set_is_in_flight_is_aborted() {
    let mut a = store_half_an_instance().await;
    let echo = dimse::request(command_field::C_ECHO_RQ, 2, VERIFICATION, None, false);
    a.send_pdv(ECHO_CONTEXT, true, true, &echo).await;
    match a.read().await {
        Incoming::Other(Pdu::AbortRQ { source }) => assert_eq!(
            source,
            AbortRQSource::ServiceProvider(AbortRQServiceProviderReason::UnexpectedPduParameter)
        ),
        other => panic!("expected an A-ABORT, got {other:?}"),
    }
    assert_nothing_stored(a).await;
}

#[tokio::test]
async fn an_a_abort_in_the_middle_of_an_instance_leaves_nothing_behind() {
    let mut a = store_half_an_instance().await;
    a.send_pdu(&Pdu::AbortRQ {
        source: AbortRQSource::ServiceUser,
    })
    .await;
    assert_nothing_stored(a).await;
}

#[tokio::test]
async fn a_release_in_the_middle_of_an_instance_is_confirmed_and_the_instance_discarded() {
    let mut a = store_half_an_instance().await;
    a.send_pdu(&Pdu::ReleaseRQ).await;
    assert!(matches!(a.read().await, Incoming::Other(Pdu::ReleaseRP)));
    assert_nothing_stored(a).await;
}

/// Storage Commitment as the association tests run it: `stored`, the SCU's AE (`SCU`) at an
/// address where nothing listens (so a report can only arrive on the association), unknown
/// instances failed after a short grace.
fn commitment(peers: &[&str]) -> CommitmentSettings {
    CommitmentSettings {
        commit_when: CommitWhen::Stored,
        peers: peers
            .iter()
            .map(|ae| (ae.to_string(), "127.0.0.1:1".to_string()))
            .collect(),
        timeout: Duration::from_secs(3600),
        index_grace: Duration::from_millis(200),
        check_interval: Duration::from_millis(200),
    }
}

const UNKNOWN_SOP: &str = "1.2.826.0.1.3680043.2.1125.5.1.99";

fn references(sops: &[&str]) -> Vec<SopReference> {
    sops.iter()
        .map(|s| SopReference {
            sop_class_uid: CT_IMAGE_STORAGE.into(),
            sop_instance_uid: s.to_string(),
        })
        .collect()
}

impl Association {
    /// Stores [`SOP`] with one C-STORE; panics unless Success.
    async fn store_sop(&mut self) {
        self.send_store_command().await;
        self.send_pdv(CT_CONTEXT, false, true, &dataset(1000)).await;
        assert_eq!(self.read_response().await.1, Status::SUCCESS);
    }

    /// Sends an N-ACTION-RQ (Action Type `action`) with `data` as its Action Information.
    async fn send_n_action(&mut self, message_id: u16, action: u16, data: &[u8]) {
        let command = dimse::n_action_request(
            message_id,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
            action,
        );
        self.send_pdv(COMMITMENT_CONTEXT, true, true, &command)
            .await;
        self.send_pdv(COMMITMENT_CONTEXT, false, true, data).await;
    }

    /// Reads a whole message from the gateway: its command and its data set, if any.
    async fn read_message(&mut self) -> (dimse::Command, Vec<u8>) {
        let (mut command, mut data) = (Vec::new(), Vec::new());
        let mut parsed: Option<dimse::Command> = None;
        loop {
            let Incoming::PData(pdvs) = self.read().await else {
                panic!("expected a P-DATA-TF");
            };
            for pdv in pdvs {
                assert_eq!(pdv.context_id, COMMITMENT_CONTEXT);
                if pdv.is_command {
                    command.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        let c = dimse::Command::parse(&command).unwrap();
                        if !c.has_dataset {
                            return (c, data);
                        }
                        parsed = Some(c);
                    }
                } else {
                    data.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        return (parsed.take().expect("command first"), data);
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn an_n_action_is_answered_at_once_and_its_report_comes_on_the_same_association() {
    let mut a = Association::associate_with(Some(commitment(&["SCU"]))).await;
    a.store_sop().await;
    // At once after the C-STORE response: the index writer may not have written SOP's record yet.
    let action = ActionInformation {
        transaction_uid: "2.25.300".into(),
        references: references(&[SOP, UNKNOWN_SOP]),
    };
    a.send_n_action(2, 1, &action.encode(Encoding::ExplicitVrLittleEndian))
        .await;
    let (rsp, _) = a.read_message().await;
    assert_eq!(rsp.command_field, 0x8130, "N-ACTION-RSP");
    assert_eq!(rsp.status, Some(Status::SUCCESS));
    assert_eq!(rsp.message_id, 2);
    assert_eq!(rsp.action_type_id, Some(1));
    let (rq, data) = a.read_message().await;
    assert_eq!(rq.command_field, dimse::command_field::N_EVENT_REPORT_RQ);
    assert_eq!(
        rq.affected_sop_class_uid.as_deref(),
        Some(STORAGE_COMMITMENT_PUSH_MODEL)
    );
    let report = Report::parse(&data, Encoding::ExplicitVrLittleEndian).unwrap();
    assert_eq!(report.event_type_id(), 2);
    assert_eq!(report.transaction_uid, "2.25.300");
    assert_eq!(report.committed, references(&[SOP]));
    assert_eq!(
        report.failed,
        vec![(
            references(&[UNKNOWN_SOP]).remove(0),
            FailureReason::NoSuchObjectInstance
        )]
    );
    a.send_pdv(
        COMMITMENT_CONTEXT,
        true,
        true,
        &crate::commitment::scu::response(rq.message_id, Status::SUCCESS),
    )
    .await;
    // The association goes on: a C-ECHO, then release.
    let echo = dimse::request(command_field::C_ECHO_RQ, 3, VERIFICATION, None, false);
    a.send_pdv(ECHO_CONTEXT, true, true, &echo).await;
    assert_eq!(a.read_response().await.1, Status::SUCCESS);
    a.send_pdu(&Pdu::ReleaseRQ).await;
    assert!(matches!(a.read().await, Incoming::Other(Pdu::ReleaseRP)));
    let store = a.end().await;
    let journal = store.path().join("jobs").join("commitments");
    // The worker forgets the request once it has the response: wait for it.
    let forgotten = async {
        while std::fs::read_dir(&journal).unwrap().count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), forgotten)
        .await
        .expect("the delivered request is forgotten");
}

#[tokio::test]
async fn malformed_n_actions_get_their_status_and_the_association_stays_usable() {
    let mut a = Association::associate_with(Some(commitment(&["SCU"]))).await;
    let good = ActionInformation {
        transaction_uid: "2.25.301".into(),
        references: references(&[SOP]),
    }
    .encode(Encoding::ExplicitVrLittleEndian);
    let mut no_transaction = ActionInformation {
        transaction_uid: "2.25.302".into(),
        references: references(&[SOP]),
    };
    no_transaction.transaction_uid.clear();
    for (message_id, action, data, status) in [
        (1, 2, good.clone(), Status::NO_SUCH_ACTION),
        (2, 1, vec![0xDE, 0xAD, 0xBE], Status::INVALID_ARGUMENT_VALUE),
        (
            3,
            1,
            no_transaction.encode(Encoding::ExplicitVrLittleEndian),
            Status::INVALID_ARGUMENT_VALUE,
        ),
    ] {
        a.send_n_action(message_id, action, &data).await;
        let (rsp, _) = a.read_message().await;
        assert_eq!(rsp.message_id, message_id);
        assert_eq!(rsp.status, Some(status), "N-ACTION {message_id}");
    }
    let echo = dimse::request(command_field::C_ECHO_RQ, 9, VERIFICATION, None, false);
    a.send_pdv(ECHO_CONTEXT, true, true, &echo).await;
    assert_eq!(a.read_response().await.1, Status::SUCCESS);
    a.send_pdu(&Pdu::ReleaseRQ).await;
    assert!(matches!(a.read().await, Incoming::Other(Pdu::ReleaseRP)));
    a.end().await;
}

#[tokio::test]
async fn an_n_action_from_an_ae_without_a_peer_address_is_refused() {
    let mut a = Association::associate_with(Some(commitment(&["CT1"]))).await;
    let data = ActionInformation {
        transaction_uid: "2.25.303".into(),
        references: references(&[SOP]),
    }
    .encode(Encoding::ExplicitVrLittleEndian);
    a.send_n_action(1, 1, &data).await;
    let (rsp, _) = a.read_message().await;
    assert_eq!(rsp.status, Some(Status::NOT_AUTHORIZED));
    a.send_pdu(&Pdu::ReleaseRQ).await;
    assert!(matches!(a.read().await, Incoming::Other(Pdu::ReleaseRP)));
    a.end().await;
}

//! The DIMSE state machine of [`Handler`], driven in-process over an in-memory stream: the test plays
//! the SCU with raw PDUs and checks what comes back on the wire and what lands in a local store.
//! No socket, no binary, no DCMTK; each test takes milliseconds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_dictionary_std::uids::{CT_IMAGE_STORAGE, VERIFICATION};
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
use crate::dimse::{self, Status, command_field};
use crate::pdu::{self, Incoming};
use crate::policy::SyntaxPolicy;
use crate::store::local::{INCOMING_DIR, LocalStore};

const AE: &str = "GATEWAY";
/// Presentation context ids the SCU proposes: CT_IMAGE_STORAGE Image Storage and Verification.
const CT_CONTEXT: u8 = 1;
const ECHO_CONTEXT: u8 = 3;
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
    /// runs a [`Handler`] on one end of an in-memory stream. The only place that knows how.
    async fn start() -> Association {
        let store = tempfile::tempdir().unwrap();
        let local = LocalStore::open(store.path()).await.unwrap();
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
            store: Arc::new(local),
            batcher: Batcher::new(BatchLimits::default(), |id| id.to_string(), events),
            duplicates: DuplicatePolicy::Overwrite,
            index: crate::index::IndexSender::disabled(),
            commitments: None,
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

    /// [`Association::start`], then an A-ASSOCIATE-RQ for CT_IMAGE_STORAGE Image Storage and Verification, both
    /// in explicit VR little endian; panics unless accepted.
    async fn associate() -> Association {
        let mut a = Association::start().await;
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

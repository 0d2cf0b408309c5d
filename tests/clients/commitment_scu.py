"""A modality's side of Storage Commitment, played by pynetdicom for tests/commitment.rs.

Stores the given files on one association, sends an N-ACTION (Action Type 1) naming them plus the
extra SOP Instance UIDs given with --unknown, and prints the N-EVENT-REPORT it then receives as one
JSON line: {"event_type": 1|2, "transaction_uid": ..., "referenced": [[class, instance], ...],
"failed": [[class, instance, reason], ...], "on": "same-association"|"new-association"}.

--wait-on same: the report is awaited on the association that carried the N-ACTION.
--wait-on new:  the association is released right after the N-ACTION-RSP, and the report is awaited
                on a new association the gateway opens to --listen-port (pynetdicom accepts the
                SCP role it asks for). Name an --unknown UID too, so that the report cannot be
                ready (the gateway waits for its index to catch up) before the release.
Exits 1 with a message if anything is not as expected (association, C-STORE, N-ACTION status, no
report within --timeout seconds).
"""

import argparse
import json
import sys
import threading

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--called", default="DICOM_GATEWAY")
    p.add_argument("--calling", default="PYSCU")
    p.add_argument("--wait-on", choices=["same", "new"], required=True)
    p.add_argument("--listen-port", type=int)
    p.add_argument("--unknown", action="append", default=[])
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("files", nargs="+")
    a = p.parse_args()

    reports = []
    received = threading.Event()
    # Set once our N-EVENT-REPORT-RSP is on the wire: only then may the association be released.
    responded = threading.Event()

    def on_sent(event):
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            responded.set()

    def on_report(event):
        ds = event.event_information
        reports.append(
            {
                "event_type": event.event_type,
                "transaction_uid": str(ds.get("TransactionUID", "")),
                "referenced": [
                    [str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)]
                    for i in ds.get("ReferencedSOPSequence", [])
                ],
                "failed": [
                    [
                        str(i.ReferencedSOPClassUID),
                        str(i.ReferencedSOPInstanceUID),
                        int(i.FailureReason),
                    ]
                    for i in ds.get("FailedSOPSequence", [])
                ],
                "on": "same-association" if a.wait_on == "same" else "new-association",
            }
        )
        received.set()
        return 0x0000, None  # (status, Event Reply): pynetdicom's handler contract

    datasets = [dcmread(f) for f in a.files]
    ae = AE(ae_title=a.calling)
    for cls in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(cls, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == cls][:1])
    ae.add_requested_context(StorageCommitmentPushModel)

    server = None
    if a.wait_on == "new":
        if not a.listen_port:
            sys.exit("--wait-on new needs --listen-port")
        # Accept the gateway's association: it proposes the SCP role only (SCP/SCU Role Selection).
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        server = ae.start_server(
            ("127.0.0.1", a.listen_port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_DIMSE_SENT, on_sent)],
        )

    handlers = (
        [(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_DIMSE_SENT, on_sent)]
        if a.wait_on == "same"
        else []
    )
    assoc = ae.associate(a.host, a.port, ae_title=a.called, evt_handlers=handlers)
    if not assoc.is_established:
        sys.exit("association with the gateway not established")
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0:
            sys.exit(f"C-STORE of {ds.SOPInstanceUID} failed: {status}")

    action = Dataset()
    action.TransactionUID = generate_uid()
    refs = []
    for ds in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(item)
    for uid in a.unknown:
        item = Dataset()
        item.ReferencedSOPClassUID = datasets[0].SOPClassUID
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    action.ReferencedSOPSequence = refs
    status, _ = assoc.send_n_action(action, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
    if not status or status.Status != 0:
        sys.exit(f"N-ACTION failed: {status}")

    if a.wait_on == "new":
        assoc.release()
    ok = received.wait(a.timeout) and responded.wait(a.timeout)
    if a.wait_on == "same":
        assoc.release()
    if server is not None:
        server.shutdown()
    if not ok:
        sys.exit(f"no N-EVENT-REPORT within {a.timeout} s")
    report = reports[0]
    if report["transaction_uid"] != action.TransactionUID:
        sys.exit(f"report for another transaction: {report}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

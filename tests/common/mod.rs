//! Shared harness for the end-to-end tests: the real gateway binary, DCMTK clients, LocalStack S3,
//! and a raw SCU for the cases a real client will not produce (malformed PDUs, mismatched UIDs).
#![allow(dead_code)]

mod aws;

// Not every test binary uses the LocalStack helpers.
#[allow(unused_imports)]
pub use aws::*;

use std::fmt::Display;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dicom_gateway::store::local::INCOMING_DIR;
use dicom_gateway::{dimse, pdu};
use dicom_ul::pdu::{AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem};

pub const AE: &str = "DICOM_GATEWAY";
pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// The deadline and the growing pause between probes of [`eventually`] and [`eventually_async`].
struct Poll<'a> {
    what: &'a str,
    within: Duration,
    until: Instant,
    pause: Duration,
}

impl<'a> Poll<'a> {
    /// Longest pause between two probes (they may be AWS calls: keep LocalStack's load modest).
    const MAX_PAUSE: Duration = Duration::from_millis(100);

    fn new(what: &'a str, within: Duration) -> Self {
        Poll {
            what,
            within,
            until: Instant::now() + within,
            pause: Duration::from_millis(1),
        }
    }

    /// The pause before the next probe; panics, with the last `state` probed, once time is up.
    fn next(&mut self, state: &dyn Display) -> Duration {
        assert!(
            Instant::now() < self.until,
            "timed out after {:?} waiting for {}; last seen:\n{state}",
            self.within,
            self.what
        );
        let pause = self.pause;
        self.pause = (pause * 2).min(Self::MAX_PAUSE);
        pause
    }
}

/// Probes until `probe` returns `Ok`, and returns its value. `Err` carries the state seen, which
/// the panic after `within` shows beside `what` (what was awaited). The pause between probes grows
/// from 1 ms to 100 ms, so a quick event is seen at once and a slow one costs few probes.
pub fn eventually<T, E: Display>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    let mut poll = Poll::new(what, within);
    loop {
        match probe() {
            Ok(v) => return v,
            Err(state) => std::thread::sleep(poll.next(&state)),
        }
    }
}

/// [`eventually`] for a probe that awaits (an AWS call), pausing without blocking the runtime.
pub async fn eventually_async<T, E: Display>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let mut poll = Poll::new(what, within);
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(state) => tokio::time::sleep(poll.next(&state)).await,
        }
    }
}

pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running gateway process, killed when dropped (use [`Gateway::stop`] for a graceful stop).
pub struct Gateway {
    pub child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `dicom-gateway serve` on a free port with `args` added; `env` is added to its environment.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("gateway.log");
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dicom-gateway"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args);
        cmd.env("DICOM_GATEWAY_LOG_LEVEL", "info")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("gateway binary starts");
        let mut gw = Gateway {
            child: Some(child),
            port,
            log,
            _dir: dir,
        };
        // Wait for the start-up log line rather than probing the port: a probe connection would
        // itself occupy an association slot for a moment.
        eventually("the gateway to listen", Duration::from_secs(20), || {
            let log = gw.log_text();
            if log.contains("dicom-gateway listening") {
                return Ok(());
            }
            if let Ok(Some(status)) = gw.child.as_mut().unwrap().try_wait() {
                panic!("gateway exited with {status} before listening; log:\n{log}");
            }
            Err(log)
        });
        gw
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn wait_for_log(&self, needle: &str) -> String {
        eventually(
            &format!("'{needle}' in the gateway log"),
            Duration::from_secs(20),
            || {
                let log = self.log_text();
                if log.contains(needle) {
                    Ok(log)
                } else {
                    Err(log)
                }
            },
        )
    }

    /// Peak resident set size of the gateway process so far, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    /// SIGTERM and wait for a clean exit; returns the log. If it does not exit within 40 s, the
    /// panic drops the gateway, which kills it.
    pub fn stop(&mut self) -> String {
        let Some(child) = self.child.as_mut() else {
            return self.log_text();
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let log = self.log.clone();
        let status = eventually(
            "the gateway to exit after SIGTERM",
            Duration::from_secs(40),
            || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                _ => Err(std::fs::read_to_string(&log).unwrap_or_default()),
            },
        );
        self.child = None;
        assert!(
            status.success(),
            "gateway exited with {status}; log:\n{}",
            self.log_text()
        );
        self.log_text()
    }
}

impl Gateway {
    /// SIGKILL, and wait for the process to be gone: the gateway gets no chance to clean up.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the gateway is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Sends the corpus `files` (under `root`) to `gw` with storescu in the background, SIGKILLs the
/// gateway once `after` of them were acknowledged, and returns the SOP Instance UIDs storescu saw
/// acknowledged. storescu's log goes to `log`.
pub fn kill_mid_study(
    gw: &mut Gateway,
    files: &[PathBuf],
    log: &Path,
    after: usize,
    root: &str,
) -> Vec<String> {
    let mut sender = storescu_background(gw.port, files, log);
    wait_for_successes(log, after);
    gw.kill();
    let _ = sender.wait();
    acknowledged(log, root)
}

impl Drop for Gateway {
    /// A gateway the test did not stop is of no further interest: kill it at once.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A gateway on a local store in a new temporary directory, with `extra` options.
pub fn local_gateway(extra: &[&str]) -> (Gateway, tempfile::TempDir) {
    let store = tempfile::tempdir().unwrap();
    let mut args = vec!["--store-dir", store.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    (Gateway::start(&args, &[]), store)
}

/// A gateway whose S3 endpoint has nothing listening: every C-STORE must fail. Needs no LocalStack.
pub fn unreachable_s3_gateway() -> Gateway {
    let dead = format!("http://127.0.0.1:{}", free_port());
    Gateway::start(
        &["--s3-bucket", "unreachable", "--s3-force-path-style"],
        &[
            ("AWS_ENDPOINT_URL", dead.as_str()),
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("AWS_REGION", "us-east-1"),
            // Fail at the first refused connection instead of retrying with backoff.
            ("AWS_MAX_ATTEMPTS", "1"),
        ],
    )
}

/// Runs a DCMTK tool with TCP_NODELAY set, as the README advises.
pub fn dcmtk(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} runs (is DCMTK installed? scripts/test.sh installs it): {e}")
        })
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn echoscu(port: u16, called: &str, calling: &str) -> Output {
    dcmtk(
        "echoscu",
        &[
            "-aec",
            called,
            "-aet",
            calling,
            "127.0.0.1",
            &port.to_string(),
        ],
    )
}

/// storescu's arguments up to the files: verbose, going on after failures (-nh), as STORESCU,
/// with `flag` choosing the proposed transfer syntaxes (e.g. -xi, -xe, -xb, -xd, -xy).
fn storescu_args(port: u16, flag: &str) -> Vec<String> {
    [
        "-v",
        "-nh",
        "-aec",
        AE,
        "-aet",
        "STORESCU",
        flag,
        "127.0.0.1",
    ]
    .map(String::from)
    .into_iter()
    .chain([port.to_string()])
    .collect()
}

/// storescu on `files`, with `flag` choosing the proposed transfer syntaxes (see [`storescu_args`]).
pub fn storescu(port: u16, flag: &str, files: &[&Path]) -> Output {
    let mut args = storescu_args(port, flag);
    args.extend(files.iter().map(|f| f.display().to_string()));
    dcmtk(
        "storescu",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// Sends the five test files, each with the flag that proposes its own transfer syntax first, so
/// storescu sends the bytes of the file unchanged.
pub fn send_testdata(port: u16) {
    for (file, flag) in [
        ("ct-implicit-le.dcm", "-xi"),
        ("ct-explicit-le.dcm", "-xe"),
        ("mr-explicit-be.dcm", "-xb"),
        ("mr-deflated.dcm", "-xd"),
        ("sc-jpeg-baseline.dcm", "-xy"),
    ] {
        let out = storescu(port, flag, &[&testdata(file)]);
        assert!(out.status.success(), "storescu {file}: {}", text(&out));
        assert!(
            !text(&out).contains("Failed"),
            "storescu {file}: {}",
            text(&out)
        );
    }
}

pub const TESTDATA_FILES: [&str; 5] = [
    "ct-implicit-le.dcm",
    "ct-explicit-le.dcm",
    "mr-explicit-be.dcm",
    "mr-deflated.dcm",
    "sc-jpeg-baseline.dcm",
];

/// Checks that `stored` (a Part-10 object written by the gateway) carries exactly the data set of
/// the test file with the same SOP Instance UID, and a correct meta group. Returns the file name.
pub fn assert_matches_a_sent_file(stored: &[u8]) -> &'static str {
    let (meta, offset) =
        dicom_gateway::part10::split_part10(stored).expect("stored object is Part-10");
    for name in TESTDATA_FILES {
        let sent = std::fs::read(testdata(name)).unwrap();
        let (sent_meta, sent_offset) = dicom_gateway::part10::split_part10(&sent).unwrap();
        if sent_meta.media_storage_sop_instance_uid() == meta.media_storage_sop_instance_uid() {
            assert_eq!(
                &stored[offset..],
                &sent[sent_offset..],
                "data set bytes of {name} differ"
            );
            assert_eq!(
                meta.transfer_syntax(),
                sent_meta.transfer_syntax(),
                "{name}"
            );
            assert_eq!(
                meta.media_storage_sop_class_uid(),
                sent_meta.media_storage_sop_class_uid(),
                "{name}"
            );
            assert_eq!(meta.source_application_entity_title(), Some("STORESCU"));
            assert_eq!(
                meta.implementation_class_uid(),
                dicom_gateway::part10::IMPLEMENTATION_CLASS_UID
            );
            return name;
        }
    }
    panic!(
        "stored object {} matches no test file",
        meta.media_storage_sop_instance_uid()
    );
}

/// A minimal SCU speaking raw PDUs, for byte-level control.
pub struct RawScu {
    pub stream: TcpStream,
}

impl RawScu {
    pub fn connect(port: u16) -> RawScu {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RawScu { stream }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_pdu(&mut self, p: &Pdu) {
        let mut out = Vec::new();
        dicom_ul::pdu::write_pdu(&mut out, p).unwrap();
        self.send_raw(&out);
    }

    /// Reads one PDU; None if the connection closed.
    pub fn read(&mut self) -> Option<Pdu> {
        let mut header = [0u8; 6];
        self.stream.read_exact(&mut header).ok()?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).ok()?;
        let mut whole = header.to_vec();
        whole.extend(body);
        dicom_ul::pdu::read_pdu(&whole[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false)
            .ok()
            .flatten()
    }

    /// Requests an association for CT Image Storage (context 1, explicit VR LE) and Verification
    /// (context 3); panics unless accepted.
    pub fn associate(port: u16, called: &str) -> RawScu {
        let mut scu = RawScu::connect(port);
        scu.send_pdu(&RawScu::request(called));
        match scu.read() {
            Some(Pdu::AssociationAC(_)) => scu,
            other => panic!("association not accepted: {other:?}"),
        }
    }

    /// The A-ASSOCIATE-RQ [`RawScu::associate`] sends.
    pub fn request(called: &str) -> Pdu {
        Pdu::AssociationRQ(AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "RAWSCU".into(),
            called_ae_title: called.into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![
                PresentationContextProposed {
                    id: 1,
                    abstract_syntax: CT.into(),
                    transfer_syntaxes: vec![EXPLICIT_LE.into()],
                },
                PresentationContextProposed {
                    id: 3,
                    abstract_syntax: "1.2.840.10008.1.1".into(),
                    transfer_syntaxes: vec![EXPLICIT_LE.into()],
                },
            ],
            user_variables: vec![UserVariableItem::MaxLength(65536)],
        })
    }

    /// Sends a C-STORE on context 1 with `command_uid` in the command and `dataset` as data set,
    /// in fragments of `fragment` bytes; returns the response status.
    pub fn store(
        &mut self,
        message_id: u16,
        command_uid: &str,
        dataset: &[u8],
        fragment: usize,
    ) -> u16 {
        self.send_store(message_id, command_uid, dataset, fragment);
        self.read_status()
    }

    /// Sends a C-STORE as [`RawScu::store`] does, without reading the response.
    pub fn send_store(
        &mut self,
        message_id: u16,
        command_uid: &str,
        dataset: &[u8],
        fragment: usize,
    ) {
        let cmd = dimse::request(
            dimse::command_field::C_STORE_RQ,
            message_id,
            CT,
            Some(command_uid),
            true,
        );
        self.send_raw(&pdu::encode_pdata(1, true, true, &cmd));
        let chunks: Vec<&[u8]> = dataset.chunks(fragment).collect();
        for (i, c) in chunks.iter().enumerate() {
            self.send_raw(&pdu::encode_pdata(1, false, i + 1 == chunks.len(), c));
        }
    }

    pub fn read_status(&mut self) -> u16 {
        self.read_response().0
    }

    /// The next response's status and its command set (to look for an Error Comment in).
    pub fn read_response(&mut self) -> (u16, Vec<u8>) {
        match self.read() {
            Some(Pdu::PData { data }) => (
                dimse::response_status(&data[0].data).unwrap().0,
                data[0].data.clone(),
            ),
            other => panic!("expected a response, got {other:?}"),
        }
    }

    pub fn release(mut self) {
        self.send_pdu(&Pdu::ReleaseRQ);
        assert!(matches!(self.read(), Some(Pdu::ReleaseRP)));
    }
}

/// An explicit VR little endian CT data set with the given UIDs and `pixel_bytes` of pixel data.
pub fn ct_dataset(sop_instance: &str, study: &str, series: &str, pixel_bytes: usize) -> Vec<u8> {
    fn el(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
        let mut v = value.to_vec();
        if v.len() % 2 == 1 {
            v.push(if vr == b"UI" { 0 } else { b' ' });
        }
        out.extend(group.to_le_bytes());
        out.extend(elem.to_le_bytes());
        out.extend(vr);
        out.extend((v.len() as u16).to_le_bytes());
        out.extend(v);
    }
    let mut out = Vec::new();
    el(&mut out, 0x0008, 0x0016, b"UI", CT.as_bytes());
    el(&mut out, 0x0008, 0x0018, b"UI", sop_instance.as_bytes());
    el(&mut out, 0x0008, 0x0060, b"CS", b"CT");
    el(&mut out, 0x0010, 0x0010, b"PN", b"RAW^SCU");
    el(&mut out, 0x0020, 0x000D, b"UI", study.as_bytes());
    el(&mut out, 0x0020, 0x000E, b"UI", series.as_bytes());
    out.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0]);
    out.extend((pixel_bytes as u32).to_le_bytes());
    out.extend(std::iter::repeat_n(0x5Au8, pixel_bytes));
    out
}

/// Files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p))
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

/// The objects in a local store: its `.dcm` files outside the incoming directory, sorted.
pub fn stored_objects(store: &Path) -> Vec<PathBuf> {
    files_under(store)
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "dcm") && !p.starts_with(store.join(INCOMING_DIR))
        })
        .collect()
}

/// Whether a local store's incoming directory holds nothing (no upload left behind).
pub fn incoming_is_empty(store: &Path) -> bool {
    files_under(&store.join(INCOMING_DIR)).is_empty()
}

/// The jobs in the local journal under `store_dir` (the gateway's --store-dir).
pub fn local_jobs(store_dir: &Path) -> Vec<serde_json::Value> {
    files_under(&store_dir.join("jobs"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

/// Waits until the local journal under `store_dir` holds one job, CLOSED (start-up recovery
/// closes a batch a killed gateway left OPEN); returns it.
pub fn wait_for_closed_local_job(store_dir: &Path, gw: &Gateway) -> serde_json::Value {
    eventually(
        "recovery to close the batch",
        Duration::from_secs(20),
        || match &local_jobs(store_dir)[..] {
            [job] if job["status"] == "CLOSED" => Ok(job.clone()),
            jobs => Err(format!("{jobs:?}\n{}", gw.log_text())),
        },
    )
}

/// The synthetic patient data in testdata/ and in `ct_dataset`: none of it may ever reach a log.
pub const PATIENT_DATA: [&str; 4] = ["SYNTHETIC^PATIENT", "SYNTH-0001", "19700101", "RAW^SCU"];

pub fn assert_no_patient_data(log: &str) {
    assert!(!log.is_empty());
    for needle in PATIENT_DATA {
        let at = log.find(needle);
        assert!(
            at.is_none(),
            "log contains patient data '{needle}': …{}…",
            &log[at.unwrap().saturating_sub(200)..(at.unwrap() + 100).min(log.len())]
        );
    }
}

/// A TCP proxy to `target` that a test can take down (connections refused, open ones cut) and bring
/// back, to inject a network failure between the gateway and an AWS service.
pub struct FaultProxy {
    pub port: u16,
    target: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    pub fn start(target: &str) -> FaultProxy {
        let mut p = FaultProxy {
            port: free_port(),
            target: target.to_string(),
            stop: Default::default(),
            accept: None,
            conns: Default::default(),
        };
        p.up();
        p
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        use std::sync::atomic::Ordering;
        let listener = eventually(
            "the proxy's port to be free again",
            Duration::from_secs(10),
            || TcpListener::bind(("127.0.0.1", self.port)),
        );
        listener.set_nonblocking(true).unwrap();
        self.stop = Default::default();
        let (stop, target, conns) = (self.stop.clone(), self.target.clone(), self.conns.clone());
        self.accept = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        conns
                            .lock()
                            .unwrap()
                            .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    /// New connections are refused and open ones are cut.
    pub fn down(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.down();
    }
}

/// Writes `n` small CT instances (distinct SOP Instance UIDs under `root`) into `dir`; returns their
/// paths in order. File `ctNNNNN.dcm` holds SOP Instance UID `{root}.{NNNNN + 1}`.
pub fn write_corpus(dir: &Path, root: &str, n: usize, pixel_bytes: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let sop = format!("{root}.{}", i + 1);
            let meta = dicom_gateway::part10::FileMeta {
                sop_class_uid: CT,
                sop_instance_uid: &sop,
                transfer_syntax_uid: EXPLICIT_LE,
                source_ae_title: "TEST",
            };
            let mut bytes = meta.encode().unwrap();
            bytes.extend(ct_dataset(&sop, root, &format!("{root}.0"), pixel_bytes));
            let path = dir.join(format!("ct{i:05}.dcm"));
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect()
}

/// The SOP Instance UID of corpus file `file_name` (`ctNNNNN.dcm`) written by [`write_corpus`].
pub fn corpus_sop(root: &str, file_name: &str) -> String {
    let n: usize = file_name
        .trim_start_matches("ct")
        .trim_end_matches(".dcm")
        .parse()
        .unwrap_or_else(|_| panic!("{file_name} is not a corpus file"));
    format!("{root}.{}", n + 1)
}

/// The SOP Instance UIDs of the corpus files (under `root`) that storescu's log shows acknowledged
/// with Success, in order.
pub fn acknowledged(log: &Path, root: &str) -> Vec<String> {
    storescu_outcomes(log)
        .iter()
        .filter(|(_, r)| r.as_deref() == Some("Success"))
        .map(|(f, _)| corpus_sop(root, f))
        .collect()
}

/// storescu on `files` in the background, proposing explicit VR little endian; its log (DCMTK logs
/// to stderr) goes to `log`.
pub fn storescu_background(port: u16, files: &[PathBuf], log: &Path) -> std::process::Child {
    Command::new("storescu")
        .args(storescu_args(port, "-xe"))
        .args(files)
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("storescu runs (is DCMTK installed? scripts/test.sh installs it): {e}")
        })
}

/// From a storescu -v log: (file name, response) for each file sent, in order; response is e.g.
/// "Success" or "Refused: OutOfResources", or None if no response came.
pub fn storescu_outcomes(log: &Path) -> Vec<(String, Option<String>)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("I: Sending file: ") {
            out.push((
                Path::new(f)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                None,
            ));
        } else if let Some(rest) = line.split("Received Store Response (").nth(1)
            && let Some(last) = out.last_mut()
        {
            last.1 = Some(rest.trim_end_matches(')').to_string());
        }
    }
    out
}

/// Waits until storescu's log shows `n` Success responses.
pub fn wait_for_successes(log: &Path, n: usize) {
    eventually(
        &format!("{n} Success responses in storescu's log"),
        Duration::from_secs(60),
        || {
            let outcomes = storescu_outcomes(log);
            let ok = outcomes
                .iter()
                .filter(|(_, r)| r.as_deref() == Some("Success"))
                .count();
            if ok >= n {
                Ok(())
            } else {
                Err(format!("{ok} so far"))
            }
        },
    )
}

/// A plain HTTP/1.1 GET; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

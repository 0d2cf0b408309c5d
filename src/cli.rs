//! The command line: `dicom-gateway serve | jobs | instances | echo` and their options.
//!
//! Every option can also come from an environment variable, `DICOM_GATEWAY_` + the option name in
//! upper snake case, so the same names work on a command line, in a container and in a template.
//! This is the only module that knows the options: [`ServeArgs::into_config`] checks them once,
//! before anything starts, with messages that name the option at fault, and turns them into the
//! typed [`ServeConfig`] the server runs on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use thiserror::Error;

use crate::association::{AcceptancePolicy, AeBinding, Timeouts};
use crate::batch::{
    BatchLimits, DuplicatePolicy, HEALTHIMAGING_MAX_JOB_BYTES, HEALTHIMAGING_MAX_NESTED_FOLDERS,
};
use crate::commitment::{CommitWhen, CommitmentSettings};
use crate::config::{
    ImportConfig, IndexConfig, JobStoreConfig, LogConfig, LogFormat, RecoveryConfig, ServeConfig,
    SpoolConfig, StoreConfig, TlsConfig, validate_ae_title,
};
use crate::import::ImportSettings;
use crate::jobs::JobStatus;
use crate::jobs::local::LocalJournal;
use crate::policy::{SyntaxPolicy, transfer_syntax_preset};
use crate::store::s3::{MAX_PART_SIZE, MIN_PART_SIZE};
use crate::store::spool::{DEFAULT_FREE_PERCENT, SpoolCapacity};
use crate::tls::{Pem, TlsFiles};
use crate::uid::{UidError, validate_uid};

/// `dicom-gateway` and its subcommands, as given on the command line.
#[derive(Debug, Parser)]
#[command(
    name = "dicom-gateway",
    version,
    about = "DICOM Store SCP that lands every instance durably in Amazon S3 (or a local directory) before acknowledging it",
    long_about = "DICOM Store SCP that lands every instance durably in Amazon S3 (or a local directory) \
before acknowledging it, and groups what it stored into AWS HealthImaging import batches.\n\n\
Quick start (local store in ./dicom-store, no cloud needed):\n  dicom-gateway serve\n  \
echoscu -aec DICOM_GATEWAY localhost 11112\n  storescu -aec DICOM_GATEWAY +sd +r localhost 11112 some/dir\n\n\
Every option can also be set through an environment variable DICOM_GATEWAY_<OPTION> \
(for example DICOM_GATEWAY_AE_TITLE); see `dicom-gateway serve --help`."
)]
/// The command line: a subcommand and its options.
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the Store SCP: accept associations, store instances, close batches, start imports.
    Serve(Box<ServeArgs>),
    /// Inspect import jobs (one per batch): where a study is, and whether it reached HealthImaging.
    Jobs(JobsArgs),
    /// Trace one instance: where it is stored, which job, when and from which AE it arrived.
    Instances(InstancesArgs),
    /// Send a C-ECHO to a DICOM peer (this gateway or any SCP); exit 0 on Success. Used by the
    /// container health check.
    Echo(EchoArgs),
    /// Inspect the edge-mode spool (--spool-dir): what waits for upload, what is quarantined.
    Spool(SpoolArgs),
}

/// Why the options cannot make a configuration: names the option at fault and what it accepts.
/// Reported as a usage error (exit status 2).
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum ConfigError {
    /// One option's value is outside what it accepts.
    #[error("{option} {problem}")]
    Invalid {
        option: &'static str,
        problem: String,
    },
    /// A UID in a list option is not a UID.
    #[error("{option}: '{uid}': {reason}")]
    Uid {
        option: &'static str,
        uid: String,
        reason: UidError,
    },
    /// Options that only work together were not given together.
    #[error("{0}")]
    Combination(&'static str),
    /// The import state machine was given without what its executions need.
    #[error(
        "--state-machine-arn also needs {} (the infra/ stack's outputs give them)",
        .missing.join(", ")
    )]
    ImportNeeds { missing: Vec<&'static str> },
    /// The log filter is not valid `EnvFilter` syntax.
    #[error("--log-level: {0}")]
    LogFilter(String),
}

impl ConfigError {
    fn invalid(option: &'static str, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            option,
            problem: problem.into(),
        }
    }
}

// ---- echo -------------------------------------------------------------------------------------

/// `dicom-gateway echo`: the peer to ask and the AE titles to use.
#[derive(Debug, Clone, Args)]
pub(crate) struct EchoArgs {
    /// The peer, as host:port (e.g. 127.0.0.1:11112 or gateway.example.org:11112).
    pub peer: String,

    /// Our (calling) AE title.
    #[arg(long, default_value = "DICOMGW_ECHO")]
    pub ae_title: String,

    /// The peer's (called) AE title. Defaults to this gateway's configured AE title.
    #[arg(long, env = "DICOM_GATEWAY_AE_TITLE", default_value = "DICOM_GATEWAY")]
    pub called_ae: String,

    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl EchoArgs {
    /// Checks both AE titles.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        validate_ae_title(&self.ae_title).map_err(|e| ConfigError::invalid("--ae-title", e))?;
        validate_ae_title(&self.called_ae).map_err(|e| ConfigError::invalid("--called-ae", e))
    }
}

// ---- jobs -------------------------------------------------------------------------------------

/// `--store-dir`, shared by `serve` (the local store) and `jobs` (whose journal is in it).
#[derive(Debug, Clone, Args)]
pub(crate) struct StoreDirArg {
    /// Local directory store, used when no --s3-bucket is given. Its jobs/ subdirectory is the job
    /// journal when no --job-table is given.
    #[arg(
        long,
        env = "DICOM_GATEWAY_STORE_DIR",
        default_value = "./dicom-store",
        global = true
    )]
    pub store_dir: PathBuf,
}

/// `--job-table`, shared by `serve` and `jobs`.
#[derive(Debug, Clone, Args)]
pub(crate) struct JobTableArg {
    /// DynamoDB table for import job records. Without it, jobs are recorded in --store-dir/jobs/.
    #[arg(long, env = "DICOM_GATEWAY_JOB_TABLE", global = true)]
    pub job_table: Option<String>,
}

/// `--instance-table`, shared by `serve`, `jobs` and `instances`.
#[derive(Debug, Clone, Args)]
pub(crate) struct InstanceTableArg {
    /// DynamoDB table of the instance index (one item per stored object), required with
    /// --job-table (the infra/ stack's output InstanceTableName). Without --job-table the index
    /// is kept in --store-dir/index/.
    #[arg(long, env = "DICOM_GATEWAY_INSTANCE_TABLE", global = true)]
    pub instance_table: Option<String>,
}

/// Where the job records are: the same options (and environment variables) as `serve`.
#[derive(Debug, Clone, Args)]
pub(crate) struct JobStoreArgs {
    #[command(flatten)]
    pub job_table: JobTableArg,
    #[command(flatten)]
    pub instance_table: InstanceTableArg,
    #[command(flatten)]
    pub store_dir: StoreDirArg,
}

impl JobStoreArgs {
    /// The job store these options name.
    pub(crate) fn into_config(self) -> JobStoreConfig {
        job_store_config(self.job_table, &self.store_dir)
    }

    /// The instance index that `serve` keeps with the same options.
    pub(crate) fn index_config(&self) -> Result<IndexConfig, ConfigError> {
        index_config(&self.job_table, &self.instance_table, &self.store_dir)
    }
}

/// The instance index beside the job store: a DynamoDB table with `--job-table` (then
/// `--instance-table` is required), else the journal in the store directory.
fn index_config(
    job_table: &JobTableArg,
    instance_table: &InstanceTableArg,
    store_dir: &StoreDirArg,
) -> Result<IndexConfig, ConfigError> {
    match (&job_table.job_table, &instance_table.instance_table) {
        (Some(_), Some(table)) => Ok(IndexConfig::DynamoDb {
            table: table.clone(),
        }),
        (None, None) => Ok(IndexConfig::Local {
            store_root: store_dir.store_dir.clone(),
        }),
        (Some(_), None) => Err(ConfigError::Combination(
            "--job-table also needs --instance-table, the DynamoDB table of the instance index (the infra/ stack's output InstanceTableName; environment DICOM_GATEWAY_INSTANCE_TABLE)",
        )),
        (None, Some(_)) => Err(ConfigError::Combination(
            "--instance-table goes with --job-table; without --job-table the instance index is kept in --store-dir/index/",
        )),
    }
}

/// DynamoDB with a table, else the journal in the store directory.
fn job_store_config(table: JobTableArg, store_dir: &StoreDirArg) -> JobStoreConfig {
    match table.job_table {
        Some(table) => JobStoreConfig::DynamoDb { table },
        None => JobStoreConfig::LocalJournal {
            dir: store_dir.store_dir.join(LocalJournal::DIR_NAME),
        },
    }
}

/// `dicom-gateway jobs`: the job store and what to show from it.
#[derive(Debug, Clone, Args)]
pub(crate) struct JobsArgs {
    #[command(flatten)]
    pub store: JobStoreArgs,

    #[command(subcommand)]
    pub command: JobsCommand,
}

/// `jobs list` or `jobs show`.
#[derive(Debug, Clone, Subcommand)]
pub(crate) enum JobsCommand {
    /// Recent jobs, newest first, with status and counts.
    List {
        /// How many jobs to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only jobs in this status (any case).
        #[arg(long, value_enum, ignore_case = true)]
        status: Option<JobStatus>,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every attribute of one job.
    Show {
        /// The job id (the batch's ULID, also the folder name under the import prefix).
        job_id: String,
        /// Print JSON instead of aligned lines.
        #[arg(long)]
        json: bool,
        /// Also list the job's instances HealthImaging refused, with its exception type and
        /// message, from the instance index (in JSON: `failedInstances`).
        #[arg(long)]
        failed: bool,
    },
}

/// `dicom-gateway instances`: the same store options as `jobs`, and what to show.
#[derive(Debug, Clone, Args)]
pub(crate) struct InstancesArgs {
    #[command(flatten)]
    pub store: JobStoreArgs,

    #[command(subcommand)]
    pub command: InstancesCommand,
}

/// `instances show`.
#[derive(Debug, Clone, Subcommand)]
pub(crate) enum InstancesCommand {
    /// Where one instance is (object key), which job, when and from which AE it arrived, and its
    /// outcome, from the instance index (--instance-table with --job-table, else --store-dir/index/).
    Show {
        /// The SOP Instance UID (0008,0018).
        sop_instance_uid: String,
        /// Print JSON (one array, a record per stored copy) instead of aligned lines.
        #[arg(long)]
        json: bool,
    },
}

// ---- spool ------------------------------------------------------------------------------------

/// `--spool-dir`, shared by `serve` (edge mode) and `spool status`.
#[derive(Debug, Clone, Args)]
pub(crate) struct SpoolDirArg {
    /// Edge mode (with --s3-bucket): acknowledge each instance once it is durable in this local
    /// directory, and upload it to S3 in the background. Without it, instances are acknowledged
    /// once S3 confirmed them (direct mode).
    #[arg(long, env = "DICOM_GATEWAY_SPOOL_DIR", global = true)]
    pub spool_dir: Option<PathBuf>,
}

/// `dicom-gateway spool`: the spool directory and what to show of it.
#[derive(Debug, Clone, Args)]
pub(crate) struct SpoolArgs {
    #[command(flatten)]
    pub spool_dir: SpoolDirArg,

    #[command(subcommand)]
    pub command: SpoolCommand,
}

/// `spool status`.
#[derive(Debug, Clone, Subcommand)]
pub(crate) enum SpoolCommand {
    /// Files and bytes waiting for upload, the oldest one's age, quarantined files and the file
    /// system's free space; reads the directory, no running gateway needed.
    Status {
        /// Print JSON instead of aligned lines.
        #[arg(long)]
        json: bool,
    },
}

// ---- serve ------------------------------------------------------------------------------------

/// `dicom-gateway serve`, one flattened struct per `--help` section.
#[derive(Debug, Clone, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub import: ImportArgs,
    #[command(flatten)]
    pub batches: BatchArgs,
    #[command(flatten)]
    pub operations: OperationsArgs,
    #[command(flatten)]
    pub recovery: RecoveryArgs,
    #[command(flatten)]
    pub commitment: CommitmentArgs,
}

/// Storage Commitment (Push Model SCP).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage Commitment")]
pub(crate) struct CommitmentArgs {
    /// When an instance is committed: stored (durable in the store and in the instance index) or
    /// imported (HealthImaging reported it imported; needs --s3-bucket, where import results are).
    #[arg(
        long,
        env = "DICOM_GATEWAY_COMMIT_WHEN",
        value_enum,
        default_value = "stored"
    )]
    pub commit_when: CommitWhen,

    /// Where a modality takes Storage Commitment reports when its requesting association is gone,
    /// as AE=host:port (e.g. CT1=10.0.0.5:104); repeat the option or separate with commas. A
    /// request from an AE title not listed is refused (0x0124).
    #[arg(long, env = "DICOM_GATEWAY_COMMITMENT_PEER", value_delimiter = ',')]
    pub commitment_peer: Vec<String>,

    /// After this long, instances still undecided are reported failed (0x0110). The default
    /// covers the longest import --import-max-polls allows (12 hours at the defaults) twice over.
    #[arg(long, env = "DICOM_GATEWAY_COMMITMENT_TIMEOUT", default_value = "24h", value_parser = humantime::parse_duration)]
    pub commitment_timeout: Duration,

    /// How long after a request an instance missing from the instance index may still be on its
    /// way into it (the index is written after the C-STORE response). Hidden: shorter only for tests.
    #[arg(long, env = "DICOM_GATEWAY_COMMITMENT_INDEX_GRACE", default_value = "10s", value_parser = humantime::parse_duration, hide = true)]
    pub commitment_index_grace: Duration,
}

impl CommitmentArgs {
    /// The settings; `outcome_interval` is how often import outcomes are read (`None`: they are
    /// not, without an S3 store).
    fn into_settings(
        self,
        outcome_interval: Option<Duration>,
    ) -> Result<CommitmentSettings, ConfigError> {
        let mut peers = std::collections::HashMap::new();
        for pair in &self.commitment_peer {
            let (ae, address) = parse_commitment_peer(pair)?;
            if peers.insert(ae.clone(), address).is_some() {
                return Err(ConfigError::invalid(
                    "--commitment-peer",
                    format!("names {ae} twice"),
                ));
            }
        }
        if self.commit_when == CommitWhen::Imported && outcome_interval.is_none() {
            return Err(ConfigError::Combination(
                "--commit-when imported needs --s3-bucket: import outcomes are read from S3, so without it no instance is ever reported imported",
            ));
        }
        Ok(CommitmentSettings {
            commit_when: self.commit_when,
            peers,
            timeout: nonzero("--commitment-timeout", self.commitment_timeout)?,
            index_grace: self.commitment_index_grace,
            // Outcomes change at most once per outcome reading; a store that did not answer is
            // asked again within 10 s.
            check_interval: outcome_interval
                .unwrap_or(Duration::from_secs(10))
                .clamp(Duration::from_secs(1), Duration::from_secs(60)),
        })
    }
}

/// One `--commitment-peer` entry, AE=host:port, checked.
fn parse_commitment_peer(pair: &str) -> Result<(String, String), ConfigError> {
    let invalid = |problem: String| ConfigError::invalid("--commitment-peer", problem);
    let (ae, address) = pair
        .split_once('=')
        .ok_or_else(|| invalid(format!("'{pair}' is not AE=host:port")))?;
    validate_ae_title(ae).map_err(invalid)?;
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("'{address}' is not host:port")))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(invalid(format!("'{address}' is not host:port")));
    }
    Ok((ae.trim().to_string(), address.to_string()))
}

/// Recovery of the jobs that stopped gateways left behind.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Recovery (of jobs left behind by stopped gateways)")]
pub(crate) struct RecoveryArgs {
    /// How often recovery looks for jobs a stopped gateway left OPEN or CLOSED (at start-up, then
    /// about this often, jittered), so the remaining gateways of a fleet finish them.
    #[arg(long, env = "DICOM_GATEWAY_RECOVERY_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub recovery_interval: Duration,

    /// Another gateway's batch OPEN for this long counts as orphaned, and recovery closes and
    /// imports it. At least twice --batch-max-age (a live gateway closes its batches at that age).
    #[arg(long, env = "DICOM_GATEWAY_ORPHAN_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub orphan_age: Duration,
}

impl RecoveryArgs {
    fn into_config(self, batch_max_age: Duration) -> Result<RecoveryConfig, ConfigError> {
        let interval = nonzero("--recovery-interval", self.recovery_interval)?;
        if self.orphan_age < batch_max_age.saturating_mul(2) {
            return Err(ConfigError::invalid(
                "--orphan-age",
                format!(
                    "must be at least twice --batch-max-age ({}): a live gateway's batch must never be taken over",
                    humantime::format_duration(batch_max_age)
                ),
            ));
        }
        Ok(RecoveryConfig {
            interval,
            orphan_age: self.orphan_age,
        })
    }
}

/// Listening, association acceptance and association timeouts.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Network")]
pub(crate) struct NetworkArgs {
    /// Address and port to listen on for DICOM associations.
    #[arg(long, env = "DICOM_GATEWAY_LISTEN", default_value = "0.0.0.0:11112")]
    pub listen: SocketAddr,

    /// Our AE title: senders must call it (1-16 characters), unless --accept-any-called-ae.
    #[arg(long, env = "DICOM_GATEWAY_AE_TITLE", default_value = "DICOM_GATEWAY")]
    pub ae_title: String,

    /// Accept associations whatever called AE title they use.
    #[arg(long, env = "DICOM_GATEWAY_ACCEPT_ANY_CALLED_AE")]
    pub accept_any_called_ae: bool,

    /// Calling AE titles allowed to associate, comma-separated. Empty: any calling AE title.
    #[arg(long, env = "DICOM_GATEWAY_CALLING_AE_ALLOW", value_delimiter = ',')]
    pub calling_ae_allow: Vec<String>,

    /// Peer networks allowed to connect, comma-separated CIDRs (e.g. 10.0.0.0/8,192.168.1.20/32).
    /// Empty: any address. Others are rejected before negotiation.
    #[arg(long, env = "DICOM_GATEWAY_PEER_ALLOW", value_delimiter = ',')]
    pub peer_allow: Vec<IpNet>,

    /// SOP class UIDs accepted, comma-separated. Default: every storage SOP class in the DICOM
    /// standard, plus Verification (C-ECHO).
    #[arg(long, env = "DICOM_GATEWAY_SOP_CLASS_ALLOW", value_delimiter = ',')]
    pub sop_class_allow: Vec<String>,

    /// Transfer syntax UIDs accepted, comma-separated. Default: every transfer syntax the standard
    /// defines, compressed ones included (data is stored as received, never transcoded).
    /// `healthimaging` stands for the syntaxes AWS HealthImaging imports; a sender proposing only
    /// others gets transfer-syntaxes-not-supported and can fall back.
    #[arg(
        long,
        env = "DICOM_GATEWAY_TRANSFER_SYNTAX_ALLOW",
        value_delimiter = ','
    )]
    pub transfer_syntax_allow: Vec<String>,

    /// Most associations served at once; more are rejected (transient, local limit exceeded).
    #[arg(long, env = "DICOM_GATEWAY_MAX_ASSOCIATIONS", default_value_t = 32)]
    pub max_associations: usize,

    /// Most connections waiting for their A-ASSOCIATE-RQ at once (load balancer health checks, port
    /// scans, idle sockets, senders mid-handshake). They take no association slot; over this bound
    /// the oldest is closed. Each holds about 80 KiB of buffers while it waits.
    #[arg(
        long,
        env = "DICOM_GATEWAY_MAX_PENDING_CONNECTIONS",
        default_value_t = 256
    )]
    pub max_pending_connections: usize,

    /// Every connection starts with a PROXY protocol v2 header, as an AWS Network Load Balancer
    /// sends with proxy_protocol_v2.enabled on its target group: the client address it names is
    /// used for --peer-allow and in the log, and a connection without a valid header is closed.
    /// Turn on only behind such a load balancer (on both DICOM ports).
    #[arg(long, env = "DICOM_GATEWAY_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// Maximum P-DATA PDU length we accept, in bytes (4096 to 16777216).
    #[arg(long, env = "DICOM_GATEWAY_MAX_PDU", default_value_t = 131072)]
    pub max_pdu: u32,

    /// Time allowed from connection to a complete A-ASSOCIATE-RQ, PROXY protocol header and TLS
    /// handshake included. Senders send their request right after connecting; a connection still
    /// without one after this long is closed.
    #[arg(long, env = "DICOM_GATEWAY_ASSOCIATION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub association_timeout: Duration,

    /// An association that sends nothing for this long is aborted.
    #[arg(long, env = "DICOM_GATEWAY_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Longest a single network write (e.g. a response) may take.
    #[arg(long, env = "DICOM_GATEWAY_IO_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub io_timeout: Duration,
}

/// The DICOM TLS listener.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "TLS")]
pub(crate) struct TlsArgs {
    /// Address and port of the DICOM TLS listener (2762 is the DICOM TLS port). Used when
    /// --tls-cert is given, beside the plain listener (or instead of it, with --tls-only).
    #[arg(long, env = "DICOM_GATEWAY_TLS_LISTEN", default_value = "0.0.0.0:2762")]
    pub tls_listen: SocketAddr,

    /// Server certificate chain (PEM). Turns the TLS listener on. Reloaded on SIGHUP.
    #[arg(long, env = "DICOM_GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of the server certificate (PEM).
    #[arg(long, env = "DICOM_GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA bundle (PEM) that client certificates must chain to: turns on mutual TLS.
    #[arg(long, env = "DICOM_GATEWAY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// The certificate chain as PEM text instead of a file (how ECS passes a Secrets Manager
    /// secret). Environment only: DICOM_GATEWAY_TLS_CERT_PEM. Not reloaded on SIGHUP.
    #[arg(
        long,
        env = "DICOM_GATEWAY_TLS_CERT_PEM",
        hide = true,
        conflicts_with = "tls_cert"
    )]
    pub tls_cert_pem: Option<String>,

    /// The private key as PEM text (DICOM_GATEWAY_TLS_KEY_PEM), instead of --tls-key.
    #[arg(
        long,
        env = "DICOM_GATEWAY_TLS_KEY_PEM",
        hide = true,
        conflicts_with = "tls_key"
    )]
    pub tls_key_pem: Option<String>,

    /// The client CA bundle as PEM text (DICOM_GATEWAY_TLS_CLIENT_CA_PEM), instead of --tls-client-ca.
    #[arg(
        long,
        env = "DICOM_GATEWAY_TLS_CLIENT_CA_PEM",
        hide = true,
        conflicts_with = "tls_client_ca"
    )]
    pub tls_client_ca_pem: Option<String>,

    /// Bind calling AE titles to client certificate subjects, comma-separated AE=CN pairs
    /// (e.g. CT1=ct1.hospital.example): that AE title is accepted only from that certificate.
    #[arg(long, env = "DICOM_GATEWAY_TLS_AE_BINDING", value_delimiter = ',')]
    pub tls_ae_binding: Vec<String>,

    /// Serve DICOM on the TLS listener only (no plain listener).
    #[arg(long, env = "DICOM_GATEWAY_TLS_ONLY")]
    pub tls_only: bool,
}

/// Where instances are stored.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage")]
pub(crate) struct StorageArgs {
    #[command(flatten)]
    pub store_dir: StoreDirArg,

    /// S3 bucket to store instances in. When set, S3 is used instead of --store-dir. Region,
    /// credentials and endpoint come from the standard AWS configuration (AWS_REGION,
    /// AWS_ENDPOINT_URL, ...).
    #[arg(long, env = "DICOM_GATEWAY_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Key prefix for stored instances; objects go to {prefix}{jobId}/{study}/{series}/{sop}.dcm.
    #[arg(long, env = "DICOM_GATEWAY_S3_PREFIX", default_value = "import/")]
    pub s3_prefix: String,

    /// Use path-style S3 addressing (needed for LocalStack and some S3-compatible stores).
    #[arg(long, env = "DICOM_GATEWAY_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: bool,

    /// Objects up to this size are sent with one PutObject; larger ones with multipart upload in
    /// parts of this size (e.g. 8MiB; 5MiB to 5GiB).
    #[arg(long, env = "DICOM_GATEWAY_PART_SIZE", default_value = "8MiB", value_parser = parse_bytes)]
    pub part_size: u64,

    /// Multipart parts uploaded concurrently per instance (memory per instance ~ part size x (this + 1)).
    #[arg(long, env = "DICOM_GATEWAY_PARTS_IN_FLIGHT", default_value_t = 4)]
    pub parts_in_flight: usize,

    #[command(flatten)]
    pub spool_dir: SpoolDirArg,

    /// Edge mode: most bytes the spool may hold (e.g. 200GB); when full, new instances get 0xA700
    /// ("spool full") until uploads make room. Default: whatever leaves 10% of the spool's file
    /// system free.
    #[arg(long, env = "DICOM_GATEWAY_SPOOL_MAX_BYTES", value_parser = parse_bytes)]
    pub spool_max_bytes: Option<u64>,

    /// Edge mode: objects uploaded from the spool to S3 at once (memory: up to this x part size x
    /// (--parts-in-flight + 1) for large instances).
    #[arg(
        long,
        env = "DICOM_GATEWAY_SPOOL_UPLOAD_CONCURRENCY",
        default_value_t = 8
    )]
    pub spool_upload_concurrency: usize,
}

/// Job records and the HealthImaging import.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Import (HealthImaging)")]
pub(crate) struct ImportArgs {
    #[command(flatten)]
    pub job_table: JobTableArg,

    #[command(flatten)]
    pub instance_table: InstanceTableArg,

    /// Step Functions state machine that runs the import (from the infra/ stack). Without it,
    /// closed batches stay CLOSED. Needs --s3-bucket, --job-table, --datastore-id and --data-access-role-arn.
    #[arg(long, env = "DICOM_GATEWAY_STATE_MACHINE_ARN")]
    pub state_machine_arn: Option<String>,

    /// HealthImaging data store to import into.
    #[arg(long, env = "DICOM_GATEWAY_DATASTORE_ID")]
    pub datastore_id: Option<String>,

    /// IAM role HealthImaging assumes to read the import prefix and write the results prefix.
    #[arg(long, env = "DICOM_GATEWAY_DATA_ACCESS_ROLE_ARN")]
    pub data_access_role_arn: Option<String>,

    /// Key prefix (in --s3-bucket) for HealthImaging's import results: {prefix}{jobId}/.
    #[arg(long, env = "DICOM_GATEWAY_RESULTS_PREFIX", default_value = "results/")]
    pub results_prefix: String,

    /// How often the state machine polls a running import job, and the gateway looks for IMPORTED jobs.
    #[arg(long, env = "DICOM_GATEWAY_IMPORT_POLL_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub import_poll_interval: Duration,

    /// Polls after which a still-running import is recorded FAILED (default: 12 hours at 60 s; at
    /// most 1000, which keeps an execution below Step Functions' 25,000 history events).
    #[arg(long, env = "DICOM_GATEWAY_IMPORT_MAX_POLLS", default_value_t = 720)]
    pub import_max_polls: u32,

    /// Name of this gateway in job records (recovery resubmits this gateway's jobs at once); each
    /// gateway of a fleet needs its own. Default: on ECS the task id (from the task metadata
    /// endpoint), elsewhere the host name.
    #[arg(long, env = "DICOM_GATEWAY_GATEWAY_ID")]
    pub gateway_id: Option<String>,
}

/// When a batch closes, and what a repeated instance does to it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Batches (one HealthImaging import job each)")]
pub(crate) struct BatchArgs {
    /// A batch closes after this long without a new instance.
    #[arg(long, env = "DICOM_GATEWAY_BATCH_IDLE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub batch_idle: Duration,

    /// A batch closes at this age.
    #[arg(long, env = "DICOM_GATEWAY_BATCH_MAX_AGE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub batch_max_age: Duration,

    /// A batch closes at this many instances (HealthImaging allows 5000 files per import job).
    #[arg(
        long,
        env = "DICOM_GATEWAY_BATCH_MAX_INSTANCES",
        default_value_t = 5000
    )]
    pub batch_max_instances: u32,

    /// A batch closes to new instances once its stored bytes plus the bytes received so far by
    /// instances in flight reach this (e.g. 9GB). Those instances go on into it, up to
    /// --job-max-bytes: the difference is their headroom.
    #[arg(long, env = "DICOM_GATEWAY_BATCH_MAX_BYTES", default_value = "9GB", value_parser = parse_bytes)]
    pub batch_max_bytes: u64,

    /// A batch never holds more than this (HealthImaging: 10 GB of files per import job). An
    /// instance whose bytes would take its batch past it is refused with 0xA700 while it streams;
    /// sent again, it goes into the next batch.
    #[arg(long, env = "DICOM_GATEWAY_JOB_MAX_BYTES", default_value = "10GB", value_parser = parse_bytes)]
    pub job_max_bytes: u64,

    /// Largest instance accepted, as stored (meta group included). A larger one is refused with
    /// 0xA700 as soon as it grows past this, and its upload is aborted. Default: HealthImaging's
    /// 4 GB per DICOM P10 file in an import job.
    #[arg(long, env = "DICOM_GATEWAY_MAX_INSTANCE_SIZE", default_value = "4GB", value_parser = parse_bytes)]
    pub max_instance_size: u64,

    /// A SOP Instance UID received twice within a batch is stored once: overwrite (the new copy
    /// replaces the earlier one), keep-first (Success, the new copy is dropped) or reject (0x0111).
    #[arg(
        long,
        env = "DICOM_GATEWAY_DUPLICATE_POLICY",
        value_enum,
        default_value = "overwrite"
    )]
    pub duplicate_policy: DuplicatePolicy,
}

/// Shutdown, health endpoints and logging.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Operations")]
pub(crate) struct OperationsArgs {
    /// On SIGTERM/SIGINT, time given to running associations before they are aborted.
    #[arg(long, env = "DICOM_GATEWAY_SHUTDOWN_DEADLINE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_deadline: Duration,

    /// Address for the HTTP health and metrics endpoints (/healthz, /readyz, /metrics), e.g.
    /// 0.0.0.0:9090. Off unless given (the container image turns it on).
    #[arg(long, env = "DICOM_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format.
    #[arg(
        long,
        env = "DICOM_GATEWAY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. info or dicom_gateway=debug). RUST_LOG also works.
    #[arg(long, env = "DICOM_GATEWAY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// With --log-format json: how often CloudWatch embedded metric format records are written
    /// (default 60s, CloudWatch's standard resolution). Hidden: shorter only for tests.
    #[arg(long, env = "DICOM_GATEWAY_EMF_INTERVAL", default_value = crate::emf::DEFAULT_INTERVAL, value_parser = humantime::parse_duration, hide = true)]
    pub emf_interval: Duration,
}

/// Parses a byte size: a plain number, or a number with B, KB, MB, GB (powers of 1000) or
/// KiB, MiB, GiB (powers of 1024).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 8MiB, 9GB, 1048576)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit '{other}' (use B, KB, MB, GB, KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

impl ServeArgs {
    /// Checks every option and turns them into the configuration `serve` runs on. The error names
    /// the option and says what is allowed.
    pub(crate) fn into_config(self) -> Result<ServeConfig, ConfigError> {
        let ServeArgs {
            network,
            tls,
            storage,
            import,
            batches,
            operations,
            recovery,
            commitment,
        } = self;
        let tls_only = tls.tls_only;
        let (tls, ae_bindings) = tls.into_config()?;
        let acceptance = network.acceptance(ae_bindings)?;
        if network.max_associations == 0 {
            return Err(ConfigError::invalid(
                "--max-associations",
                "must be at least 1",
            ));
        }
        if network.max_pending_connections == 0 {
            return Err(ConfigError::invalid(
                "--max-pending-connections",
                "must be at least 1",
            ));
        }
        let timeouts = network.timeouts()?;
        let store = storage.store_config()?;
        let spool = storage.spool_config()?;
        let batch_limits = batches.limits()?;
        let recovery = recovery.into_config(batch_limits.max_age)?;
        let import_config = import.import_config(&storage)?;
        let index = index_config(
            &import.job_table,
            &import.instance_table,
            &storage.store_dir,
        )?;
        let job_store = job_store_config(import.job_table, &storage.store_dir);
        // The outcome reader runs with an S3 store, at the import poll interval (else at the
        // recovery interval): how often an instance's import outcome can change.
        let outcome_interval = matches!(store, StoreConfig::S3 { .. }).then(|| {
            import_config
                .as_ref()
                .map_or(recovery.interval, |i| i.settings.poll_interval)
        });
        let commitment = commitment.into_settings(outcome_interval)?;
        Ok(ServeConfig {
            listen: (!tls_only).then_some(network.listen),
            tls,
            peer_allow: network.peer_allow,
            max_associations: network.max_associations,
            max_pending_connections: network.max_pending_connections,
            proxy_protocol: network.proxy_protocol,
            acceptance,
            timeouts,
            store,
            spool,
            job_store,
            index,
            import: import_config,
            gateway_id: import.gateway_id,
            recovery,
            batch_limits,
            duplicate_policy: batches.duplicate_policy,
            commitment,
            shutdown_deadline: operations.shutdown_deadline,
            metrics_listen: operations.metrics_listen,
            emf_interval: operations.emf_interval.max(Duration::from_millis(10)),
            log: LogConfig {
                format: operations.log_format,
                filter: operations.log_level,
            },
        })
    }
}

/// Fails on a zero duration: every timeout and batch duration needs time to pass.
fn nonzero(option: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::invalid(option, "must be greater than zero"));
    }
    Ok(d)
}

/// Each UID of a list option, checked; an empty list means "no restriction" (`None`).
fn uid_allow_list(
    option: &'static str,
    uids: &[String],
) -> Result<Option<Vec<String>>, ConfigError> {
    for uid in uids {
        validate_uid(uid).map_err(|reason| ConfigError::Uid {
            option,
            uid: uid.clone(),
            reason,
        })?;
    }
    Ok((!uids.is_empty()).then(|| uids.to_vec()))
}

/// `--transfer-syntax-allow` with each preset name (e.g. `healthimaging`) replaced by its UIDs.
fn expand_transfer_syntax_presets(list: &[String]) -> Vec<String> {
    list.iter()
        .flat_map(|entry| match transfer_syntax_preset(entry) {
            Some(uids) => uids.iter().map(|u| u.to_string()).collect(),
            None => vec![entry.clone()],
        })
        .collect()
}

impl NetworkArgs {
    /// The acceptance policy; `ae_bindings` come from the TLS options.
    fn acceptance(&self, ae_bindings: Vec<AeBinding>) -> Result<AcceptancePolicy, ConfigError> {
        validate_ae_title(&self.ae_title).map_err(|e| ConfigError::invalid("--ae-title", e))?;
        for ae in &self.calling_ae_allow {
            validate_ae_title(ae).map_err(|e| ConfigError::invalid("--calling-ae-allow", e))?;
        }
        let sop_class_allow = uid_allow_list("--sop-class-allow", &self.sop_class_allow)?;
        let transfer_syntax_allow = uid_allow_list(
            "--transfer-syntax-allow",
            &expand_transfer_syntax_presets(&self.transfer_syntax_allow),
        )?;
        if !(4096..=16 * 1024 * 1024).contains(&self.max_pdu) {
            return Err(ConfigError::invalid(
                "--max-pdu",
                format!("{} is outside 4096..=16777216", self.max_pdu),
            ));
        }
        Ok(AcceptancePolicy {
            ae_title: self.ae_title.trim().to_string(),
            accept_any_called_ae: self.accept_any_called_ae,
            calling_ae_allow: self.calling_ae_allow.clone(),
            syntaxes: SyntaxPolicy::new(
                sop_class_allow.as_deref(),
                transfer_syntax_allow.as_deref(),
            ),
            max_pdu: self.max_pdu,
            ae_bindings,
        })
    }

    fn timeouts(&self) -> Result<Timeouts, ConfigError> {
        Ok(Timeouts {
            request: nonzero("--association-timeout", self.association_timeout)?,
            idle: nonzero("--idle-timeout", self.idle_timeout)?,
            io: nonzero("--io-timeout", self.io_timeout)?,
        })
    }
}

impl TlsArgs {
    /// The TLS listener, when a certificate and key are given (the other TLS options need them),
    /// and the calling AE titles bound to client certificates (`--tls-ae-binding`).
    fn into_config(self) -> Result<(Option<TlsConfig>, Vec<AeBinding>), ConfigError> {
        let pem = |file: Option<PathBuf>, text: Option<String>, from| match (file, text) {
            (Some(path), _) => Some(Pem::File(path)),
            (None, Some(text)) => Some(Pem::Inline { text, from }),
            (None, None) => None,
        };
        let client_ca = pem(
            self.tls_client_ca,
            self.tls_client_ca_pem,
            "DICOM_GATEWAY_TLS_CLIENT_CA_PEM",
        );
        let cert = pem(
            self.tls_cert,
            self.tls_cert_pem,
            "DICOM_GATEWAY_TLS_CERT_PEM",
        );
        let key = pem(self.tls_key, self.tls_key_pem, "DICOM_GATEWAY_TLS_KEY_PEM");
        let (cert, key) = match (cert, key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => {
                if client_ca.is_some() || self.tls_only || !self.tls_ae_binding.is_empty() {
                    return Err(ConfigError::Combination(
                        "--tls-client-ca, --tls-only and --tls-ae-binding need --tls-cert and --tls-key",
                    ));
                }
                return Ok((None, Vec::new()));
            }
            _ => {
                return Err(ConfigError::Combination(
                    "--tls-cert and --tls-key go together",
                ));
            }
        };
        if !self.tls_ae_binding.is_empty() && client_ca.is_none() {
            return Err(ConfigError::Combination(
                "--tls-ae-binding needs --tls-client-ca (client certificates must be verified to be trusted)",
            ));
        }
        let ae_bindings = self
            .tls_ae_binding
            .iter()
            .map(|pair| parse_ae_binding(pair))
            .collect::<Result<_, _>>()?;
        let tls = TlsConfig {
            listen: self.tls_listen,
            files: TlsFiles {
                cert,
                key,
                client_ca,
            },
        };
        Ok((Some(tls), ae_bindings))
    }
}

/// One `AE=CN` pair of `--tls-ae-binding`, as (AE title, certificate common name).
fn parse_ae_binding(pair: &str) -> Result<(String, String), ConfigError> {
    match pair.split_once('=') {
        Some((ae, cn)) if !cn.is_empty() => {
            validate_ae_title(ae).map_err(|e| ConfigError::invalid("--tls-ae-binding", e))?;
            Ok((ae.trim().to_string(), cn.to_string()))
        }
        _ => Err(ConfigError::invalid(
            "--tls-ae-binding",
            format!("'{pair}' is not AE=CN"),
        )),
    }
}

impl StorageArgs {
    /// S3 when a bucket is given, else the local directory. The S3 settings are checked either way.
    fn store_config(&self) -> Result<StoreConfig, ConfigError> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(ConfigError::invalid(
                "--part-size",
                format!("{} is outside S3's limits (5 MiB to 5 GiB)", self.part_size),
            ));
        }
        let part_size = usize::try_from(self.part_size).map_err(|_| {
            ConfigError::invalid(
                "--part-size",
                format!("{} is too large for this platform", self.part_size),
            )
        })?;
        if !(1..=64).contains(&self.parts_in_flight) {
            return Err(ConfigError::invalid(
                "--parts-in-flight",
                "must be between 1 and 64",
            ));
        }
        if let Some(bucket) = &self.s3_bucket
            && (bucket.is_empty() || bucket.contains('/'))
        {
            return Err(ConfigError::invalid(
                "--s3-bucket",
                format!(
                    "'{bucket}' is not a bucket name (give the name only, without s3:// or a path)"
                ),
            ));
        }
        if self.s3_prefix.starts_with('/') {
            return Err(ConfigError::invalid(
                "--s3-prefix",
                "must not start with '/'",
            ));
        }
        Ok(match &self.s3_bucket {
            Some(bucket) => StoreConfig::S3 {
                bucket: bucket.clone(),
                prefix: self.s3_prefix.clone(),
                force_path_style: self.s3_force_path_style,
                part_size,
                parts_in_flight: self.parts_in_flight,
            },
            None => StoreConfig::Local {
                dir: self.store_dir.store_dir.clone(),
            },
        })
    }
}

impl StorageArgs {
    /// Edge mode's spool, when `--spool-dir` is given (it needs `--s3-bucket`).
    fn spool_config(&self) -> Result<Option<SpoolConfig>, ConfigError> {
        if !(1..=256).contains(&self.spool_upload_concurrency) {
            return Err(ConfigError::invalid(
                "--spool-upload-concurrency",
                "must be between 1 and 256",
            ));
        }
        let Some(dir) = &self.spool_dir.spool_dir else {
            if self.spool_max_bytes.is_some() {
                return Err(ConfigError::Combination(
                    "--spool-max-bytes needs --spool-dir (edge mode)",
                ));
            }
            return Ok(None);
        };
        if self.s3_bucket.is_none() {
            return Err(ConfigError::Combination(
                "--spool-dir needs --s3-bucket: the spool holds instances on their way to S3 (edge mode)",
            ));
        }
        let capacity = match self.spool_max_bytes {
            Some(0) => {
                return Err(ConfigError::invalid("--spool-max-bytes", "must be above 0"));
            }
            Some(n) => SpoolCapacity::MaxBytes(n),
            None => SpoolCapacity::LeaveFree {
                percent: DEFAULT_FREE_PERCENT,
            },
        };
        Ok(Some(SpoolConfig {
            dir: dir.clone(),
            capacity,
            upload_concurrency: self.spool_upload_concurrency,
        }))
    }
}

impl BatchArgs {
    fn limits(&self) -> Result<BatchLimits, ConfigError> {
        if self.batch_max_age > Duration::from_secs(1800) {
            return Err(ConfigError::invalid(
                "--batch-max-age",
                "must be at most 30m (recovery treats batches open for --orphan-age, default 1h, as abandoned; keep it at most half of that)",
            ));
        }
        if !(1..=5000).contains(&self.batch_max_instances) {
            return Err(ConfigError::invalid(
                "--batch-max-instances",
                "must be between 1 and 5000 (HealthImaging accepts at most 5000 files per import job)",
            ));
        }
        // HealthImaging quotas: endpoints-quotas page of its developer guide, see crate::batch.
        if self.job_max_bytes == 0 || self.job_max_bytes > HEALTHIMAGING_MAX_JOB_BYTES {
            return Err(ConfigError::invalid(
                "--job-max-bytes",
                "must be above 0 and at most 10GB (HealthImaging's limit per import job)",
            ));
        }
        if self.batch_max_bytes == 0 || self.batch_max_bytes > self.job_max_bytes {
            return Err(ConfigError::invalid(
                "--batch-max-bytes",
                "must be above 0 and at most --job-max-bytes (10GB, HealthImaging's limit per import job)",
            ));
        }
        // The General Reference copy of the quotas gives 10 GB per file: the most we allow.
        if self.max_instance_size == 0 || self.max_instance_size > HEALTHIMAGING_MAX_JOB_BYTES {
            return Err(ConfigError::invalid(
                "--max-instance-size",
                "must be above 0 and at most 10GB",
            ));
        }
        Ok(BatchLimits {
            idle: nonzero("--batch-idle", self.batch_idle)?,
            max_age: nonzero("--batch-max-age", self.batch_max_age)?,
            max_instances: self.batch_max_instances,
            max_bytes: self.batch_max_bytes,
            byte_ceiling: self.job_max_bytes,
            max_instance_bytes: self.max_instance_size,
            max_folders: HEALTHIMAGING_MAX_NESTED_FOLDERS,
        })
    }
}

impl ImportArgs {
    /// The import, when a state machine is given (then everything it needs must be too). The
    /// results prefix is checked either way.
    fn import_config(&self, storage: &StorageArgs) -> Result<Option<ImportConfig>, ConfigError> {
        if self.results_prefix.starts_with('/')
            || (!self.results_prefix.is_empty() && !self.results_prefix.ends_with('/'))
        {
            return Err(ConfigError::invalid(
                "--results-prefix",
                "must end with '/' and not start with one",
            ));
        }
        if storage.s3_bucket.is_some()
            && self.results_prefix.starts_with(&storage.s3_prefix)
            && !storage.s3_prefix.is_empty()
        {
            return Err(ConfigError::invalid(
                "--results-prefix",
                "must not lie under --s3-prefix: HealthImaging reports any non-DICOM file in an import prefix as a failure",
            ));
        }
        let Some(arn) = &self.state_machine_arn else {
            return Ok(None);
        };
        if !arn.starts_with("arn:") {
            return Err(ConfigError::invalid(
                "--state-machine-arn",
                format!("'{arn}' is not an ARN"),
            ));
        }
        // Each poll adds about 15 events to the execution's history, which Step Functions caps at
        // 25,000, failing the execution outside any Catch ("Avoid reaching the history quota",
        // https://docs.aws.amazon.com/step-functions/latest/dg/bp-history-limit.html): its job
        // would stay IMPORTING.
        if !(1..=1000).contains(&self.import_max_polls) {
            return Err(ConfigError::invalid(
                "--import-max-polls",
                "must be between 1 and 1000 (Step Functions keeps at most 25,000 events of an execution; raise --import-poll-interval for longer imports)",
            ));
        }
        match (
            &storage.s3_bucket,
            &self.job_table.job_table,
            &self.datastore_id,
            &self.data_access_role_arn,
        ) {
            (Some(bucket), Some(table), Some(datastore_id), Some(role_arn)) => {
                Ok(Some(ImportConfig {
                    state_machine_arn: arn.clone(),
                    settings: ImportSettings {
                        datastore_id: datastore_id.clone(),
                        data_access_role_arn: role_arn.clone(),
                        results_bucket: bucket.clone(),
                        results_prefix: self.results_prefix.clone(),
                        table_name: table.clone(),
                        poll_interval: self.import_poll_interval,
                        max_polls: self.import_max_polls,
                    },
                }))
            }
            (bucket, table, datastore_id, role_arn) => {
                let missing = [
                    ("--s3-bucket", bucket.is_none()),
                    ("--job-table", table.is_none()),
                    ("--datastore-id", datastore_id.is_none()),
                    ("--data-access-role-arn", role_arn.is_none()),
                ]
                .into_iter()
                .filter_map(|(name, absent)| absent.then_some(name))
                .collect();
                Err(ConfigError::ImportNeeds { missing })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use dicom_dictionary_std::uids::CT_IMAGE_STORAGE;

    fn parse_args(args: &[&str]) -> Result<ServeArgs, String> {
        let mut full = vec!["dicom-gateway", "serve"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        let Command::Serve(a) = cli.command else {
            panic!("serve")
        };
        Ok(*a)
    }

    fn parse(args: &[&str]) -> Result<ServeConfig, String> {
        parse_args(args)?.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_sensible() {
        let a = parse_args(&[]).unwrap();
        assert_eq!(a.operations.shutdown_deadline, Duration::from_secs(25));
        let c = a.into_config().unwrap();
        assert_eq!(c.listen.map(|l| l.port()), Some(11112));
        assert_eq!(c.acceptance.ae_title, "DICOM_GATEWAY");
        assert_eq!(
            c.store,
            StoreConfig::Local {
                dir: PathBuf::from("./dicom-store")
            }
        );
        assert_eq!(
            c.job_store,
            JobStoreConfig::LocalJournal {
                dir: PathBuf::from("./dicom-store/jobs")
            }
        );
        assert_eq!(c.shutdown_deadline, Duration::from_secs(25));
        assert_eq!(c.batch_limits.max_instances, 5000);
        assert_eq!(c.batch_limits.max_bytes, 9_000_000_000);
        assert_eq!(c.duplicate_policy, DuplicatePolicy::Overwrite);
        assert!(c.tls.is_none());
        assert!(c.import.is_none());
        assert!(c.metrics_listen.is_none());
        assert!(c.acceptance.syntaxes.accepts_sop_class(CT_IMAGE_STORAGE));
        assert!(
            c.acceptance
                .syntaxes
                .accepts_transfer_syntax("1.2.840.10008.1.2.4.50")
        );
        assert_eq!(c.timeouts.request, Duration::from_secs(10));
        assert_eq!(
            c.log,
            LogConfig {
                format: LogFormat::Text,
                filter: "info".into()
            }
        );
        assert_eq!(c.gateway_id, None, "resolved at start-up");
        assert_eq!(c.recovery.interval, Duration::from_secs(300));
        assert_eq!(c.recovery.orphan_age, Duration::from_secs(3600));
        assert_eq!(c.commitment.commit_when, CommitWhen::Stored);
        assert_eq!(c.commitment.timeout, Duration::from_secs(24 * 3600));
        assert!(c.commitment.peers.is_empty());
        assert!(
            c.acceptance
                .syntaxes
                .accepts_sop_class(dicom_dictionary_std::uids::STORAGE_COMMITMENT_PUSH_MODEL)
        );
    }

    #[test]
    fn commitment_peers_are_checked_and_imported_needs_an_import() {
        let c = parse(&[
            "--commitment-peer",
            "CT1=10.0.0.5:104",
            "--commitment-peer",
            "MR1=mr1.hospital.example:11112,US1=[::1]:104",
            "--commitment-timeout",
            "2h",
        ])
        .unwrap();
        assert_eq!(c.commitment.peers["CT1"], "10.0.0.5:104");
        assert_eq!(c.commitment.peers["MR1"], "mr1.hospital.example:11112");
        assert_eq!(c.commitment.peers["US1"], "[::1]:104");
        assert_eq!(c.commitment.timeout, Duration::from_secs(7200));
        for (bad, says) in [
            ("CT1", "is not AE=host:port"),
            ("CT1=host", "is not host:port"),
            ("CT1=host:0", "is not host:port"),
            ("CT1=:104", "is not host:port"),
            ("SEVENTEEN_CHARS_X=h:1", "1 to 16 characters"),
        ] {
            let e = parse(&["--commitment-peer", bad]).unwrap_err();
            assert!(
                e.starts_with("--commitment-peer") && e.contains(says),
                "{bad}: {e}"
            );
        }
        let e = parse(&["--commitment-peer", "CT1=a:1,CT1=b:2"]).unwrap_err();
        assert!(e.contains("names CT1 twice"), "{e}");
        let e = parse(&["--commit-when", "imported"]).unwrap_err();
        assert!(e.contains("needs --s3-bucket"), "{e}");
        let c = parse(&["--commit-when", "imported", "--s3-bucket", "b"]).unwrap();
        assert_eq!(c.commitment.commit_when, CommitWhen::Imported);
        assert_eq!(
            c.commitment.check_interval,
            Duration::from_secs(60),
            "the outcome reader's interval (here the recovery interval, 5 min), at most a minute"
        );
        let e = parse(&["--commitment-timeout", "0s"]).unwrap_err();
        assert!(e.starts_with("--commitment-timeout"), "{e}");
    }

    #[test]
    fn lists_are_comma_separated() {
        let c = parse(&[
            "--calling-ae-allow",
            "CT1,MR1",
            "--peer-allow",
            "10.0.0.0/8,127.0.0.1/32",
            "--sop-class-allow",
            "1.2.840.10008.5.1.4.1.1.2,1.2.840.10008.1.1",
        ])
        .unwrap();
        assert_eq!(c.acceptance.calling_ae_allow, vec!["CT1", "MR1"]);
        assert_eq!(c.peer_allow.len(), 2);
        assert!(c.acceptance.syntaxes.accepts_sop_class(CT_IMAGE_STORAGE));
        assert!(
            !c.acceptance
                .syntaxes
                .accepts_sop_class("1.2.840.10008.5.1.4.1.1.4")
        );
    }

    #[test]
    fn errors_name_the_option() {
        assert!(
            parse(&["--ae-title", "THIS_TITLE_IS_WAY_TOO_LONG"])
                .unwrap_err()
                .contains("--ae-title")
        );
        assert!(
            parse(&["--sop-class-allow", "1.2.x"])
                .unwrap_err()
                .contains("--sop-class-allow")
        );
        assert!(
            parse(&["--part-size", "1MiB"])
                .unwrap_err()
                .contains("--part-size")
        );
        assert!(
            parse(&["--max-pdu", "100"])
                .unwrap_err()
                .contains("--max-pdu")
        );
        assert!(
            parse(&["--batch-max-instances", "6000"])
                .unwrap_err()
                .contains("5000")
        );
        assert!(
            parse(&["--s3-bucket", "s3://bucket/x"])
                .unwrap_err()
                .contains("--s3-bucket")
        );
        assert!(parse(&["--peer-allow", "not-a-cidr"]).is_err());
        let e = parse(&[
            "--state-machine-arn",
            "arn:aws:states:us-east-1:1:stateMachine:x",
            "--s3-bucket",
            "b",
        ])
        .unwrap_err();
        assert!(
            e.contains("--job-table")
                && e.contains("--datastore-id")
                && e.contains("--data-access-role-arn"),
            "{e}"
        );
        assert!(
            parse(&[
                "--s3-bucket",
                "b",
                "--s3-prefix",
                "data/",
                "--results-prefix",
                "data/results/"
            ])
            .unwrap_err()
            .contains("--results-prefix")
        );
    }

    #[test]
    fn pending_connections_and_the_proxy_protocol() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.max_pending_connections, 256);
        assert!(!c.proxy_protocol);
        let c = parse(&["--max-pending-connections", "8", "--proxy-protocol"]).unwrap();
        assert_eq!(c.max_pending_connections, 8);
        assert!(c.proxy_protocol);
        let e = parse(&["--max-pending-connections", "0"]).unwrap_err();
        assert_eq!(e, "--max-pending-connections must be at least 1");
    }

    #[test]
    fn messages_are_unchanged() {
        let msg = |args: &[&str]| parse(args).unwrap_err();
        assert_eq!(
            msg(&["--ae-title", "THIS_TITLE_IS_WAY_TOO_LONG"]),
            "--ae-title 'THIS_TITLE_IS_WAY_TOO_LONG' must be 1 to 16 characters"
        );
        assert_eq!(
            msg(&["--max-pdu", "100"]),
            "--max-pdu 100 is outside 4096..=16777216"
        );
        assert!(msg(&["--sop-class-allow", "1.2.x"]).starts_with("--sop-class-allow: '1.2.x': "));
        assert_eq!(
            msg(&["--idle-timeout", "0s"]),
            "--idle-timeout must be greater than zero"
        );
        assert_eq!(
            msg(&["--tls-cert", "c.pem"]),
            "--tls-cert and --tls-key go together"
        );
        assert_eq!(
            msg(&[
                "--state-machine-arn",
                "arn:aws:states:us-east-1:1:stateMachine:x",
                "--s3-bucket",
                "b",
                "--job-table",
                "t"
            ]),
            "--state-machine-arn also needs --datastore-id, --data-access-role-arn (the infra/ stack's outputs give them)"
        );
    }

    #[test]
    fn import_settings_exist_only_with_a_state_machine() {
        let common = [
            "--s3-bucket",
            "b",
            "--job-table",
            "t",
            "--instance-table",
            "i",
            "--datastore-id",
            "ds",
            "--data-access-role-arn",
            "arn:aws:iam::1:role/r",
            "--import-max-polls",
            "10",
        ];
        let c = parse(&common).unwrap();
        assert!(c.import.is_none(), "no state machine: batches stay CLOSED");
        assert_eq!(c.job_store, JobStoreConfig::DynamoDb { table: "t".into() });
        assert_eq!(c.index, IndexConfig::DynamoDb { table: "i".into() });

        let mut args = common.to_vec();
        args.extend([
            "--state-machine-arn",
            "arn:aws:states:us-east-1:1:stateMachine:x",
        ]);
        let import = parse(&args).unwrap().import.unwrap();
        assert_eq!(
            import.state_machine_arn,
            "arn:aws:states:us-east-1:1:stateMachine:x"
        );
        let s = import.settings;
        assert_eq!(s.datastore_id, "ds");
        assert_eq!(s.data_access_role_arn, "arn:aws:iam::1:role/r");
        assert_eq!(s.results_bucket, "b");
        assert_eq!(s.results_prefix, "results/");
        assert_eq!(s.table_name, "t");
        assert_eq!(s.poll_interval, Duration::from_secs(60));
        assert_eq!(s.max_polls, 10);
    }

    #[test]
    fn import_polls_stay_within_the_execution_history_quota() {
        let import = [
            "--state-machine-arn",
            "arn:aws:states:us-east-1:1:stateMachine:x",
            "--s3-bucket",
            "b",
            "--job-table",
            "t",
            "--instance-table",
            "i",
            "--datastore-id",
            "d",
            "--data-access-role-arn",
            "arn:aws:iam::1:role/r",
        ];
        let mut too_many = import.to_vec();
        too_many.extend(["--import-max-polls", "5000"]);
        let e = parse(&too_many).unwrap_err().to_string();
        assert!(
            e.contains("--import-max-polls") && e.contains("1000"),
            "{e}"
        );
        let mut fine = import.to_vec();
        fine.extend(["--import-max-polls", "1000"]);
        assert!(parse(&fine).is_ok());
    }

    #[test]
    fn s3_store_settings_are_grouped() {
        let c = parse(&[
            "--s3-bucket",
            "b",
            "--s3-prefix",
            "in/",
            "--s3-force-path-style",
            "--part-size",
            "16MiB",
            "--parts-in-flight",
            "2",
        ])
        .unwrap();
        assert_eq!(
            c.store,
            StoreConfig::S3 {
                bucket: "b".into(),
                prefix: "in/".into(),
                force_path_style: true,
                part_size: 16 << 20,
                parts_in_flight: 2,
            }
        );
    }

    #[test]
    fn edge_mode_needs_a_bucket_and_defaults_to_leaving_a_tenth_free() {
        assert!(
            parse(&[]).unwrap().spool.is_none(),
            "direct mode by default"
        );
        let c = parse(&["--s3-bucket", "b", "--spool-dir", "/var/spool/gw"]).unwrap();
        assert_eq!(
            c.spool,
            Some(SpoolConfig {
                dir: PathBuf::from("/var/spool/gw"),
                capacity: SpoolCapacity::LeaveFree { percent: 10 },
                upload_concurrency: 8,
            })
        );
        let c = parse(&[
            "--s3-bucket",
            "b",
            "--spool-dir",
            "s",
            "--spool-max-bytes",
            "200GB",
            "--spool-upload-concurrency",
            "2",
        ])
        .unwrap();
        let spool = c.spool.unwrap();
        assert_eq!(spool.capacity, SpoolCapacity::MaxBytes(200_000_000_000));
        assert_eq!(spool.upload_concurrency, 2);
        let e = parse(&["--spool-dir", "s"]).unwrap_err();
        assert!(e.contains("--spool-dir needs --s3-bucket"), "{e}");
        let e = parse(&["--spool-max-bytes", "1GB"]).unwrap_err();
        assert!(e.contains("needs --spool-dir"), "{e}");
        let e = parse(&[
            "--s3-bucket",
            "b",
            "--spool-dir",
            "s",
            "--spool-max-bytes",
            "0",
        ])
        .unwrap_err();
        assert!(e.contains("--spool-max-bytes"), "{e}");
        let e = parse(&["--spool-upload-concurrency", "0"]).unwrap_err();
        assert!(e.contains("--spool-upload-concurrency"), "{e}");
    }

    #[test]
    fn spool_status_parses() {
        let cli = Cli::try_parse_from([
            "dicom-gateway",
            "spool",
            "status",
            "--json",
            "--spool-dir",
            "/var/spool/gw",
        ])
        .unwrap();
        let Command::Spool(s) = cli.command else {
            panic!("not spool")
        };
        let SpoolCommand::Status { json } = s.command;
        assert!(json);
        assert_eq!(s.spool_dir.spool_dir, Some(PathBuf::from("/var/spool/gw")));
    }

    #[test]
    fn tls_is_parsed_once_with_its_bindings() {
        let c = parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
            "--tls-ae-binding",
            "CT1=ct1.hospital.example, MR1 =mr1",
            "--tls-only",
        ])
        .unwrap();
        assert_eq!(c.listen, None, "--tls-only: no plain listener");
        assert_eq!(
            c.acceptance.ae_bindings,
            vec![
                ("CT1".to_string(), "ct1.hospital.example".to_string()),
                ("MR1".to_string(), "mr1".to_string())
            ]
        );
        let tls = c.tls.unwrap();
        assert_eq!(tls.listen.port(), 2762);
        assert_eq!(tls.files.cert, Pem::File(PathBuf::from("c.pem")));
        assert_eq!(tls.files.key, Pem::File(PathBuf::from("k.pem")));
        assert_eq!(
            tls.files.client_ca,
            Some(Pem::File(PathBuf::from("ca.pem")))
        );

        let inline = parse(&["--tls-cert-pem", "CERT", "--tls-key-pem", "KEY"]).unwrap();
        assert!(matches!(
            inline.tls.unwrap().files.cert,
            Pem::Inline {
                from: "DICOM_GATEWAY_TLS_CERT_PEM",
                ..
            }
        ));
        assert!(parse(&["--tls-cert", "c.pem", "--tls-cert-pem", "CERT"]).is_err());

        let plain_and_tls = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert!(plain_and_tls.listen.is_some());
        assert!(plain_and_tls.tls.is_some());
        assert!(plain_and_tls.acceptance.ae_bindings.is_empty());

        let e = parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
            "--tls-ae-binding",
            "CT1",
        ])
        .unwrap_err();
        assert_eq!(e, "--tls-ae-binding 'CT1' is not AE=CN");
        assert!(
            parse(&["--tls-only"])
                .unwrap_err()
                .contains("need --tls-cert and --tls-key")
        );
        assert!(
            parse(&[
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
                "--tls-ae-binding",
                "CT1=x"
            ])
            .unwrap_err()
            .contains("--tls-client-ca")
        );
    }

    #[test]
    fn a_given_gateway_id_is_used() {
        let c = parse(&["--gateway-id", "gw-7"]).unwrap();
        assert_eq!(c.gateway_id.as_deref(), Some("gw-7"));
    }

    #[test]
    fn the_orphan_age_leaves_live_batches_alone() {
        let c = parse(&["--batch-max-age", "2s", "--orphan-age", "4s"]).unwrap();
        assert_eq!(c.recovery.orphan_age, Duration::from_secs(4));
        let e = parse(&["--batch-max-age", "31m", "--orphan-age", "1h"]).unwrap_err();
        assert!(e.contains("--batch-max-age"), "{e}");
        let e = parse(&["--orphan-age", "9m"]).unwrap_err();
        assert_eq!(
            e,
            "--orphan-age must be at least twice --batch-max-age (5m): a live gateway's batch must never be taken over"
        );
        let e = parse(&["--recovery-interval", "0s"]).unwrap_err();
        assert!(e.contains("--recovery-interval"), "{e}");
    }

    #[test]
    fn instances_show_parses_with_the_store_options_of_jobs() {
        let cli = Cli::try_parse_from([
            "dicom-gateway",
            "instances",
            "show",
            "1.2.3.4",
            "--json",
            "--store-dir",
            "/data",
        ])
        .unwrap();
        let Command::Instances(i) = cli.command else {
            panic!("not instances")
        };
        let InstancesCommand::Show {
            sop_instance_uid,
            json,
        } = i.command;
        assert_eq!((sop_instance_uid.as_str(), json), ("1.2.3.4", true));
        assert_eq!(i.store.store_dir.store_dir, PathBuf::from("/data"));
        assert!(Cli::try_parse_from(["dicom-gateway", "instances", "show"]).is_err());
    }

    #[test]
    fn the_instance_table_goes_with_the_job_table() {
        let e = parse(&["--job-table", "t"]).unwrap_err();
        assert!(
            e.contains("--job-table also needs --instance-table")
                && e.contains("InstanceTableName")
                && e.contains("DICOM_GATEWAY_INSTANCE_TABLE"),
            "{e}"
        );
        let e = parse(&["--instance-table", "i"]).unwrap_err();
        assert!(e.contains("--store-dir/index/"), "{e}");
        let c = parse(&["--store-dir", "/data"]).unwrap();
        assert_eq!(
            c.index,
            IndexConfig::Local {
                store_root: PathBuf::from("/data")
            }
        );
        let cli = Cli::try_parse_from([
            "dicom-gateway",
            "instances",
            "show",
            "1.2.3.4",
            "--job-table",
            "t",
            "--instance-table",
            "i",
        ])
        .unwrap();
        let Command::Instances(i) = cli.command else {
            panic!("not instances")
        };
        assert_eq!(i.store.instance_table.instance_table.as_deref(), Some("i"));
        let cli = Cli::try_parse_from(["dicom-gateway", "jobs", "list", "--instance-table", "i"]);
        assert!(cli.is_ok(), "jobs accepts the same store options");
    }

    #[test]
    fn jobs_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "dicom-gateway",
            "jobs",
            "show",
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N",
            "--job-table",
            "t",
        ])
        .unwrap();
        let Command::Jobs(j) = cli.command else {
            panic!()
        };
        assert!(matches!(j.command, JobsCommand::Show { failed: false, .. }));
        assert!(
            j.store.index_config().is_err(),
            "--job-table needs --instance-table for the index"
        );
        assert_eq!(
            j.store.into_config(),
            JobStoreConfig::DynamoDb { table: "t".into() }
        );
        let cli = Cli::try_parse_from([
            "dicom-gateway",
            "jobs",
            "show",
            "01JD6Y7Z8X9W0V1T2S3R4Q5P6N",
            "--failed",
            "--json",
            "--store-dir",
            "/data",
        ])
        .unwrap();
        let Command::Jobs(j) = cli.command else {
            panic!()
        };
        assert!(matches!(
            j.command,
            JobsCommand::Show {
                failed: true,
                json: true,
                ..
            }
        ));
        assert_eq!(
            j.store.index_config(),
            Ok(IndexConfig::Local {
                store_root: PathBuf::from("/data")
            }),
            "the index serve keeps beside the local journal"
        );
        let cli = Cli::try_parse_from([
            "dicom-gateway",
            "jobs",
            "list",
            "--limit",
            "5",
            "--store-dir",
            "/data",
        ])
        .unwrap();
        let Command::Jobs(j) = cli.command else {
            panic!()
        };
        assert!(matches!(j.command, JobsCommand::List { limit: 5, .. }));
        assert_eq!(
            j.store.into_config(),
            JobStoreConfig::LocalJournal {
                dir: PathBuf::from("/data/jobs")
            }
        );
    }

    #[test]
    fn job_status_is_case_insensitive() {
        for given in ["completed", "COMPLETED_WITH_ERRORS", "Failed"] {
            let cli =
                Cli::try_parse_from(["dicom-gateway", "jobs", "list", "--status", given]).unwrap();
            let Command::Jobs(j) = cli.command else {
                panic!()
            };
            let JobsCommand::List { status, .. } = j.command else {
                panic!()
            };
            assert_eq!(
                status.map(JobStatus::as_str),
                Some(given.to_ascii_uppercase().as_str())
            );
        }
        assert!(
            Cli::try_parse_from(["dicom-gateway", "jobs", "list", "--status", "done"]).is_err()
        );
    }

    #[test]
    fn echo_checks_both_ae_titles() {
        let cli = Cli::try_parse_from([
            "dicom-gateway",
            "echo",
            "127.0.0.1:11112",
            "--called-ae",
            "THIS_TITLE_IS_WAY_TOO_LONG",
        ])
        .unwrap();
        let Command::Echo(e) = cli.command else {
            panic!()
        };
        assert!(
            e.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--called-ae ")
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert_eq!(parse_bytes("9GB"), Ok(9_000_000_000));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }

    #[test]
    fn batch_byte_limits_follow_healthimaging_quotas() {
        let l = parse(&[]).unwrap().batch_limits;
        assert_eq!(l.byte_ceiling, 10_000_000_000, "10 GB per import job");
        assert_eq!(l.max_instance_bytes, 4_000_000_000, "4 GB per P10 file");
        assert_eq!(l.max_folders, 10_000);
        let l = parse(&[
            "--batch-max-bytes",
            "2MB",
            "--job-max-bytes",
            "3MB",
            "--max-instance-size",
            "100KiB",
        ])
        .unwrap()
        .batch_limits;
        assert_eq!(
            (l.max_bytes, l.byte_ceiling, l.max_instance_bytes),
            (2_000_000, 3_000_000, 100 * 1024)
        );
        for (args, option) in [
            (&["--job-max-bytes", "11GB"][..], "--job-max-bytes"),
            (&["--job-max-bytes", "5GB"][..], "--batch-max-bytes"),
            (&["--max-instance-size", "0"][..], "--max-instance-size"),
            (&["--max-instance-size", "11GB"][..], "--max-instance-size"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(option), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_healthimaging_preset_stands_for_healthimaging_syntaxes() {
        let c = parse(&["--transfer-syntax-allow", "healthimaging"]).unwrap();
        let ts = &c.acceptance.syntaxes;
        for uid in crate::policy::healthimaging::HEALTHIMAGING_TRANSFER_SYNTAXES {
            assert!(ts.accepts_transfer_syntax(uid), "{uid}");
        }
        assert!(!ts.accepts_transfer_syntax("1.2.840.10008.1.2.4.110"));
        // A UID beside the preset adds to it.
        let c = parse(&[
            "--transfer-syntax-allow",
            "HealthImaging,1.2.840.10008.1.2.4.110",
        ])
        .unwrap();
        assert!(
            c.acceptance
                .syntaxes
                .accepts_transfer_syntax("1.2.840.10008.1.2.4.110")
        );
        assert!(
            c.acceptance
                .syntaxes
                .accepts_transfer_syntax("1.2.840.10008.1.2.4.50")
        );
        let e = parse(&["--transfer-syntax-allow", "healthimagin"]).unwrap_err();
        assert!(e.contains("--transfer-syntax-allow"), "{e}");
    }
}

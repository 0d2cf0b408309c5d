//! The command line: `dicom-gateway serve` and its options (DESIGN.md §7).
//!
//! Every option can also come from an environment variable, `DICOM_GATEWAY_` + the option name in
//! upper snake case, so the same names work on a command line, in a container and in a template.
//! Options are validated before anything starts, with messages that name the option at fault.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::batch::{BatchLimits, DuplicatePolicy};
use crate::jobs::JobStatus;
use crate::store::s3::{MAX_PART_SIZE, MIN_PART_SIZE};
use crate::uid::validate_uid;

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Store SCP: accept associations, store instances, close batches, start imports.
    Serve(Box<ServeArgs>),
    /// Inspect import jobs (one per batch): where a study is, and whether it reached HealthImaging.
    Jobs(JobsArgs),
    /// Send a C-ECHO to a DICOM peer (this gateway or any SCP); exit 0 on Success. Used by the
    /// container health check.
    Echo(EchoArgs),
}

#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
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

/// Where the job records are: the same options (and environment variables) as `serve`.
#[derive(Debug, Clone, Args)]
pub struct JobStoreArgs {
    /// DynamoDB table of import jobs. Without it, the local journal in --store-dir/jobs is used.
    #[arg(long, env = "DICOM_GATEWAY_JOB_TABLE", global = true)]
    pub job_table: Option<String>,

    /// Local store directory, whose jobs/ subdirectory is the job journal when no --job-table is given.
    #[arg(
        long,
        env = "DICOM_GATEWAY_STORE_DIR",
        default_value = "./dicom-store",
        global = true
    )]
    pub store_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub store: JobStoreArgs,

    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
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
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for CloudWatch Logs and other collectors).
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    // ---- Network and association -------------------------------------------------------------
    /// Address and port to listen on for DICOM associations.
    #[arg(
        long,
        env = "DICOM_GATEWAY_LISTEN",
        default_value = "0.0.0.0:11112",
        help_heading = "Network"
    )]
    pub listen: SocketAddr,

    /// Our AE title: senders must call it (1-16 characters), unless --accept-any-called-ae.
    #[arg(
        long,
        env = "DICOM_GATEWAY_AE_TITLE",
        default_value = "DICOM_GATEWAY",
        help_heading = "Network"
    )]
    pub ae_title: String,

    /// Accept associations whatever called AE title they use.
    #[arg(
        long,
        env = "DICOM_GATEWAY_ACCEPT_ANY_CALLED_AE",
        help_heading = "Network"
    )]
    pub accept_any_called_ae: bool,

    /// Calling AE titles allowed to associate, comma-separated. Empty: any calling AE title.
    #[arg(
        long,
        env = "DICOM_GATEWAY_CALLING_AE_ALLOW",
        value_delimiter = ',',
        help_heading = "Network"
    )]
    pub calling_ae_allow: Vec<String>,

    /// Peer networks allowed to connect, comma-separated CIDRs (e.g. 10.0.0.0/8,192.168.1.20/32).
    /// Empty: any address. Others are rejected before negotiation.
    #[arg(
        long,
        env = "DICOM_GATEWAY_PEER_ALLOW",
        value_delimiter = ',',
        help_heading = "Network"
    )]
    pub peer_allow: Vec<IpNet>,

    /// SOP class UIDs accepted, comma-separated. Default: every storage SOP class in the DICOM
    /// standard, plus Verification (C-ECHO).
    #[arg(
        long,
        env = "DICOM_GATEWAY_SOP_CLASS_ALLOW",
        value_delimiter = ',',
        help_heading = "Network"
    )]
    pub sop_class_allow: Vec<String>,

    /// Transfer syntax UIDs accepted, comma-separated. Default: every transfer syntax the standard
    /// defines, compressed ones included (data is stored as received, never transcoded).
    #[arg(
        long,
        env = "DICOM_GATEWAY_TRANSFER_SYNTAX_ALLOW",
        value_delimiter = ',',
        help_heading = "Network"
    )]
    pub transfer_syntax_allow: Vec<String>,

    /// Most associations served at once; more are rejected (transient, local limit exceeded).
    #[arg(
        long,
        env = "DICOM_GATEWAY_MAX_ASSOCIATIONS",
        default_value_t = 32,
        help_heading = "Network"
    )]
    pub max_associations: usize,

    /// Maximum P-DATA PDU length we accept, in bytes (4096 to 16777216).
    #[arg(
        long,
        env = "DICOM_GATEWAY_MAX_PDU",
        default_value_t = 131072,
        help_heading = "Network"
    )]
    pub max_pdu: u32,

    /// Time allowed from connection to a complete association request.
    #[arg(long, env = "DICOM_GATEWAY_ASSOCIATION_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, help_heading = "Network")]
    pub association_timeout: Duration,

    /// An association that sends nothing for this long is aborted.
    #[arg(long, env = "DICOM_GATEWAY_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration, help_heading = "Network")]
    pub idle_timeout: Duration,

    /// Longest a single network write (e.g. a response) may take.
    #[arg(long, env = "DICOM_GATEWAY_IO_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, help_heading = "Network")]
    pub io_timeout: Duration,

    // ---- TLS ---------------------------------------------------------------------------------
    /// Address and port of the DICOM TLS listener (2762 is the DICOM TLS port). Used when
    /// --tls-cert is given, beside the plain listener (or instead of it, with --tls-only).
    #[arg(
        long,
        env = "DICOM_GATEWAY_TLS_LISTEN",
        default_value = "0.0.0.0:2762",
        help_heading = "TLS"
    )]
    pub tls_listen: SocketAddr,

    /// Server certificate chain (PEM). Turns the TLS listener on. Reloaded on SIGHUP.
    #[arg(long, env = "DICOM_GATEWAY_TLS_CERT", help_heading = "TLS")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of the server certificate (PEM).
    #[arg(long, env = "DICOM_GATEWAY_TLS_KEY", help_heading = "TLS")]
    pub tls_key: Option<PathBuf>,

    /// CA bundle (PEM) that client certificates must chain to: turns on mutual TLS.
    #[arg(long, env = "DICOM_GATEWAY_TLS_CLIENT_CA", help_heading = "TLS")]
    pub tls_client_ca: Option<PathBuf>,

    /// Bind calling AE titles to client certificate subjects, comma-separated AE=CN pairs
    /// (e.g. CT1=ct1.hospital.example): that AE title is accepted only from that certificate.
    #[arg(
        long,
        env = "DICOM_GATEWAY_TLS_AE_BINDING",
        value_delimiter = ',',
        help_heading = "TLS"
    )]
    pub tls_ae_binding: Vec<String>,

    /// Serve DICOM on the TLS listener only (no plain listener).
    #[arg(long, env = "DICOM_GATEWAY_TLS_ONLY", help_heading = "TLS")]
    pub tls_only: bool,

    // ---- Storage -----------------------------------------------------------------------------
    /// Local directory store, used when no --s3-bucket is given.
    #[arg(
        long,
        env = "DICOM_GATEWAY_STORE_DIR",
        default_value = "./dicom-store",
        help_heading = "Storage"
    )]
    pub store_dir: PathBuf,

    /// S3 bucket to store instances in. When set, S3 is used instead of --store-dir. Region,
    /// credentials and endpoint come from the standard AWS configuration (AWS_REGION,
    /// AWS_ENDPOINT_URL, ...).
    #[arg(long, env = "DICOM_GATEWAY_S3_BUCKET", help_heading = "Storage")]
    pub s3_bucket: Option<String>,

    /// Key prefix for stored instances; objects go to {prefix}{jobId}/{study}/{series}/{sop}.dcm.
    #[arg(
        long,
        env = "DICOM_GATEWAY_S3_PREFIX",
        default_value = "import/",
        help_heading = "Storage"
    )]
    pub s3_prefix: String,

    /// Use path-style S3 addressing (needed for LocalStack and some S3-compatible stores).
    #[arg(
        long,
        env = "DICOM_GATEWAY_S3_FORCE_PATH_STYLE",
        help_heading = "Storage"
    )]
    pub s3_force_path_style: bool,

    /// Objects up to this size are sent with one PutObject; larger ones with multipart upload in
    /// parts of this size (e.g. 8MiB; 5MiB to 5GiB).
    #[arg(long, env = "DICOM_GATEWAY_PART_SIZE", default_value = "8MiB", value_parser = parse_bytes, help_heading = "Storage")]
    pub part_size: u64,

    /// Multipart parts uploaded concurrently per instance (memory per instance ~ part size x (this + 1)).
    #[arg(
        long,
        env = "DICOM_GATEWAY_PARTS_IN_FLIGHT",
        default_value_t = 4,
        help_heading = "Storage"
    )]
    pub parts_in_flight: usize,

    // ---- Import ---------------------------------------------------------------------------------
    /// DynamoDB table for import job records. Without it, jobs are recorded in --store-dir/jobs/.
    #[arg(
        long,
        env = "DICOM_GATEWAY_JOB_TABLE",
        help_heading = "Import (HealthImaging)"
    )]
    pub job_table: Option<String>,

    /// Step Functions state machine that runs the import (from the infra/ stack). Without it,
    /// closed batches stay CLOSED. Needs --s3-bucket, --job-table, --datastore-id and --data-access-role-arn.
    #[arg(
        long,
        env = "DICOM_GATEWAY_STATE_MACHINE_ARN",
        help_heading = "Import (HealthImaging)"
    )]
    pub state_machine_arn: Option<String>,

    /// HealthImaging data store to import into.
    #[arg(
        long,
        env = "DICOM_GATEWAY_DATASTORE_ID",
        help_heading = "Import (HealthImaging)"
    )]
    pub datastore_id: Option<String>,

    /// IAM role HealthImaging assumes to read the import prefix and write the results prefix.
    #[arg(
        long,
        env = "DICOM_GATEWAY_DATA_ACCESS_ROLE_ARN",
        help_heading = "Import (HealthImaging)"
    )]
    pub data_access_role_arn: Option<String>,

    /// Key prefix (in --s3-bucket) for HealthImaging's import results: {prefix}{jobId}/.
    #[arg(
        long,
        env = "DICOM_GATEWAY_RESULTS_PREFIX",
        default_value = "results/",
        help_heading = "Import (HealthImaging)"
    )]
    pub results_prefix: String,

    /// How often the state machine polls a running import job.
    #[arg(long, env = "DICOM_GATEWAY_IMPORT_POLL_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration, help_heading = "Import (HealthImaging)")]
    pub import_poll_interval: Duration,

    /// Polls after which a still-running import is recorded FAILED (default: 12 hours at 60 s).
    #[arg(
        long,
        env = "DICOM_GATEWAY_IMPORT_MAX_POLLS",
        default_value_t = 720,
        help_heading = "Import (HealthImaging)"
    )]
    pub import_max_polls: u32,

    /// Name of this gateway in job records (start-up recovery resubmits this gateway's jobs at once).
    /// Default: the host name.
    #[arg(
        long,
        env = "DICOM_GATEWAY_GATEWAY_ID",
        help_heading = "Import (HealthImaging)"
    )]
    pub gateway_id: Option<String>,

    // ---- Batches ------------------------------------------------------------------------------
    /// A batch closes after this long without a new instance.
    #[arg(long, env = "DICOM_GATEWAY_BATCH_IDLE", default_value = "30s", value_parser = humantime::parse_duration, help_heading = "Batches (one HealthImaging import job each)")]
    pub batch_idle: Duration,

    /// A batch closes at this age.
    #[arg(long, env = "DICOM_GATEWAY_BATCH_MAX_AGE", default_value = "5m", value_parser = humantime::parse_duration, help_heading = "Batches (one HealthImaging import job each)")]
    pub batch_max_age: Duration,

    /// A batch closes at this many instances (HealthImaging allows 5000 files per import job).
    #[arg(
        long,
        env = "DICOM_GATEWAY_BATCH_MAX_INSTANCES",
        default_value_t = 5000,
        help_heading = "Batches (one HealthImaging import job each)"
    )]
    pub batch_max_instances: u32,

    /// A batch closes once its stored bytes reach this (e.g. 9GB). Instances already in flight
    /// still join it, so keep it below HealthImaging's 10 GB per job by the largest study in flight.
    #[arg(long, env = "DICOM_GATEWAY_BATCH_MAX_BYTES", default_value = "9GB", value_parser = parse_bytes, help_heading = "Batches (one HealthImaging import job each)")]
    pub batch_max_bytes: u64,

    /// A SOP Instance UID received twice within a batch is stored once: overwrite (the new copy
    /// replaces the earlier one), keep-first (Success, the new copy is dropped) or reject (0x0111).
    #[arg(
        long,
        env = "DICOM_GATEWAY_DUPLICATE_POLICY",
        value_enum,
        default_value = "overwrite",
        help_heading = "Batches (one HealthImaging import job each)"
    )]
    pub duplicate_policy: DuplicatePolicy,

    // ---- Operations -----------------------------------------------------------------------------
    /// On SIGTERM/SIGINT, time given to running associations before they are aborted.
    #[arg(long, env = "DICOM_GATEWAY_SHUTDOWN_DEADLINE", default_value = "25s", value_parser = humantime::parse_duration, help_heading = "Operations")]
    pub shutdown_deadline: Duration,

    /// Address for the HTTP health and metrics endpoints (/healthz, /readyz, /metrics), e.g.
    /// 0.0.0.0:9090. Off unless given (the container image turns it on).
    #[arg(
        long,
        env = "DICOM_GATEWAY_METRICS_LISTEN",
        help_heading = "Operations"
    )]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format.
    #[arg(
        long,
        env = "DICOM_GATEWAY_LOG_FORMAT",
        value_enum,
        default_value = "text",
        help_heading = "Operations"
    )]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. info or dicom_gateway=debug). RUST_LOG also works.
    #[arg(
        long,
        env = "DICOM_GATEWAY_LOG_LEVEL",
        default_value = "info",
        help_heading = "Operations"
    )]
    pub log_level: String,
}

/// Parses a byte size: a plain number, or a number with B, KB, MB, GB (powers of 1000) or
/// KiB, MiB, GiB (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 8MiB, 9GB, 1048576)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000_000,
        "gb" => 1000_000_000,
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

/// Checks an AE title: 1-16 characters of the default repertoire, no backslash or control characters.
pub fn validate_ae_title(ae: &str) -> Result<(), String> {
    let t = ae.trim();
    if t.is_empty() || t.len() > 16 {
        return Err(format!("'{ae}' must be 1 to 16 characters"));
    }
    if !t
        .chars()
        .all(|c| c.is_ascii() && !c.is_ascii_control() && c != '\\')
    {
        return Err(format!(
            "'{ae}' may only hold printable ASCII characters other than '\\'"
        ));
    }
    Ok(())
}

impl ServeArgs {
    /// Checks every option; the error names the option and says what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        validate_ae_title(&self.ae_title).map_err(|e| format!("--ae-title {e}"))?;
        for ae in &self.calling_ae_allow {
            validate_ae_title(ae).map_err(|e| format!("--calling-ae-allow {e}"))?;
        }
        for uid in &self.sop_class_allow {
            validate_uid(uid).map_err(|e| format!("--sop-class-allow: '{uid}': {e}"))?;
        }
        for uid in &self.transfer_syntax_allow {
            validate_uid(uid).map_err(|e| format!("--transfer-syntax-allow: '{uid}': {e}"))?;
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".into());
        }
        if self.tls_cert.is_none()
            && (self.tls_client_ca.is_some() || self.tls_only || !self.tls_ae_binding.is_empty())
        {
            return Err(
                "--tls-client-ca, --tls-only and --tls-ae-binding need --tls-cert and --tls-key"
                    .into(),
            );
        }
        if !self.tls_ae_binding.is_empty() && self.tls_client_ca.is_none() {
            return Err("--tls-ae-binding needs --tls-client-ca (client certificates must be verified to be trusted)".into());
        }
        self.ae_bindings()?;
        if self.max_associations == 0 {
            return Err("--max-associations must be at least 1".into());
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.max_pdu) {
            return Err(format!(
                "--max-pdu {} is outside 4096..=16777216",
                self.max_pdu
            ));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(format!(
                "--part-size {} is outside S3's limits (5 MiB to 5 GiB)",
                self.part_size
            ));
        }
        if !(1..=64).contains(&self.parts_in_flight) {
            return Err("--parts-in-flight must be between 1 and 64".into());
        }
        if let Some(bucket) = &self.s3_bucket {
            if bucket.is_empty() || bucket.contains('/') {
                return Err(format!(
                    "--s3-bucket '{bucket}' is not a bucket name (give the name only, without s3:// or a path)"
                ));
            }
        }
        if self.s3_prefix.starts_with('/') {
            return Err("--s3-prefix must not start with '/'".into());
        }
        if self.batch_max_age > Duration::from_secs(1800) {
            return Err("--batch-max-age must be at most 30m (start-up recovery treats batches open for an hour as abandoned)".into());
        }
        if !(1..=5000).contains(&self.batch_max_instances) {
            return Err("--batch-max-instances must be between 1 and 5000 (HealthImaging accepts at most 5000 files per import job)".into());
        }
        if self.batch_max_bytes == 0 || self.batch_max_bytes > 10_000_000_000 {
            return Err("--batch-max-bytes must be above 0 and at most 10GB (HealthImaging's limit per import job)".into());
        }
        if let Some(arn) = &self.state_machine_arn {
            if !arn.starts_with("arn:") {
                return Err(format!("--state-machine-arn '{arn}' is not an ARN"));
            }
            let missing: Vec<&str> = [
                ("--s3-bucket", self.s3_bucket.is_none()),
                ("--job-table", self.job_table.is_none()),
                ("--datastore-id", self.datastore_id.is_none()),
                (
                    "--data-access-role-arn",
                    self.data_access_role_arn.is_none(),
                ),
            ]
            .into_iter()
            .filter_map(|(name, absent)| absent.then_some(name))
            .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "--state-machine-arn also needs {} (the infra/ stack's outputs give them)",
                    missing.join(", ")
                ));
            }
        }
        if self.results_prefix.starts_with('/')
            || (!self.results_prefix.is_empty() && !self.results_prefix.ends_with('/'))
        {
            return Err("--results-prefix must end with '/' and not start with one".into());
        }
        if self.s3_bucket.is_some()
            && self.results_prefix.starts_with(&self.s3_prefix)
            && !self.s3_prefix.is_empty()
        {
            return Err("--results-prefix must not lie under --s3-prefix: HealthImaging reports any non-DICOM file in an import prefix as a failure".into());
        }
        for (name, d) in [
            ("--association-timeout", self.association_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--io-timeout", self.io_timeout),
            ("--batch-idle", self.batch_idle),
            ("--batch-max-age", self.batch_max_age),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        Ok(())
    }

    /// The --tls-ae-binding pairs, as (AE title, certificate common name).
    pub fn ae_bindings(&self) -> Result<Vec<(String, String)>, String> {
        self.tls_ae_binding
            .iter()
            .map(|pair| match pair.split_once('=') {
                Some((ae, cn)) if !cn.is_empty() => {
                    validate_ae_title(ae).map_err(|e| format!("--tls-ae-binding {e}"))?;
                    Ok((ae.trim().to_string(), cn.to_string()))
                }
                _ => Err(format!("--tls-ae-binding '{pair}' is not AE=CN")),
            })
            .collect()
    }

    /// This gateway's name in job records.
    pub fn gateway_id(&self) -> String {
        self.gateway_id.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .unwrap_or_else(|| "dicom-gateway".into())
        })
    }

    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            idle: self.batch_idle,
            max_age: self.batch_max_age,
            max_instances: self.batch_max_instances,
            max_bytes: self.batch_max_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServeArgs, String> {
        let mut full = vec!["dicom-gateway", "serve"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        let Command::Serve(a) = cli.command else {
            panic!("serve")
        };
        a.validate()?;
        Ok(*a)
    }

    #[test]
    fn defaults_are_sensible() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen.port(), 11112);
        assert_eq!(a.ae_title, "DICOM_GATEWAY");
        assert_eq!(a.store_dir, PathBuf::from("./dicom-store"));
        assert_eq!(a.part_size, 8 << 20);
        assert_eq!(a.shutdown_deadline, Duration::from_secs(25));
        assert_eq!(a.batch_max_instances, 5000);
        assert!(a.s3_bucket.is_none());
    }

    #[test]
    fn lists_are_comma_separated() {
        let a = parse(&[
            "--calling-ae-allow",
            "CT1,MR1",
            "--peer-allow",
            "10.0.0.0/8,127.0.0.1/32",
        ])
        .unwrap();
        assert_eq!(a.calling_ae_allow, vec!["CT1", "MR1"]);
        assert_eq!(a.peer_allow.len(), 2);
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
        assert_eq!(j.store.job_table.as_deref(), Some("t"));
        assert!(matches!(j.command, JobsCommand::Show { .. }));
        let cli = Cli::try_parse_from(["dicom-gateway", "jobs", "list", "--limit", "5"]).unwrap();
        let Command::Jobs(j) = cli.command else {
            panic!()
        };
        assert!(matches!(j.command, JobsCommand::List { limit: 5, .. }));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert_eq!(parse_bytes("9GB"), Ok(9_000_000_000));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }
}

//! The validated configuration of `dicom-gateway serve`.
//!
//! [`crate::cli`] turns the command line into a [`ServeConfig`] once, before anything starts; from
//! then on the server reads typed values only: what is optional is an `Option` or an enum of the
//! possible setups, never a set of options that must be checked together again. Nothing here parses
//! the command line or names a flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::association::{AcceptancePolicy, Timeouts};
use crate::batch::{BatchLimits, DuplicatePolicy};
use crate::commitment::CommitmentSettings;
use crate::import::ImportSettings;
use crate::store::spool::SpoolCapacity;
use crate::tls::TlsFiles;

/// Everything `serve` needs, checked: option values within their limits, combinations complete.
#[derive(Debug, Clone)]
pub(crate) struct ServeConfig {
    /// Where to listen for plain DICOM associations; `None` when DICOM is served over TLS only.
    pub listen: Option<SocketAddr>,
    /// The DICOM TLS listener, when a certificate is configured.
    pub tls: Option<TlsConfig>,
    /// Peer networks allowed to connect; empty allows any address.
    pub peer_allow: Vec<IpNet>,
    /// Most associations served at once.
    pub max_associations: usize,
    /// Most connections waiting for their A-ASSOCIATE-RQ at once; they take no association slot.
    pub max_pending_connections: usize,
    /// Every connection starts with a PROXY protocol v2 header naming the client (behind an NLB).
    pub proxy_protocol: bool,
    /// What associations are accepted: who may call, under which AE title, for what.
    pub acceptance: AcceptancePolicy,
    pub timeouts: Timeouts,
    pub store: StoreConfig,
    /// Edge mode: instances are acknowledged from this local spool and uploaded to the S3 store
    /// in the background; `None` is direct mode (acknowledged once S3 confirmed them).
    pub spool: Option<SpoolConfig>,
    pub job_store: JobStoreConfig,
    pub index: IndexConfig,
    /// The HealthImaging import; `None` leaves closed batches CLOSED.
    pub import: Option<ImportConfig>,
    /// This gateway's name in job records when given (`--gateway-id`); otherwise the server
    /// resolves it once at start-up (the ECS task id, else the host name).
    pub gateway_id: Option<String>,
    /// When and what the fleet's recovery of orphaned jobs runs.
    pub recovery: RecoveryConfig,
    pub batch_limits: BatchLimits,
    pub duplicate_policy: DuplicatePolicy,
    /// Storage Commitment: when instances are committed, where reports go.
    pub commitment: CommitmentSettings,
    /// On SIGTERM/SIGINT, time given to running associations before they are aborted.
    pub shutdown_deadline: Duration,
    /// Address of the HTTP health and metrics endpoints, when they are on.
    pub metrics_listen: Option<SocketAddr>,
    /// With JSON logs, how often CloudWatch embedded metric format records are written.
    pub emf_interval: Duration,
    pub log: LogConfig,
}

/// The DICOM TLS listener and what it trusts.
#[derive(Debug, Clone)]
pub(crate) struct TlsConfig {
    pub listen: SocketAddr,
    /// Certificate chain, key and (for mutual TLS) client CA bundle, reloaded on SIGHUP.
    pub files: TlsFiles,
}

/// Where instances are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreConfig {
    /// A local directory (the default, no cloud needed).
    Local { dir: PathBuf },
    /// An S3 bucket; region, credentials and endpoint come from the standard AWS configuration.
    S3 {
        bucket: String,
        /// Key prefix for stored instances, `{prefix}{jobId}/{study}/{series}/{sop}.dcm`.
        prefix: String,
        force_path_style: bool,
        /// Objects up to this size go in one PutObject, larger ones in parts of this size.
        part_size: usize,
        /// Multipart parts uploaded concurrently per instance.
        parts_in_flight: usize,
    },
}

/// Edge mode's spool in front of the S3 store ([`crate::store::spool`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpoolConfig {
    pub dir: PathBuf,
    pub capacity: SpoolCapacity,
    /// Objects uploaded from the spool at once.
    pub upload_concurrency: usize,
}

/// Where job records are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JobStoreConfig {
    /// A DynamoDB table (deployments; shared by gateways and the import state machine).
    DynamoDb { table: String },
    /// A journal of JSON files in this directory (the embedded default).
    LocalJournal { dir: PathBuf },
}

/// Where the instance index is kept ([`crate::index`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IndexConfig {
    /// JSON lines in `{store_root}/index/` beside the local job journal; rebuilt from the local
    /// store's objects at start-up.
    Local { store_root: PathBuf },
    /// A DynamoDB table beside the job table (`--instance-table`), for deployments with
    /// `--job-table`: shared by the gateways of a fleet ([`crate::index::dynamodb`]).
    DynamoDb { table: String },
}

/// The import state machine and the settings passed to each of its executions.
#[derive(Debug, Clone)]
pub(crate) struct ImportConfig {
    pub state_machine_arn: String,
    pub settings: ImportSettings,
}

/// Periodic recovery of the jobs stopped gateways left behind ([`crate::recovery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecoveryConfig {
    /// Mean pause between two recovery passes (each pause is jittered).
    pub interval: Duration,
    /// How long another gateway's batch may stay OPEN before it counts as orphaned. At least twice
    /// `--batch-max-age`: a live gateway closes a batch at that age at the latest, and the margin
    /// gives it as long again to record the close (retrying a job store that is briefly away)
    /// before another gateway may take the batch over and start its import.
    pub orphan_age: Duration,
}

/// How the log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogConfig {
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive (RUST_LOG takes precedence when set).
    pub filter: String,
}

/// The log line format. Derives clap's `ValueEnum` so its names are written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for CloudWatch Logs and other collectors).
    Json,
}

/// Checks an AE title: 1-16 characters of the default repertoire, no backslash or control characters.
pub(crate) fn validate_ae_title(ae: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ae_titles() {
        assert!(validate_ae_title("DICOM_GATEWAY").is_ok());
        assert!(validate_ae_title(" CT1 ").is_ok());
        assert!(validate_ae_title("").is_err());
        assert!(validate_ae_title("SEVENTEEN_CHARS_X").is_err());
        assert!(validate_ae_title("A\\B").is_err());
    }
}

//! The subcommands (`serve`, `jobs`, `instances`, `spool`, `echo`): what `main` runs once the command line is parsed
//! into a typed configuration ([`crate::cli`]). Exit status: 0 on success, 2 for a usage or
//! configuration error, 1 when running fails.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::cli::{
    Cli, Command, ConfigError, EchoArgs, InstancesArgs, InstancesCommand, JobsArgs, JobsCommand,
    SpoolArgs, SpoolCommand,
};
use crate::config::{IndexConfig, LogConfig, LogFormat, ServeConfig};
use crate::index::{InstanceOutcome, InstanceRecord};
use crate::jobs::report;

/// Directives added in front of `--log-level` (not of RUST_LOG, which replaces everything): the AWS
/// SDK's probing of where credentials and the region come from is quiet unless it fails for good.
/// On a machine without EC2 instance metadata (IMDS), every configuration load logs multi-line WARN
/// blobs (`aws_config::imds::region`: "failed to load region from IMDS"; the credentials chain,
/// `aws_config::meta::credentials`: "provider failed to provide credentials"), although the
/// gateway goes on to use the environment or fails at start-up with its own one-line message
/// ([`crate::aws::AwsSetupError`]). A more specific directive of `--log-level` still wins (e.g.
/// `--log-level info,aws_config::imds=debug`).
const QUIET_AWS_PROBING: &str = "aws_config::imds=error,aws_config::meta::credentials=error";

/// The tracing filter: RUST_LOG when set, else [`QUIET_AWS_PROBING`] and `--log-level`.
fn log_filter(rust_log: Option<&str>, log_level: &str) -> Result<EnvFilter, ConfigError> {
    match rust_log {
        Some(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ => EnvFilter::try_new(format!("{QUIET_AWS_PROBING},{log_level}")),
    }
    .map_err(|e| ConfigError::LogFilter(e.to_string()))
}

fn init_logging(log: &LogConfig) -> Result<(), ConfigError> {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), &log.filter)?;
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match log.format {
        LogFormat::Text => builder.init(),
        // The span list puts the association fields (peer, calling and called AE) on every line.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `dicom-gateway serve`: runs until SIGTERM or SIGINT, then shuts down gracefully.
fn serve(config: ServeConfig) -> anyhow::Result<ExitCode> {
    init_logging(&config.log)?;
    runtime()?.block_on(async move {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            crate::server::shutdown_signal().await;
            trigger.cancel();
        });
        crate::server::serve(config, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `dicom-gateway jobs list|show`: reads the same job store (and, for `--failed`, the same
/// instance index) as `serve`.
fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let JobsArgs { store, command } = args;
    // Only `--failed` reads the index: `jobs list` needs no --instance-table.
    let index_config = store.index_config();
    let store_config = store.into_config();
    runtime()?.block_on(async move {
        let aws = crate::aws::Aws::new("--job-table");
        let store = crate::server::open_job_store(&store_config, &aws).await?;
        let text = match command {
            JobsCommand::List {
                limit,
                status,
                json,
            } => {
                let jobs = match status {
                    Some(st) => store.list_by_status(st).await.map(|mut v| {
                        v.reverse();
                        v.truncate(limit);
                        v
                    }),
                    None => store.list_recent(limit).await,
                }
                .map_err(|e| anyhow::anyhow!("{e} (reading {})", store.describe()))?;
                if json {
                    serde_json::to_string_pretty(&jobs).unwrap_or_default() + "\n"
                } else {
                    report::table(&jobs)
                }
            }
            JobsCommand::Show {
                job_id,
                json,
                failed,
            } => {
                if job_id.starts_with(crate::commitment::dynamodb::KEY_PREFIX) {
                    anyhow::bail!(
                        "'{job_id}' is not a job: it is a pending Storage Commitment request, kept in {} until its report is delivered.",
                        store.describe()
                    );
                }
                let job = store
                    .get(&job_id)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e} (reading {})", store.describe()))?;
                let Some(job) = job else {
                    anyhow::bail!(
                        "no job '{job_id}' in {}. `dicom-gateway jobs list` shows the recent ones.",
                        store.describe()
                    );
                };
                // Without an instance index (--job-table without --instance-table), the job is
                // still worth showing: the note says why its failed instances are not.
                let failed =
                    match (failed, index_config) {
                        (false, _) => Failed::NotAsked,
                        (true, Err(no_index)) => Failed::NoIndex(no_index.to_string()),
                        (true, Ok(config)) => {
                            let index = crate::server::open_instance_index(&config, &aws).await?;
                            Failed::Listed(index.failed(&job_id).await.map_err(|e| {
                                anyhow::anyhow!("{e} (reading {})", index.describe())
                            })?)
                        }
                    };
                let with = |name: &str, value: serde_json::Value| {
                    let mut job = serde_json::to_value(&job).unwrap_or_default();
                    if let Some(map) = job.as_object_mut() {
                        map.insert(name.into(), value);
                    }
                    serde_json::to_string_pretty(&job).unwrap_or_default() + "\n"
                };
                match (json, failed) {
                    (true, Failed::NotAsked) => {
                        serde_json::to_string_pretty(&job).unwrap_or_default() + "\n"
                    }
                    (true, Failed::Listed(failed)) => with(
                        "failedInstances",
                        serde_json::to_value(&failed).unwrap_or_default(),
                    ),
                    (true, Failed::NoIndex(note)) => {
                        with("failedInstancesNote", serde_json::Value::String(note))
                    }
                    (false, Failed::NotAsked) => report::details(&job),
                    (false, Failed::Listed(failed)) => {
                        report::details(&job) + &failed_instances(&failed)
                    }
                    (false, Failed::NoIndex(note)) => {
                        report::details(&job) + &format!("\nFailed instances: not listed: {note}\n")
                    }
                }
            }
        };
        print!("{text}");
        Ok(ExitCode::SUCCESS)
    })
}

/// What `jobs show` prints of a job's failed instances.
enum Failed {
    /// `--failed` was not given.
    NotAsked,
    Listed(Vec<InstanceRecord>),
    /// `--failed` was given, but these options name no instance index: why.
    NoIndex(String),
}

/// `dicom-gateway instances show`: reads the instance index `serve` writes with the same
/// options: the DynamoDB table with --job-table and --instance-table, else the local journal.
fn instances(args: InstancesArgs) -> anyhow::Result<ExitCode> {
    let InstancesArgs { store, command } = args;
    let config = store.index_config()?;
    let InstancesCommand::Show {
        sop_instance_uid,
        json,
    } = command;
    let (records, described) = runtime()?.block_on(async {
        let aws = crate::aws::Aws::new("--instance-table");
        let index = crate::server::open_instance_index(&config, &aws).await?;
        let records = index
            .find(&sop_instance_uid)
            .await
            .map_err(|e| anyhow::anyhow!("{e} (reading {})", index.describe()))?;
        anyhow::Ok((records, index.describe()))
    })?;
    if records.is_empty() {
        let check = match config {
            IndexConfig::Local { .. } => "--store-dir",
            IndexConfig::DynamoDb { .. } => "--instance-table",
        };
        anyhow::bail!(
            "no instance '{sop_instance_uid}' in {described}. Check the UID (the SOP Instance UID, 0008,0018) and {check}; an instance stored just before a crash is indexed when its batch is recovered (at the gateway's next start, or by another gateway of the fleet)."
        );
    }
    let text = if json {
        serde_json::to_string_pretty(&records).unwrap_or_default() + "\n"
    } else {
        records
            .iter()
            .map(instance_details)
            .collect::<Vec<_>>()
            .join("\n")
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// The failed instances of a job under a heading, one paragraph each, for `jobs show --failed`.
fn failed_instances(records: &[InstanceRecord]) -> String {
    let mut out = format!("\nFailed instances: {}\n", records.len());
    for r in records {
        out.push('\n');
        out.push_str(&aligned(&[
            ("SOP Instance UID", r.sop_instance_uid.clone()),
            ("Object key", r.object_key.clone()),
        ]));
        out.push_str(&aligned(&outcome_details(&r.outcome)));
    }
    if records.is_empty() {
        out.push_str(
            "(none recorded: the import refused no file, or its results are not read yet)\n",
        );
    }
    out
}

/// What an outcome adds to an instance's lines: the image set, or the exception.
fn outcome_details(outcome: &InstanceOutcome) -> Vec<(&'static str, String)> {
    let yes_no = |b: bool| {
        if b {
            "yes"
        } else {
            "no (a non-primary image set)"
        }
        .to_string()
    };
    match outcome {
        InstanceOutcome::Stored => Vec::new(),
        InstanceOutcome::Imported {
            image_set_id,
            is_primary,
        } => vec![
            ("Image set", image_set_id.clone()),
            ("Primary", yes_no(*is_primary)),
        ],
        InstanceOutcome::ImportedWithWarnings {
            image_set_id,
            is_primary,
            warnings,
        } => {
            let mut lines = vec![
                ("Image set", image_set_id.clone()),
                ("Primary", yes_no(*is_primary)),
            ];
            lines.extend(warnings.iter().map(|w| ("Warning", w.clone())));
            lines
        }
        InstanceOutcome::Failed {
            exception_type,
            message,
        } => vec![
            ("Exception", exception_type.clone()),
            ("Message", message.clone()),
        ],
    }
}

/// `name: value` lines, the values aligned.
fn aligned(lines: &[(&str, String)]) -> String {
    lines
        .iter()
        .map(|(k, v)| format!("{:<20}{v}\n", format!("{k}:")))
        .collect()
}

/// One record as aligned `name: value` lines.
fn instance_details(r: &InstanceRecord) -> String {
    let unknown = || "(unknown)".to_string();
    let mut lines = vec![
        ("SOP Instance UID", r.sop_instance_uid.clone()),
        (
            "SOP Class UID",
            r.sop_class_uid.clone().unwrap_or_else(unknown),
        ),
        ("Study Instance UID", r.study_instance_uid.clone()),
        ("Series Instance UID", r.series_instance_uid.clone()),
        ("Object key", r.object_key.clone()),
        ("Job", r.job_id.clone()),
        ("Size", format!("{} bytes", r.size)),
        (
            "Calling AE",
            r.calling_ae_title.clone().unwrap_or_else(unknown),
        ),
        ("Received at", r.received_at.clone()),
        ("Outcome", r.outcome.to_string()),
    ];
    lines.extend(outcome_details(&r.outcome));
    aligned(&lines)
}

/// `dicom-gateway spool status`: reads the spool directory; no running gateway needed.
fn spool(args: SpoolArgs) -> anyhow::Result<ExitCode> {
    let Some(dir) = args.spool_dir.spool_dir else {
        return Err(ConfigError::Combination(
            "`spool status` needs --spool-dir (or DICOM_GATEWAY_SPOOL_DIR): the gateway's spool directory",
        )
        .into());
    };
    let SpoolCommand::Status { json } = args.command;
    let status = crate::store::spool::status(&dir)
        .with_context(|| format!("cannot read the spool directory {}", dir.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", status.text());
    }
    Ok(ExitCode::SUCCESS)
}

/// `dicom-gateway echo`: one C-ECHO, a line saying how it went, exit 0 only on Success.
fn echo(args: EchoArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    let outcome = runtime()?.block_on(crate::echo::echo(
        &args.peer,
        &args.ae_title,
        &args.called_ae,
        args.timeout,
    ));
    Ok(match outcome {
        Ok(ok) => {
            println!(
                "C-ECHO {} (called AE {}): Success in {} ms",
                args.peer,
                args.called_ae,
                ok.round_trip.as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "C-ECHO {} (called AE {}) failed: {e}",
                args.peer, args.called_ae
            );
            ExitCode::FAILURE
        }
    })
}

/// Parses the command line (clap exits with status 2 on a usage error), checks it, runs it.
pub fn run() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args.into_config()?),
        Command::Jobs(args) => jobs(args),
        Command::Instances(args) => instances(args),
        Command::Echo(args) => echo(args),
        Command::Spool(args) => spool(args),
    }
}

/// The exit status for an error [`run`] returned: 2 for a configuration the options (or the AWS
/// environment: region, credentials) cannot make (a usage error, like clap's own), 1 for a failure
/// while running.
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    if error.downcast_ref::<ConfigError>().is_some()
        || error.downcast_ref::<crate::aws::AwsSetupError>().is_some()
    {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: InstanceOutcome) -> InstanceRecord {
        let key = "01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2/1.2.3/1.2.3.4.dcm";
        let mut r = crate::index::KeyParts::parse(key).unwrap().record(
            key,
            42,
            None,
            Some("CT1".into()),
            "2026-11-24T06:00:00.000Z".into(),
        );
        r.outcome = outcome;
        r
    }

    #[test]
    fn instances_show_prints_the_outcome_details() {
        let warned = instance_details(&record(InstanceOutcome::ImportedWithWarnings {
            image_set_id: "0a1b".into(),
            is_primary: false,
            warnings: vec!["InvalidOffsetTable (45330): bad".into(), "W (1)".into()],
        }));
        assert!(
            warned.contains("Outcome:            IMPORTED_WITH_WARNINGS\n"),
            "{warned}"
        );
        assert!(warned.contains("Image set:          0a1b\n"), "{warned}");
        assert!(warned.contains("Primary:            no"), "{warned}");
        assert!(
            warned.contains(
                "Warning:            InvalidOffsetTable (45330): bad\nWarning:            W (1)\n"
            ),
            "{warned}"
        );
        let failed = instance_details(&record(InstanceOutcome::Failed {
            exception_type: "ValidationException".into(),
            message: "not DICOM".into(),
        }));
        assert!(
            failed.contains(
                "Exception:          ValidationException\nMessage:            not DICOM\n"
            ),
            "{failed}"
        );
        let stored = instance_details(&record(InstanceOutcome::Stored));
        assert!(stored.ends_with("Outcome:            STORED\n"), "{stored}");
    }

    #[test]
    fn jobs_show_failed_lists_each_instance_with_its_exception() {
        let text = failed_instances(&[record(InstanceOutcome::Failed {
            exception_type: "ValidationException".into(),
            message: "not DICOM".into(),
        })]);
        assert!(
            text.starts_with("\nFailed instances: 1\n\nSOP Instance UID:   1.2.3.4\n"),
            "{text}"
        );
        assert!(
            text.contains("Object key:         01JD6Y7Z8X9W0V1T2S3R4Q5P6N/1.2/1.2.3/1.2.3.4.dcm")
        );
        assert!(
            text.contains(
                "Exception:          ValidationException\nMessage:            not DICOM\n"
            )
        );
        assert!(failed_instances(&[]).contains("Failed instances: 0\n(none recorded"));
    }

    #[test]
    fn aws_probing_is_quiet_unless_rust_log_says_otherwise() {
        let f = log_filter(None, "info").unwrap().to_string();
        assert!(f.contains("aws_config::imds=error"), "{f}");
        assert!(f.contains("aws_config::meta::credentials=error"), "{f}");
        assert!(f.contains("info"), "{f}");
        let f = log_filter(Some("debug"), "info").unwrap().to_string();
        assert_eq!(f, "debug", "RUST_LOG replaces everything");
        let f = log_filter(Some(""), "warn").unwrap().to_string();
        assert!(
            f.contains("aws_config::imds=error") && f.contains("warn"),
            "{f}"
        );
        assert!(log_filter(None, "info,[").is_err());
    }
}

//! The subcommands (`serve`, `jobs`, `echo`): what `main` runs once the command line is parsed
//! into a typed configuration ([`crate::cli`]). Exit status: 0 on success, 2 for a usage or
//! configuration error, 1 when running fails.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, ConfigError, EchoArgs, JobsArgs, JobsCommand};
use crate::config::{LogConfig, LogFormat, ServeConfig};
use crate::jobs::report;

fn init_logging(log: &LogConfig) -> Result<(), ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ => EnvFilter::try_new(&log.filter),
    }
    .map_err(|e| ConfigError::LogFilter(e.to_string()))?;
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

/// `dicom-gateway jobs list|show`: reads the same job store as `serve`.
fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let JobsArgs { store, command } = args;
    let store_config = store.into_config();
    runtime()?.block_on(async move {
        let store = crate::server::open_job_store(&store_config).await;
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
            JobsCommand::Show { job_id, json } => {
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
                if json {
                    serde_json::to_string_pretty(&job).unwrap_or_default() + "\n"
                } else {
                    report::details(&job)
                }
            }
        };
        print!("{text}");
        Ok(ExitCode::SUCCESS)
    })
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
        Command::Echo(args) => echo(args),
    }
}

/// The exit status for an error [`run`] returned: 2 for a configuration the options cannot make (a
/// usage error, like clap's own), 1 for a failure while running.
pub fn exit_code(error: &anyhow::Error) -> ExitCode {
    if error.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

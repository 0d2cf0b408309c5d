//! `dicom-gateway`: parses the command line once into a typed configuration (see `cli`), then runs
//! the subcommand. Exit status: 0 on success, 2 for a usage or configuration error, 1 when running
//! fails.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use dicom_gateway::cli::{Cli, Command, ConfigError, EchoArgs, JobsArgs, JobsCommand};
use dicom_gateway::config::{LogConfig, LogFormat, ServeConfig};
use dicom_gateway::jobs::report;

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
            dicom_gateway::server::shutdown_signal().await;
            trigger.cancel();
        });
        dicom_gateway::server::serve(config, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `dicom-gateway jobs list|show`: reads the same job store as `serve`.
fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let JobsArgs { store, command } = args;
    let store_config = store.into_config();
    runtime()?.block_on(async move {
        let store = dicom_gateway::server::open_job_store(&store_config).await;
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
    let outcome = runtime()?.block_on(dicom_gateway::echo::echo(
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
fn run() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Serve(args) => serve(args.into_config()?),
        Command::Jobs(args) => jobs(args),
        Command::Echo(args) => echo(args),
    }
}

/// Keeps glibc from growing its heap with the S3 part buffers. By default glibc raises its mmap
/// threshold each time a large block is freed, so after the first part, every 8 MiB part buffer
/// came from the heap arenas, which fragment and keep the memory: a 1.1 GB upload peaked at 97 MB
/// RSS. With a fixed 1 MiB threshold, blocks that large are mmap'd and returned to the system when
/// freed: 58 MB for the same upload.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A configuration the options cannot make is a usage error, like clap's own.
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

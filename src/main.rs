use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use dicom_gateway::config::{Cli, Command, EchoArgs, JobsArgs, JobsCommand, LogFormat};
use dicom_gateway::jobs::report;

fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("--log-level: {e}"))?;
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
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

fn runtime() -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        })
}

/// `dicom-gateway jobs list|show`: reads the same job store as `serve`.
fn jobs(args: JobsArgs) -> std::process::ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let store = dicom_gateway::server::open_job_store(&args.store).await;
        let result = match &args.command {
            JobsCommand::List { limit, status, json } => {
                let jobs = match status {
                    Some(st) => store.list_by_status(*st).await.map(|mut v| {
                        v.reverse();
                        v.truncate(*limit);
                        v
                    }),
                    None => store.list_recent(*limit).await,
                };
                jobs.map(|jobs| if *json { serde_json::to_string_pretty(&jobs).unwrap_or_default() + "\n" } else { report::table(&jobs) })
            }
            JobsCommand::Show { job_id, json } => match store.get(job_id).await {
                Ok(Some(job)) => Ok(if *json { serde_json::to_string_pretty(&job).unwrap_or_default() + "\n" } else { report::details(&job) }),
                Ok(None) => {
                    eprintln!("error: no job '{job_id}' in {}. `dicom-gateway jobs list` shows the recent ones.", store.describe());
                    return std::process::ExitCode::FAILURE;
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(text) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e} (reading {})", store.describe());
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// `dicom-gateway echo`: one C-ECHO, a line saying how it went, exit 0 only on Success.
fn echo(args: EchoArgs) -> std::process::ExitCode {
    for (name, ae) in [
        ("--ae-title", &args.ae_title),
        ("--called-ae", &args.called_ae),
    ] {
        if let Err(e) = dicom_gateway::config::validate_ae_title(ae) {
            eprintln!("error: {name} {e}");
            return std::process::ExitCode::from(2);
        }
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(dicom_gateway::echo::echo(
        &args.peer,
        &args.ae_title,
        &args.called_ae,
        args.timeout,
    )) {
        Ok(ok) => {
            println!(
                "C-ECHO {} (called AE {}): Success in {} ms",
                args.peer,
                args.called_ae,
                ok.round_trip.as_millis()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "C-ECHO {} (called AE {}) failed: {e}",
                args.peer, args.called_ae
            );
            std::process::ExitCode::FAILURE
        }
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

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            if let Err(e) = args.validate() {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
            if let Err(e) = init_logging(args.log_format, &args.log_level) {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
            let runtime = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            let result = runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                let trigger = shutdown.clone();
                tokio::spawn(async move {
                    dicom_gateway::server::shutdown_signal().await;
                    trigger.cancel();
                });
                dicom_gateway::server::serve(*args, shutdown).await
            });
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Jobs(args) => jobs(args),
        Command::Echo(args) => echo(args),
    }
}

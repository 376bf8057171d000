//! forkwatch: a system-wide fork-hazard monitor. The command line; the daemon is the library
//! (lib.rs).

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::{EnvFilter, fmt};

use forkwatch::{
    cli::{Cli, Command, LogFormat, UsageError, config},
    commands::{check, exec, fixture, run, selftest},
};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The config file only fills in FORKWATCH_* defaults, so it is applied before parsing and
    // its values meet the same validation as flags. A bad file is a usage error, like a bad flag.
    let mut ignore = Vec::new();
    if let Some(path) = config::config_path(&args) {
        match config::read(&path) {
            Ok(file) => {
                config::apply(&file.settings);
                ignore = file.ignore;
            }
            Err(err) => {
                eprintln!("forkwatch: error: {err}");
                return ExitCode::from(2);
            }
        }
    }
    let cli = Cli::parse_from(args);
    let command = cli.command.unwrap_or(Command::Run(cli.run));
    let log_format = match &command {
        Command::Run(args) => args.watch.common.log_format,
        Command::Exec(args) => args.watch.common.log_format,
        Command::Check(args) | Command::Selftest(args) => args.log_format,
        Command::Fixture { .. } => LogFormat::Text,
    };
    let result = match command {
        Command::Run(args) => {
            init_logging(args.watch.common.log_format);
            runtime().and_then(|rt| rt.block_on(run::run(args, ignore)))
        }
        Command::Exec(args) => {
            init_logging(args.watch.common.log_format);
            // CMD's status, or 3 for a finding in its tree: see commands/exec.
            match runtime().and_then(|rt| rt.block_on(exec::run(args, ignore))) {
                Ok(status) => return ExitCode::from(status),
                Err(err) => Err(err),
            }
        }
        Command::Check(args) => {
            init_logging(args.log_format);
            let items = check::run(&args);
            return exit(check::print(&items));
        }
        Command::Selftest(args) => {
            init_logging(args.log_format);
            match runtime().and_then(|rt| rt.block_on(selftest::run(args))) {
                Ok(passed) => return exit(passed),
                Err(err) => Err(err),
            }
        }
        Command::Fixture { name } => fixture::run(&name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, in the form the logs are in: a log pipeline parses JSON, a person reads
            // text.
            match log_format {
                LogFormat::Json => tracing::error!("{err:#}"),
                LogFormat::Text => eprintln!("forkwatch: error: {err:#}"),
            }
            // A configuration it cannot run with is a usage error, like a bad flag.
            if err.is::<UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn exit(success: bool) -> ExitCode {
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One thread for the HTTP server, signals and sinks; the event pipeline has its own thread
    // (pipeline/), so nothing here blocks for long.
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Logs go to stderr (stdout carries findings). `FORKWATCH_LOG` / `RUST_LOG` set the filter.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("FORKWATCH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald, kubectl logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

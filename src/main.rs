//! The `recap` binary: parse the command line, run, print the error chain, set the exit code.

use clap::Parser;

// The trainer allocates a fresh buffer per tensor op: glibc's malloc maps and unmaps the large
// ones each time (page faults and TLB shootdowns were most of a training step); mimalloc keeps
// and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = recap::cli::Cli::parse();
    let is_run = matches!(cli.command, recap::cli::Command::Run(_));
    if is_run {
        // Small short-lived buffers on many threads: huge pages cost CPU and memory there.
        recap::engine::without_huge_pages();
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RECAP_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs that go to files (Slurm, Kubernetes) stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = match runtime.block_on(async {
        tokio::select! {
            r = recap::cli::execute(cli) => Ok(r),
            signal = interrupted() => Err(signal),
        }
    }) {
        Ok(r) => r,
        Err((name, code)) => {
            // Shards are renamed into place only when whole, so stopping here loses nothing that
            // a rerun does not redo; say so, and exit as a shell expects of a signalled process.
            use std::io::IsTerminal;
            let nl = if std::io::stderr().is_terminal() { "\n" } else { "" };
            let what = if is_run {
                "; completed shards are kept and the shards in flight are redone: run the same command again to resume"
            } else {
                ""
            };
            eprintln!("{nl}recap: interrupted by {name}{what}");
            std::process::exit(code);
        }
    };
    if let Err(e) = result {
        // A closed stdout (`recap query ... | head`) is not a failure.
        if let recap::Error::Io { source, .. } = &e {
            if source.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
        let code = if matches!(e, recap::Error::Usage(_)) { 2 } else { 1 };
        eprintln!("error: {}", chain_message(&anyhow::Error::from(e)));
        std::process::exit(code);
    }
}

/// The error and its causes, "outer: inner: ...", leaving out a cause whose text is already
/// shown (DataFusion's and Arrow's errors repeat their sources in their own message).
fn chain_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C, `kill`, Slurm and Kubernetes stopping a job) with the
/// signal's name and the exit code a shell gives a process it ended (128 + the signal).
async fn interrupted() -> (&'static str, i32) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => ("SIGINT", 130),
                _ = term.recv() => ("SIGTERM", 143),
            },
            // No handlers: the default actions stay, and this never resolves.
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        match tokio::signal::ctrl_c().await {
            Ok(()) => ("Ctrl-C", 130),
            Err(_) => std::future::pending().await,
        }
    }
}

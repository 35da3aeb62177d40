//! The `recap` binary: parse the command line, run, print the error chain, set the exit code.

use clap::Parser;

fn main() {
    let cli = recap::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RECAP_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(recap::cli::execute(cli));
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

//! `xlb`: load, attach, run and manage the xlb XDP load balancer.

mod cli;

use std::io::Write as _;

use clap::Parser as _;

fn main() {
    let cli = cli::Cli::parse();
    let json_logs = matches!(
        &cli.command,
        cli::Command::Daemon(args) if args.log_format == cli::daemon::LogFormat::Json
    );
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json_logs {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let json = cli.json;
    if let Err(e) = cli::dispatch(cli) {
        // `xlb ... | head`: the reader has all it wanted; that is no error.
        if cli::output::is_stdout_closed(&e) {
            return;
        }
        if json {
            // Scripts read the kind; people read stderr as always.
            let failure = xlb::api::Failure::of(&e, xlb::api::FailureKind::Failed);
            let _ = cli::print_json(&serde_json::json!({
                "ok": false,
                "error": { "kind": failure.kind.name(), "message": failure.message },
            }));
        }
        // eprintln! would panic if stderr is closed too.
        let _ = writeln!(std::io::stderr(), "xlb: error: {e:#}");
        std::process::exit(1);
    }
}

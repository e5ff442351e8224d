use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use loadtest::cli::{Cli, Command, CompareArgs, RunArgs, EXIT_FAILED_CHECK};
use loadtest::report::Report;
use loadtest::{compare, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let outcome = match cli.command {
        Command::Run(args) => run_command(&args),
        Command::Compare(args) => compare_command(&args),
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tga-loadtest: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(args: &RunArgs) -> loadtest::Result<ExitCode> {
    let config = args.config(std::io::stderr().is_terminal())?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| {
        loadtest::LoadtestError::Config(format!("cannot start the async runtime: {e}"))
    })?;
    let report = runtime.block_on(async {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        // The first Ctrl-C stops sending and lets requests in flight finish (so the report is
        // still written); a second one exits at once.
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "tga-loadtest: stopping; waiting for requests in flight (Ctrl-C again to quit)"
                );
                let _ = stop_tx.send(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        run::run(&config, stop).await
    })?;
    print!("{}", report.render_text());
    run::write_outputs(&report, args.output.as_deref(), args.markdown.as_deref())?;
    if let Some(path) = &args.output {
        eprintln!("report: {}", path.display());
    }
    if let Some(path) = &args.markdown {
        eprintln!("markdown: {}", path.display());
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED_CHECK)
    })
}

fn compare_command(args: &CompareArgs) -> loadtest::Result<ExitCode> {
    let a = Report::read_json(&args.a)?;
    let b = Report::read_json(&args.b)?;
    let name = |p: &std::path::Path| p.display().to_string();
    print!(
        "{}",
        compare::render(&a, &b, (&name(&args.a), &name(&args.b)), args.markdown)
    );
    Ok(ExitCode::SUCCESS)
}

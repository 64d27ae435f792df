//! `ggfs`: the thin command-line edge over the library. One file per verb in
//! src/cli/; errors become one line on stderr and a non-zero exit.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap adds usage and a hint on more lines; keep the one that says what is wrong.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("ggfs: {}", first.trim_start_matches("error: "));
            return std::process::ExitCode::from(2);
        }
    };
    cli::init_logging(args.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ggfs: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("ggfs: {}", dedup_chain(chain).join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Drop causes whose text the outer message already contains.
fn dedup_chain(chain: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for msg in chain {
        if !out.iter().any(|o| o.contains(&msg)) {
            out.push(msg);
        }
    }
    out
}

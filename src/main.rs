//! `ggfs`: the thin command-line edge over the library. One file per verb in
//! src/cli/; errors become one line on stderr and a non-zero exit.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `ggfs help mount` is the daemon's own help, as `ggfs mount --help` is.
    if argv.len() == 3 && argv[1] == "help" && argv[2] == "mount" {
        argv = vec![argv[0].clone(), "mount".into(), "--help".into()];
    }
    // `ggfs unmount --help` (and `ggfs help unmount`): its argument only.
    let help_flag = |a: &std::ffi::OsString| a == "-h" || a == "--help";
    let unmount_help = match argv.get(1).and_then(|a| a.to_str()) {
        Some("unmount") => argv[2..].iter().any(help_flag),
        Some("help") => argv.len() == 3 && argv[2] == "unmount",
        _ => false,
    };
    if unmount_help {
        print!("{}", cli::unmount_help());
        return std::process::ExitCode::SUCCESS;
    }
    let args = match cli::Cli::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        // Bare `ggfs` (or a command group alone): the help, commands listed.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            e.exit()
        }
        Err(e) => {
            eprintln!("ggfs: {}", ggfs::usage::one_line(&e.to_string()));
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
    let result = runtime.block_on(cli::run(args));
    // A blocking task still running (a credential helper past its deadline)
    // would hold up a plain drop of the runtime for as long as it hangs.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            let tls = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<ggfs::Error>(),
                    Some(ggfs::Error::Tls { .. })
                )
            });
            let hint = if tls {
                " (a private CA: --ca-file PEM)"
            } else {
                ""
            };
            eprintln!("ggfs: {}{hint}", dedup_chain(chain).join(": "));
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

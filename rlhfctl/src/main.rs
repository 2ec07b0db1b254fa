//! `rlhfctl`: the rlhfd client CLI. Parsing and error reporting only; the
//! commands live in the `rlhfctl` library (`src/lib.rs`).

use std::process::ExitCode;

use clap::Parser;
use rlhfctl::{run, Cli};

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`rlhfctl list | head`) like other Unix
    // tools, instead of panicking inside println!.
    // SAFETY: restoring the default disposition of one signal at startup,
    // before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    rlhf_common::unset_empty_rlhf_env();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

//! The `ckpt` binary: parse, run, report. Everything else is in the library.

use std::process::ExitCode;

/// Large freed blocks are kept for the next batch's activations (see `ckpt::alloc`).
#[global_allocator]
static ALLOC: ckpt::alloc::Global = ckpt::alloc::Global;

fn main() -> ExitCode {
    let cli = ckpt::cli::parse();
    let code = match ckpt::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if ckpt::report::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ckpt: {}", ckpt::report::one_line(&err));
            ExitCode::FAILURE
        }
    };
    if std::env::var_os(ckpt::report::PEAK_RSS_ENV).is_some() {
        if let Some(kb) = ckpt::report::peak_rss_kb() {
            eprintln!("ckpt: peak resident memory {kb} kB");
        }
        let s = ckpt::alloc::GLOBAL.stats();
        eprintln!(
            "ckpt: allocator cache {} kB, live {} kB, peak requested {} kB, fresh {} kB",
            s.cached / 1024,
            s.live / 1024,
            s.peak_requested / 1024,
            s.fresh / 1024
        );
    }
    code
}

//! The `ckpt` binary: parse, run, report. Everything else is in the library.

use std::process::ExitCode;

/// Large freed blocks are kept for the next batch's activations (see `ckpt::alloc`).
#[global_allocator]
static ALLOC: ckpt::alloc::CachingAllocator = ckpt::alloc::CachingAllocator::new();

fn main() -> ExitCode {
    let cli = ckpt::cli::parse();
    match ckpt::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if ckpt::report::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ckpt: {}", ckpt::report::one_line(&err));
            ExitCode::FAILURE
        }
    }
}

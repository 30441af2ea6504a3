//! `ckpt completions SHELL`: the shell completion script, generated from the CLI definitions.

use std::io::Write;

use anyhow::Result;

use crate::cli::{completion, CompletionsArgs};

pub fn run(args: CompletionsArgs) -> Result<()> {
    std::io::stdout()
        .lock()
        .write_all(&completion(args.shell))?;
    Ok(())
}

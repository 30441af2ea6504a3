//! The command line: the one definition that `--help`, the man pages in `man/`, the shell
//! completions in `completions/` and the parser are all generated from, and the only code that
//! knows a flag's name.
//!
//! Parsing is two steps, as ripgrep's: clap fills the argument structs here ([`commands`]: one
//! per subcommand; [`args`]: the groups several commands share, each declared once), then each
//! command turns them into the engines' own configuration objects (`DataConfig`,
//! `average::Config`, ...), which know nothing of flags. Engine enums get their command-line
//! spelling in [`values`], not from a derive in the engine.

pub mod args;
pub mod commands;
pub mod values;

use clap::{Args, CommandFactory, Parser, Subcommand};

pub use args::*;
pub use commands::*;
pub use values::{OptimizerKind, Shell};

use crate::device::DeviceSpec;
use crate::models::Kernels;

const ABOUT: &str = "Make a trained image classifier better from its saved checkpoints";

const LONG_ABOUT: &str = "\
Make a trained image classifier better from its saved checkpoints: average snapshots (SWA), \
take an exponential moving average over saved steps (EMA), recompute BatchNorm statistics over \
images (precise BN), measure accuracy at several test resolutions, fine-tune at the test \
resolution (FixRes), choose model soups on held-out images, distil teachers into a student, \
and inspect what a checkpoint holds. Checkpoints may be .safetensors files, sharded \
safetensors (an index or its folder) or torch.save files (.pth, .pt, .bin, .pth.tar, .ckpt); the \
format is recognised from the content, and the model (torchvision's CNN families) from its \
tensors.";

#[derive(Parser, Debug)]
#[command(name = "ckpt", version, about = ABOUT, long_about = LONG_ABOUT, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Device for forward passes: cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU
    /// is present, else the CPU)
    #[arg(long, global = true, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,
    /// Worker threads (default: one per core)
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// Print results, warnings and errors only: no notes, no progress bars
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Kernels of the forward passes on the CPU: fast (ckpt's own) or candle (candle's ops, the
    /// path CUDA takes; for comparisons)
    #[arg(
        long,
        global = true,
        hide = true,
        env = "CKPT_CPU_CONV",
        value_name = "KERNELS",
        default_value = "fast",
        value_parser = values::parse_kernels
    )]
    pub kernels: Kernels,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Inspect(InspectArgs),
    Swa(SwaArgs),
    Ema(EmaArgs),
    Logits(LogitsArgs),
    Eval(EvalArgs),
    RecalBn(RecalBnArgs),
    SweepRes(SweepResArgs),
    Fixres(FixresArgs),
    Soup(SoupArgs),
    Distill(DistillArgs),
    Completions(CompletionsArgs),
}

pub fn parse() -> Cli {
    Cli::parse()
}

/// The man pages: `ckpt.1` and `ckpt-<subcommand>.1`, as (file name, content).
pub fn man_pages() -> Vec<(String, Vec<u8>)> {
    let cmd = Cli::command();
    let mut pages = Vec::new();
    let mut render = |name: String, c: clap::Command| {
        let mut buf = Vec::new();
        clap_mangen::Man::new(c)
            .render(&mut buf)
            .expect("rendering a man page into memory cannot fail");
        pages.push((format!("{name}.1"), buf));
    };
    render("ckpt".into(), cmd.clone());
    for sub in cmd.get_subcommands() {
        let name = format!("ckpt-{}", sub.get_name());
        let sub = sub
            .clone()
            .name(name.clone())
            .version(env!("CARGO_PKG_VERSION"));
        render(name, sub);
    }
    pages
}

/// The shell completion script for `shell`.
pub fn completion(shell: Shell) -> Vec<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(shell.generator(), &mut Cli::command(), "ckpt", &mut buf);
    buf
}

/// Every shell's completion script, as (file name, content): what `completions/` holds.
pub fn completion_files() -> Vec<(String, Vec<u8>)> {
    Shell::ALL
        .iter()
        .map(|&s| (s.file_name().to_string(), completion(s)))
        .collect()
}

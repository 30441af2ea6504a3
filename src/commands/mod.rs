//! One thin file per subcommand: its arguments, and a `run` that turns them into an engine
//! configuration, calls the engine and prints the result. The only code that prints.

pub mod average_common;
pub mod ema;
pub mod eval;
pub mod inspect;
pub mod logits;
pub mod recal_bn;
pub mod swa;
pub mod sweep_res;

use std::path::Path;

use anyhow::Result;

use crate::checkpoint::Checkpoint;
use crate::cli::{GlobalArgs, LabelArgs, OpenArgs};
use crate::data::{labels, Dataset, Labels};
use crate::models::Model;

use crate::cli::{Cli, Command};
use crate::report::Reporter;

pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.global.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .map_err(|e| anyhow::anyhow!("--threads {n}: {e}"))?;
    }
    let rep = Reporter::new(cli.global.quiet);
    match cli.command {
        Command::Inspect(a) => inspect::run(a, &cli.global, rep),
        Command::Swa(a) => swa::run(a, &cli.global, rep),
        Command::Ema(a) => ema::run(a, &cli.global, rep),
        Command::Logits(a) => logits::run(a, &cli.global, rep),
        Command::Eval(a) => eval::run(a, &cli.global, rep),
        Command::RecalBn(a) => recal_bn::run(a, &cli.global, rep),
        Command::SweepRes(a) => sweep_res::run(a, &cli.global, rep),
    }
}

/// Opens a model checkpoint, says how its state dict was found, and builds the network on the
/// device `--device` asks for.
pub fn open_model(
    path: &Path,
    open: &OpenArgs,
    arch: Option<&str>,
    global: &GlobalArgs,
    rep: &Reporter,
) -> Result<(Checkpoint, Model)> {
    let ck = Checkpoint::open(path, &open.options())?;
    if let Some(n) = ck.origin_note() {
        rep.note(n);
    }
    let dev = crate::device::resolve(global.device, |m| rep.note(m))?;
    let model = Model::load(&ck, arch, &dev)?;
    Ok((ck, model))
}

/// Labels a scanned ImageFolder's images with the classes of a model with `model_classes`
/// outputs (`--class-map`, ImageNet-1k synsets or the folder order): warns before any work when
/// they cannot be the model's (refuses with `--strict-labels`), and says once which labelling
/// it used.
pub fn label_images(
    ds: &mut Dataset,
    model_classes: usize,
    args: &LabelArgs,
    rep: &Reporter,
) -> Result<Labels> {
    let labels = labels::resolve(ds, model_classes, &args.options())?;
    if let Some(w) = &labels.warning {
        rep.warn(w);
    }
    rep.note(labels.describe());
    labels.apply(ds);
    Ok(labels)
}

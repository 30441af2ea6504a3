//! One thin file per subcommand: a `run` that turns its arguments (defined in `crate::cli`) into
//! engine configurations, calls the engines and prints the result. The only code that prints.
//! No command imports another: what several share is here ([`open_model`], [`device`]) or in
//! [`common`].

pub mod common;
pub mod completions;
pub mod distill;
pub mod ema;
pub mod eval;
pub mod fixres;
pub mod inspect;
pub mod logits;
pub mod recal_bn;
pub mod soup;
pub mod swa;
pub mod sweep_res;

use std::path::Path;

use anyhow::{Context, Result};

use crate::checkpoint::Checkpoint;
use crate::cli::{Cli, Command, DataOptions, GlobalArgs, LabelArgs, ModelArgs, OpenArgs};
use crate::data::{labels, Dataset, Labels};
use crate::models::{self, Model};
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
        Command::Fixres(a) => fixres::run(a, &cli.global, rep),
        Command::Soup(a) => soup::run(a, &cli.global, rep),
        Command::Distill(a) => distill::run(a, &cli.global, rep),
        Command::Completions(a) => completions::run(a),
    }
}

/// The device `--device` asks for (auto when not given), with its one-line note.
pub fn device(global: &GlobalArgs, rep: &Reporter) -> Result<candle_core::Device> {
    crate::device::resolve(global.device, |m| rep.note(m))
}

/// Opens a checkpoint to run as a model, its names made the model's (a wrapper's prefix
/// removed when only that makes them fit; see `models::use_model_names`). `arch` is `--arch`;
/// a model folder's config stands in for it (see [`model_arch`]).
pub fn open_for_model(path: &Path, open: &OpenArgs, arch: Option<&str>) -> Result<Checkpoint> {
    let mut ck = Checkpoint::open(path, &open.options())?;
    let arch = model_arch(arch, &ck)?;
    models::use_model_names(&mut ck, arch.as_deref(), open.keep_prefix)
        .with_context(|| path.display().to_string())?;
    Ok(ck)
}

/// The architecture a checkpoint runs as: `--arch` when given, else a model folder's
/// `architecture` (through `models::arch_for_model_name`), else `None` (detection alone). A
/// folder's `num_classes` must be the classifier's.
pub fn model_arch(flag: Option<&str>, ck: &Checkpoint) -> Result<Option<String>> {
    let Some(folder) = &ck.model_folder else {
        return Ok(flag.map(str::to_string));
    };
    let config = folder.config_path.display();
    let shapes = models::weight_shapes(ck);
    let arch = match (flag, &folder.architecture) {
        (Some(a), _) => Some(a.to_string()),
        (None, Some(name)) => {
            Some(models::arch_for_model_name(&shapes, name).with_context(|| config.to_string())?)
        }
        (None, None) => None,
    };
    if let Some(n) = folder.num_classes {
        let (found, _) = models::detect_unwrapped(&shapes, arch.as_deref())
            .with_context(|| ck.path.display().to_string())?;
        if found.num_classes() != n {
            anyhow::bail!(
                "{config}: num_classes is {n}, but the weights' classifier has {} classes ({found})",
                found.num_classes()
            );
        }
    }
    Ok(arch)
}

/// Opens a model checkpoint, says how its state dict was found, and builds the network on the
/// device `--device` asks for, with the kernels `--kernels` chooses.
pub fn open_model(
    args: &ModelArgs,
    global: &GlobalArgs,
    rep: &Reporter,
) -> Result<(Checkpoint, Model)> {
    let ck = open_for_model(&args.model, &args.open, args.arch.get())?;
    if let Some(n) = ck.origin_note() {
        rep.note(n);
    }
    let arch = model_arch(args.arch.get(), &ck)?;
    let model = load_model(&ck, arch.as_deref(), global, rep)?;
    Ok((ck, model))
}

/// Fills the data options no flag gave from a model folder's `pretrained_cfg` (nothing for other
/// checkpoints), saying once where they came from.
pub fn model_data_defaults(opts: &mut DataOptions, ck: &Checkpoint, rep: &Reporter) -> Result<()> {
    if let Some(folder) = &ck.model_folder {
        if let Some(line) = opts.take_model_defaults(folder)? {
            rep.note(line);
        }
    }
    Ok(())
}

/// Builds the network of an open checkpoint (see [`open_model`]).
pub fn load_model(
    ck: &Checkpoint,
    arch: Option<&str>,
    global: &GlobalArgs,
    rep: &Reporter,
) -> Result<Model> {
    let dev = device(global, rep)?;
    let model = Model::load(ck, arch, &dev)?.with_kernels(global.kernels);
    // The notice is about a choice made without a name; a folder's config names one.
    if let Some(n) = model.config.notice().filter(|_| arch.is_none()) {
        rep.note(n);
    }
    Ok(model)
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

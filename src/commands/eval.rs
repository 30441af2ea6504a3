//! `ckpt eval`: top-1, top-5 and loss of a checkpoint on an ImageFolder.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::cli::{DataArgs, GlobalArgs, OpenArgs};
use crate::data::Loader;
use crate::eval;
use crate::report::Reporter;

/// Evaluate a checkpoint on an ImageFolder: top-1, top-5, loss
///
/// Images go through the eval transform as torchvision's Resize + CenterCrop + ToTensor +
/// Normalize would make them; the model is recognised from the checkpoint.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model checkpoint
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    /// Architecture, instead of recognising it
    #[arg(long, value_name = "NAME")]
    pub arch: Option<String>,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub open: OpenArgs,
}

pub fn run(args: EvalArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (_, model) =
        super::open_model(&args.model, &args.open, args.arch.as_deref(), global, &rep)?;
    let cfg = args.data.config(global.threads)?;
    let mut ds = cfg.scan()?;
    if !ds.is_labelled() {
        bail!(
            "{}: a flat folder has no labels to evaluate against (use class sub-folders)",
            ds.root.display()
        );
    }
    let labels = super::label_images(&mut ds, model.config.num_classes(), &args.data.labels, &rep)?;
    let mut loader = Loader::new(&ds, cfg.transform, &cfg.loader, &rep)?;
    rep.note(format!(
        "{}: {}; {} images",
        args.model.display(),
        model.config,
        ds.len()
    ));
    let pass = eval::eval_pass(&model, &mut loader, false)?;
    let acc = pass.accuracy.unwrap_or_default();
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "arch": model.config.name(),
        "data": ds.root.display().to_string(),
        "images": acc.images,
        "skipped": pass.summary.skipped.len(),
        "top1": acc.top1(),
        "top5": acc.top5(),
        "loss": acc.loss(),
        "images_per_second": pass.summary.images_per_second(),
        "size": args.data.opts.size,
        "crop_pct": args.data.opts.crop_pct[0],
        "labelling": labels.record(),
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "top-1 {:.3} %  top-5 {:.3} %  loss {:.4}  ({} images, {:.1} images/s)",
            acc.top1(),
            acc.top5(),
            acc.loss(),
            acc.images,
            pass.summary.images_per_second()
        )?;
    }
    for s in &pass.summary.skipped {
        rep.note(format!("skipped {}", s.error));
    }
    Ok(())
}

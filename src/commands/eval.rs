//! `ckpt eval`: top-1, top-5 and loss of a checkpoint on an ImageFolder.

use std::io::Write;

use anyhow::{bail, Result};

use crate::cli::{EvalArgs, GlobalArgs};
use crate::commands::common;
use crate::data::Loader;
use crate::eval;
use crate::report::Reporter;

pub fn run(mut args: EvalArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (ck, model) = super::open_model(&args.model, global, &rep)?;
    super::model_data_defaults(&mut args.data.opts, &ck, &rep)?;
    common::check_json(&args.json, &ck.files, args.force)?;
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
        args.model.model.display(),
        model.config,
        ds.len()
    ));
    let pass = eval::eval_pass(&model, &mut loader, false)?;
    let acc = pass.accuracy.unwrap_or_default();
    let report = serde_json::json!({
        "model": args.model.model.display().to_string(),
        "arch": model.config.name(),
        "data": ds.root.display().to_string(),
        "images": acc.images,
        "skipped": pass.summary.skipped.len(),
        "top1": acc.top1(),
        "top5": acc.top5(),
        "loss": acc.loss(),
        "images_per_second": pass.summary.images_per_second(),
        "size": args.data.opts.size(),
        "crop_pct": args.data.opts.single_crop_pct()?,
        "labelling": labels.record(),
    });
    if !args.json.to_stdout() {
        writeln!(
            std::io::stdout().lock(),
            "top-1 {:.3} %  top-5 {:.3} %  loss {:.4}  ({} images, {:.1} images/s)",
            acc.top1(),
            acc.top5(),
            acc.loss(),
            acc.images,
            pass.summary.images_per_second()
        )?;
    }
    common::emit_json(&args.json, &report, args.force)?;
    for s in &pass.summary.skipped {
        rep.note(format!("skipped {}", s.error));
    }
    Ok(())
}

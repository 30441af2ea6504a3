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
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        bail!(
            "--temperature must be a positive number, not {}",
            args.temperature
        );
    }
    let teachers = args
        .teachers
        .iter()
        .map(|t| {
            let ck = super::open_for_model(t, &args.model.open, None)?;
            let arch = super::model_arch(None, &ck)?;
            let m = super::load_model(&ck, arch.as_deref(), global, &rep)?;
            if m.config.num_classes() != model.config.num_classes() {
                bail!(
                    "{}: the teacher has {} classes, the model {}",
                    t.display(),
                    m.config.num_classes(),
                    model.config.num_classes()
                );
            }
            rep.note(format!("teacher {}: {}", t.display(), m.config));
            Ok(m)
        })
        .collect::<Result<Vec<_>>>()?;
    let keep = !teachers.is_empty();
    let refs: Vec<&crate::models::Model> = teachers.iter().collect();
    let pass = eval::eval_pass_with(&model, &refs, &mut loader, keep)?;
    let teacher = keep.then(|| {
        eval::compare_with_teacher(
            &pass.logits,
            &pass.teacher_logits,
            pass.classes,
            args.temperature,
        )
    });
    let acc = pass.accuracy.unwrap_or_default();
    let report = serde_json::json!({
        "teachers": args.teachers.iter().map(|t| t.display().to_string()).collect::<Vec<_>>(),
        "temperature": keep.then_some(args.temperature),
        "kd_loss": teacher.map(|c| c.kd_loss),
        "teacher_agreement": teacher.map(|c| c.agreement),
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
        if let Some(c) = teacher {
            writeln!(
                std::io::stdout().lock(),
                "against the teacher{}: KD loss {:.4} (T = {}), top-1 agreement {:.3} %",
                if teachers.len() > 1 { "s' average" } else { "" },
                c.kd_loss,
                args.temperature,
                c.agreement
            )?;
        }
    }
    common::emit_json(&args.json, &report, args.force)?;
    for s in &pass.summary.skipped {
        rep.note(format!("skipped {}", s.error));
    }
    Ok(())
}

//! `ckpt fixres`: FixRes fine-tuning of a model's head at the test size (the engine is
//! `train::fixres`), optionally after recalibrating every BN layer there, with the accuracy at
//! each stage on a validation folder.

use std::io::Write;

use anyhow::{bail, Result};

use crate::bn::{self, apply};
use crate::checkpoint::write::check_outputs;
use crate::checkpoint::{provenance, Checkpoint};
use crate::cli::{FixresArgs, GlobalArgs, TransformKind};
use crate::commands::common;
use crate::data::{DataConfig, DatasetOptions};
use crate::eval;
use crate::models::Model;
use crate::report::Reporter;
use crate::train;

pub fn run(mut args: FixresArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let ck = Checkpoint::open(&args.model.model, &args.model.open.options())?;
    if let Some(n) = ck.origin_note() {
        rep.note(n);
    }
    let arch = super::model_arch(args.model.arch.get(), &ck)?;
    super::model_data_defaults(&mut args.data.opts, &ck, &rep)?;
    let force = args.out.force;
    check_outputs(std::slice::from_ref(&args.out.output), &ck.files, force)?;
    common::check_json(&args.json, &ck.files, force)?;
    if args.data.opts.transform != TransformKind::Eval {
        bail!("--transform train: fixres fine-tunes on the eval transform at the test size");
    }
    let data = args.data.config(global.threads)?;
    data.scan()?;
    let val = match &args.val {
        Some(dir) => {
            let mut v = data.clone();
            v.dir = dir.clone();
            v.dataset = DatasetOptions::default();
            v.scan()?;
            Some(v)
        }
        None => None,
    };
    let recal = match &args.recal_bn {
        Some(dir) => {
            let c = args.data.opts.config(dir, global.threads)?;
            c.scan()?;
            Some(c)
        }
        None => None,
    };
    let cfg = common::fine_tune_config(&args.train, data, args.data.opts.seed, global)?;
    let dev = super::device(global, &rep)?;
    let arch = arch.as_deref();
    let load = |c: &Checkpoint| -> Result<Model> {
        Ok(Model::load(c, arch, &dev)?.with_kernels(global.kernels))
    };
    let accuracy = |c: &Checkpoint, v: &DataConfig| -> Result<(f64, f64)> {
        let model = load(c)?;
        let (_, mut loader) = v.open(&rep)?;
        let pass = eval::eval_pass(&model, &mut loader, false)?;
        let a = pass.accuracy.unwrap_or_default();
        Ok((a.top1(), a.top5()))
    };
    let mut stages: Vec<(&str, f64, f64)> = Vec::new();
    if let Some(v) = &val {
        let (t1, t5) = accuracy(&ck, v)?;
        stages.push(("before", t1, t5));
    }

    let mut meta = provenance::metadata(&provenance::command_line(), std::slice::from_ref(&ck))?;
    let recalibrated = match &recal {
        Some(c) => {
            let (r, m) = bn::recalibrated_in_memory(&ck, &load(&ck)?, c, args.estimator, &rep)?;
            meta.extend(m);
            if let Some(v) = &val {
                let (t1, t5) = accuracy(&r, v)?;
                stages.push(("after recal-bn", t1, t5));
            }
            Some(r)
        }
        None => None,
    };
    let base = recalibrated.as_ref().unwrap_or(&ck);
    let out = train::fixres::fine_tune(base, arch, &dev, &cfg, &rep)?;
    meta.extend(out.metadata.clone());
    if let Some(v) = &val {
        let label = format!("{} (fine-tuned)", ck.path.display());
        let (t1, t5) = accuracy(&base.with_replaced(&out.tensors, label.as_ref())?, v)?;
        let stage = if recal.is_some() {
            "after recal-bn + fixres"
        } else {
            "after fixres"
        };
        stages.push((stage, t1, t5));
    }
    let replacement = apply::Replacement {
        tensors: out.tensors.clone(),
        changes: Vec::new(),
    };
    let (layout, folder) = common::model_output(&args.out.output, &ck, force)?;
    apply::write(base, &replacement, &layout, &meta, force)?;
    if let Some(f) = folder {
        f.commit()?;
    }

    let report = serde_json::json!({
        "output": args.out.output.display().to_string(),
        "size": args.data.opts.size(),
        "classifier": out.head.classifier,
        "last_bn": out.head.last_bn,
        "images": out.images,
        "epochs": args.train.epochs,
        "steps": out.steps,
        "losses": out.losses,
        "epoch_losses": out.epoch_losses,
        "recal_bn": args.recal_bn.as_ref().map(|d| d.display().to_string()),
        "accuracy": stages
            .iter()
            .map(|(s, t1, t5)| serde_json::json!({"stage": s, "top1": t1, "top5": t5}))
            .collect::<Vec<_>>(),
    });
    common::emit_json(&args.json, &report, force)?;
    if args.json.to_stdout() {
        return Ok(());
    }
    let mut o = std::io::stdout().lock();
    let first = out.losses.first().copied().unwrap_or(f64::NAN);
    let last = out.epoch_losses.last().copied().unwrap_or(f64::NAN);
    writeln!(
        o,
        "wrote {}: {} and {} fine-tuned at {} over {} images, {} epoch(s), {} steps; loss {first:.4} (first step) -> {last:.4} (last epoch)",
        args.out.output.display(),
        out.head.classifier,
        out.head.last_bn,
        args.data.opts.size(),
        out.images,
        args.train.epochs,
        out.steps
    )?;
    for (s, t1, t5) in &stages {
        writeln!(o, "  {s:26} top-1 {t1:7.3} %  top-5 {t5:7.3} %")?;
    }
    Ok(())
}

//! `ckpt soup`: greedy model soups, uniform soups and best-of selection on a validation folder.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::average;
use crate::bn::apply::Replacement;
use crate::checkpoint::write::{check_outputs, destinations, FolderOutput};
use crate::checkpoint::{bn_layers, provenance};
use crate::cli::{GlobalArgs, SoupArgs};
use crate::commands::common;
use crate::data::{decode, Batches};
use crate::models;
use crate::report::{human_bytes, Reporter};
use crate::soup::{self, Judge, Method, Score};

pub fn run(mut args: SoupArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (paths, inputs) = common::open_snapshots(&args.candidates, &rep)?;
    // A model folder's preprocessing (the first candidate's) where no flag gives it.
    super::model_data_defaults(&mut args.data_opts, &inputs[0], &rep)?;
    let cfg = common::config(&args.average, &args.output);
    let plan = average::plan(&inputs, &cfg)?;
    // -o DIR/: a model folder with the first candidate's config.json (removed again if the
    // soup fails before it is committed).
    let (layout, folder) = common::layout(&args.output.output, &args.output, &inputs);
    let folder = folder
        .map(|dir| {
            let config = inputs[0].model_folder.as_ref().map(|f| f.bytes.as_slice());
            FolderOutput::create(&dir, config, args.output.force)
        })
        .transpose()?;
    let files: Vec<PathBuf> = inputs.iter().flat_map(|c| c.files.clone()).collect();
    check_outputs(
        &destinations(&layout, &plan.planned_tensors()),
        &files,
        args.output.force,
    )?;
    common::check_json(&args.json, &files, args.output.force)?;
    let arch = super::model_arch(args.arch.get(), &inputs[0])?;
    let arch = arch.as_deref();
    let dev = super::device(global, &rep)?;

    // The network, recognised from the first candidate: its classes label the folder, its BN
    // layers decide whether recalibration is needed.
    let (config, _) = models::detect_unwrapped(&models::weight_shapes(&inputs[0]), arch)
        .with_context(|| paths[0].display().to_string())?;
    let classes = config.num_classes();
    rep.note(format!(
        "{} candidates of {}; method {} by {}",
        inputs.len(),
        config,
        args.method,
        args.metric
    ));
    let has_bn = !bn_layers(&inputs[0]).is_empty();
    if args.recal_bn.is_some() && !has_bn {
        bail!(
            "{}: the model has no BatchNorm layers: --recal-bn has nothing to re-estimate",
            paths[0].display()
        );
    }

    // The images, decoded once when they fit.
    let mut budget = common::cache_budget(args.cache_mb) as u64;
    let decoded_before = decode::files_decoded();
    let val_cfg = args.data_opts.config(&args.data, global.threads)?;
    let mut val_ds = val_cfg.scan()?;
    if !val_ds.is_labelled() {
        bail!(
            "{}: a flat folder has no labels to judge soups by (use class sub-folders)",
            val_ds.root.display()
        );
    }
    let labels = super::label_images(&mut val_ds, classes, &args.labels, &rep)?;
    let recal_ds = match &args.recal_bn {
        Some(dir) => {
            let mut c = args.data_opts.config(dir, global.threads)?;
            c.dataset.max_images = args.recal_max_images.0;
            c.dataset.shard = None;
            Some((c.scan()?, c))
        }
        None => None,
    };
    if args.recal_bn.is_none() && has_bn {
        rep.warn("the model has BatchNorm layers and no --recal-bn DIR was given: averaged running statistics do not fit averaged weights, so soups are judged (and written) with statistics that misrepresent them; give the training images as --recal-bn DIR");
    }
    let evaluations = soup::evaluations(args.method, inputs.len());
    let hold = |ds, c: &crate::data::DataConfig, what: &str, budget: &mut u64| {
        let need = Batches::bytes_needed(&ds, &c.transform);
        let b = Batches::new(ds, c.transform, &c.loader, budget, &rep)?;
        if b.cached() {
            rep.note(format!(
                "{what}: {} images of {} decoded once and held ({})",
                b.images(),
                c.dir.display(),
                human_bytes(need)
            ));
        } else {
            rep.note(format!(
                "{what}: the decoded images of {} need {}, more than the cache holds (--cache-mb): decoding them again for each of {evaluations} evaluations",
                c.dir.display(),
                human_bytes(need)
            ));
        }
        anyhow::Ok(b)
    };
    let val = hold(val_ds, &val_cfg, "validation", &mut budget)?;
    let recal = match recal_ds {
        Some((ds, c)) => Some(hold(ds, &c, "recalibration", &mut budget)?),
        None => None,
    };
    for b in std::iter::once(&val).chain(&recal) {
        for s in &b.summary().skipped {
            rep.note(format!("skipped {}", s.error));
        }
    }

    let judge = Judge {
        inputs: &inputs,
        plan: &plan,
        average: &cfg,
        val: &val,
        recal: recal.as_ref().map(|r| (r, args.estimator)),
        arch,
        keep_prefix: args.candidates.open.keep_prefix,
        device: &dev,
        kernels: global.kernels,
    };
    let name = |i: usize| paths[i].display().to_string();
    let t0 = std::time::Instant::now();
    let outcome = soup::run(&judge, args.method, args.metric, &name, &rep)?;
    let secs = t0.elapsed().as_secs_f64();
    let decoded = decode::files_decoded() - decoded_before;

    // The result, with its provenance and the recipe.
    let mut meta = provenance::metadata(&provenance::command_line(), &inputs)?;
    meta.insert("ckpt.method".into(), format!("soup-{}", args.method));
    meta.insert("ckpt.soup.metric".into(), args.metric.to_string());
    let chosen: Vec<String> = outcome.chosen.iter().map(|&i| name(i)).collect();
    meta.insert("ckpt.soup.chosen".into(), serde_json::to_string(&chosen)?);
    let w: Vec<String> = outcome.weights.iter().map(|w| format!("{w:.6}")).collect();
    meta.insert("ckpt.weights".into(), w.join(","));
    meta.insert("ckpt.soup.data".into(), args.data.display().to_string());
    meta.insert(
        "ckpt.soup.score".into(),
        serde_json::to_string(&outcome.result.score)?,
    );
    let none = Replacement {
        tensors: Default::default(),
        changes: Vec::new(),
    };
    let replacement = match (&outcome.result.recal, &args.recal_bn) {
        (Some((r, m)), Some(dir)) => {
            meta.insert("ckpt.recal.data".into(), dir.display().to_string());
            meta.extend(m.clone());
            r
        }
        _ => &none,
    };
    crate::bn::apply::write(
        &outcome.result.average,
        replacement,
        &layout,
        &meta,
        args.output.force,
    )?;
    if let Some(f) = folder {
        f.commit()?;
    }

    // The table and the record.
    let score_json = |s: &Score| serde_json::to_value(s).unwrap_or_default();
    let steps: Vec<serde_json::Value> = outcome
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "step": s.step,
                "candidate": name(s.candidate),
                "own": score_json(&s.own),
                "soup": s.soup.as_ref().map(score_json),
                "kept": s.kept,
            })
        })
        .collect();
    let out_name = destinations(&layout, &plan.planned_tensors())
        .pop()
        .unwrap_or_default();
    let record = serde_json::json!({
        "method": args.method.to_string(),
        "metric": args.metric.to_string(),
        "data": args.data.display().to_string(),
        "recal_bn": args.recal_bn.as_ref().map(|d| d.display().to_string()),
        "estimator": args.recal_bn.as_ref().map(|_| args.estimator.to_string()),
        "candidates": paths.iter().zip(&outcome.own).map(|(p, s)| {
            let mut v = score_json(s);
            v["path"] = p.display().to_string().into();
            v
        }).collect::<Vec<_>>(),
        "steps": steps,
        "chosen": chosen,
        "weights": outcome.weights,
        "result": score_json(&outcome.result.score),
        "output": out_name.display().to_string(),
        "evaluations": soup::evaluations(args.method, inputs.len()),
        "images": {
            "val": val.images(),
            "recal": recal.as_ref().map(|r| r.images()),
        },
        "cached": {
            "val": val.cached(),
            "recal": recal.as_ref().map(|r| r.cached()),
        },
        "decoded_images": decoded,
        "seconds": secs,
        "labelling": labels.record(),
    });
    if !args.json.to_stdout() {
        print_table(&outcome, &name, args.method)?;
        let mut out = std::io::stdout().lock();
        let r = &outcome.result.score;
        writeln!(
            out,
            "wrote {}: {} of {} candidate(s), top-1 {:.2} %  top-5 {:.2} %  loss {:.4}",
            out_name.display(),
            outcome.chosen.len(),
            inputs.len(),
            r.top1,
            r.top5,
            r.loss
        )?;
    }
    common::emit_json(&args.json, &record, args.output.force)?;
    rep.note(format!(
        "{} evaluations in {secs:.1} s; {decoded} image files decoded ({} of {}{})",
        soup::evaluations(args.method, inputs.len()),
        val.images(),
        args.data.display(),
        match (&recal, &args.recal_bn) {
            (Some(r), Some(d)) => format!(", {} of {}", r.images(), d.display()),
            _ => String::new(),
        }
    ));
    if args.recal_bn.is_none() && has_bn {
        rep.note("note: the written soup's BatchNorm statistics are averaged, not recomputed: `ckpt recal-bn OUT --data DIR` before use");
    }
    Ok(())
}

/// The steps as a table on standard output.
fn print_table(o: &soup::Outcome, name: &dyn Fn(usize) -> String, method: Method) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let width = o
        .steps
        .iter()
        .map(|s| name(s.candidate).len())
        .max()
        .unwrap_or(9)
        .max(9);
    let soup_cols = method == Method::Greedy;
    write!(
        out,
        "{:>4}  {:<width$}  {:>7} {:>7} {:>8}",
        "step", "candidate", "top-1", "top-5", "loss"
    )?;
    if soup_cols {
        write!(
            out,
            "  {:>10} {:>10} {:>9}",
            "soup top-1", "soup top-5", "soup loss"
        )?;
    }
    writeln!(
        out,
        "  {}",
        if method == Method::Best {
            "chosen"
        } else {
            "kept"
        }
    )?;
    for s in &o.steps {
        write!(
            out,
            "{:>4}  {:<width$}  {:>7.2} {:>7.2} {:>8.4}",
            s.step,
            name(s.candidate),
            s.own.top1,
            s.own.top5,
            s.own.loss
        )?;
        if soup_cols {
            match &s.soup {
                Some(p) => write!(out, "  {:>10.2} {:>10.2} {:>9.4}", p.top1, p.top5, p.loss)?,
                None => write!(out, "  {:>10} {:>10} {:>9}", "", "", "")?,
            }
        }
        writeln!(out, "  {}", if s.kept { "yes" } else { "no" })?;
    }
    if method == Method::Uniform {
        let r = &o.result.score;
        writeln!(
            out,
            "uniform soup of all {}: top-1 {:.2} %  top-5 {:.2} %  loss {:.4}",
            o.chosen.len(),
            r.top1,
            r.top5,
            r.loss
        )?;
    }
    Ok(())
}

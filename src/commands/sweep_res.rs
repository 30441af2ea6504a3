//! `ckpt sweep-res`: accuracy at many test resolutions in one pass, optionally with BN
//! statistics re-estimated at each size (FixRes-lite), the head fine-tuned at each size
//! (FixRes, the `train::fixres` engine), or both.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::bn::{self, apply};
use crate::checkpoint::write::{check_outputs, write_file, OutputLayout};
use crate::checkpoint::{num_params, provenance, Checkpoint};
use crate::cli::{GlobalArgs, SweepResArgs};
use crate::commands::common;
use crate::data::{sweep_loader, EvalTransform, Transform};
use crate::eval::sweep::{self, Row};
use crate::models::{BuildOptions, Model};
use crate::report::Reporter;
use crate::train;

pub fn run(mut args: SweepResArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    for m in &args.models {
        if !m.exists() && m.extension().is_some_and(|e| e == "json") {
            bail!(
                "{}: no such checkpoint (JSON goes to a file with --json={})",
                m.display(),
                m.display()
            );
        }
    }
    let cks = args
        .models
        .iter()
        .map(|p| super::open_for_model(p, &args.open, args.arch.get()))
        .collect::<Result<Vec<_>>>()?;
    // A model folder's preprocessing (the first model's, when several are swept together).
    if let Some(ck) = cks.first() {
        super::model_data_defaults(&mut args.data_opts, ck, &rep)?;
    }
    // Around the training size, and the size timm's validate.py tests at when the folder has one.
    let test_size = cks
        .first()
        .and_then(|c| c.model_folder.as_ref())
        .and_then(|f| f.pretrained_cfg.test_input_size)
        .map(|[_, h, _]| h);
    let sizes = match &args.sizes {
        Some(s) => s.clone(),
        None => {
            let mut s = sweep::default_sizes(args.data_opts.size());
            if let Some(t) = test_size.filter(|t| !s.contains(t)) {
                s.push(t);
                s.sort();
            }
            s
        }
    };
    if sizes.is_empty() || sizes.contains(&0) {
        bail!("--sizes needs positive sizes");
    }
    let train = args.data_opts.size();
    let points: Vec<EvalTransform> = sizes
        .iter()
        .flat_map(|&s| args.data_opts.crop_pcts().into_iter().map(move |c| (s, c)))
        .map(|(s, c)| args.data_opts.eval_transform(s, c))
        .collect();
    for t in &points {
        t.check()?;
    }
    if args.save_best.is_some() && cks.len() != 1 {
        bail!("--save-best needs exactly one MODEL");
    }
    if args.save_best.is_some() && args.recal_bn.is_none() && args.fixres.is_none() {
        bail!("--save-best writes the checkpoint recalibrated or fine-tuned at the best size: it needs --recal-bn or --fixres");
    }
    let inputs: Vec<PathBuf> = cks.iter().flat_map(|c| c.files.clone()).collect();
    let json = args.json.file().map(|p| p.to_path_buf());
    let outs: Vec<PathBuf> = [&args.csv, &json, &args.plot, &args.save_best]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    check_outputs(&outs, &inputs, args.force)?;
    let dev = super::device(global, &rep)?;
    let load = |ck: &Checkpoint, opts: &BuildOptions| -> Result<Model> {
        let arch = super::model_arch(args.arch.get(), ck)?;
        Ok(Model::load_with(ck, arch.as_deref(), &dev, opts)?.with_kernels(global.kernels))
    };
    let eval_cfg = args
        .data_opts
        .config_at(&args.data, global.threads, points[0].crop_pct)?;
    let mut ds = eval_cfg.scan()?;
    if !ds.is_labelled() {
        bail!(
            "{}: a flat folder has no labels to evaluate against",
            ds.root.display()
        );
    }
    let mut classes = Vec::new();
    for ck in &cks {
        let arch = super::model_arch(args.arch.get(), ck)?;
        let c = crate::models::detect(&crate::models::shapes_of(ck), arch.as_deref())
            .with_context(|| ck.path.display().to_string())?;
        classes.push((ck.path.display().to_string(), c.num_classes()));
    }
    if let Some((other, n)) = classes.iter().find(|(_, n)| *n != classes[0].1) {
        bail!(
            "{other} outputs {n} classes, {} {}: sweep models with the same classes together",
            classes[0].0,
            classes[0].1
        );
    }
    let labels = super::label_images(&mut ds, classes[0].1, &args.labels, &rep)?;

    // Models per checkpoint and point; recalibrated per point with --recal-bn.
    let mut models: Vec<Vec<Model>> = Vec::new();
    let mut best_stats = Vec::new();
    let mut best_tuned: Vec<Vec<Tuned>> = Vec::new();
    for ck in &cks {
        if let Some(n) = ck.origin_note() {
            rep.note(n);
        }
        if let Some(train_dir) = &args.fixres {
            let mut per_point = Vec::new();
            let mut tuned_per_point = Vec::new();
            for t in &points {
                let (model, tuned) = fine_tuned_at(ck, t, train_dir, &args, global, &dev, &rep)?;
                per_point.push(model);
                tuned_per_point.push(tuned);
            }
            models.push(per_point);
            best_tuned.push(tuned_per_point);
            continue;
        }
        match &args.recal_bn {
            None => models.push(vec![load(ck, &BuildOptions::default())?]),
            Some(dir) => {
                let base = load(ck, &BuildOptions::default())?;
                check_has_bn(ck, &base)?;
                let mut per_point = Vec::new();
                let mut stats_per_point = Vec::new();
                for t in &points {
                    let stats = recal_stats(&base, ck, t, dir, &args, global, &rep)?;
                    let mut overrides = HashMap::new();
                    for (prefix, (m, v)) in
                        stats.layers.iter().zip(stats.estimates(args.estimator)?)
                    {
                        overrides.insert(
                            format!("{prefix}.running_mean"),
                            m.iter().map(|x| *x as f32).collect(),
                        );
                        overrides.insert(
                            format!("{prefix}.running_var"),
                            v.iter().map(|x| *x as f32).collect(),
                        );
                    }
                    per_point.push(load(
                        ck,
                        &BuildOptions {
                            overrides: Some(&overrides),
                            ..BuildOptions::default()
                        },
                    )?);
                    stats_per_point.push(stats);
                }
                models.push(per_point);
                best_stats.push(stats_per_point);
            }
        }
    }
    let refs: Vec<Vec<&Model>> = models
        .iter()
        .map(|m| {
            if m.len() == 1 {
                vec![&m[0]; points.len()]
            } else {
                m.iter().collect()
            }
        })
        .collect();
    rep.note(format!(
        "{} images x {} points x {} models",
        ds.len(),
        points.len(),
        cks.len()
    ));
    let transforms: Vec<EvalTransform> = points.clone();
    let mut loader = sweep_loader(&ds, &transforms, &eval_cfg.loader, &rep)?;
    let t0 = std::time::Instant::now();
    let results = sweep::run(&refs, &mut loader)?;
    rep.note(format!(
        "sweep: {} images decoded once, {} forward passes each, in {:.2} s",
        ds.len(),
        points.len() * cks.len(),
        t0.elapsed().as_secs_f64()
    ));
    let sources: Vec<(PathBuf, usize)> = args
        .models
        .iter()
        .cloned()
        .zip(cks.iter().map(num_params))
        .collect();
    let rows = sweep::rows(
        &sources,
        &points,
        &results,
        train,
        args.recal_bn.is_some(),
        args.fixres.is_some(),
        labels.labelling.kind(),
    );

    if !args.json.to_stdout() {
        print_table(&rows)?;
    }
    let write = |path: &Option<PathBuf>, bytes: Vec<u8>| -> Result<()> {
        match path {
            Some(p) => write_file(p, &bytes, args.force),
            None => Ok(()),
        }
    };
    if args.csv.is_some() {
        write(&args.csv, sweep::to_csv(&rows)?)?;
    }
    common::emit_json(&args.json, &rows, args.force)?;
    if let Some(p) = &args.plot {
        write(&args.plot, sweep::chart(&rows, train).encode_for(p)?)?;
    }
    if let Some(out) = &args.save_best {
        let best = rows.iter().position(|r| r.best).unwrap_or(0);
        let mut meta = provenance::metadata(&provenance::command_line(), &cks)?;
        let layout = OutputLayout::new(out, None);
        if let Some(tuned) = best_tuned.first() {
            let tuned = &tuned[best];
            meta.extend(tuned.metadata.clone());
            let replacement = apply::Replacement {
                tensors: tuned.tensors.clone(),
                changes: Vec::new(),
            };
            apply::write(&cks[0], &replacement, &layout, &meta, args.force)?;
            rep.note(format!(
                "wrote {} (fine-tuned at {}{})",
                out.display(),
                points[best].size,
                if args.recal_bn.is_some() {
                    ", BN statistics recalibrated there first"
                } else {
                    ""
                }
            ));
        } else if let Some(stats) = best_stats.first() {
            meta.insert("ckpt.recal.estimator".into(), args.estimator.to_string());
            meta.insert("ckpt.recal.size".into(), points[best].size.to_string());
            meta.insert(
                "ckpt.recal.crop_pct".into(),
                points[best].crop_pct.to_string(),
            );
            bn::recalibrated(
                &cks[0],
                &stats[best],
                args.estimator,
                &layout,
                &meta,
                args.force,
            )?;
            rep.note(format!(
                "wrote {} (BN statistics at {})",
                out.display(),
                points[best].size
            ));
        }
    }
    Ok(())
}

/// A checkpoint fine-tuned at one point, as the tensors that differ from the input (BN
/// statistics recalibrated there, then the fine-tune's) and the metadata saying how.
struct Tuned {
    tensors: HashMap<String, Vec<u8>>,
    metadata: BTreeMap<String, String>,
}

/// Refuses `--recal-bn` for a model without BN layers.
fn check_has_bn(ck: &Checkpoint, model: &Model) -> Result<()> {
    if model.bn_layers.is_empty() {
        bail!(
            "{}: {} has no BatchNorm layers: --recal-bn has nothing to re-estimate",
            ck.path.display(),
            model.config.name()
        );
    }
    Ok(())
}

/// The BN statistics of `model` at point `t` over `dir` (all of it: --shard selects images of
/// --data only).
fn recal_stats(
    model: &Model,
    ck: &Checkpoint,
    t: &EvalTransform,
    dir: &std::path::Path,
    args: &SweepResArgs,
    global: &GlobalArgs,
    rep: &Reporter,
) -> Result<bn::Stats> {
    let mut cfg = args.data_opts.config_at(dir, global.threads, t.crop_pct)?;
    cfg.transform = Transform::Eval(*t);
    cfg.dataset.shard = None;
    rep.note(format!(
        "{}: BN statistics at {} (crop_pct {})",
        ck.path.display(),
        t.size,
        t.crop_pct
    ));
    let (stats, _, _) = bn::pass(model, &cfg, None, rep)?;
    Ok(stats)
}

/// `ck` fine-tuned at point `t` over `train_dir` (after recalibrating its BN statistics there
/// with --recal-bn), as `ckpt fixres --size` does: the model to evaluate, and what to write if
/// this point is the best.
fn fine_tuned_at(
    ck: &Checkpoint,
    t: &EvalTransform,
    train_dir: &std::path::Path,
    args: &SweepResArgs,
    global: &GlobalArgs,
    dev: &candle_core::Device,
    rep: &Reporter,
) -> Result<(Model, Tuned)> {
    let arch = super::model_arch(args.arch.get(), ck)?;
    let arch = arch.as_deref();
    let load = |c: &Checkpoint| -> Result<Model> {
        Ok(Model::load(c, arch, dev)?.with_kernels(global.kernels))
    };
    let mut tensors = HashMap::new();
    let mut metadata = BTreeMap::new();
    let recalibrated = match &args.recal_bn {
        Some(dir) => {
            let model = load(ck)?;
            check_has_bn(ck, &model)?;
            let stats = recal_stats(&model, ck, t, dir, args, global, rep)?;
            let estimates = stats.estimates(args.estimator)?;
            let r = apply::replacements(ck, &stats.layers, &estimates, stats.batches)?;
            metadata.insert("ckpt.recal.data".into(), dir.display().to_string());
            metadata.extend(bn::estimate_metadata(&stats, args.estimator));
            let label = format!("{} (recalibrated at {})", ck.path.display(), t.size);
            let c = ck.with_replaced(&r.tensors, label.as_ref())?;
            tensors = r.tensors;
            Some(c)
        }
        None => None,
    };
    let base = recalibrated.as_ref().unwrap_or(ck);
    let mut data = args
        .data_opts
        .config_at(train_dir, global.threads, t.crop_pct)?;
    data.transform = Transform::Eval(*t);
    data.dataset.shard = None;
    let cfg = common::fine_tune_config(&args.train, data, args.data_opts.seed, global)?;
    rep.note(format!(
        "{}: fine-tuning at {} (crop_pct {})",
        ck.path.display(),
        t.size,
        t.crop_pct
    ));
    let out = train::fixres::fine_tune(base, arch, dev, &cfg, rep)?;
    let label = format!("{} (fine-tuned at {})", ck.path.display(), t.size);
    let model = load(&base.with_replaced(&out.tensors, label.as_ref())?)?;
    metadata.extend(out.metadata);
    tensors.extend(out.tensors);
    Ok((model, Tuned { tensors, metadata }))
}

fn print_table(rows: &[Row]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let w = rows.iter().map(|r| r.model.len()).max().unwrap_or(5).max(5);
    writeln!(
        out,
        "{:w$}  {:>5} {:>6} {:>8} {:>8} {:>8} {:>7} {:>9}",
        "model", "size", "resize", "crop_pct", "top-1", "top-5", "delta", "images/s"
    )?;
    for r in rows {
        let delta = r
            .delta_top1
            .map(|d| format!("{d:+.2}"))
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:w$}  {:>5} {:>6} {:>8.3} {:>8.3} {:>8.3} {:>7} {:>9.1}{}",
            r.model,
            r.img_size,
            r.resize,
            r.crop_pct,
            r.top1,
            r.top5,
            delta,
            r.images_per_second,
            if r.best { "  * best" } else { "" }
        )?;
    }
    Ok(())
}

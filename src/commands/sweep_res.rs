//! `ckpt sweep-res`: accuracy at many test resolutions in one pass, optionally with BN
//! statistics re-estimated at each size (FixRes-lite).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::bn;
use crate::checkpoint::write::{check_outputs, write_file, OutputLayout};
use crate::checkpoint::{num_params, provenance, Checkpoint};
use crate::cli::{GlobalArgs, SweepResArgs};
use crate::commands::common;
use crate::data::{sweep_loader, EvalTransform, Transform};
use crate::eval::sweep::{self, Row};
use crate::models::{BuildOptions, Model};
use crate::report::Reporter;

pub fn run(args: SweepResArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let sizes = args
        .sizes
        .clone()
        .unwrap_or_else(|| sweep::default_sizes(args.data_opts.size));
    if sizes.is_empty() || sizes.contains(&0) {
        bail!("--sizes needs positive sizes");
    }
    let train = args.data_opts.size;
    let points: Vec<EvalTransform> = sizes
        .iter()
        .flat_map(|&s| args.data_opts.crop_pct.iter().map(move |&c| (s, c)))
        .map(|(s, c)| args.data_opts.eval_transform(s, c))
        .collect();
    for t in &points {
        t.check()?;
    }
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
    if args.save_best.is_some() && cks.len() != 1 {
        bail!("--save-best needs exactly one MODEL");
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
        Ok(Model::load_with(ck, args.arch.get(), &dev, opts)?.with_kernels(global.kernels))
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
        let c = crate::models::detect(&crate::models::shapes_of(ck), args.arch.get())
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
    for ck in &cks {
        if let Some(n) = ck.origin_note() {
            rep.note(n);
        }
        match &args.recal_bn {
            None => models.push(vec![load(ck, &BuildOptions::default())?]),
            Some(dir) => {
                let base = load(ck, &BuildOptions::default())?;
                if base.bn_layers.is_empty() {
                    bail!(
                        "{}: {} has no BatchNorm layers: --recal-bn has nothing to re-estimate",
                        ck.path.display(),
                        base.config.name()
                    );
                }
                let mut per_point = Vec::new();
                let mut stats_per_point = Vec::new();
                for t in &points {
                    let mut cfg = args.data_opts.config_at(dir, global.threads, t.crop_pct)?;
                    cfg.transform = Transform::Eval(*t);
                    // --shard selects images of --data; every recalibration reads all of DIR.
                    cfg.dataset.shard = None;
                    rep.note(format!(
                        "{}: BN statistics at {} (crop_pct {})",
                        ck.path.display(),
                        t.size,
                        t.crop_pct
                    ));
                    let (stats, _, _) = bn::pass(&base, &cfg, None, &rep)?;
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
    if let (Some(out), Some(stats)) = (&args.save_best, best_stats.first()) {
        let best = rows.iter().position(|r| r.best).unwrap_or(0);
        let mut meta = provenance::metadata(&provenance::command_line(), &cks)?;
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
            &OutputLayout::new(out, None),
            &meta,
            args.force,
        )?;
        rep.note(format!(
            "wrote {} (BN statistics at {})",
            out.display(),
            points[best].size
        ));
    }
    Ok(())
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

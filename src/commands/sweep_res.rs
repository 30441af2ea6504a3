//! `ckpt sweep-res`: accuracy at many test resolutions in one pass, optionally with BN
//! statistics re-estimated at each size (FixRes-lite).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::bn::Estimator;
use crate::checkpoint::write::{check_outputs, write_file, OutputLayout};
use crate::checkpoint::{num_params, provenance, Checkpoint};
use crate::cli::{DataOptions, GlobalArgs, LabelArgs, OpenArgs};
use crate::commands::recal_bn;
use crate::data::{sweep_loader, EvalTransform, Transform};
use crate::device;
use crate::eval::sweep::{self, PointResult};
use crate::models::Model;
use crate::plot::{Chart, Series};
use crate::report::Reporter;

/// Accuracy at several test sizes (and crop fractions) in one pass over the images
///
/// Each image is decoded once and resized to every size (resize = floor(size / crop_pct), centre
/// crop). Several checkpoints are compared in the same pass. With --recal-bn DIR, the BN
/// statistics are re-estimated at each size over DIR first (FixRes-lite), so that each size is
/// measured with statistics that fit it; --save-best writes that checkpoint for the best size.
/// The recalibration passes use the same data options as the evaluation (batch size 64 by
/// default, as recal-bn's), over DIR.
#[derive(Args, Debug)]
#[command(
    mut_arg("size", |a| a.long("train-size").help("Training image size: the default sizes are multiples of 32 from 0.75x to 1.5x of it, and deltas are against it")),
    mut_arg("batch_size", |a| a.default_value("64"))
)]
pub struct SweepResArgs {
    /// Checkpoints to compare (last epoch, SWA, EMA, ...)
    #[arg(value_name = "MODEL", required = true)]
    pub models: Vec<PathBuf>,
    /// Folder of labelled images (ImageFolder)
    #[arg(long = "data", value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub data_opts: DataOptions,
    #[command(flatten)]
    pub labels: LabelArgs,
    /// Test sizes (default: multiples of 32 from 0.75x to 1.5x of --train-size)
    #[arg(long, value_delimiter = ',', value_name = "S1,S2,...")]
    pub sizes: Option<Vec<u32>>,
    /// Re-estimate BN statistics at each size over the images in DIR before evaluating it
    #[arg(long = "recal-bn", value_name = "DIR")]
    pub recal_bn: Option<PathBuf>,
    /// Estimator for --recal-bn (see `ckpt recal-bn --help`)
    #[arg(long, value_enum, default_value = "population")]
    pub estimator: Estimator,
    /// Write the checkpoint recalibrated at the best size (needs --recal-bn and one MODEL)
    #[arg(long, value_name = "OUT", requires = "recal_bn")]
    pub save_best: Option<PathBuf>,
    /// Write the results as CSV in the column layout of timm's results-imagenet.csv
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write the results as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Plot top-1 against test size, one line per model and crop_pct (.png or .svg)
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Replace existing output files
    #[arg(long)]
    pub force: bool,
    /// Architecture, instead of recognising it
    #[arg(long, value_name = "NAME")]
    pub arch: Option<String>,
    #[command(flatten)]
    pub open: OpenArgs,
}

/// One row of the results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub model: String,
    pub img_size: u32,
    pub resize: u32,
    pub crop_pct: f64,
    pub interpolation: String,
    pub top1: f64,
    pub top5: f64,
    pub images: u64,
    /// Top-1 minus top-1 at the training size (same model and crop_pct), if measured.
    pub delta_top1: Option<f64>,
    pub images_per_second: f64,
    /// Parameters in millions.
    pub param_count: f64,
    pub best: bool,
    pub recal_bn: bool,
    /// Where the labels came from (`folder-order`, `class-map`, `imagenet-1k-synsets`).
    pub labelling: &'static str,
}

/// Sizes from 0.75x to 1.5x of `train`, multiples of 32 (always including `train`).
pub fn default_sizes(train: u32) -> Vec<u32> {
    let lo = ((train as f64 * 0.75) as u32 / 32 * 32).max(32);
    let hi = (train as f64 * 1.5) as u32;
    let mut v: Vec<u32> = (lo..=hi).step_by(32).collect();
    if !v.contains(&train) {
        v.push(train);
        v.sort();
    }
    v
}

pub fn run(args: SweepResArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let sizes = args
        .sizes
        .clone()
        .unwrap_or_else(|| default_sizes(args.data_opts.size));
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
    let cks = args
        .models
        .iter()
        .map(|p| Checkpoint::open(p, &args.open.options()))
        .collect::<Result<Vec<_>>>()?;
    if args.save_best.is_some() && cks.len() != 1 {
        bail!("--save-best needs exactly one MODEL");
    }
    let inputs: Vec<PathBuf> = cks.iter().flat_map(|c| c.files.clone()).collect();
    let outs: Vec<PathBuf> = [&args.csv, &args.json, &args.plot, &args.save_best]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    check_outputs(&outs, &inputs, args.force)?;
    let dev = device::resolve(global.device, |m| rep.note(m))?;
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
        let c = crate::models::detect(&crate::models::shapes_of(ck), args.arch.as_deref())
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
            None => models.push(vec![Model::load(ck, args.arch.as_deref(), &dev)?]),
            Some(dir) => {
                let base = Model::load(ck, args.arch.as_deref(), &dev)?;
                let mut per_point = Vec::new();
                let mut stats_per_point = Vec::new();
                for t in &points {
                    let mut cfg = args.data_opts.config_at(dir, global.threads, t.crop_pct)?;
                    cfg.transform = Transform::Eval(*t);
                    rep.note(format!(
                        "{}: BN statistics at {} (crop_pct {})",
                        ck.path.display(),
                        t.size,
                        t.crop_pct
                    ));
                    let (stats, _, _) = recal_bn::pass(&base, &cfg, &rep)?;
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
                    per_point.push(Model::load_with(
                        ck,
                        args.arch.as_deref(),
                        &dev,
                        &overrides,
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
    let rows = rows(
        &args,
        &cks,
        &points,
        &results,
        train,
        labels.labelling.kind(),
    );

    print_table(&rows)?;
    let write = |path: &Option<PathBuf>, bytes: Vec<u8>| -> Result<()> {
        match path {
            Some(p) => write_file(p, &bytes, args.force),
            None => Ok(()),
        }
    };
    write(&args.csv, to_csv(&rows).into_bytes())?;
    write(&args.json, serde_json::to_vec_pretty(&rows)?)?;
    if let Some(p) = &args.plot {
        write(&args.plot, chart(&rows, train).encode_for(p)?)?;
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
        recal_bn::recalibrated(
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

fn label(p: &std::path::Path, all: &[PathBuf]) -> String {
    let stem = p
        .file_name()
        .unwrap_or(p.as_os_str())
        .to_string_lossy()
        .to_string();
    let stem = stem
        .split(".safetensors")
        .next()
        .unwrap_or(&stem)
        .split(".pth")
        .next()
        .unwrap_or(&stem)
        .to_string();
    let clash = all
        .iter()
        .filter(|q| q.file_name() == p.file_name())
        .count()
        > 1;
    if clash {
        p.display().to_string()
    } else {
        stem
    }
}

fn rows(
    args: &SweepResArgs,
    cks: &[Checkpoint],
    points: &[EvalTransform],
    results: &[Vec<PointResult>],
    train: u32,
    labelling: &'static str,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (m, ck) in cks.iter().enumerate() {
        let name = label(&args.models[m], &args.models);
        let params = num_params(ck) as f64 / 1e6;
        let start = rows.len();
        for (p, t) in points.iter().enumerate() {
            let r = &results[m][p];
            rows.push(Row {
                model: name.clone(),
                img_size: t.size,
                resize: t.scale_size(),
                crop_pct: t.crop_pct,
                interpolation: t.interpolation.name().to_string(),
                top1: r.accuracy.top1(),
                top5: r.accuracy.top5(),
                images: r.accuracy.images,
                delta_top1: None,
                images_per_second: r.accuracy.images as f64 / r.forward_secs.max(1e-9),
                param_count: params,
                best: false,
                recal_bn: args.recal_bn.is_some(),
                labelling,
            });
        }
        let block = &mut rows[start..];
        let at_train: Vec<(f64, f64)> = block
            .iter()
            .filter(|r| r.img_size == train)
            .map(|r| (r.crop_pct, r.top1))
            .collect();
        for r in block.iter_mut() {
            r.delta_top1 = at_train
                .iter()
                .find(|(c, _)| *c == r.crop_pct)
                .map(|(_, t)| r.top1 - t);
        }
        // Best: highest top-1, then top-5, then the smaller size.
        if let Some(b) = (0..block.len()).max_by(|&i, &j| {
            (
                block[i].top1,
                block[i].top5,
                std::cmp::Reverse(block[i].img_size),
            )
                .partial_cmp(&(
                    block[j].top1,
                    block[j].top5,
                    std::cmp::Reverse(block[j].img_size),
                ))
                .unwrap_or(std::cmp::Ordering::Equal)
        }) {
            block[b].best = true;
        }
    }
    rows
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

/// timm's results-imagenet.csv layout; accuracies in percent, parameters in millions.
pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "model,img_size,top1,top1_err,top5,top5_err,param_count,crop_pct,interpolation\n",
    );
    for r in rows {
        let model = if r.model.contains([',', '"']) {
            format!("\"{}\"", r.model.replace('"', "\"\""))
        } else {
            r.model.clone()
        };
        s.push_str(&format!(
            "{model},{},{:.3},{:.3},{:.3},{:.3},{:.2},{:.3},{}\n",
            r.img_size,
            r.top1,
            100.0 - r.top1,
            r.top5,
            100.0 - r.top5,
            r.param_count,
            r.crop_pct,
            r.interpolation
        ));
    }
    s
}

fn chart(rows: &[Row], train: u32) -> Chart {
    let mut series: Vec<Series> = Vec::new();
    for r in rows {
        let label = if rows.iter().any(|o| o.crop_pct != r.crop_pct) {
            format!("{} @{}", r.model, r.crop_pct)
        } else {
            r.model.clone()
        };
        match series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push((r.img_size as f64, r.top1)),
            None => series.push(Series {
                label,
                points: vec![(r.img_size as f64, r.top1)],
            }),
        }
    }
    Chart {
        title: "top-1 accuracy against test size".into(),
        x_label: "test size (px)".into(),
        y_label: "top-1 %".into(),
        series,
        marker: Some((train as f64, format!("train {train}"))),
    }
}

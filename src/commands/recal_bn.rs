//! `ckpt recal-bn`: precise BatchNorm statistics from a pass over images.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::bn::part::{self, PartRecord, PassImages};
use crate::bn::{self, apply, Estimator, Stats};
use crate::checkpoint::write::{check_outputs, OutputLayout};
use crate::checkpoint::{provenance, Checkpoint};
use crate::cli::{DataOptions, GlobalArgs, OpenArgs};
use crate::data::{DataConfig, Shard};
use crate::models::Model;
use crate::report::Reporter;

/// Recompute BatchNorm running statistics over images (precise BN)
///
/// Freezes the weights, runs the images forward with every BN layer normalising with its batch
/// statistics (as in train mode; everything else as in eval), and replaces each layer's
/// running_mean and running_var. Estimators: population (default; fvcore's precise BN: the
/// mean and population variance of every element seen, weighted by count) or torch
/// (torch.optim.swa_utils.update_bn: the mean of batch means and of unbiased batch variances,
/// every batch weighing the same, the short last batch included). num_batches_tracked becomes
/// the number of batches, as update_bn leaves it; every other tensor is copied byte for byte.
///
/// Several machines: run each with --shard i/n --stats-out PART.safetensors, then
/// `ckpt recal-bn MODEL --merge PART... -o OUT`; the result equals one pass over all images.
/// Each part records the pass it is a slice of (the weights' digest, the data folder and
/// options, the estimator, its shard); the merge refuses parts that are not every shard of one
/// pass over MODEL's weights, naming the part and the field.
#[derive(Args, Debug)]
#[command(mut_arg("max_images", |a| a.default_value("8192")), mut_arg("batch_size", |a| a.default_value("64")))]
pub struct RecalBnArgs {
    /// Model checkpoint
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Folder of (training) images; see the data options
    #[arg(long = "data", value_name = "DIR", required_unless_present = "merge")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub data_opts: DataOptions,
    /// How running statistics are estimated from the batches (default: population). A stats
    /// part records it; with --merge the parts' is used, and a different one is refused
    #[arg(long, value_enum, value_name = "ESTIMATOR")]
    pub estimator: Option<Estimator>,
    /// Write the mergeable per-layer sums (f64) to this file instead of a checkpoint
    #[arg(long, value_name = "PART", conflicts_with = "merge")]
    pub stats_out: Option<PathBuf>,
    /// Combine --stats-out files of shards instead of reading images
    #[arg(long, value_name = "PART", num_args = 1.., conflicts_with = "data")]
    pub merge: Vec<PathBuf>,
    /// Output checkpoint (or, with --stats-out, the statistics file)
    #[arg(short, long, value_name = "OUT", required_unless_present = "stats_out")]
    pub output: Option<PathBuf>,
    /// Replace an existing output
    #[arg(long)]
    pub force: bool,
    /// Architecture, instead of recognising it
    #[arg(long, value_name = "NAME")]
    pub arch: Option<String>,
    /// Print the summary (every layer's change) as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub open: OpenArgs,
}

pub fn run(args: RecalBnArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (ck, model) =
        super::open_model(&args.model, &args.open, args.arch.as_deref(), global, &rep)?;
    if model.bn_layers.is_empty() {
        bail!(
            "{}: the model has no BatchNorm layers",
            args.model.display()
        );
    }
    let dest = args.stats_out.clone().or(args.output.clone()).unwrap();
    let mut inputs = ck.files.clone();
    let parts = args
        .merge
        .iter()
        .map(|p| Checkpoint::open(p, &Default::default()))
        .collect::<Result<Vec<_>>>()?;
    inputs.extend(parts.iter().flat_map(|p| p.files.clone()));
    check_outputs(std::slice::from_ref(&dest), &inputs, args.force)?;

    let digest = || part::model_digest(&ck, &model.bn_layers);
    let (stats, estimator, data_meta, record) = if args.merge.is_empty() {
        let dir = args.data.clone().unwrap();
        let cfg = args.data_opts.config(&dir, global.threads)?;
        let estimator = args.estimator.unwrap_or_default();
        let (stats, meta, images) = pass(&model, &cfg, &rep)?;
        let record = args.stats_out.is_some().then(|| {
            let shard = cfg.dataset.shard.unwrap_or(Shard { index: 0, count: 1 });
            PartRecord::new(digest(), &cfg, &images, estimator, shard)
        });
        (stats, estimator, meta, record)
    } else {
        let parts = parts.iter().map(part::read).collect::<Result<Vec<_>>>()?;
        let estimator = part::check_set(&parts, &args.model, &digest(), args.estimator)?;
        let mut total = parts[0].stats.clone();
        for p in &parts[1..] {
            total
                .merge(&p.stats)
                .with_context(|| p.path.display().to_string())?;
        }
        let mut meta: BTreeMap<String, String> = parts[0]
            .record
            .data
            .iter()
            .map(|(k, v)| (format!("ckpt.recal.{k}"), v.clone()))
            .collect();
        meta.insert("ckpt.recal.merged".into(), parts.len().to_string());
        (total, estimator, meta, None)
    };
    if stats.layers != model.bn_layers {
        bail!(
            "the statistics are of another model: their BN layers differ from {}'s",
            args.model.display()
        );
    }
    // Provenance covers the model and any merged statistics files.
    let mut sources = vec![ck];
    sources.extend(parts);
    let mut meta = provenance::metadata(&provenance::command_line(), &sources)?;
    meta.extend(data_meta);
    let ck = &sources[0];
    if let (Some(path), Some(record)) = (&args.stats_out, &record) {
        part::write(path, &stats, record, &meta, args.force)?;
        writeln!(
            std::io::stdout(),
            "wrote {} (shard {}: {} images, {} batches, {} BN layers)",
            path.display(),
            record.shard,
            stats.images,
            stats.batches,
            stats.layers.len()
        )?;
        return Ok(());
    }
    meta.insert("ckpt.recal.estimator".into(), estimator.to_string());
    meta.insert("ckpt.recal.images".into(), stats.images.to_string());
    meta.insert("ckpt.recal.batches".into(), stats.batches.to_string());
    let changes = recalibrated(
        ck,
        &stats,
        estimator,
        &OutputLayout::new(&dest, None),
        &meta,
        args.force,
    )?;
    report(&dest, &stats, estimator, &changes, args.json, &rep)
}

/// One calibrate pass over a folder; returns the statistics, the metadata describing it and
/// the images of the whole pass (before `--shard`), which a stats part records.
///
/// `--shard i/n` splits the pass by batches here (batches i, i + n, ... of the whole pass),
/// not by images: each shard then sees exactly the batches the single pass would, so merged
/// shards give the single pass's statistics (to f64 summation order) under either estimator.
pub fn pass(
    model: &Model,
    cfg: &DataConfig,
    rep: &Reporter,
) -> Result<(Stats, BTreeMap<String, String>, PassImages)> {
    let mut whole = cfg.clone();
    whole.dataset.shard = None;
    let mut ds = whole.scan()?;
    let images = PassImages::of(&ds);
    if let Some(sh) = cfg.dataset.shard {
        let bs = cfg.loader.batch_size;
        ds.items = ds
            .items
            .chunks(bs)
            .enumerate()
            .filter(|(k, _)| k % sh.count == sh.index)
            .flat_map(|(_, c)| c.to_vec())
            .collect();
        if ds.items.is_empty() {
            bail!(
                "{}: shard {}/{} has no batch of {bs} images",
                ds.root.display(),
                sh.index,
                sh.count
            );
        }
    }
    let mut loader = crate::data::Loader::new(&ds, cfg.transform, &cfg.loader, rep)?;
    rep.note(format!(
        "recalibrating {} BN layers over {} images of {}",
        model.bn_layers.len(),
        ds.len(),
        ds.root.display()
    ));
    let t0 = std::time::Instant::now();
    let stats = bn::calibrate(model, &mut loader)?;
    let secs = t0.elapsed().as_secs_f64();
    let skipped = &loader.summary().skipped;
    for s in skipped {
        rep.note(format!("skipped {}", s.error));
    }
    let n = ds.len() - skipped.len();
    rep.note(format!(
        "calibration: {n} images in {secs:.2} s ({:.1} images/s, decoding included)",
        n as f64 / secs
    ));
    let mut meta = BTreeMap::new();
    meta.insert("ckpt.recal.data".into(), cfg.dir.display().to_string());
    meta.insert(
        "ckpt.recal.transform".into(),
        format!("{:?}", cfg.transform),
    );
    meta.insert("ckpt.recal.dataset".into(), format!("{:?}", cfg.dataset));
    Ok((stats, meta, images))
}

/// Writes `ck` with the statistics' estimates; returns each layer's change.
pub fn recalibrated(
    ck: &Checkpoint,
    stats: &Stats,
    est: Estimator,
    layout: &OutputLayout,
    meta: &BTreeMap<String, String>,
    force: bool,
) -> Result<Vec<apply::LayerChange>> {
    let estimates = stats.estimates(est)?;
    let r = apply::replacements(ck, &stats.layers, &estimates, stats.batches)?;
    apply::write(ck, &r, layout, meta, force)?;
    Ok(r.changes)
}

/// The closing summary: layers updated and the largest relative changes.
pub fn report(
    dest: &Path,
    stats: &Stats,
    est: Estimator,
    changes: &[apply::LayerChange],
    json: bool,
    rep: &Reporter,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let j = serde_json::json!({
            "output": dest.display().to_string(),
            "estimator": est.to_string(),
            "images": stats.images,
            "batches": stats.batches,
            "layers": changes,
        });
        serde_json::to_writer_pretty(&mut out, &j)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "wrote {}: {} BN layers recalibrated ({} estimator) over {} images in {} batches",
        dest.display(),
        changes.len(),
        est,
        stats.images,
        stats.batches
    )?;
    let mut by_var: Vec<&apply::LayerChange> = changes.iter().collect();
    by_var.sort_by(|a, b| b.var_change.total_cmp(&a.var_change));
    rep.note("largest relative changes (mean, var):");
    for c in by_var.iter().take(5) {
        rep.note(format!(
            "  {:40} {:9.3} % {:9.3} %",
            c.layer,
            100.0 * c.mean_change,
            100.0 * c.var_change
        ));
    }
    Ok(())
}

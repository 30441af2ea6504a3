//! The calibration pass: a model in calibrate mode over a folder of images, its statistics
//! summed per layer ([`super::Stats`]), optionally one batch-shard of the pass, and the
//! recalibrated checkpoint written from them.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::part::PassImages;
use super::{apply, calibrate, Estimator, Stats};
use crate::checkpoint::write::OutputLayout;
use crate::checkpoint::Checkpoint;
use crate::data::{DataConfig, Shard};
use crate::models::Model;
use crate::report::Reporter;

/// One calibrate pass over a folder; returns the statistics, the metadata describing it and the
/// images of the whole pass (before `shard`), which a stats part records.
///
/// `shard` splits the pass by batches (batches i, i + n, ... of the whole pass), not by images:
/// each shard then sees exactly the batches the single pass would, so merged shards give the
/// single pass's statistics (to f64 summation order) under either estimator. (`cfg`'s own
/// image shard, if any, is applied first.)
pub fn pass(
    model: &Model,
    cfg: &DataConfig,
    shard: Option<Shard>,
    rep: &Reporter,
) -> Result<(Stats, BTreeMap<String, String>, PassImages)> {
    let mut ds = cfg.scan()?;
    let images = PassImages::of(&ds);
    if let Some(sh) = shard {
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
    crate::report::test_pause("calibrate");
    let stats = calibrate(model, &mut loader)?;
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
    // The options that chose the images, the batch shard among them.
    let mut chosen = cfg.dataset;
    chosen.shard = shard.or(chosen.shard);
    meta.insert("ckpt.recal.dataset".into(), format!("{chosen:?}"));
    Ok((stats, meta, images))
}

/// Writes `ck` with the statistics' estimates (see [`apply`]); returns each layer's change.
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

/// `ck` with every BN layer's statistics re-estimated by a pass of `model` (built from `ck`)
/// over `cfg`'s images, held in memory (see [`apply`] for what changes); the pass's metadata
/// with the estimator, images and batches added.
pub fn recalibrated_in_memory(
    ck: &Checkpoint,
    model: &Model,
    cfg: &DataConfig,
    est: Estimator,
    rep: &Reporter,
) -> Result<(Checkpoint, BTreeMap<String, String>)> {
    let (stats, mut meta, _) = pass(model, cfg, None, rep)?;
    let estimates = stats.estimates(est)?;
    let r = apply::replacements(ck, &stats.layers, &estimates, stats.batches)?;
    meta.extend(estimate_metadata(&stats, est));
    let label = format!("{} (recalibrated)", ck.path.display());
    Ok((ck.with_replaced(&r.tensors, label.as_ref())?, meta))
}

/// What a recalibrated checkpoint's metadata says of its estimate: the estimator and the images
/// and batches the statistics came from.
pub fn estimate_metadata(stats: &Stats, est: Estimator) -> BTreeMap<String, String> {
    [
        ("ckpt.recal.estimator", est.to_string()),
        ("ckpt.recal.images", stats.images.to_string()),
        ("ckpt.recal.batches", stats.batches.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

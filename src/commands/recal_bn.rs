//! `ckpt recal-bn`: precise BatchNorm statistics from a pass over images.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::bn::{self, apply, Estimator, Stats};
use crate::checkpoint::write::{check_outputs, write_owned, OutputLayout, OwnedTensor};
use crate::checkpoint::{provenance, Checkpoint, DType};
use crate::cli::{GlobalArgs, JsonArg, RecalBnArgs};
use crate::commands::common;
use crate::report::Reporter;

pub fn run(args: RecalBnArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (ck, model) = super::open_model(&args.model, global, &rep)?;
    if model.bn_layers.is_empty() {
        bail!(
            "{}: {} has no BatchNorm layers: nothing to recalibrate",
            args.model.model.display(),
            model.config.name()
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
    common::check_json(&args.json, &inputs, args.force)?;

    let (stats, data_meta) = if args.merge.is_empty() {
        let dir = args.data.clone().unwrap();
        let mut cfg = args.data_opts.config(&dir, global.threads)?;
        // --shard here splits the pass by batches (see bn::pass), not by images.
        let shard = cfg.dataset.shard.take();
        bn::pass(&model, &cfg, shard, &rep)?
    } else {
        let mut total: Option<Stats> = None;
        for p in &parts {
            let s = read_stats(p).with_context(|| p.path.display().to_string())?;
            match &mut total {
                None => total = Some(s),
                Some(t) => t.merge(&s).with_context(|| p.path.display().to_string())?,
            }
        }
        let mut meta = BTreeMap::new();
        meta.insert("ckpt.recal.merged".into(), parts.len().to_string());
        (total.unwrap(), meta)
    };
    if stats.layers != model.bn_layers {
        bail!(
            "the statistics are of another model: their BN layers differ from {}'s",
            args.model.model.display()
        );
    }
    // Provenance covers the model and any merged statistics files.
    let mut sources = vec![ck];
    sources.extend(parts);
    let mut meta = provenance::metadata(&provenance::command_line(), &sources)?;
    meta.extend(data_meta);
    let ck = &sources[0];
    if let Some(part) = &args.stats_out {
        write_stats(part, &stats, &meta, args.force)?;
        writeln!(
            std::io::stdout(),
            "wrote {} ({} images, {} batches, {} BN layers)",
            part.display(),
            stats.images,
            stats.batches,
            stats.layers.len()
        )?;
        return Ok(());
    }
    meta.insert("ckpt.recal.estimator".into(), args.estimator.to_string());
    meta.insert("ckpt.recal.images".into(), stats.images.to_string());
    meta.insert("ckpt.recal.batches".into(), stats.batches.to_string());
    let changes = bn::recalibrated(
        ck,
        &stats,
        args.estimator,
        &OutputLayout::new(&dest, None),
        &meta,
        args.force,
    )?;
    report(
        &dest,
        &stats,
        args.estimator,
        &changes,
        &args.json,
        args.force,
        &rep,
    )
}

/// The closing summary: layers updated and the largest relative changes.
fn report(
    dest: &Path,
    stats: &Stats,
    est: Estimator,
    changes: &[apply::LayerChange],
    json: &JsonArg,
    force: bool,
    rep: &Reporter,
) -> Result<()> {
    let j = serde_json::json!({
        "output": dest.display().to_string(),
        "estimator": est.to_string(),
        "images": stats.images,
        "batches": stats.batches,
        "layers": changes,
    });
    common::emit_json(json, &j, force)?;
    if json.to_stdout() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
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

fn write_stats(path: &Path, s: &Stats, meta: &BTreeMap<String, String>, force: bool) -> Result<()> {
    let tensors: Vec<OwnedTensor> = bn::to_tensors(s)
        .into_iter()
        .map(|(name, v)| OwnedTensor {
            name,
            dtype: DType::F64,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let mut m = meta.clone();
    m.insert(bn::META_LAYERS.into(), serde_json::to_string(&s.layers)?);
    m.insert(bn::META_BATCHES.into(), s.batches.to_string());
    m.insert(bn::META_IMAGES.into(), s.images.to_string());
    write_owned(path, &tensors, &m, force)
}

fn read_stats(ck: &Checkpoint) -> Result<Stats> {
    let layers: Vec<String> = ck
        .metadata
        .get(bn::META_LAYERS)
        .context("not a --stats-out file (no BN layer list in its metadata)")
        .and_then(|s| serde_json::from_str(s).context("bad BN layer list"))?;
    let num = |k: &str| -> Result<u64> {
        ck.metadata
            .get(k)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {k} in the metadata"))
    };
    bn::from_tensors(
        layers,
        num(bn::META_BATCHES)?,
        num(bn::META_IMAGES)?,
        |name| {
            let t = ck.get(name).filter(|t| t.dtype == DType::F64)?;
            let b = ck.bytes(t);
            Some(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            )
        },
    )
}

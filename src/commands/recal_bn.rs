//! `ckpt recal-bn`: precise BatchNorm statistics from a pass over images.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::bn::part::{self, PartRecord};
use crate::bn::{self, apply, Estimator, Stats};
use crate::checkpoint::write::{check_outputs, wants_folder, FolderOutput, OutputLayout};
use crate::checkpoint::{provenance, Checkpoint};
use crate::cli::{GlobalArgs, JsonArg, RecalBnArgs};
use crate::commands::common;
use crate::data::Shard;
use crate::report::Reporter;

pub fn run(mut args: RecalBnArgs, global: &GlobalArgs, rep: Reporter) -> Result<()> {
    let (ck, model) = super::open_model(&args.model, global, &rep)?;
    if args.data.is_some() {
        super::model_data_defaults(&mut args.data_opts, &ck, &rep)?;
    }
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
    // -o DIR/: a model folder with the input folder's config.json (see write::FolderOutput).
    let folder = match &args.output {
        Some(o) if args.stats_out.is_none() && wants_folder(o) => {
            let config = ck.model_folder.as_ref().map(|f| f.bytes.as_slice());
            Some(FolderOutput::create(o, config, args.force)?)
        }
        _ => None,
    };
    let layout = match &folder {
        Some(f) => f.layout(None),
        None => OutputLayout::new(&dest, None),
    };
    let dest = match &layout {
        OutputLayout::Single(p) => p.clone(),
        OutputLayout::Sharded { index, .. } => index.clone(),
    };
    check_outputs(std::slice::from_ref(&dest), &inputs, args.force)?;
    common::check_json(&args.json, &inputs, args.force)?;

    let digest = || part::model_digest(&ck, &model.bn_layers);
    let (stats, estimator, data_meta, record) = if args.merge.is_empty() {
        let dir = args.data.clone().unwrap();
        let mut cfg = args.data_opts.config(&dir, global.threads)?;
        // --shard here splits the pass by batches (see bn::pass), not by images.
        let shard = cfg.dataset.shard.take();
        let estimator = args.estimator.unwrap_or_default();
        let (stats, meta, images) = bn::pass(&model, &cfg, shard, &rep)?;
        let record = args.stats_out.is_some().then(|| {
            let shard = shard.unwrap_or(Shard { index: 0, count: 1 });
            PartRecord::new(digest(), &cfg, &images, estimator, shard)
        });
        (stats, estimator, meta, record)
    } else {
        let parts = parts.iter().map(part::read).collect::<Result<Vec<_>>>()?;
        let estimator = part::check_set(&parts, &args.model.model, &digest(), args.estimator)?;
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
            args.model.model.display()
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
    meta.extend(bn::estimate_metadata(&stats, estimator));
    let changes = bn::recalibrated(ck, &stats, estimator, &layout, &meta, args.force)?;
    if let Some(f) = folder {
        f.commit()?;
    }
    report(
        &dest, &stats, estimator, &changes, &args.json, args.force, &rep,
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

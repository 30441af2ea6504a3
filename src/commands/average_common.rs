//! What `swa` and `ema` share: choosing and opening the snapshots, checking the outputs, and the
//! closing summary.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::average::{self, select, Config, OutputSpec, Plan};
use crate::bn::Estimator;
use crate::checkpoint::guard::PendingFile;
use crate::checkpoint::write::{check_outputs, destinations, OutputLayout};
use crate::checkpoint::{bn_layers, provenance, Checkpoint, Format};
use crate::cli::{AverageArgs, DataOptions, GlobalArgs, OutputArgs, SnapshotArgs};
use crate::commands::recal_bn;
use crate::device;
use crate::models::Model;
use crate::report::{human_bytes, Reporter};

/// Chooses, orders and opens the snapshots, printing the list before any work.
pub fn open_snapshots(
    args: &SnapshotArgs,
    rep: &Reporter,
) -> Result<(Vec<PathBuf>, Vec<Checkpoint>)> {
    let paths = select::select(
        select::expand(&args.snapshots)?,
        &select::Selection {
            no_sort: args.no_sort,
            every: args.every,
            last: args.last,
        },
    )?;
    rep.note(format!("{} snapshot(s), oldest first:", paths.len()));
    for p in &paths {
        rep.note(format!("  {}", p.display()));
    }
    let opts = args.open.options();
    let cks = paths
        .iter()
        .map(|p| Checkpoint::open(p, &opts))
        .collect::<Result<Vec<_>>>()?;
    // Say once how state dicts were found, unless every snapshot says the same.
    let notes: Vec<String> = cks.iter().filter_map(Checkpoint::origin_note).collect();
    if let Some(first) = notes.first() {
        rep.note(first);
        if notes.len() > 1 {
            rep.note(format!("  (and likewise for {} more)", notes.len() - 1));
        }
    }
    Ok((paths, cks))
}

pub fn config(args: &AverageArgs, out: &OutputArgs) -> Config {
    Config {
        int_policy: args.int_policy,
        dtype: args.dtype,
        allow_missing: args.allow_missing,
        allow_nonfinite: args.allow_nonfinite,
        force: out.force,
    }
}

/// The layout of an output: shards when asked, or when the inputs were sharded.
pub fn layout(path: &std::path::Path, out: &OutputArgs, inputs: &[Checkpoint]) -> OutputLayout {
    let sharded_input = inputs
        .iter()
        .any(|c| c.format == Format::ShardedSafetensors);
    match (out.shard_size, sharded_input) {
        (Some(s), _) => OutputLayout::new(path, Some(s)),
        (None, true) => OutputLayout::new(path, Some(5_000_000_000)),
        (None, false) => OutputLayout::new(path, None),
    }
}

/// `--recal-bn DIR`: recompute the BN statistics of the averaged weights before writing them.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "BN recalibration")]
pub struct RecalArgs {
    /// Recompute the BatchNorm statistics of the averaged weights over the images in DIR
    /// (precise BN, as `ckpt recal-bn`) before writing; the data options below apply
    #[arg(long = "recal-bn", value_name = "DIR")]
    pub recal_bn: Option<PathBuf>,
    /// Estimator for --recal-bn (see `ckpt recal-bn --help`)
    #[arg(long, value_enum, default_value = "population")]
    pub estimator: Estimator,
    #[command(flatten)]
    pub data: DataOptions,
}

/// Removes an intermediate file when dropped, or when a signal stops the process.
struct Scratch {
    path: PathBuf,
    _pending: PendingFile,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Checks the outputs against the inputs, records provenance, runs the pass and reports; with
/// `recal`, averages into hidden intermediate files and writes the recalibrated outputs.
pub fn write_outputs(
    inputs: &[Checkpoint],
    plan: &Plan,
    mut outputs: Vec<OutputSpec>,
    cfg: &Config,
    recal: &RecalArgs,
    global: &GlobalArgs,
    rep: &Reporter,
) -> Result<()> {
    let files: Vec<PathBuf> = inputs.iter().flat_map(|c| c.files.clone()).collect();
    let planned = plan.planned_tensors();
    let dests: Vec<PathBuf> = outputs
        .iter()
        .flat_map(|o| destinations(&o.layout, &planned))
        .collect();
    check_outputs(&dests, &files, cfg.force)?;
    if !plan.partial.is_empty() {
        rep.note(format!(
            "--allow-missing: {} tensor(s) averaged over the snapshots that have them: {}",
            plan.partial.len(),
            plan.partial.join(", ")
        ));
    }
    let base = provenance::metadata(&provenance::command_line(), inputs)?;
    for o in &mut outputs {
        let mut m = base.clone();
        m.append(&mut o.metadata);
        let w: Vec<String> = o.weights.iter().map(|w| format!("{w:.6}")).collect();
        m.insert("ckpt.weights".into(), w.join(","));
        o.metadata = m;
    }
    let finals: Vec<OutputLayout> = outputs.iter().map(|o| o.layout.clone()).collect();
    let mut scratch = Vec::new();
    let mut recal_setup = None;
    if let Some(dir) = &recal.recal_bn {
        let data = recal.data.config(dir, global.threads)?;
        data.scan()?; // a bad folder fails before the averaging, not after
        let dev = device::resolve(global.device, |m| rep.note(m))?;
        recal_setup = Some((data, dev));
        for (i, o) in outputs.iter_mut().enumerate() {
            let dest = destinations(&o.layout, &planned).pop().unwrap();
            let dir = dest
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let tmp = dir.join(format!(
                ".ckpt-average-{}-{i}.safetensors",
                std::process::id()
            ));
            o.layout = OutputLayout::Single(tmp.clone());
            scratch.push(Scratch {
                _pending: PendingFile::new(&tmp)?,
                path: tmp,
            });
        }
    }
    let stats = average::run(inputs, plan, &outputs, cfg, rep)?;
    let secs = stats.elapsed.as_secs_f64();
    if let Some((data, dev)) = &recal_setup {
        for (o, (fin, tmp)) in outputs.iter_mut().zip(finals.iter().zip(&scratch)) {
            let ck = Checkpoint::open(&tmp.path, &Default::default())?;
            let model = Model::load(&ck, None, dev)?;
            let (bn_stats, meta) = recal_bn::pass(&model, data, rep)?;
            let mut m = o.metadata.clone();
            m.extend(meta);
            m.insert("ckpt.recal.estimator".into(), recal.estimator.to_string());
            m.insert("ckpt.recal.images".into(), bn_stats.images.to_string());
            m.insert("ckpt.recal.batches".into(), bn_stats.batches.to_string());
            recal_bn::recalibrated(&ck, &bn_stats, recal.estimator, fin, &m, cfg.force)?;
            o.layout = fin.clone();
        }
    }
    let mut stdout = std::io::stdout().lock();
    for o in &outputs {
        let w: Vec<String> = o.weights.iter().map(|w| format!("{w:.4}")).collect();
        let dest = destinations(&o.layout, &planned);
        writeln!(
            stdout,
            "wrote {} (weights {})",
            dest.last()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            w.join(", ")
        )?;
    }
    rep.note(format!(
        "{} snapshots, {} tensors ({} averaged in f64, {} integer: --int {}), read {}, wrote {} in {:.2} s ({}/s)",
        inputs.len(),
        stats.tensors,
        stats.averaged,
        stats.integer,
        cfg.int_policy,
        human_bytes(stats.bytes_read),
        human_bytes(stats.bytes_written),
        secs,
        human_bytes((stats.bytes_read as f64 / secs.max(1e-9)) as u64),
    ));
    let bn = bn_layers(&inputs[0]);
    if let Some(dir) = &recal.recal_bn {
        rep.note(format!(
            "BatchNorm statistics of {} layers recomputed over {} ({} estimator)",
            bn.len(),
            dir.display(),
            recal.estimator
        ));
    } else if !bn.is_empty() {
        rep.note(format!(
            "note: the running statistics of {} BatchNorm layers were averaged like the weights and do not match the averaged weights; recompute them over training data before evaluating (precise BN, e.g. torch.optim.swa_utils.update_bn)",
            bn.len()
        ));
    }
    Ok(())
}

//! What several commands share. `swa` and `ema`: choosing and opening the snapshots, checking
//! the outputs, recalibrating BN in memory before anything is written, and the closing summary.
//! `fixres` and `sweep-res --fixres`: the fine-tune's configuration from its flags. Not a
//! command: commands call it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use crate::average::{self, select, Config, OutputSpec, Plan, Target};
use crate::bn;
use crate::checkpoint::write::{
    check_outputs, destinations, wants_folder, write_file, FolderOutput, OutputLayout,
};
use crate::checkpoint::{bn_layers, provenance, Checkpoint, Format};
use crate::cli::{
    AverageArgs, FineTuneArgs, GlobalArgs, JsonArg, OptimizerKind, OutputArgs, RecalArgs,
    SnapshotArgs,
};
use crate::data::DataConfig;
use crate::models::{self, Model};
use crate::report::{human_bytes, Reporter};
use crate::train::{self, AdamWConfig, OptimizerConfig, Schedule, SgdConfig};

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

/// Where a one-model command's result (fixres, distill) goes: `-o DIR/` makes a model folder
/// holding `model.safetensors` and `ck`'s config.json (see `write::FolderOutput`; commit it after
/// the weights), any other path is the file itself.
pub fn model_output(
    path: &std::path::Path,
    ck: &Checkpoint,
    force: bool,
) -> Result<(OutputLayout, Option<FolderOutput>)> {
    if wants_folder(path) {
        let config = ck.model_folder.as_ref().map(|f| f.bytes.as_slice());
        let f = FolderOutput::create(path, config, force)?;
        return Ok((f.layout(None), Some(f)));
    }
    Ok((OutputLayout::new(path, None), None))
}

/// The layout of an output: shards when asked, or when the inputs were sharded; in a model folder
/// (`-o DIR/`, see `write::FolderOutput`) `model.safetensors` or shards there, with the folder
/// to make.
pub fn layout(
    path: &std::path::Path,
    out: &OutputArgs,
    inputs: &[Checkpoint],
) -> (OutputLayout, Option<PathBuf>) {
    let sharded_input = inputs
        .iter()
        .any(|c| c.format == Format::ShardedSafetensors);
    if wants_folder(path) {
        let shard = out.shard_size.or(sharded_input.then_some(5_000_000_000));
        let l = match shard {
            None => OutputLayout::Single(path.join("model.safetensors")),
            Some(max_bytes) => OutputLayout::Sharded {
                index: path.join("model.safetensors.index.json"),
                max_bytes,
            },
        };
        return (l, Some(path.to_path_buf()));
    }
    let l = match (out.shard_size, sharded_input) {
        (Some(s), _) => OutputLayout::new(path, Some(s)),
        (None, true) => OutputLayout::new(path, Some(5_000_000_000)),
        (None, false) => OutputLayout::new(path, None),
    };
    (l, None)
}

/// Checks the outputs against the inputs, records provenance, runs the pass and reports; with
/// `recal`, averages into memory, recalibrates each average's BN statistics there and writes
/// only the recalibrated outputs (no intermediate file, so an interrupted run leaves nothing).
/// `folders` are the model folders to make (from [`layout`]), each given the first input's
/// config.json when it has one.
#[allow(clippy::too_many_arguments)]
pub fn write_outputs(
    inputs: &[Checkpoint],
    plan: &Plan,
    mut outputs: Vec<OutputSpec>,
    folders: Vec<PathBuf>,
    cfg: &Config,
    recal: &RecalArgs,
    global: &GlobalArgs,
    rep: &Reporter,
) -> Result<()> {
    let files: Vec<PathBuf> = inputs.iter().flat_map(|c| c.files.clone()).collect();
    let planned = plan.planned_tensors();
    let layouts: Vec<OutputLayout> = outputs
        .iter()
        .map(|o| match &o.target {
            Target::File(l) => l.clone(),
            Target::Memory(_) => unreachable!("the averaging commands ask for files"),
        })
        .collect();
    let dests: Vec<PathBuf> = layouts
        .iter()
        .flat_map(|l| destinations(l, &planned))
        .collect();
    let config = inputs[0].model_folder.as_ref().map(|f| f.bytes.as_slice());
    let folders = folders
        .iter()
        .map(|d| FolderOutput::create(d, config, cfg.force))
        .collect::<Result<Vec<_>>>()?;
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
    let mut recal_setup = None;
    if let Some(dir) = &recal.recal_bn {
        // A model folder's preprocessing (the first snapshot's) where no flag gives it.
        let mut opts = recal.data.clone();
        super::model_data_defaults(&mut opts, &inputs[0], rep)?;
        let mut data = opts.config(dir, global.threads)?;
        let shard = data.dataset.shard.take();
        data.scan()?; // a bad folder fails before the averaging, not after
        let dev = super::device(global, rep)?;
        recal_setup = Some((data, shard, dev));
        for (o, l) in outputs.iter_mut().zip(&layouts) {
            let dest = destinations(l, &planned).pop().unwrap_or_default();
            o.target = Target::Memory(format!("the average for {}", dest.display()).into());
        }
    }
    let (stats, averages) = average::run(inputs, plan, &outputs, cfg, rep)?;
    let secs = stats.elapsed.as_secs_f64();
    if let Some((data, shard, dev)) = &recal_setup {
        let mut averages = averages;
        for ((o, layout), avg) in outputs.iter().zip(&layouts).zip(&mut averages) {
            let avg = avg.as_mut().expect("averaged into memory");
            models::use_model_names(avg, recal.arch.get(), false)?;
            let model = Model::load(avg, recal.arch.get(), dev)?.with_kernels(global.kernels);
            let (bn_stats, meta, _) = bn::pass(&model, data, *shard, rep)?;
            let mut m = o.metadata.clone();
            m.extend(meta);
            m.extend(bn::estimate_metadata(&bn_stats, recal.estimator));
            bn::recalibrated(avg, &bn_stats, recal.estimator, layout, &m, cfg.force)?;
        }
    }
    for f in folders {
        f.commit()?;
    }
    let mut stdout = std::io::stdout().lock();
    for (o, layout) in outputs.iter().zip(&layouts) {
        let w: Vec<String> = o.weights.iter().map(|w| format!("{w:.4}")).collect();
        let dest = destinations(layout, &planned);
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
            "note: the running statistics of {} BatchNorm layers were averaged like the weights and do not match the averaged weights; recompute them over training images before evaluating: --recal-bn DIR here, or `ckpt recal-bn OUT --data DIR` (precise BN)",
            bn.len()
        ));
    }
    Ok(())
}

/// Refuses a `--json=FILE` that would replace an input, or an existing file without `force`,
/// before any work.
pub fn check_json(json: &JsonArg, inputs: &[PathBuf], force: bool) -> Result<()> {
    match json.file() {
        Some(f) => check_outputs(&[f.to_path_buf()], inputs, force),
        None => Ok(()),
    }
}

/// Writes `value` as JSON where `--json` says: standard output, a file, or nowhere.
pub fn emit_json(json: &JsonArg, value: &impl serde::Serialize, force: bool) -> Result<()> {
    if json.to_stdout() {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, value)?;
        writeln!(out)?;
    } else if let Some(f) = json.file() {
        let mut bytes = serde_json::to_vec_pretty(value)?;
        bytes.push(b'\n');
        write_file(f, &bytes, force)?;
    }
    Ok(())
}

/// The bytes `--cache-mb` allows (MiB), by default a quarter of physical memory: what a command
/// may keep in memory across passes (`fixres`'s backbone output, `soup`'s decoded images).
pub fn cache_budget(cache_mb: Option<u64>) -> usize {
    match cache_mb {
        Some(mb) => usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
        None => crate::alloc::physical_memory() / 4,
    }
}

/// The optimiser `--opt` and its flags ask for (`fixres`, `sweep-res --fixres`, `distill`).
pub fn optimizer_config(
    kind: OptimizerKind,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
) -> Result<OptimizerConfig> {
    Ok(match kind {
        OptimizerKind::Sgd => OptimizerConfig::Sgd(SgdConfig {
            momentum,
            dampening: 0.0,
            weight_decay,
            nesterov,
        }),
        OptimizerKind::AdamW => {
            if nesterov {
                anyhow::bail!("--nesterov is an SGD option, not AdamW's");
            }
            OptimizerConfig::AdamW(AdamWConfig {
                weight_decay,
                ..AdamWConfig::default()
            })
        }
    })
}

/// The fine-tune engine's configuration from the training flags, over `data` (a labelled
/// folder through the eval transform at the fine-tune's size); `seed` shuffles the epochs
/// unless `--no-shuffle`.
pub fn fine_tune_config(
    args: &FineTuneArgs,
    data: DataConfig,
    seed: u64,
    global: &GlobalArgs,
) -> Result<train::fixres::Config> {
    let optimizer = optimizer_config(
        args.optimizer,
        args.momentum,
        args.weight_decay,
        args.nesterov,
    )?;
    let cache_bytes = cache_budget(args.cache_mb);
    let cfg = train::fixres::Config {
        data,
        epochs: args.epochs,
        shuffle_seed: (!args.no_shuffle).then_some(seed),
        optimizer,
        schedule: Schedule {
            lr: args.lr,
            kind: args.lr_schedule,
            warmup_steps: args.warmup_steps,
        },
        bn_momentum: args.bn_momentum,
        train_bn_affine: args.train_bn_affine,
        kernels: global.kernels,
        cache_bytes,
    };
    cfg.check()?;
    Ok(cfg)
}

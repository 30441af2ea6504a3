//! Writing recalibrated BN statistics into a copy of a checkpoint: `running_mean` and
//! `running_var` of every calibrated layer are replaced (rounded once from f64 into their stored
//! dtype), `num_batches_tracked` is set to the number of batches seen (as torch's `update_bn`
//! leaves it) in its own integer dtype, and every other tensor is copied byte for byte.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};

use crate::checkpoint::dtype::{self, DType};
use crate::checkpoint::write::{CheckpointWriter, OutputLayout, PlannedTensor};
use crate::checkpoint::Checkpoint;

/// How much one layer's statistics moved.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerChange {
    pub layer: String,
    /// Largest |new - old| / max(|old|, 1e-8) over channels.
    pub mean_change: f64,
    pub var_change: f64,
}

fn read_all(ck: &Checkpoint, name: &str) -> Result<(DType, Vec<f64>)> {
    let t = ck.get(name).with_context(|| format!("no tensor {name}"))?;
    if !t.dtype.is_arithmetic_float() {
        bail!("tensor {name} is {}, expected a float tensor", t.dtype);
    }
    let b = ck.bytes(t);
    Ok((
        t.dtype,
        (0..t.numel())
            .map(|i| dtype::read_f64(&b, t.dtype, i))
            .collect(),
    ))
}

fn max_rel_change(old: &[f64], new: &[f64]) -> f64 {
    old.iter()
        .zip(new)
        .map(|(o, n)| (n - o).abs() / o.abs().max(1e-8))
        .fold(0.0, f64::max)
}

/// What replaces what, before anything is written.
pub struct Replacement {
    /// Tensor name to new bytes.
    pub tensors: HashMap<String, Vec<u8>>,
    pub changes: Vec<LayerChange>,
}

/// Prepares the new tensors for `layers` (prefixes) from `estimates` (mean, var per layer).
pub fn replacements(
    ck: &Checkpoint,
    layers: &[String],
    estimates: &[(Vec<f64>, Vec<f64>)],
    batches: u64,
) -> Result<Replacement> {
    let mut tensors = HashMap::new();
    let mut changes = Vec::new();
    for (prefix, (mean, var)) in layers.iter().zip(estimates) {
        let mut moved = [0.0; 2];
        for (k, (what, new)) in [("running_mean", mean), ("running_var", var)]
            .into_iter()
            .enumerate()
        {
            let name = format!("{prefix}.{what}");
            let (dt, old) = read_all(ck, &name)?;
            if old.len() != new.len() {
                bail!(
                    "tensor {name} has {} channels, the statistics {}",
                    old.len(),
                    new.len()
                );
            }
            let mut bytes = vec![0u8; new.len() * dt.size()];
            dtype::store(new, dt, &mut bytes);
            moved[k] = max_rel_change(&old, new);
            tensors.insert(name, bytes);
        }
        let nbt = format!("{prefix}.num_batches_tracked");
        if let Some(t) = ck.get(&nbt) {
            if !t.dtype.is_integer() || t.numel() != 1 {
                bail!(
                    "tensor {nbt} is {} {:?}, expected an integer scalar",
                    t.dtype,
                    t.shape
                );
            }
            let mut bytes = vec![0u8; t.dtype.size()];
            dtype::write_int(&mut bytes, t.dtype, 0, batches as i128)
                .with_context(|| format!("tensor {nbt}: {batches} does not fit {}", t.dtype))?;
            tensors.insert(nbt, bytes);
        }
        changes.push(LayerChange {
            layer: prefix.clone(),
            mean_change: moved[0],
            var_change: moved[1],
        });
    }
    Ok(Replacement { tensors, changes })
}

/// Writes `ck` with the replacements to `layout`, atomically.
pub fn write(
    ck: &Checkpoint,
    rep: &Replacement,
    layout: &OutputLayout,
    metadata: &BTreeMap<String, String>,
    force: bool,
) -> Result<()> {
    let planned: Vec<PlannedTensor> = ck.tensors().iter().map(PlannedTensor::from).collect();
    let w = CheckpointWriter::create(layout, planned, metadata, force)?;
    for (i, t) in ck.tensors().iter().enumerate() {
        match rep.tensors.get(&t.name) {
            Some(b) => w.write(i, 0, b)?,
            None => w.write(i, 0, &ck.bytes(t))?,
        }
    }
    w.commit()
}

//! A training run's state at the end of an epoch, saved (`--save-every`) so that `--resume`
//! continues it as if it had never stopped: the trained parameters and BN running statistics in
//! f32 (the values the run holds, not their stored dtype), the BN layers' batch counts, the
//! optimisers' buffers, the epochs done and the per-step records. What else decides the rest of
//! the run is derived from the epoch number (the shuffle, the train transform's draws) or from
//! the settings, which are saved too and must match on resume.
//!
//! The file is a safetensors file (written atomically): tensors `model/KEY` and
//! `optimizer/KEY.BUFFER` as flat f32, and `ckpt.resume.*` metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::checkpoint::write::{write_owned, OwnedTensor};
use crate::checkpoint::{dtype, Checkpoint, DType, OpenOptions};

const MODEL: &str = "model/";
const OPTIMIZER: &str = "optimizer/";
const FORMAT: &str = "1";

/// Where a run stands after `epochs_done` whole epochs.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub epochs_done: usize,
    /// The per-step records so far, as JSON.
    pub steps: serde_json::Value,
    /// Trained parameters and BN running statistics, by checkpoint key.
    pub tensors: Vec<(String, Vec<f32>)>,
    /// Each BN layer's train-mode batch count, in the model's BN order.
    pub bn_batches: Vec<u64>,
    /// The optimisers' state (`Optimizer::state`).
    pub optimizer: Vec<(String, Vec<f32>)>,
    /// The settings the run was started with.
    pub settings: BTreeMap<String, String>,
}

impl Progress {
    /// Writes the state to `path` atomically (replacing an earlier save of the same run).
    pub fn save(&self, path: &Path) -> Result<()> {
        let owned = |prefix: &str, (k, v): &(String, Vec<f32>)| OwnedTensor {
            name: format!("{prefix}{k}"),
            dtype: DType::F32,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        let tensors: Vec<OwnedTensor> = (self.tensors.iter().map(|t| owned(MODEL, t)))
            .chain(self.optimizer.iter().map(|t| owned(OPTIMIZER, t)))
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert("ckpt.resume.format".into(), FORMAT.into());
        meta.insert(
            "ckpt.resume.epochs_done".into(),
            self.epochs_done.to_string(),
        );
        meta.insert("ckpt.resume.steps".into(), self.steps.to_string());
        meta.insert(
            "ckpt.resume.bn_batches".into(),
            serde_json::to_string(&self.bn_batches)?,
        );
        meta.insert(
            "ckpt.resume.settings".into(),
            serde_json::to_string(&self.settings)?,
        );
        write_owned(path, &tensors, &meta, true)
    }

    /// Reads a state [`Progress::save`] wrote.
    pub fn load(path: &Path) -> Result<Progress> {
        let opts = OpenOptions {
            keep_prefix: true,
            ..OpenOptions::default()
        };
        let ck = Checkpoint::open(path, &opts)?;
        let not_state = || format!("{}: not a saved training state", path.display());
        let meta = |k: &str| -> Result<&String> {
            ck.metadata
                .get(&format!("ckpt.resume.{k}"))
                .with_context(not_state)
        };
        if meta("format")? != FORMAT {
            bail!("{}: a training state of another format", path.display());
        }
        let json = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(meta(k)?).with_context(not_state)
        };
        let mut p = Progress {
            epochs_done: meta("epochs_done")?.parse().with_context(not_state)?,
            steps: json("steps")?,
            tensors: Vec::new(),
            bn_batches: serde_json::from_value(json("bn_batches")?).with_context(not_state)?,
            optimizer: Vec::new(),
            settings: serde_json::from_value(json("settings")?).with_context(not_state)?,
        };
        for t in ck.tensors() {
            if t.dtype != DType::F32 {
                bail!("{}: tensor {} is not f32", path.display(), t.name);
            }
            let v = dtype::to_f32_vec(&ck.bytes(t), t.dtype);
            if let Some(k) = t.name.strip_prefix(MODEL) {
                p.tensors.push((k.to_string(), v));
            } else if let Some(k) = t.name.strip_prefix(OPTIMIZER) {
                p.optimizer.push((k.to_string(), v));
            } else {
                bail!("{}: unexpected tensor {}", path.display(), t.name);
            }
        }
        Ok(p)
    }

    /// Refuses to continue with other settings than the run was started with, naming them.
    pub fn check_settings(&self, path: &Path, settings: &BTreeMap<String, String>) -> Result<()> {
        let none = String::from("(none)");
        let keys: std::collections::BTreeSet<&String> =
            self.settings.keys().chain(settings.keys()).collect();
        let differ: Vec<String> = keys
            .into_iter()
            .filter(|k| self.settings.get(*k) != settings.get(*k))
            .map(|k| {
                format!(
                    "{k} {} now, {} then",
                    settings.get(k).unwrap_or(&none),
                    self.settings.get(k).unwrap_or(&none)
                )
            })
            .collect();
        if !differ.is_empty() {
            bail!(
                "{}: saved by a run with other settings ({}); resume with the same ones, or start again with --force",
                path.display(),
                differ.join("; ")
            );
        }
        Ok(())
    }

    /// The saved tensors by key.
    pub fn tensor_map(&self) -> HashMap<String, Vec<f32>> {
        self.tensors.iter().cloned().collect()
    }

    /// The saved optimiser state by key.
    pub fn optimizer_map(&self) -> HashMap<String, Vec<f32>> {
        self.optimizer.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.resume");
        let p = Progress {
            epochs_done: 2,
            steps: serde_json::json!([{"loss": 0.5}]),
            tensors: vec![
                ("fc.weight".into(), vec![1.0, f32::MIN_POSITIVE, -3.5e-30]),
                ("bn1.running_var".into(), vec![0.25]),
            ],
            bn_batches: vec![8, 8],
            optimizer: vec![("fc.weight.momentum_buffer".into(), vec![0.1, 0.2, 0.3])],
            settings: [("lr".to_string(), "0.01".to_string())].into(),
        };
        p.save(&path).unwrap();
        let q = Progress::load(&path).unwrap();
        assert_eq!(p, q);
        q.check_settings(&path, &p.settings).unwrap();
        let other = [("lr".to_string(), "0.02".to_string())].into();
        let e = q.check_settings(&path, &other).unwrap_err().to_string();
        assert!(e.contains("lr 0.02 now, 0.01 then"), "{e}");
    }
}

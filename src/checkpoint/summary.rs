//! What `ckpt inspect` reports about a checkpoint, as data (the command formats it).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{bn_layers, num_params, Checkpoint};

#[derive(Serialize, Debug)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

#[derive(Serialize, Debug)]
pub struct Summary {
    pub path: String,
    pub format: &'static str,
    pub files: Vec<String>,
    pub key: Option<String>,
    pub key_picked: bool,
    /// The training code that wrote the file, when its layout says so.
    pub trainer: Option<String>,
    pub stripped_prefix: Option<String>,
    /// What each removed part of the prefix was (`DDP`, `AveragedModel`, ...).
    pub prefix_reasons: Vec<String>,
    /// AveragedModel's `n_averaged`, when the state dict is one.
    pub n_averaged: Option<i64>,
    /// Classes named outside the state dict and left unread (never constructed).
    pub placeholders: Vec<String>,
    pub num_tensors: usize,
    pub num_params: usize,
    pub total_bytes: usize,
    /// Tensor count per dtype.
    pub dtypes: BTreeMap<String, usize>,
    pub bn_layers: Vec<String>,
    /// The architecture recognised from the tensors, if any (filled by the caller: this layer
    /// knows no architecture).
    pub arch: Option<String>,
    /// A further prefix the forward commands remove for the names to fit that architecture.
    pub arch_prefix: Option<String>,
    /// The recognised model's output count.
    pub num_classes: Option<usize>,
    /// The labels a class folder gets for this model without `--class-map`: the first of these
    /// that applies (`imagenet-1k-synsets` only to folders named by ImageNet-1k synsets).
    pub labelling: Option<Vec<&'static str>>,
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorRow>>,
}

pub fn summarize(ck: &Checkpoint, with_tensors: bool) -> Summary {
    let mut dtypes = BTreeMap::new();
    for t in ck.tensors() {
        *dtypes.entry(t.dtype.name().to_string()).or_insert(0) += 1;
    }
    Summary {
        path: ck.path.display().to_string(),
        format: ck.format.name(),
        files: ck.files.iter().map(|p| p.display().to_string()).collect(),
        key: ck.key.clone(),
        key_picked: ck.key_picked,
        trainer: ck.trainer.as_ref().map(|t| t.to_string()),
        stripped_prefix: ck.stripped_prefix.clone(),
        prefix_reasons: ck.prefix_reasons.clone(),
        n_averaged: ck.n_averaged,
        placeholders: ck.placeholders.clone(),
        num_tensors: ck.tensors().len(),
        num_params: num_params(ck),
        total_bytes: ck.total_bytes(),
        dtypes,
        bn_layers: bn_layers(ck),
        arch: None,
        arch_prefix: None,
        num_classes: None,
        labelling: None,
        metadata: ck.metadata.clone(),
        tensors: with_tensors.then(|| {
            ck.tensors()
                .iter()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    dtype: t.dtype.name().to_string(),
                    shape: t.shape.clone(),
                })
                .collect()
        }),
    }
}

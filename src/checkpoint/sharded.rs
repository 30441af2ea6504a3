//! Hugging Face sharded checkpoints: `*.safetensors.index.json` with a `weight_map` from tensor
//! name to shard file, the shards beside it.
//!
//! Shard names must be plain file names in the index's folder: an index that points elsewhere
//! (`../x`, an absolute path) is refused rather than followed, since indexes come from downloads.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Largest index file we read (real ones are tens of kilobytes).
const MAX_INDEX_BYTES: u64 = 64 << 20;

pub struct Index {
    pub metadata: BTreeMap<String, String>,
    /// Tensor name to shard path.
    pub weight_map: BTreeMap<String, PathBuf>,
    /// Distinct shards, in name order.
    pub shards: Vec<PathBuf>,
}

/// The checkpoint file inside a folder: its sharded index, or its single safetensors file, or
/// (a model folder saved without safetensors) `pytorch_model.bin` and its kin
/// ([`super::folder::TORCH_WEIGHTS`], in timm's order of preference).
pub fn find_in_folder(dir: &Path) -> Result<PathBuf> {
    let mut indexes = Vec::new();
    let mut singles = Vec::new();
    for e in std::fs::read_dir(dir).context("cannot list folder")? {
        let p = e?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(p);
        } else if name.ends_with(".safetensors") {
            singles.push(p);
        }
    }
    indexes.sort();
    singles.sort();
    match (indexes.len(), singles.len()) {
        (1, _) => Ok(indexes.remove(0)),
        (0, 1) => Ok(singles.remove(0)),
        (0, 0) => match super::folder::TORCH_WEIGHTS
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
        {
            Some(p) => Ok(p),
            None => bail!(
                "folder holds no weights: no *.safetensors.index.json, no .safetensors file, no {}",
                super::folder::TORCH_WEIGHTS.join(", ")
            ),
        },
        (0, _) => bail!(
            "folder holds {} .safetensors files and no index to say how they fit together",
            singles.len()
        ),
        _ => bail!(
            "folder holds several sharded indexes ({}); name one",
            indexes
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn read_index(path: &Path) -> Result<Index> {
    let len = std::fs::metadata(path).context("cannot open")?.len();
    if len > MAX_INDEX_BYTES {
        bail!("{len} bytes is too large for a sharded index");
    }
    let text = std::fs::read_to_string(path).context("cannot read")?;
    parse_index(&text, path.parent().unwrap_or(Path::new(".")))
}

/// Parses the text of an index whose shards live in `dir`, checking that each shard exists there.
pub fn parse_index(text: &str, dir: &Path) -> Result<Index> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not valid JSON: {e}"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .context("JSON without a weight_map object is not a sharded index")?;
    let mut weight_map = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard
            .as_str()
            .with_context(|| format!("weight_map entry {name} is not a file name"))?;
        let rel = Path::new(shard);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) || shard.is_empty() {
            bail!("weight_map points tensor {name} at {shard}, outside the index's folder");
        }
        let full = dir.join(rel);
        if !full.is_file() {
            bail!("shard {} (for tensor {name}) is missing", full.display());
        }
        weight_map.insert(name.clone(), full);
    }
    if weight_map.is_empty() {
        bail!("weight_map is empty");
    }
    let mut shards: Vec<PathBuf> = weight_map.values().cloned().collect();
    shards.sort();
    shards.dedup();
    let mut metadata = BTreeMap::new();
    if let Some(m) = v.get("metadata").and_then(|m| m.as_object()) {
        for (k, val) in m {
            let s = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            metadata.insert(k.clone(), s);
        }
    }
    Ok(Index {
        metadata,
        weight_map,
        shards,
    })
}

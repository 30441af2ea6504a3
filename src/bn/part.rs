//! Stats parts: what `recal-bn --shard i/n --stats-out PART` writes and `recal-bn --merge`
//! combines, and the record that makes a set of parts provably one pass.
//!
//! A part holds one shard's mergeable f64 sums ([`super::Stats`], as tensors `layer{i}.sum`, ...)
//! and, in its safetensors metadata, a [`PartRecord`]: everything that decides which batches of
//! which images, through which transform, went through which weights. Merging is only right when
//! every part is a slice of the same pass and together they are all of it, and the mistakes that
//! break that in job arrays are silent otherwise (one job at another `--size`, a retried shard
//! given twice while another is missing, parts measured on other weights than the checkpoint
//! they are written into). So [`check_set`] refuses, in one line naming the part and the field:
//!
//! - a part measured on other weights than MODEL (the record's `model` against MODEL's digest);
//! - a part whose record differs from the first part's in any field but the shard index;
//! - shard indices that are not `0..n-1` each exactly once (naming the repeated or missing ones);
//! - a `--estimator` at merge time other than the one the parts were run for.
//!
//! The model's identity is a digest of the weights, not the file: sha256 over every tensor the
//! calibrate pass reads (name, dtype, shape, bytes; in name order, each length-prefixed), from the
//! same mapped bytes the model is built from. BN running statistics and `num_batches_tracked`
//! are left out: the pass never reads them (BN normalises with batch statistics) and they are
//! what the merge replaces, so MODEL may already have been recalibrated once; any other byte of
//! any other tensor differs and is refused. Names are taken after key normalisation, so a DDP
//! `module.` copy of the same weights is the same model.
//!
//! The data side records the folder (canonical path), the number of images of the whole pass
//! and a digest of their list (so a folder whose content differs between machines is refused,
//! not only one at another path), and every option that changes the images or their order:
//! transform and its parameters, mean/std, seed, `--max-images`, `--batch-size` (batches are
//! what shards split), EXIF handling. Threads, device and `--skip-bad` are not recorded: they do
//! not change a pass that succeeds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{Estimator, Stats};
use crate::checkpoint::write::{write_owned, OwnedTensor};
use crate::checkpoint::{Checkpoint, DType};
use crate::data::{DataConfig, Dataset, Shard, Transform};

/// Metadata key prefix of the record's fields.
const META_PREFIX: &str = "ckpt.part.";

/// What makes a part one slice of one pass. `fields` lists them in display order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartRecord {
    /// sha256 of the weights the pass ran ([`model_digest`]).
    pub model: String,
    pub estimator: Estimator,
    pub shard: Shard,
    /// Every data field, in order: `data`, `transform`, `size`, ..., `images`, `listing`.
    pub data: Vec<(String, String)>,
}

/// The images of a whole pass (after `--max-images`, before sharding), as the record names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassImages {
    pub count: usize,
    /// sha256 of the images' paths relative to the folder, in pass order, one per line.
    pub listing: String,
}

impl PassImages {
    pub fn of(ds: &Dataset) -> PassImages {
        let mut h = Sha256::new();
        for it in &ds.items {
            let rel = it.path.strip_prefix(&ds.root).unwrap_or(&it.path);
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update(b"\n");
        }
        PassImages {
            count: ds.items.len(),
            listing: format!("{:x}", h.finalize()),
        }
    }
}

/// sha256 of the tensors of `ck` a calibrate pass of a model with BN layers `bn_layers` reads
/// (see the module doc), as lowercase hex.
pub fn model_digest(ck: &Checkpoint, bn_layers: &[String]) -> String {
    let skipped: std::collections::HashSet<String> = bn_layers
        .iter()
        .flat_map(|l| {
            ["running_mean", "running_var", "num_batches_tracked"].map(|b| format!("{l}.{b}"))
        })
        .collect();
    let mut tensors: Vec<_> = ck
        .tensors()
        .iter()
        .filter(|t| !skipped.contains(&t.name))
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for t in tensors {
        field(t.name.as_bytes());
        field(t.dtype.name().as_bytes());
        let shape: Vec<u8> = t
            .shape
            .iter()
            .flat_map(|d| (*d as u64).to_le_bytes())
            .collect();
        field(&shape);
        field(&ck.bytes(t));
    }
    format!("{:x}", h.finalize())
}

fn rgb(v: [f32; 3]) -> String {
    format!("{},{},{}", v[0], v[1], v[2])
}

impl PartRecord {
    /// The record of shard `shard` of the pass `cfg` describes over `images`, through the
    /// weights with digest `model`, for `estimator`.
    pub fn new(
        model: String,
        cfg: &DataConfig,
        images: &PassImages,
        estimator: Estimator,
        shard: Shard,
    ) -> PartRecord {
        let dir = cfg.dir.canonicalize().unwrap_or_else(|_| cfg.dir.clone());
        let mut data: Vec<(&str, String)> = vec![("data", dir.display().to_string())];
        match cfg.transform {
            Transform::Eval(t) => data.extend([
                ("transform", "eval".to_string()),
                ("size", t.size.to_string()),
                ("crop_pct", t.crop_pct.to_string()),
                ("crop_mode", format!("{:?}", t.crop_mode).to_lowercase()),
                ("interpolation", t.interpolation.name().to_string()),
                ("mean", rgb(t.normalize.mean)),
                ("std", rgb(t.normalize.std)),
            ]),
            Transform::Train(t) => data.extend([
                ("transform", "train".to_string()),
                ("size", t.size.to_string()),
                ("scale", format!("{},{}", t.scale.0, t.scale.1)),
                ("ratio", format!("{},{}", t.ratio.0, t.ratio.1)),
                ("hflip", t.hflip.to_string()),
                ("interpolation", t.interpolation.name().to_string()),
                ("mean", rgb(t.normalize.mean)),
                ("std", rgb(t.normalize.std)),
            ]),
        }
        data.extend([
            ("seed", cfg.dataset.seed.to_string()),
            (
                "max_images",
                cfg.dataset
                    .max_images
                    .map_or("all".to_string(), |n| n.to_string()),
            ),
            ("batch_size", cfg.loader.batch_size.to_string()),
            (
                "exif_transpose",
                cfg.loader.decode.exif_transpose.to_string(),
            ),
            // What the options above chose from the folder, last: a difference in them is
            // better named by the option that caused it.
            ("images", images.count.to_string()),
            ("listing", images.listing.clone()),
        ]);
        PartRecord {
            model,
            estimator,
            shard,
            data: data.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }

    /// Every field as (name, value), in display order: model, data fields, estimator, shard.
    pub fn fields(&self) -> Vec<(String, String)> {
        let mut f = vec![("model".to_string(), self.model.clone())];
        f.extend(self.data.iter().cloned());
        f.push(("estimator".into(), self.estimator.to_string()));
        f.push(("shard".into(), self.shard.to_string()));
        f
    }

    /// The record as metadata entries (`ckpt.part.<field>`), plus the field order.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let fields = self.fields();
        let mut m: BTreeMap<String, String> = fields
            .iter()
            .map(|(k, v)| (format!("{META_PREFIX}{k}"), v.clone()))
            .collect();
        let order: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        m.insert(
            format!("{META_PREFIX}fields"),
            serde_json::to_string(&order).expect("a list of strings serialises"),
        );
        m
    }

    /// Reads the record back from a part's metadata; `Ok(None)` when it has none.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Result<Option<PartRecord>> {
        let Some(order) = meta.get(&format!("{META_PREFIX}fields")) else {
            return Ok(None);
        };
        let order: Vec<String> =
            serde_json::from_str(order).context("bad ckpt.part.fields in the metadata")?;
        let get = |k: &str| {
            meta.get(&format!("{META_PREFIX}{k}"))
                .with_context(|| format!("no {META_PREFIX}{k} in the metadata"))
        };
        let estimator = match get("estimator")?.as_str() {
            "population" => Estimator::Population,
            "torch" => Estimator::Torch,
            e => bail!("unknown estimator {e:?} in the metadata"),
        };
        let shard: Shard = get("shard")?
            .parse()
            .map_err(|e: String| anyhow::anyhow!("ckpt.part.shard: {e}"))?;
        let mut data = Vec::new();
        for k in order
            .iter()
            .filter(|k| !["model", "estimator", "shard"].contains(&k.as_str()))
        {
            data.push((k.clone(), get(k)?.clone()));
        }
        Ok(Some(PartRecord {
            model: get("model")?.clone(),
            estimator,
            shard,
            data,
        }))
    }
}

/// A part read back: its file, record and sums.
#[derive(Debug)]
pub struct Part {
    pub path: PathBuf,
    pub record: PartRecord,
    pub stats: Stats,
}

/// Writes a part: the sums as f64 tensors, the record and `meta` (provenance) as metadata.
pub fn write(
    path: &Path,
    stats: &Stats,
    record: &PartRecord,
    meta: &BTreeMap<String, String>,
    force: bool,
) -> Result<()> {
    let tensors: Vec<OwnedTensor> = super::to_tensors(stats)
        .into_iter()
        .map(|(name, v)| OwnedTensor {
            name,
            dtype: DType::F64,
            shape: vec![v.len()],
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let mut m = meta.clone();
    m.insert(
        super::META_LAYERS.into(),
        serde_json::to_string(&stats.layers)?,
    );
    m.insert(super::META_BATCHES.into(), stats.batches.to_string());
    m.insert(super::META_IMAGES.into(), stats.images.to_string());
    m.extend(record.to_metadata());
    write_owned(path, &tensors, &m, force)
}

/// Reads a part written by [`write()`]; errors name the file.
pub fn read(ck: &Checkpoint) -> Result<Part> {
    read_inner(ck).with_context(|| ck.path.display().to_string())
}

fn read_inner(ck: &Checkpoint) -> Result<Part> {
    let layers: Vec<String> = ck
        .metadata
        .get(super::META_LAYERS)
        .context("not a --stats-out file (no BN layer list in its metadata)")
        .and_then(|s| serde_json::from_str(s).context("bad BN layer list"))?;
    let record = PartRecord::from_metadata(&ck.metadata)?.context(
        "a --stats-out file without the record of its pass (written by an older ckpt): rerun \
         its shard",
    )?;
    let num = |k: &str| -> Result<u64> {
        ck.metadata
            .get(k)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {k} in the metadata"))
    };
    let stats = super::from_tensors(
        layers,
        num(super::META_BATCHES)?,
        num(super::META_IMAGES)?,
        |name| {
            let t = ck.get(name).filter(|t| t.dtype == DType::F64)?;
            let b = ck.bytes(t);
            Some(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            )
        },
    )?;
    Ok(Part {
        path: ck.path.clone(),
        record,
        stats,
    })
}

/// Checks that `parts` are every shard of one pass through the weights `model` names (digest
/// `model_digest`), exactly once each, and that `estimator` (the merge's `--estimator`, if
/// given) is theirs. Returns the estimator to use. See the module doc.
pub fn check_set(
    parts: &[Part],
    model: &Path,
    model_digest: &str,
    estimator: Option<Estimator>,
) -> Result<Estimator> {
    let Some(first) = parts.first() else {
        bail!("--merge needs at least one part");
    };
    let short = |d: &str| d.chars().take(12).collect::<String>();
    for p in parts {
        if p.record.model != model_digest {
            bail!(
                "{}: model: measured on weights {}, but {} has weights {}: the statistics belong \
                 to another model",
                p.path.display(),
                short(&p.record.model),
                model.display(),
                short(model_digest)
            );
        }
    }
    let want = first.record.fields();
    for p in &parts[1..] {
        let got = p.record.fields();
        for (k, w) in &want {
            let g = got
                .iter()
                .find(|(n, _)| n == k)
                .map_or("(absent)", |(_, v)| v.as_str());
            let (g, w) = if k == "shard" {
                // Indices differ by design; the count must not.
                (
                    g.split_once('/').map_or(g, |(_, n)| n),
                    w.split_once('/').map_or(w.as_str(), |(_, n)| n),
                )
            } else {
                (g, w.as_str())
            };
            if g != w {
                let field = if k == "shard" { "shard count" } else { k };
                bail!(
                    "{}: {field} is {g}, but {} has {w}: parts of one pass share the model, the \
                     data and every data option",
                    p.path.display(),
                    first.path.display()
                );
            }
        }
    }
    let n = first.record.shard.count;
    let mut seen: Vec<Option<&Path>> = vec![None; n];
    let mut repeated = None;
    for p in parts {
        let i = p.record.shard.index;
        match seen[i] {
            Some(before) if repeated.is_none() => repeated = Some((p, before)),
            Some(_) => {}
            None => seen[i] = Some(&p.path),
        }
    }
    let missing: Vec<String> = (0..n)
        .filter(|&i| seen[i].is_none())
        .map(|i| format!("{i}/{n}"))
        .collect();
    let missing_text = match missing.len() {
        0 => String::new(),
        1 => format!("shard {} is missing", missing[0]),
        _ => format!("shards {} are missing", missing.join(", ")),
    };
    if let Some((p, before)) = repeated {
        bail!(
            "{}: shard {} again (also {}){}",
            p.path.display(),
            p.record.shard,
            before.display(),
            if missing.is_empty() {
                String::new()
            } else {
                format!("; {missing_text}")
            }
        );
    }
    if !missing.is_empty() {
        bail!(
            "{missing_text}: {} of {n} parts given ({}), each shard 0/{n} .. {}/{n} is needed once",
            parts.len(),
            parts
                .iter()
                .map(|p| p.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            n - 1
        );
    }
    let theirs = first.record.estimator;
    match estimator {
        Some(e) if e != theirs => bail!(
            "--estimator {e}, but the parts were run for estimator {theirs} ({}): give \
             --estimator {theirs} or rerun the shards",
            first.path.display()
        ),
        _ => Ok(theirs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, shard: &str, size: &str) -> Part {
        Part {
            path: PathBuf::from(name),
            record: PartRecord {
                model: "abc".into(),
                estimator: Estimator::Population,
                shard: shard.parse().unwrap(),
                data: vec![("size".into(), size.into())],
            },
            stats: Stats::default(),
        }
    }

    fn err(parts: &[Part]) -> String {
        check_set(parts, Path::new("m"), "abc", None)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_set_is_every_shard_once_with_equal_records() {
        let ok = [part("a", "0/2", "32"), part("b", "1/2", "32")];
        assert_eq!(
            check_set(&ok, Path::new("m"), "abc", None).unwrap(),
            Estimator::Population
        );
        let e = err(&[part("a", "0/2", "32"), part("b", "1/2", "40")]);
        assert!(e.starts_with("b: size is 40, but a has 32"), "{e}");
        let e = err(&[part("a", "0/2", "32"), part("b", "0/2", "32")]);
        assert_eq!(e, "b: shard 0/2 again (also a); shard 1/2 is missing");
        let e = err(&[part("a", "0/3", "32"), part("b", "2/3", "32")]);
        assert!(
            e.starts_with("shard 1/3 is missing: 2 of 3 parts given (a, b)"),
            "{e}"
        );
        let e = err(&[part("a", "0/2", "32"), part("b", "1/3", "32")]);
        assert!(e.starts_with("b: shard count is 3, but a has 2"), "{e}");
        let e = check_set(&ok, Path::new("m"), "abd", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a: model: measured on weights abc, but m has"),
            "{e}"
        );
        assert!(check_set(&ok, Path::new("m"), "abc", Some(Estimator::Torch)).is_err());
    }

    #[test]
    fn record_round_trips_through_metadata() {
        let r = PartRecord {
            model: "abc".into(),
            estimator: Estimator::Torch,
            shard: "1/4".parse().unwrap(),
            data: vec![("data".into(), "/d".into()), ("size".into(), "32".into())],
        };
        let m = r.to_metadata();
        assert_eq!(m["ckpt.part.size"], "32");
        assert_eq!(PartRecord::from_metadata(&m).unwrap().unwrap(), r);
        assert!(PartRecord::from_metadata(&BTreeMap::new())
            .unwrap()
            .is_none());
    }
}

//! Offline teacher targets: the logits `ckpt logits --data DIR` stored for a folder's images,
//! read back by `ckpt distill --targets` in place of running a teacher.
//!
//! A targets file holds `logits` [n, classes] f32 (dense), or `topk_values` f32 and
//! `topk_indices` i64 [n, k] (`--top-k K`), and in its metadata `ckpt.images`: each row's image
//! path relative to the folder it was made from. Rows are found by that path, never by
//! position, so a file made with another batch size, in another order, or over more images (a
//! superset: the rows the run never asks for are unused) fits, and every image of the run must
//! have its row. The file is memory-mapped and read a batch's rows at a time.
//!
//! The logits must belong to the pixels the student sees: the run's transform must be
//! deterministic (a random crop of the student is not the crop the stored logits saw), and the
//! same as the file's `ckpt.transform` when it records one (older files do not: the caller
//! warns). The teacher's distribution from a row is the caller's (`distill::SoftTargets`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, DType, OpenOptions, TensorInfo};
use crate::data::{Dataset, TransformRecord};

/// What a targets file stores per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Every class's logit (`logits` [n, classes]).
    Logits { classes: usize },
    /// The k largest logits and their classes (`topk_values`, `topk_indices` [n, k]).
    TopK { k: usize },
}

impl std::fmt::Display for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stored::Logits { .. } => f.write_str("logits"),
            Stored::TopK { k } => write!(f, "top-{k} logits"),
        }
    }
}

/// A batch's rows, in the order of the images asked for.
pub enum Rows {
    /// [n, classes] f32.
    Logits(Tensor),
    /// `values` [n, k] f32 and their class indices, row-major.
    TopK { values: Tensor, indices: Vec<usize> },
}

/// An opened targets file (see the module doc).
pub struct Targets {
    pub path: PathBuf,
    pub stored: Stored,
    /// The model that made the logits (`ckpt.arch`), when recorded.
    pub arch: Option<String>,
    /// The pass's transform (`ckpt.transform`), when recorded.
    pub transform: Option<TransformRecord>,
    /// The model's class count: a dense file's width, else `ckpt.num_classes` when recorded.
    pub classes: Option<usize>,
    ck: Checkpoint,
    /// The row of each image, by its path relative to the folder.
    rows: HashMap<String, usize>,
    /// Top-k: every row's class indices, row-major.
    indices: Vec<usize>,
}

impl Targets {
    /// Opens and checks a targets file: its tensors, their shapes and dtypes, one image path per
    /// row, no image twice.
    pub fn open(path: &Path) -> Result<Targets> {
        let opts = OpenOptions {
            keep_prefix: true,
            ..OpenOptions::default()
        };
        let ck = Checkpoint::open(path, &opts)?;
        let file = path.display();
        let tensor = |name: &str, dtype: DType| -> Result<Option<&TensorInfo>> {
            let Some(t) = ck.get(name) else {
                return Ok(None);
            };
            if t.dtype != dtype || t.shape.len() != 2 {
                bail!(
                    "{file}: tensor {name} is {} {:?}, expected {} [images, {}] (as ckpt logits writes it)",
                    t.dtype.name(),
                    t.shape,
                    dtype.name(),
                    if name == "logits" { "classes" } else { "k" }
                );
            }
            Ok(Some(t))
        };
        let (stored, n) = match tensor("logits", DType::F32)? {
            Some(t) => (
                Stored::Logits {
                    classes: t.shape[1],
                },
                t.shape[0],
            ),
            None => match (
                tensor("topk_values", DType::F32)?,
                tensor("topk_indices", DType::I64)?,
            ) {
                (Some(v), Some(i)) => {
                    if v.shape != i.shape {
                        bail!(
                            "{file}: topk_values is {:?} but topk_indices {:?}: expected the same shape",
                            v.shape,
                            i.shape
                        );
                    }
                    (Stored::TopK { k: v.shape[1] }, v.shape[0])
                }
                _ => bail!(
                    "{file}: not a logits file of ckpt logits: no tensor logits, nor topk_values and topk_indices"
                ),
            },
        };
        if matches!(
            stored,
            Stored::Logits { classes: 0 } | Stored::TopK { k: 0 }
        ) {
            bail!("{file}: no logits stored per image");
        }
        let images: Vec<String> = match ck.metadata.get("ckpt.images") {
            Some(s) => serde_json::from_str(s)
                .with_context(|| format!("{file}: metadata ckpt.images is not a list of paths"))?,
            None => bail!(
                "{file}: no image paths (metadata ckpt.images): offline targets come from `ckpt logits --data DIR`"
            ),
        };
        if images.len() != n {
            bail!(
                "{file}: {} image paths (ckpt.images) for {n} rows",
                images.len()
            );
        }
        let mut rows = HashMap::with_capacity(n);
        for (row, image) in images.into_iter().enumerate() {
            if let Some(first) = rows.insert(image.clone(), row) {
                bail!("{file}: image {image} has two rows ({first} and {row})");
            }
        }
        let mut classes = match stored {
            Stored::Logits { classes } => Some(classes),
            Stored::TopK { .. } => None,
        };
        if let Some(c) = ck
            .metadata
            .get("ckpt.num_classes")
            .filter(|_| classes.is_none())
        {
            classes = Some(c.parse().with_context(|| {
                format!("{file}: metadata ckpt.num_classes {c:?} is not a number")
            })?);
        }
        let mut indices = Vec::new();
        if let (Stored::TopK { .. }, Some(t)) = (stored, ck.get("topk_indices")) {
            for (i, b) in ck.bytes(t).chunks_exact(8).enumerate() {
                let c = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                match usize::try_from(c) {
                    Ok(c) if classes.is_none_or(|n| c < n) => indices.push(c),
                    _ => bail!(
                        "{file}: topk_indices[{}][{}] is {c}, not a class{}",
                        i / t.shape[1],
                        i % t.shape[1],
                        classes.map_or(String::new(), |n| format!(" of {n}"))
                    ),
                }
            }
        }
        let transform = match ck.metadata.get("ckpt.transform") {
            Some(s) => Some(serde_json::from_str(s).with_context(|| {
                format!("{file}: metadata ckpt.transform is not a transform record")
            })?),
            None => None,
        };
        Ok(Targets {
            path: path.to_path_buf(),
            stored,
            arch: ck.metadata.get("ckpt.arch").cloned(),
            transform,
            classes,
            ck,
            rows,
            indices,
        })
    }

    /// Images the file has a row for.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Refuses a file whose classes are not a model's with `classes` outputs (`model` names it).
    pub fn check_classes(&self, classes: usize, model: &str) -> Result<()> {
        let file = self.path.display();
        if let Some(n) = self.classes.filter(|&n| n != classes) {
            bail!(
                "{file}: the targets have {n} classes, the student ({model}) {classes}: distillation needs the same classes"
            );
        }
        if let Some(&c) = self.indices.iter().max().filter(|&&c| c >= classes) {
            bail!(
                "{file}: topk_indices holds class {c}, but the student ({model}) has {classes} classes"
            );
        }
        Ok(())
    }

    /// Refuses a run whose images go through another transform than the file's: `Ok(false)`
    /// when the file records none (made by an older ckpt), so that nothing can be checked.
    pub fn check_transform(&self, run: &TransformRecord) -> Result<bool> {
        let Some(made) = &self.transform else {
            return Ok(false);
        };
        if made.kind == "train" {
            bail!(
                "{}: its logits were made through the train transform (random crops and flips), whose pixels no other pass sees; make it with --transform eval",
                self.path.display()
            );
        }
        let differ = run.differences(made, "here", "in the file");
        if !differ.is_empty() {
            bail!(
                "{}: its logits were made from other pixels than this run's ({}); make it again with this run's data options, or give the file's here",
                self.path.display(),
                differ.join("; ")
            );
        }
        Ok(true)
    }

    /// Checks that every image of `ds` has a row; returns how many rows no image of `ds` uses.
    pub fn match_images(&self, ds: &Dataset) -> Result<usize> {
        let mut missing = ds
            .items
            .iter()
            .map(|it| ds.relative_name(&it.path))
            .filter(|name| !self.rows.contains_key(name));
        if let Some(first) = missing.next() {
            let others = missing.count();
            bail!(
                "{}: no row for image {first} of {}{} (the file has {} images: make it with `ckpt logits --data` over the same folder)",
                self.path.display(),
                ds.root.display(),
                if others > 0 {
                    format!(", nor for {others} other image(s)")
                } else {
                    String::new()
                },
                self.rows.len()
            );
        }
        Ok(self.rows.len() - ds.len())
    }

    /// The rows of the images at `paths` (under `ds`'s folder), on `device`.
    pub fn rows(&self, ds: &Dataset, paths: &[PathBuf], device: &Device) -> Result<Rows> {
        let rows = paths
            .iter()
            .map(|p| {
                let name = ds.relative_name(p);
                self.rows
                    .get(&name)
                    .copied()
                    .with_context(|| format!("{}: no row for image {name}", self.path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let read = |name: &str, width: usize| -> Result<Tensor> {
            let t = self.ck.get(name).context("internal error: tensor gone")?;
            let mut v = Vec::with_capacity(rows.len() * width);
            for &r in &rows {
                let bytes = self.ck.elements(t, r * width, (r + 1) * width);
                v.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
                );
            }
            Ok(Tensor::from_vec(v, (rows.len(), width), device)?)
        };
        Ok(match self.stored {
            Stored::Logits { classes } => Rows::Logits(read("logits", classes)?),
            Stored::TopK { k } => Rows::TopK {
                values: read("topk_values", k)?,
                indices: rows
                    .iter()
                    .flat_map(|&r| self.indices[r * k..(r + 1) * k].iter().copied())
                    .collect(),
            },
        })
    }
}

//! Folders of images -> the ordered list of files (and labels) a data pass reads.
//!
//! The order and the labels are torchvision's `ImageFolder`'s, so per-image outputs line up with
//! what the user's PyTorch code sees: classes are the folder's sub-folders in sorted order (class
//! index = position), and each class's files come from `sorted(os.walk(class_dir))` (folders
//! ordered by their path string, files by name within one folder), symbolic links followed. A
//! folder without sub-folders is a flat, unlabelled set of images.
//!
//! Images are recognised by extension (jpg, jpeg, png, webp, bmp; any case), as torchvision
//! does; content decides the format later. Departures from `ImageFolder`, all on purpose:
//! hidden entries (names starting with `.`, such as `.ipynb_checkpoints`) are skipped and
//! counted, where torchvision would make a hidden folder a class; other files are skipped and
//! counted too, and an empty folder or a class folder without images is an error naming it.
//!
//! `max_images` takes a seeded random subset, kept in folder order; `shard i/n` then takes every
//! n-th of those from the i-th, so n machines split one (sub)set between them.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The file extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "bmp"];

/// One image of a data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    /// Class index (ImageFolder), `None` in a flat folder.
    pub label: Option<i64>,
    /// Position in the whole folder's listing, before subset and shard: stable per image, it
    /// seeds the train transform.
    pub index: usize,
}

/// Part `index` (0-based) of `count`: every `count`-th image starting at `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("{s:?} is not a shard i/n with 0 <= i < n (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Which images of the folder a pass reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatasetOptions {
    /// At most this many images: a random subset (seeded by `seed`) when the folder has more.
    pub max_images: Option<usize>,
    pub seed: u64,
    pub shard: Option<Shard>,
}

/// Entries of the folder that are not part of the data set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanSkipped {
    /// Hidden files and folders (names starting with `.`).
    pub hidden: usize,
    /// Files without an image extension, and files beside the class folders.
    pub other: usize,
}

/// A scanned folder: the images a pass reads, in order.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    /// Class names by index (ImageFolder); empty for a flat folder.
    pub classes: Vec<String>,
    pub items: Vec<Item>,
    /// Images in the folder before `max_images` and `shard`.
    pub total: usize,
    pub skipped: ScanSkipped,
}

impl Dataset {
    /// Lists `dir` as described in the module doc.
    pub fn scan(dir: &Path, opts: &DatasetOptions) -> Result<Dataset> {
        let mut skipped = ScanSkipped::default();
        let entries = list_dir(dir)?;
        let mut class_dirs = Vec::new();
        let mut files = Vec::new();
        for (name, path) in entries {
            if is_hidden(&name) {
                skipped.hidden += 1;
            } else if path.is_dir() {
                class_dirs.push((name, path));
            } else {
                files.push((name, path));
            }
        }

        let mut classes = Vec::new();
        let mut items = Vec::new();
        if class_dirs.is_empty() {
            for (name, path) in files {
                if is_image_name(&name) {
                    items.push((path, None));
                } else {
                    skipped.other += 1;
                }
            }
            if items.is_empty() {
                bail!(
                    "{}: no images ({}) in the folder{}",
                    dir.display(),
                    IMAGE_EXTENSIONS.join(", "),
                    describe_skipped(&skipped)
                );
            }
        } else {
            skipped.other += files.len();
            for (label, (name, path)) in class_dirs.into_iter().enumerate() {
                let before = items.len();
                walk_class(&path, label as i64, &mut items, &mut skipped)?;
                if items.len() == before {
                    bail!(
                        "{}: class folder has no images ({})",
                        path.display(),
                        IMAGE_EXTENSIONS.join(", ")
                    );
                }
                classes.push(name.to_string_lossy().into_owned());
            }
        }

        let total = items.len();
        let mut items: Vec<Item> = items
            .into_iter()
            .enumerate()
            .map(|(index, (path, label))| Item { path, label, index })
            .collect();
        if let Some(n) = opts.max_images {
            if n == 0 {
                bail!("--max-images must be at least 1");
            }
            if n < total {
                items = random_subset(items, n, opts.seed);
            }
        }
        if let Some(shard) = opts.shard {
            let chosen = items.len();
            items = items
                .into_iter()
                .skip(shard.index)
                .step_by(shard.count)
                .collect();
            if items.is_empty() {
                bail!(
                    "{}: shard {shard} of {chosen} images is empty",
                    dir.display()
                );
            }
        }
        Ok(Dataset {
            root: dir.to_path_buf(),
            classes,
            items,
            total,
            skipped,
        })
    }

    /// Whether images carry class labels (ImageFolder layout).
    pub fn is_labelled(&self) -> bool {
        !self.classes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// An image's path relative to the folder, as `ckpt logits --data` records it (`ckpt.images`)
    /// and `ckpt distill --targets` looks it up: independent of where the folder lies.
    pub fn relative_name(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// The same images in a seeded random order (BatchNorm statistics want batches that mix
    /// classes; an ImageFolder listing is sorted by class).
    pub fn shuffled(mut self, seed: u64) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in (1..self.items.len()).rev() {
            let j = rng.random_range(0..=i);
            self.items.swap(i, j);
        }
        self
    }
}

fn list_dir(dir: &Path) -> Result<Vec<(OsString, PathBuf)>> {
    let meta = std::fs::metadata(dir).with_context(|| format!("{}: cannot read", dir.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a folder", dir.display());
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let e = e.with_context(|| format!("{}: cannot list", dir.display()))?;
        entries.push((e.file_name(), e.path()));
    }
    // Python sorts str by code point, which is UTF-8 byte order.
    entries.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
    Ok(entries)
}

/// The images of one class folder, in `sorted(os.walk(dir, followlinks=True))` order.
fn walk_class(
    dir: &Path,
    label: i64,
    items: &mut Vec<(PathBuf, Option<i64>)>,
    skipped: &mut ScanSkipped,
) -> Result<()> {
    // (path relative to the class folder as a '/'-joined string, its image files)
    let mut folders: Vec<(Vec<u8>, Vec<PathBuf>)> = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(Vec::new(), dir.to_path_buf())];
    while let Some((rel, path)) = stack.pop() {
        // Symbolic links are followed; a folder reached twice (a link cycle) is read once.
        if let Ok(canon) = path.canonicalize() {
            if !seen.insert(canon) {
                continue;
            }
        }
        let mut images = Vec::new();
        for (name, p) in list_dir(&path)? {
            if is_hidden(&name) {
                skipped.hidden += 1;
            } else if p.is_dir() {
                let mut sub = rel.clone();
                if !sub.is_empty() {
                    sub.push(b'/');
                }
                sub.extend_from_slice(name.as_encoded_bytes());
                stack.push((sub, p));
            } else if is_image_name(&name) {
                images.push(p);
            } else {
                skipped.other += 1;
            }
        }
        folders.push((rel, images));
    }
    folders.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, images) in folders {
        items.extend(images.into_iter().map(|p| (p, Some(label))));
    }
    Ok(())
}

fn is_hidden(name: &OsString) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

fn is_image_name(name: &OsString) -> bool {
    let name = name.to_string_lossy().to_ascii_lowercase();
    IMAGE_EXTENSIONS
        .iter()
        .any(|ext| name.len() > ext.len() + 1 && name.ends_with(&format!(".{ext}")))
}

fn describe_skipped(s: &ScanSkipped) -> String {
    if s.hidden == 0 && s.other == 0 {
        String::new()
    } else {
        format!(" ({} hidden and {} other files skipped)", s.hidden, s.other)
    }
}

/// `n` of `items` chosen uniformly with a seeded partial Fisher-Yates shuffle, back in folder
/// order.
fn random_subset(mut items: Vec<Item>, n: usize, seed: u64) -> Vec<Item> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len = items.len();
    for i in 0..n {
        let j = rng.random_range(i..len);
        items.swap(i, j);
    }
    items.truncate(n);
    items.sort_by_key(|it| it.index);
    items
}

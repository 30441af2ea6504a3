//! Which of the model's classes each class folder's images are: the labels every labelled pass
//! (eval, sweeps, logits with a folder) measures against.
//!
//! [`crate::data::Dataset::scan`] labels a class folder by its position in sorted order, as
//! torchvision's `ImageFolder` does. That is the model's class only when the folder holds all of
//! the model's classes under names that sort in the model's order; a folder holding two of a
//! ten-class model's classes (`digit_5/`, `digit_7/`) gets labels 0 and 1 and measures 0 %.
//! [`resolve`] picks the labelling, in this order:
//!
//! 1. `--class-map FILE`, in timm's format (`timm.data.load_class_map` for a `.txt`): one class
//!    folder name per line, whitespace stripped, the line number (from 0) being the model's class
//!    index. A blank line holds an index without naming a folder. As in timm's `ImageDataset`,
//!    the images of a folder the map does not name are left out; unlike timm, ckpt says so (a
//!    warning before any work, or an error with `--strict-labels`). Lines naming folders the
//!    data does not have are the point of a map (a subset of the model's classes) and are fine.
//! 2. ImageNet-1k: when the model has 1000 outputs and every class folder is named like a
//!    WordNet id (`n01440764`), the folders are labelled by their place in the ImageNet-1k synset
//!    list [`IMAGENET_1K_SYNSETS`], as if it had been given as the class map (so a subset such as
//!    Imagenette is labelled right without a flag, and a name that is no ImageNet-1k synset is
//!    named in the warning or error).
//! 3. Otherwise the folder order. When the folder's class count differs from the model's, a
//!    warning (or, with `--strict-labels`, an error) says so before any work; more folders than
//!    the model has classes is always an error, as those labels cannot be scored.
//!
//! A map naming none of the folders is an error whatever the flags: nothing would be measured.
//!
//! ## The synset list
//!
//! `imagenet_synsets.txt` beside this file is timm 1.0.31's `timm/data/_info/imagenet_synsets.txt`
//! (sha256 `70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15`), copied unchanged:
//! the 1000 WordNet ids of the ILSVRC-2012 classification classes in sorted order, which is the
//! order `ImageFolder` gives the ILSVRC-2012 training folder and so the class order of
//! torchvision's and timm's ImageNet-1k weights. The unit tests check its length and order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::Dataset;

/// The 1000 ImageNet-1k (ILSVRC-2012) synsets, one per line, line number = class index.
pub const IMAGENET_1K_SYNSETS: &str = include_str!("imagenet_synsets.txt");

/// How labels are to be chosen: `--class-map` and `--strict-labels`.
#[derive(Clone, Debug, Default)]
pub struct LabelOptions {
    pub class_map: Option<PathBuf>,
    /// Refuse, instead of warning about, folders that cannot be the model's classes.
    pub strict: bool,
}

/// Where the labels came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Labelling {
    /// A class folder's position in sorted order (torchvision's `ImageFolder`).
    FolderOrder,
    /// A `--class-map` file.
    ClassMap(PathBuf),
    /// The ImageNet-1k synset order, for folders named by WordNet id.
    ImageNet1k,
}

impl Labelling {
    /// The name recorded in JSON and metadata.
    pub fn kind(&self) -> &'static str {
        match self {
            Labelling::FolderOrder => "folder-order",
            Labelling::ClassMap(_) => "class-map",
            Labelling::ImageNet1k => "imagenet-1k-synsets",
        }
    }
}

/// The labellings a model with `classes` outputs gets from a class folder without
/// `--class-map`, the first that applies (ImageNet-1k only applies to synset-named folders).
pub fn default_labellings(classes: usize) -> Vec<&'static str> {
    if classes == IMAGENET_CLASSES {
        vec![Labelling::ImageNet1k.kind(), Labelling::FolderOrder.kind()]
    } else {
        vec![Labelling::FolderOrder.kind()]
    }
}

const IMAGENET_CLASSES: usize = 1000;

/// A class map: the model's class names by index (empty for a blank line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassMap {
    pub names: Vec<String>,
}

impl ClassMap {
    /// Reads a class map in timm's text format (see the module doc).
    pub fn read(path: &Path) -> Result<ClassMap> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("--class-map {}: cannot read", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "--class-map {}: not a text file (one class folder name per line, in UTF-8)",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("--class-map {}", path.display()))
    }

    /// Parses the text of a class map.
    pub fn parse(text: &str) -> Result<ClassMap> {
        let mut names: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
        while names.last().is_some_and(|n| n.is_empty()) {
            names.pop();
        }
        if names.is_empty() {
            bail!("names no class (expected one class folder name per line)");
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() {
                continue;
            }
            if let Some(first) = seen.insert(n, i) {
                bail!(
                    "line {} names {n:?} again (also line {}): a folder has one class",
                    i + 1,
                    first + 1
                );
            }
        }
        Ok(ClassMap { names })
    }

    /// The ImageNet-1k synsets as a class map.
    pub fn imagenet_1k() -> ClassMap {
        ClassMap {
            names: IMAGENET_1K_SYNSETS.lines().map(str::to_string).collect(),
        }
    }

    fn index(&self) -> HashMap<&str, usize> {
        self.names
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.is_empty())
            .map(|(i, n)| (n.as_str(), i))
            .collect()
    }
}

/// Whether a folder name is a WordNet noun id (`n` and eight digits).
pub fn is_wordnet_id(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 9 && b[0] == b'n' && b[1..].iter().all(u8::is_ascii_digit)
}

/// The labels of a pass: which model class each class folder is, and what was said about it.
#[derive(Clone, Debug)]
pub struct Labels {
    pub labelling: Labelling,
    /// The model's output count.
    pub model_classes: usize,
    /// The folder's class names in sorted order (the scan's labels index them).
    pub folder_classes: Vec<String>,
    /// The model's class per folder class; `None`: not in the map, its images are left out.
    pub targets: Vec<Option<usize>>,
    /// The model's class names by index, as far as known (the map's lines; for the folder
    /// order, the folders).
    pub class_names: Vec<String>,
    /// Images of unmapped folders (left out).
    pub unmapped_images: usize,
    /// What was found that cannot be right, in one line (already refused with `strict`).
    pub warning: Option<String>,
}

/// What the JSON reports and the metadata record about the labels.
#[derive(Clone, Debug, Serialize)]
pub struct LabelRecord {
    pub kind: &'static str,
    pub class_map: Option<String>,
    pub folder_classes: usize,
    pub model_classes: usize,
    pub unmapped_folders: Vec<String>,
    pub unmapped_images: usize,
    pub warning: Option<String>,
}

/// Chooses the labels of `ds` (a scanned ImageFolder) for a model with `model_classes` outputs,
/// as the module doc says. Errors are one line naming the folder or the map.
pub fn resolve(ds: &Dataset, model_classes: usize, opts: &LabelOptions) -> Result<Labels> {
    let root = ds.root.display();
    let folders = &ds.classes;
    let n = folders.len();
    let mut per_class = vec![0usize; n];
    for it in &ds.items {
        if let Some(l) = it.label.and_then(|l| usize::try_from(l).ok()) {
            if l < n {
                per_class[l] += 1;
            }
        }
    }
    let (labelling, map) = match &opts.class_map {
        Some(path) => {
            let map = ClassMap::read(path)?;
            if map.names.len() > model_classes {
                bail!(
                    "--class-map {}: {} classes, but the model outputs {model_classes}",
                    path.display(),
                    map.names.len()
                );
            }
            (Labelling::ClassMap(path.clone()), Some(map))
        }
        None if model_classes == IMAGENET_CLASSES
            && n > 0
            && folders.iter().all(|f| is_wordnet_id(f)) =>
        {
            (Labelling::ImageNet1k, Some(ClassMap::imagenet_1k()))
        }
        None => (Labelling::FolderOrder, None),
    };

    let Some(map) = map else {
        let shown = list(folders);
        if n > model_classes {
            bail!(
                "{root} has {n} class folders ({shown}) but the model outputs {model_classes} \
                 classes; --class-map FILE names the model's classes, one folder name per line"
            );
        }
        let warning = (n != model_classes).then(|| {
            format!(
                "{root} has {n} class folders ({shown}) but the model outputs {model_classes} \
                 classes: labelled 0..{} by sorted position, which are the model's classes only \
                 if they are its first {n}; --class-map FILE names the model's classes, one \
                 folder name per line",
                n.saturating_sub(1)
            )
        });
        if let (Some(w), true) = (&warning, opts.strict) {
            bail!("--strict-labels: {w}");
        }
        return Ok(Labels {
            labelling,
            model_classes,
            folder_classes: folders.clone(),
            targets: (0..n).map(Some).collect(),
            class_names: folders.clone(),
            unmapped_images: 0,
            warning,
        });
    };

    let index = map.index();
    let targets: Vec<Option<usize>> = folders
        .iter()
        .map(|f| index.get(f.as_str()).copied())
        .collect();
    let missing: Vec<&String> = folders
        .iter()
        .zip(&targets)
        .filter(|(_, t)| t.is_none())
        .map(|(f, _)| f)
        .collect();
    let unmapped_images: usize = targets
        .iter()
        .zip(&per_class)
        .filter(|(t, _)| t.is_none())
        .map(|(_, c)| c)
        .sum();
    let source = match &labelling {
        Labelling::ClassMap(p) => format!("--class-map {}", p.display()),
        _ => "the ImageNet-1k synsets".to_string(),
    };
    if missing.len() == n {
        bail!(
            "{root}: none of its {n} class folders ({}) is in {source}",
            list(folders)
        );
    }
    let warning = (!missing.is_empty()).then(|| {
        let names: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
        format!(
            "{root}: {} of {n} class folders not in {source} ({}): their {unmapped_images} images \
             are left out",
            missing.len(),
            list(&names)
        )
    });
    if let (Some(w), true) = (&warning, opts.strict) {
        bail!("--strict-labels: {w}");
    }
    Ok(Labels {
        labelling,
        model_classes,
        folder_classes: folders.clone(),
        targets,
        class_names: map.names,
        unmapped_images,
        warning,
    })
}

/// Up to 5 names, then how many more.
fn list(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(&format!(", ... {} more", names.len() - 5));
    }
    s
}

impl Labels {
    /// Relabels `ds`'s images with the model's classes and leaves out those of unmapped
    /// folders; `ds.classes` becomes the model's class names.
    pub fn apply(&self, ds: &mut Dataset) {
        ds.items.retain_mut(|it| {
            match it
                .label
                .and_then(|l| self.targets.get(l as usize).copied().flatten())
            {
                Some(t) => {
                    it.label = Some(t as i64);
                    true
                }
                None => it.label.is_none(),
            }
        });
        ds.classes = self.class_names.clone();
    }

    /// One line saying which labelling is used.
    pub fn describe(&self) -> String {
        let n = self.folder_classes.len();
        let mapped = self.targets.iter().filter(|t| t.is_some()).count();
        match &self.labelling {
            Labelling::FolderOrder => {
                format!("labels: {n} class folders in sorted order (ImageFolder)")
            }
            Labelling::ClassMap(p) => format!(
                "labels: --class-map {} ({mapped} of its {} classes in the folder)",
                p.display(),
                self.class_names.iter().filter(|c| !c.is_empty()).count()
            ),
            Labelling::ImageNet1k => format!(
                "labels: ImageNet-1k synset order ({mapped} synset folders; --class-map overrides)"
            ),
        }
    }

    /// What JSON reports and metadata record.
    pub fn record(&self) -> LabelRecord {
        LabelRecord {
            kind: self.labelling.kind(),
            class_map: match &self.labelling {
                Labelling::ClassMap(p) => Some(p.display().to_string()),
                _ => None,
            },
            folder_classes: self.folder_classes.len(),
            model_classes: self.model_classes,
            unmapped_folders: self
                .folder_classes
                .iter()
                .zip(&self.targets)
                .filter(|(_, t)| t.is_none())
                .map(|(f, _)| f.clone())
                .collect(),
            unmapped_images: self.unmapped_images,
            warning: self.warning.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Item, ScanSkipped};

    fn folder(classes: &[&str], per_class: usize) -> Dataset {
        let mut items = Vec::new();
        for (l, c) in classes.iter().enumerate() {
            for k in 0..per_class {
                items.push(Item {
                    path: PathBuf::from(format!("root/{c}/{k}.png")),
                    label: Some(l as i64),
                    index: items.len(),
                });
            }
        }
        Dataset {
            root: PathBuf::from("root"),
            classes: classes.iter().map(|s| s.to_string()).collect(),
            total: items.len(),
            items,
            skipped: ScanSkipped::default(),
        }
    }

    #[test]
    fn synset_list_is_the_sorted_ilsvrc_2012_wnids() {
        let s = ClassMap::imagenet_1k().names;
        assert_eq!(s.len(), 1000);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert!(s.iter().all(|n| is_wordnet_id(n)));
        assert_eq!((s[0].as_str(), s[999].as_str()), ("n01440764", "n15075141"));
    }

    #[test]
    fn class_map_parsing_follows_timm() {
        let m = ClassMap::parse("a\n b \n\nc\n\n\n").unwrap();
        assert_eq!(m.names, ["a", "b", "", "c"]);
        assert!(ClassMap::parse("\n\n").is_err());
        let e = ClassMap::parse("a\nb\na\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn map_relabels_and_leaves_out_unmapped_folders() {
        let ds = folder(&["digit_5", "digit_7", "junk"], 2);
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("map.txt");
        let names: Vec<String> = (0..10).map(|i| format!("digit_{i}")).collect();
        std::fs::write(&map, names.join("\n")).unwrap();
        let opts = LabelOptions {
            class_map: Some(map.clone()),
            strict: false,
        };
        let labels = resolve(&ds, 10, &opts).unwrap();
        assert_eq!(labels.targets, [Some(5), Some(7), None]);
        assert!(labels.warning.as_deref().unwrap().contains("junk"));
        let mut relabelled = ds.clone();
        labels.apply(&mut relabelled);
        let got: Vec<i64> = relabelled.items.iter().map(|i| i.label.unwrap()).collect();
        assert_eq!(got, [5, 5, 7, 7]);
        assert_eq!(relabelled.classes.len(), 10);
        let strict = LabelOptions {
            strict: true,
            ..opts
        };
        let e = resolve(&ds, 10, &strict).unwrap_err().to_string();
        assert!(e.contains("junk") && e.contains("--strict-labels"), "{e}");
        // A map with more classes than the model cannot be scored.
        assert!(resolve(
            &ds,
            8,
            &LabelOptions {
                class_map: Some(map),
                strict: false
            }
        )
        .is_err());
    }

    #[test]
    fn folder_order_warns_on_a_different_count() {
        let ds = folder(&["5", "7"], 1);
        let l = resolve(&ds, 10, &LabelOptions::default()).unwrap();
        assert_eq!(l.labelling, Labelling::FolderOrder);
        assert!(l.warning.is_some());
        assert!(resolve(&ds, 2, &LabelOptions::default())
            .unwrap()
            .warning
            .is_none());
        assert!(resolve(&ds, 1, &LabelOptions::default()).is_err());
    }

    #[test]
    fn synset_folders_take_imagenet_order_for_1000_classes_only() {
        let ds = folder(&["n01440764", "n02102040"], 1);
        let l = resolve(&ds, 1000, &LabelOptions::default()).unwrap();
        assert_eq!(l.labelling, Labelling::ImageNet1k);
        assert_eq!(l.targets, [Some(0), Some(217)]);
        assert!(l.warning.is_none());
        let l = resolve(&ds, 2, &LabelOptions::default()).unwrap();
        assert_eq!(l.labelling, Labelling::FolderOrder);
        let bad = folder(&["n01440764", "n99999999"], 1);
        let l = resolve(&bad, 1000, &LabelOptions::default()).unwrap();
        assert!(l.warning.unwrap().contains("n99999999"));
    }
}

//! Checkpoints as lazily read maps from tensor name to (dtype, shape, bytes).
//!
//! [`Checkpoint::open`] accepts every form users have without being told which: a `.safetensors`
//! file, a sharded safetensors checkpoint (its `*.safetensors.index.json` or the folder holding
//! it) and a `torch.save` zip (`.pth`, `.pt`, `.bin`, `.pth.tar`), whether a bare state dict or a
//! training checkpoint that holds one. Files are memory-mapped and never read whole: a tensor's
//! bytes are a slice of the map (or gathered, for the rare strided `.pth` view). The format is
//! recognised from the content, not the extension. Every map is guarded against the file
//! changing underneath it ([`guard`]).
//!
//! Names are normalised here, once, so that every command sees the same keys: wrapper prefixes
//! (`module.` from DDP, `_orig_mod.` from torch.compile) are removed when every key carries them.
//! Two trainers' layouts are recognised as wrappers too: `torch.optim.swa_utils.AveragedModel`'s
//! state dict (a `module.` copy of the model beside an `n_averaged` count, which is set aside as
//! metadata rather than treated as a weight) and a PyTorch Lightning checkpoint's `state_dict`
//! (the LightningModule's attribute, `model.` say, shared by every key). `--keep-prefix` keeps
//! all of these as they are (with `n_averaged` as a tensor), so that an output loads back into
//! the same wrapper.
//!
//! Any other prefix is left alone here: whether `backbone.` is a wrapper or part of the model's
//! own naming can only be told by an architecture, which is the model layer's business
//! ([`Checkpoint::remove_prefix`] and [`shared_component`] are its tools).
//!
//! A folder holding a `config.json` beside its weights is a Hugging Face / timm model folder:
//! the config is read with the weights ([`folder`]; [`Checkpoint::model_folder`]) and left for
//! the model layer and the commands to interpret.

pub mod dtype;
pub mod folder;
pub mod guard;
pub mod pickle;
pub mod provenance;
pub mod pth;
pub mod safetensors;
pub mod sharded;
pub mod summary;
pub mod write;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

pub use dtype::DType;

/// Prefixes that training wrappers add to every key and that are removed without being asked,
/// with the wrapper's name.
pub const WRAPPER_PREFIXES: [(&str, &str); 2] =
    [("module.", "DDP"), ("_orig_mod.", "torch.compile")];

/// The tensor `torch.optim.swa_utils.AveragedModel` keeps beside its `module.` copy of the model.
pub const N_AVERAGED: &str = "n_averaged";

/// How a checkpoint was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    ShardedSafetensors,
    TorchSave,
    /// Tensors made in memory by an engine (an average judged before it is written).
    InMemory,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::ShardedSafetensors => "safetensors-sharded",
            Format::TorchSave => "torch-save",
            Format::InMemory => "in-memory",
        }
    }
}

/// How to open a checkpoint: which dict of a training checkpoint, and which prefixes to strip.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Key of the state dict inside a `torch.save` file (`a.b` for nested dicts).
    pub key: Option<String>,
    /// Prefixes to remove in addition to the wrapper prefixes (every key must carry them).
    pub strip_prefix: Vec<String>,
    /// Keep wrapper prefixes as they are.
    pub keep_prefix: bool,
}

/// A memory-mapped file, or an empty one (which cannot be mapped).
enum Blob {
    Map(guard::MappedInput),
    Empty,
}

impl Blob {
    fn bytes(&self) -> &[u8] {
        match self {
            Blob::Map(m) => m.bytes(),
            Blob::Empty => &[],
        }
    }
}

/// Where a tensor's elements live.
#[derive(Clone, Debug)]
enum Source {
    /// `file`'s bytes from `start` on.
    File { file: usize, start: usize },
    /// An inflated (once compressed) `.pth` record.
    Inflated(Arc<Vec<u8>>),
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    source: Source,
    /// Element offset from the source start, and strides (`None`: contiguous).
    offset: usize,
    stride: Option<Vec<usize>>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// Which underlying file holds it (an index into [`Checkpoint::files`]).
    pub fn file(&self) -> Option<usize> {
        match self.source {
            Source::File { file, .. } => Some(file),
            Source::Inflated(_) => None,
        }
    }
}

pub struct Checkpoint {
    /// The path as the user gave it.
    pub path: PathBuf,
    pub format: Format,
    /// The dict a `torch.save` file's state dict was taken from.
    pub key: Option<String>,
    /// True when that key was chosen by preference, not by `--key`.
    pub key_picked: bool,
    /// Other state-dict keys that were present but not picked.
    pub other_keys: Vec<String>,
    /// The prefix removed from every key, if any.
    pub stripped_prefix: Option<String>,
    /// What each removed part of that prefix was (`DDP`, `AveragedModel`, ...).
    pub prefix_reasons: Vec<String>,
    /// AveragedModel's `n_averaged`, when the state dict is one (set aside unless `--keep-prefix`).
    pub n_averaged: Option<i64>,
    /// The training code that wrote a `torch.save` file, when its layout says so.
    pub trainer: Option<pth::Trainer>,
    /// Classes a `torch.save` file names outside the state dict, left unread as placeholders.
    pub placeholders: Vec<String>,
    /// The safetensors `__metadata__` (for sharded checkpoints, the index's `metadata`, flattened).
    pub metadata: BTreeMap<String, String>,
    /// The files read (several for a sharded checkpoint).
    pub files: Vec<PathBuf>,
    /// The config.json of a model folder (see [`folder`]).
    pub model_folder: Option<folder::ModelFolder>,
    blobs: Vec<Blob>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

fn map_file(path: &Path) -> Result<Blob> {
    let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("{}: cannot stat", path.display()))?;
    if meta.is_dir() {
        bail!("{}: is a folder", path.display());
    }
    if meta.len() == 0 {
        return Ok(Blob::Empty);
    }
    Ok(Blob::Map(guard::MappedInput::new(f, &meta, path)?))
}

impl Checkpoint {
    /// Lets the kernel take back the pages of the mapped files that reading the tensors brought
    /// into this process's resident memory, once their bytes have been copied out (a model is
    /// built): they stay in the page cache, and any later read maps them again. Without this, a
    /// job holds every weight twice for its whole run (the file's pages and the model's copy).
    pub fn release_pages(&self) {
        for b in &self.blobs {
            if let Blob::Map(m) = b {
                m.release_pages();
            }
        }
    }

    /// Opens `path` in whichever supported form it is.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Checkpoint> {
        let path = path.as_ref();
        Self::open_inner(path, opts).with_context(|| path.display().to_string())
    }

    fn open_inner(path: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).context("cannot open")?;
        let mut ck = if meta.is_dir() {
            let target = sharded::find_in_folder(path)?;
            let mut ck = if target.extension().is_some_and(|e| e == "json") {
                Self::open_sharded(path, &target).with_context(|| file_name(&target))?
            } else {
                let mut c = Self::open_file(&target, opts).with_context(|| file_name(&target))?;
                c.path = path.to_path_buf();
                c
            };
            ck.model_folder = folder::ModelFolder::read(path)?;
            ck
        } else if path.to_string_lossy().ends_with(".json") {
            Self::open_sharded(path, path)?
        } else {
            Self::open_file(path, opts)?
        };
        ck.normalise_names(opts)?;
        Ok(ck)
    }

    /// A checkpoint of tensors held in memory, `(planned tensor, bytes)` in order; `label`
    /// names it in messages. It reads no file: `files` is empty.
    pub fn from_memory(
        label: &Path,
        tensors: Vec<(write::PlannedTensor, Vec<u8>)>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Checkpoint> {
        let mut ck = Self::empty(label, Format::InMemory);
        ck.metadata = metadata;
        for (t, bytes) in tensors {
            if bytes.len() != t.nbytes() {
                bail!(
                    "tensor {}: {} bytes for {} {:?}",
                    t.name,
                    bytes.len(),
                    t.dtype,
                    t.shape
                );
            }
            ck.push(TensorInfo {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                source: Source::Inflated(Arc::new(bytes)),
                offset: 0,
                stride: None,
            })?;
        }
        Ok(ck)
    }

    /// This checkpoint with some tensors' bytes replaced (by name, each the tensor's size in its
    /// dtype), held in memory under `label`: a result to evaluate or transform further before
    /// anything is written.
    pub fn with_replaced(
        &self,
        tensors: &HashMap<String, Vec<u8>>,
        label: &Path,
    ) -> Result<Checkpoint> {
        let all = self
            .tensors()
            .iter()
            .map(|t| {
                let bytes = match tensors.get(&t.name) {
                    Some(b) => b.clone(),
                    None => self.bytes(t).into_owned(),
                };
                (write::PlannedTensor::from(t), bytes)
            })
            .collect();
        Self::from_memory(label, all, self.metadata.clone())
    }

    fn empty(path: &Path, format: Format) -> Checkpoint {
        Checkpoint {
            path: path.to_path_buf(),
            format,
            key: None,
            key_picked: false,
            other_keys: Vec::new(),
            stripped_prefix: None,
            prefix_reasons: Vec::new(),
            n_averaged: None,
            trainer: None,
            placeholders: Vec::new(),
            metadata: BTreeMap::new(),
            files: Vec::new(),
            model_folder: None,
            blobs: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
        }
    }

    fn open_file(path: &Path, opts: &OpenOptions) -> Result<Checkpoint> {
        let blob = map_file(path)?;
        let bytes = blob.bytes();
        if pth::is_zip(bytes) {
            let contents = pth::read(bytes, opts.key.as_deref())?;
            let mut ck = Self::empty(path, Format::TorchSave);
            ck.key = contents.key;
            ck.key_picked = contents.key_picked;
            ck.other_keys = contents.other_keys;
            ck.trainer = contents.trainer;
            ck.placeholders = contents.placeholders;
            for t in contents.tensors {
                let (source, offset) = match t.record {
                    pth::Record::Mapped { start, .. } => {
                        (Source::File { file: 0, start }, t.offset)
                    }
                    pth::Record::Inflated(v) => (Source::Inflated(v), t.offset),
                };
                let stride = (!is_contiguous(&t.shape, &t.stride)).then_some(t.stride);
                ck.push(TensorInfo {
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    source,
                    offset,
                    stride,
                })?;
            }
            ck.files.push(path.to_path_buf());
            ck.blobs.push(blob);
            return Ok(ck);
        }
        if pth::is_legacy_pickle(bytes) {
            bail!("legacy (pre-1.6) torch.save format is not supported; re-save it with a current PyTorch");
        }
        if opts.key.is_some() {
            bail!("--key applies to torch.save files only; this is a safetensors file");
        }
        let mut ck = Self::empty(path, Format::Safetensors);
        ck.add_safetensors(path, blob, |_| true)?;
        Ok(ck)
    }

    /// Adds the tensors of one safetensors file (a whole checkpoint or a shard) that `keep`
    /// accepts.
    fn add_safetensors(
        &mut self,
        path: &Path,
        blob: Blob,
        keep: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let header = safetensors::parse_header(blob.bytes())?;
        let file = self.blobs.len();
        for t in header.tensors.into_iter().filter(|t| keep(&t.name)) {
            self.push(TensorInfo {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                source: Source::File {
                    file,
                    start: t.start,
                },
                offset: 0,
                stride: None,
            })?;
        }
        self.files.push(path.to_path_buf());
        self.blobs.push(blob);
        if self.metadata.is_empty() {
            self.metadata = header.metadata;
        }
        Ok(())
    }

    fn open_sharded(given: &Path, index_path: &Path) -> Result<Checkpoint> {
        let index = sharded::read_index(index_path)?;
        let mut ck = Self::empty(given, Format::ShardedSafetensors);
        ck.metadata = index.metadata.clone();
        for shard in &index.shards {
            // Tensors a shard holds but the index does not list are not part of the model.
            ck.add_safetensors(shard, map_file(shard)?, |name| {
                index.weight_map.get(name) == Some(shard)
            })
            .with_context(|| format!("shard {}", shard.display()))?;
        }
        for (name, shard) in &index.weight_map {
            if !ck.by_name.contains_key(name) {
                bail!(
                    "the index maps tensor {name} to {}, which does not hold it",
                    shard.display()
                );
            }
        }
        Ok(ck)
    }

    fn push(&mut self, t: TensorInfo) -> Result<()> {
        if self.by_name.contains_key(&t.name) {
            bail!("tensor {} appears twice", t.name);
        }
        self.by_name.insert(t.name.clone(), self.tensors.len());
        self.tensors.push(t);
        Ok(())
    }

    fn normalise_names(&mut self, opts: &OpenOptions) -> Result<()> {
        if let Some(n) = self.averaged_model_count() {
            self.n_averaged = Some(n);
            if !opts.keep_prefix {
                self.remove_tensor(N_AVERAGED);
            }
        }
        for p in &opts.strip_prefix {
            if let Some(t) = self
                .tensors
                .iter()
                .find(|t| !t.name.starts_with(p.as_str()))
            {
                bail!(
                    "--strip-prefix {p}: tensor {} does not start with it",
                    t.name
                );
            }
            self.remove_prefix(p, "--strip-prefix");
        }
        if opts.keep_prefix {
            return Ok(());
        }
        let lightning = matches!(self.trainer, Some(pth::Trainer::Lightning(_)))
            && self.key.as_deref() == Some("state_dict");
        if lightning && opts.strip_prefix.is_empty() {
            if let Some(p) = shared_component(self.tensors.iter().map(|t| t.name.as_str())) {
                self.remove_prefix(&p, "the LightningModule's attribute");
            }
        }
        // DDP around torch.compile gives `module._orig_mod.`; strip as long as one applies. An
        // AveragedModel's `module.` comes first; a further one is a DDP's inside it.
        let mut averaged = self.n_averaged.is_some() && opts.strip_prefix.is_empty();
        while let Some((p, who)) = WRAPPER_PREFIXES.iter().find(|(p, _)| {
            !self.tensors.is_empty() && self.tensors.iter().all(|t| t.name.starts_with(*p))
        }) {
            let averaged_model = *p == "module." && std::mem::take(&mut averaged);
            self.remove_prefix(p, if averaged_model { "AveragedModel" } else { who });
        }
        Ok(())
    }

    /// `n_averaged` when the tensors are an AveragedModel's state dict: that integer scalar and,
    /// beside it, only `module.` names.
    fn averaged_model_count(&self) -> Option<i64> {
        let t = self.get(N_AVERAGED)?;
        let others = self.tensors.iter().filter(|t| t.name != N_AVERAGED);
        if !t.dtype.is_integer() || t.numel() != 1 || others.clone().next().is_none() {
            return None;
        }
        if !others.into_iter().all(|t| t.name.starts_with("module.")) {
            return None;
        }
        i64::try_from(dtype::read_int(&self.bytes(t), t.dtype, 0)).ok()
    }

    fn remove_tensor(&mut self, name: &str) {
        self.tensors.retain(|t| t.name != name);
        self.reindex();
    }

    /// Removes `prefix` from every tensor name (every name must carry it) and records it, with
    /// what it was, for [`Checkpoint::origin_note`].
    pub fn remove_prefix(&mut self, prefix: &str, why: &str) {
        assert!(
            self.tensors.iter().all(|t| t.name.starts_with(prefix)),
            "remove_prefix: not every name starts with {prefix}"
        );
        for t in &mut self.tensors {
            t.name.drain(..prefix.len());
        }
        self.reindex();
        self.stripped_prefix
            .get_or_insert_with(String::new)
            .push_str(prefix);
        self.prefix_reasons.push(why.to_string());
    }

    fn reindex(&mut self) {
        self.by_name = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
    }

    /// Tensors in storage order (the state dict's order for `torch.save` files).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// All of a tensor's bytes, borrowed from the map when it is contiguous.
    pub fn bytes<'a>(&'a self, t: &'a TensorInfo) -> Cow<'a, [u8]> {
        self.elements(t, 0, t.numel())
    }

    /// Elements `start..end` of a tensor in row-major order, as bytes.
    pub fn elements<'a>(&'a self, t: &'a TensorInfo, start: usize, end: usize) -> Cow<'a, [u8]> {
        let base: &[u8] = match &t.source {
            Source::File { file, start: s } => &self.blobs[*file].bytes()[*s..],
            Source::Inflated(v) => v.as_slice(),
        };
        let es = t.dtype.size();
        match &t.stride {
            None => Cow::Borrowed(&base[(t.offset + start) * es..(t.offset + end) * es]),
            Some(stride) => {
                let mut out = Vec::with_capacity((end - start) * es);
                for flat in start..end {
                    let mut rem = flat;
                    let mut pos = t.offset;
                    for (d, s) in t.shape.iter().zip(stride).rev() {
                        pos += (rem % d) * s;
                        rem /= d;
                    }
                    out.extend_from_slice(&base[pos * es..(pos + 1) * es]);
                }
                Cow::Owned(out)
            }
        }
    }

    /// Lets the pages that [`Checkpoint::elements`] of `t` from `start` to `end` read leave
    /// resident memory (see [`Checkpoint::release_pages`]): for a stream that reads each part of
    /// a file once, so that the file's pages do not pile up. Only the whole pages inside that
    /// range go; other tensors' parts and strided or inflated tensors are not touched.
    pub fn release_elements(&self, t: &TensorInfo, start: usize, end: usize) {
        if let (Source::File { file, start: s }, None) = (&t.source, &t.stride) {
            let es = t.dtype.size();
            self.release_file_range(
                *file,
                s + (t.offset + start) * es..s + (t.offset + end) * es,
            );
        }
    }

    /// The whole content of underlying file `i` (see [`Checkpoint::files`]), as mapped.
    pub fn file_bytes(&self, i: usize) -> &[u8] {
        self.blobs[i].bytes()
    }

    /// Lets the pages of underlying file `i` within `bytes` leave resident memory (see
    /// [`Checkpoint::release_pages`]) once they have been read.
    pub fn release_file_range(&self, i: usize, bytes: std::ops::Range<usize>) {
        if let Blob::Map(m) = &self.blobs[i] {
            m.release_range(bytes);
        }
    }

    /// The identity underlying file `i` had when it was opened (`None` for an empty file).
    pub fn file_identity(&self, i: usize) -> Option<guard::Identity> {
        match &self.blobs[i] {
            Blob::Map(m) => Some(m.identity()),
            Blob::Empty => None,
        }
    }

    /// Whether underlying file `i` still has the identity it was opened with.
    pub fn file_unchanged(&self, i: usize) -> bool {
        match &self.blobs[i] {
            Blob::Map(m) => m.unchanged(),
            Blob::Empty => true,
        }
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().map(TensorInfo::nbytes).sum()
    }

    /// A one-line account of how the state dict was found, for commands to print.
    pub fn origin_note(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(t) = &self.trainer {
            parts.push(format!("a {t} checkpoint"));
        }
        if let Some(k) = &self.key {
            if self.key_picked {
                let also = if self.other_keys.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (also present: {}; --key chooses)",
                        self.other_keys.join(", ")
                    )
                };
                parts.push(format!("using the state dict under key '{k}'{also}"));
            } else {
                parts.push(format!("using the state dict under key '{k}'"));
            }
        }
        if let Some(p) = &self.stripped_prefix {
            parts.push(format!(
                "removed the prefix '{p}' from every key ({})",
                self.prefix_reasons.join(", ")
            ));
        }
        if let Some(n) = self.n_averaged {
            let how = if self.get(N_AVERAGED).is_none() {
                "set aside as metadata"
            } else {
                "kept as a tensor"
            };
            parts.push(format!("AveragedModel's n_averaged = {n} {how}"));
        }
        (!parts.is_empty()).then(|| format!("{}: {}", self.path.display(), parts.join("; ")))
    }
}

/// The leading name component (`model.`) that every name shares, if there is one and no name
/// is that component alone.
pub fn shared_component<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<String> {
    let first = names.next()?;
    let dot = first.find('.')?;
    let prefix = &first[..=dot];
    names
        .all(|n| n.len() > prefix.len() && n.starts_with(prefix))
        .then(|| prefix.to_string())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or(p.as_os_str())
        .to_string_lossy()
        .into_owned()
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// BatchNorm layers: prefixes `P` with `P.running_mean` and `P.running_var`, in storage order.
pub fn bn_layers(ck: &Checkpoint) -> Vec<String> {
    ck.tensors()
        .iter()
        .filter_map(|t| t.name.strip_suffix(".running_mean"))
        .filter(|p| ck.get(&format!("{p}.running_var")).is_some())
        .map(str::to_string)
        .collect()
}

/// Whether a tensor is a BatchNorm buffer rather than a learned parameter.
pub fn is_bn_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

/// Learned parameters, counted as PyTorch's `sum(p.numel() for p in model.parameters())`
/// would: the elements of floating tensors that are not BatchNorm buffers.
pub fn num_params(ck: &Checkpoint) -> usize {
    ck.tensors()
        .iter()
        .filter(|t| t.dtype.is_float() && !is_bn_buffer(&t.name))
        .map(TensorInfo::numel)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[], &[]));
    }

    #[test]
    fn shared_leading_component() {
        assert_eq!(
            shared_component(["model.conv1.weight", "model.fc.bias"].into_iter()),
            Some("model.".into())
        );
        assert_eq!(shared_component(["model.a", "net.b"].into_iter()), None);
        assert_eq!(
            shared_component(["model.a", "n_averaged"].into_iter()),
            None
        );
        assert_eq!(shared_component(["conv1"].into_iter()), None);
        assert_eq!(shared_component([].into_iter()), None);
    }
}

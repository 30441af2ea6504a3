//! Writing checkpoints: safetensors, one file or shards plus an index, always atomically.
//!
//! Every output goes to a hidden temporary file in the destination's folder, sized up front and
//! filled with positioned writes (so that worker threads can write their chunks wherever they
//! belong, straight from the engines, with no whole-tensor buffer). Only `commit` makes it
//! visible: fsync, then a check that no input changed while it was read ([`guard::check_inputs`]:
//! an output made of a file that another process rewrote is discarded), then a rename over the
//! destination (refusing to replace an existing file unless forced), then an fsync of the folder.
//! On an error the temporary file is removed when the writer is dropped; on SIGINT, SIGTERM or
//! SIGHUP a handler removes every pending temporary file before the process exits, and so does the
//! SIGBUS handler of [`guard`] when a mapped input is truncated under the reader. A SIGKILL can
//! leave a `.name.ckpt-*.tmp` file behind, never a partial file under the name asked for.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use super::dtype::DType;
use super::guard::{self, PendingFile};
use super::safetensors::build_header;

static HANDLER: OnceLock<()> = OnceLock::new();

/// Testing hook: when set, writes past this many bytes (over all outputs of the process) fail as
/// if the disk were full. Lets the test suite check that a failed write leaves nothing behind.
const FAIL_AFTER_ENV: &str = "CKPT_TEST_FAIL_WRITE_AFTER";
static WRITTEN: AtomicU64 = AtomicU64::new(0);

fn install_signal_cleanup() {
    HANDLER.get_or_init(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    guard::remove_pending();
                    eprintln!("ckpt: interrupted; no output was written");
                    std::process::exit(128 + sig);
                }
            });
        }
    });
}

/// The process's file-creation mask.
fn umask() -> u32 {
    static MASK: OnceLock<u32> = OnceLock::new();
    // Reading the mask means setting it; done once, before any worker thread creates files.
    *MASK.get_or_init(|| unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    })
}

/// A file that appears under its name only when committed.
pub struct AtomicFile {
    tmp: Option<tempfile::NamedTempFile>,
    /// The temporary file's entry in the signal handlers' list.
    pending: Option<PendingFile>,
    dest: PathBuf,
    force: bool,
}

/// Checks that `dest` may be written: its folder exists and it is not there already (unless
/// `force`). Called for every output before any work starts.
pub fn check_destination(dest: &Path, force: bool) -> Result<()> {
    let dir = parent_dir(dest);
    if !dir.is_dir() {
        bail!(
            "{}: output folder {} does not exist",
            dest.display(),
            dir.display()
        );
    }
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => bail!("{}: output is a folder", dest.display()),
        Ok(_) if !force => bail!(
            "{}: exists already (use --force to replace it)",
            dest.display()
        ),
        _ => Ok(()),
    }
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

impl AtomicFile {
    pub fn create(dest: &Path, force: bool) -> Result<AtomicFile> {
        check_destination(dest, force)?;
        install_signal_cleanup();
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.ckpt-"))
            .suffix(".tmp")
            .tempfile_in(parent_dir(dest))
            .with_context(|| format!("{}: cannot create a file in its folder", dest.display()))?;
        let pending = PendingFile::new(tmp.path())?;
        // Temporary files are created private; the output gets the mode a plain create would
        // give it (or keeps the mode of the file it replaces).
        let mode = match std::fs::metadata(dest) {
            Ok(m) => m.permissions(),
            Err(_) => std::fs::Permissions::from_mode(0o666 & !umask()),
        };
        tmp.as_file()
            .set_permissions(mode)
            .with_context(|| format!("{}: cannot set permissions", dest.display()))?;
        let file = AtomicFile {
            tmp: Some(tmp),
            pending: Some(pending),
            dest: dest.to_path_buf(),
            force,
        };
        // Every input is open and mapped; what is still to be read from them (the averaging
        // pass of `swa`, the tensors `recal-bn` copies) is not read yet.
        crate::report::test_pause("opened");
        Ok(file)
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    fn file(&self) -> &File {
        self.tmp.as_ref().unwrap().as_file()
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file()
            .set_len(len)
            .with_context(|| format!("{}: cannot size the output", self.dest.display()))
    }

    /// Writes `bytes` at `offset`; safe to call from several threads at once.
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> Result<()> {
        if let Some(limit) = std::env::var(FAIL_AFTER_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            let before = WRITTEN.fetch_add(bytes.len() as u64, Ordering::SeqCst);
            if before + bytes.len() as u64 > limit {
                bail!("{}: writing failed: No space left on device (os error 28, injected by {FAIL_AFTER_ENV})", self.dest.display());
            }
        }
        self.file().write_all_at(bytes, offset).map_err(|e| {
            // The kernel could not read `bytes`: a page of a mapped input that was truncated.
            match guard::input_holding(bytes).filter(|_| e.raw_os_error() == Some(libc::EFAULT)) {
                Some(input) => anyhow::anyhow!("{}: {}", input.display(), guard::CHANGED),
                None => anyhow::Error::new(e)
                    .context(format!("{}: writing failed", self.dest.display())),
            }
        })
    }

    /// Makes the file visible under its name, unless an input changed while it was read.
    pub fn commit(self) -> Result<()> {
        self.sync()?;
        guard::check_inputs()?;
        self.persist()
    }

    /// Flushes the content to disk.
    fn sync(&self) -> Result<()> {
        self.file()
            .sync_all()
            .with_context(|| format!("{}: flushing to disk failed", self.dest.display()))
    }

    /// Renames the (flushed) file into place.
    fn persist(mut self) -> Result<()> {
        let tmp = self.tmp.take().unwrap();
        let persisted = if self.force {
            tmp.persist(&self.dest)
        } else {
            tmp.persist_noclobber(&self.dest)
        };
        let result = match persisted {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = e.file.close();
                Err(e.error)
            }
        };
        self.pending = None;
        result.map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot move the output into place: {e}",
                self.dest.display()
            )
        })?;
        if let Ok(d) = File::open(parent_dir(&self.dest)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Removed before it leaves the signal handlers' list, so that no signal can come between.
        if let Some(tmp) = self.tmp.take() {
            let _ = tmp.close();
        }
        self.pending = None;
    }
}

/// A tensor the output will hold.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl From<&super::TensorInfo> for PlannedTensor {
    fn from(t: &super::TensorInfo) -> PlannedTensor {
        PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        }
    }
}

impl From<&OwnedTensor> for PlannedTensor {
    fn from(t: &OwnedTensor) -> PlannedTensor {
        PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        }
    }
}

impl PlannedTensor {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Where an output goes: one file, or shards and an index.
#[derive(Clone, Debug)]
pub enum OutputLayout {
    Single(PathBuf),
    /// Shards of at most `max_bytes` (a tensor larger than that gets a shard of its own).
    Sharded {
        index: PathBuf,
        max_bytes: u64,
    },
}

impl OutputLayout {
    /// One file at `path`, or shards beside `path` when `shard_size` is given: `path` may then
    /// be a folder, a `.safetensors` name or a `.safetensors.index.json` name.
    pub fn new(path: &Path, shard_size: Option<u64>) -> OutputLayout {
        match shard_size {
            None if !path.is_dir() && !path.to_string_lossy().ends_with(".json") => {
                OutputLayout::Single(path.to_path_buf())
            }
            s => {
                let index = if path.is_dir() {
                    path.join("model.safetensors.index.json")
                } else {
                    let s = path.to_string_lossy();
                    let stem = s
                        .strip_suffix(".safetensors.index.json")
                        .or_else(|| s.strip_suffix(".index.json"))
                        .or_else(|| s.strip_suffix(".json"))
                        .or_else(|| s.strip_suffix(".safetensors"))
                        .unwrap_or(&s);
                    PathBuf::from(format!("{stem}.safetensors.index.json"))
                };
                OutputLayout::Sharded {
                    index,
                    max_bytes: s.unwrap_or(5_000_000_000),
                }
            }
        }
    }
}

/// Assignment of tensors to files.
struct Plan {
    /// (file path, tensor indices) per file.
    files: Vec<(PathBuf, Vec<usize>)>,
    index: Option<PathBuf>,
}

fn plan(layout: &OutputLayout, tensors: &[PlannedTensor]) -> Plan {
    match layout {
        OutputLayout::Single(p) => Plan {
            files: vec![(p.clone(), (0..tensors.len()).collect())],
            index: None,
        },
        OutputLayout::Sharded { index, max_bytes } => {
            let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
            let mut size = 0u64;
            for (i, t) in tensors.iter().enumerate() {
                let n = t.nbytes() as u64;
                if size > 0 && size + n > *max_bytes {
                    groups.push(Vec::new());
                    size = 0;
                }
                groups.last_mut().unwrap().push(i);
                size += n;
            }
            let s = index.to_string_lossy();
            let stem = s.strip_suffix(".safetensors.index.json").unwrap_or(&s);
            let n = groups.len();
            Plan {
                files: groups
                    .into_iter()
                    .enumerate()
                    .map(|(i, g)| {
                        (
                            PathBuf::from(format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1)),
                            g,
                        )
                    })
                    .collect(),
                index: Some(index.clone()),
            }
        }
    }
}

/// Every path an output with this layout will write (to check against inputs and existing files
/// before any work).
pub fn destinations(layout: &OutputLayout, tensors: &[PlannedTensor]) -> Vec<PathBuf> {
    let p = plan(layout, tensors);
    p.files.into_iter().map(|(f, _)| f).chain(p.index).collect()
}

/// A safetensors output being written: header first, tensor bytes at their offsets.
pub struct CheckpointWriter {
    files: Vec<AtomicFile>,
    index: Option<(AtomicFile, Vec<u8>)>,
    /// Per tensor: (file, absolute byte offset of its data).
    slots: Vec<(usize, u64)>,
    by_name: HashMap<String, usize>,
    tensors: Vec<PlannedTensor>,
}

impl CheckpointWriter {
    pub fn create(
        layout: &OutputLayout,
        tensors: Vec<PlannedTensor>,
        metadata: &BTreeMap<String, String>,
        force: bool,
    ) -> Result<CheckpointWriter> {
        let plan = plan(layout, &tensors);
        let mut slots = vec![(0usize, 0u64); tensors.len()];
        let mut files = Vec::new();
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (fi, (path, members)) in plan.files.iter().enumerate() {
            let list: Vec<(&str, DType, &[usize])> = members
                .iter()
                .map(|&i| {
                    (
                        tensors[i].name.as_str(),
                        tensors[i].dtype,
                        tensors[i].shape.as_slice(),
                    )
                })
                .collect();
            let (header, offsets) = build_header(&list, metadata)?;
            let f = AtomicFile::create(path, force)?;
            let data_len = offsets.last().map(|o| o.1).unwrap_or(0) as u64;
            f.set_len(header.len() as u64 + data_len)?;
            f.write_at(&header, 0)?;
            for (&i, &(start, _)) in members.iter().zip(&offsets) {
                slots[i] = (fi, header.len() as u64 + start as u64);
                let shard_name = path.file_name().unwrap().to_string_lossy().to_string();
                weight_map.insert(
                    tensors[i].name.clone(),
                    serde_json::Value::String(shard_name),
                );
            }
            total += data_len;
            files.push(f);
        }
        let index = match plan.index {
            Some(p) => {
                let f = AtomicFile::create(&p, force)?;
                let doc = serde_json::json!({
                    "metadata": { "total_size": total, "ckpt": metadata },
                    "weight_map": weight_map,
                });
                let mut bytes = serde_json::to_vec_pretty(&doc)?;
                bytes.push(b'\n');
                Some((f, bytes))
            }
            None => None,
        };
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(CheckpointWriter {
            files,
            index,
            slots,
            by_name,
            tensors,
        })
    }

    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Writes `bytes` into tensor `i` starting `byte_offset` bytes into its data.
    pub fn write(&self, i: usize, byte_offset: usize, bytes: &[u8]) -> Result<()> {
        let t = &self.tensors[i];
        if byte_offset + bytes.len() > t.nbytes() {
            bail!("internal error: write past the end of tensor {}", t.name);
        }
        let (f, base) = self.slots[i];
        self.files[f].write_at(bytes, base + byte_offset as u64)
    }

    /// The paths this writer will create.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files
            .iter()
            .map(|f| f.dest().to_path_buf())
            .chain(self.index.as_ref().map(|(f, _)| f.dest().to_path_buf()))
            .collect()
    }

    /// Makes every file visible, the index last (so that a reader never finds an index whose
    /// shards are not all in place), unless an input changed while it was read: then none is.
    pub fn commit(self) -> Result<()> {
        if let Some((f, bytes)) = &self.index {
            f.set_len(bytes.len() as u64)?;
            f.write_at(bytes, 0)?;
        }
        for f in self.files.iter().chain(self.index.as_ref().map(|(f, _)| f)) {
            f.sync()?;
        }
        guard::check_inputs()?;
        for f in self.files {
            f.persist()?;
        }
        if let Some((f, _)) = self.index {
            f.persist()?;
        }
        Ok(())
    }
}

/// Refuses outputs that would replace one of the inputs (by any path to the same file), and
/// outputs that exist already unless `force`.
pub fn check_outputs(dests: &[PathBuf], inputs: &[PathBuf], force: bool) -> Result<()> {
    let canon_inputs: Vec<PathBuf> = inputs
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    for d in dests {
        let canon = match std::fs::canonicalize(d) {
            Ok(c) => c,
            Err(_) => match (std::fs::canonicalize(parent_dir(d)), d.file_name()) {
                (Ok(dir), Some(name)) => dir.join(name),
                _ => d.clone(),
            },
        };
        if let Some(i) = canon_inputs.iter().position(|c| c == &canon) {
            bail!(
                "{}: output is the input {}; write to another file",
                d.display(),
                inputs[i].display()
            );
        }
        check_destination(d, force)?;
    }
    Ok(())
}

/// A tensor held in memory, to be written whole.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Writes small in-memory tensors as one safetensors file, atomically.
pub fn write_owned(
    path: &Path,
    tensors: &[OwnedTensor],
    metadata: &BTreeMap<String, String>,
    force: bool,
) -> Result<()> {
    let planned: Vec<PlannedTensor> = tensors.iter().map(PlannedTensor::from).collect();
    let w = CheckpointWriter::create(
        &OutputLayout::Single(path.to_path_buf()),
        planned,
        metadata,
        force,
    )?;
    for (i, t) in tensors.iter().enumerate() {
        w.write(i, 0, &t.data)?;
    }
    w.commit()
}

/// Writes a small file (a report, a chart) atomically.
pub fn write_file(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let f = AtomicFile::create(path, force)?;
    f.write_at(bytes, 0)?;
    f.commit()
}

/// Whether `-o PATH` asks for a model folder: a trailing slash, or a folder that exists.
pub fn wants_folder(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().ends_with(b"/") || path.is_dir()
}

/// An output written as a model folder (`-o DIR/`): the weights as `DIR/model.safetensors` (or
/// shards and their index there), and the input model folder's config.json beside them, so that
/// timm's local folder loading takes the result. The folder is made when missing and removed
/// again when the write fails before anything was committed; config.json is prepared first and
/// committed after the weights, as an index after its shards, so that the folder never holds a
/// config without its weights.
pub struct FolderOutput {
    dir: PathBuf,
    created: bool,
    config: Option<AtomicFile>,
    committed: bool,
}

impl FolderOutput {
    /// Makes `dir` if needed (its parent must exist) and prepares `config` as its config.json.
    pub fn create(dir: &Path, config: Option<&[u8]>, force: bool) -> Result<FolderOutput> {
        let created = !dir.exists();
        if created {
            let parent = parent_dir(dir.components().as_path());
            if !parent.is_dir() {
                bail!(
                    "{}: output folder {} does not exist",
                    dir.display(),
                    parent.display()
                );
            }
            std::fs::create_dir(dir)
                .with_context(|| format!("{}: cannot make the output folder", dir.display()))?;
        }
        let mut out = FolderOutput {
            dir: dir.to_path_buf(),
            created,
            config: None,
            committed: false,
        };
        if let Some(bytes) = config {
            let f = AtomicFile::create(&dir.join(super::folder::CONFIG_NAME), force)?;
            f.set_len(bytes.len() as u64)?;
            f.write_at(bytes, 0)?;
            out.config = Some(f);
        }
        Ok(out)
    }

    /// Where the weights go: `model.safetensors`, or shards of `shard_size` and their index.
    pub fn layout(&self, shard_size: Option<u64>) -> OutputLayout {
        match shard_size {
            None => OutputLayout::Single(self.dir.join("model.safetensors")),
            Some(max_bytes) => OutputLayout::Sharded {
                index: self.dir.join("model.safetensors.index.json"),
                max_bytes,
            },
        }
    }

    /// Makes config.json visible, once the weights are.
    pub fn commit(mut self) -> Result<()> {
        if let Some(f) = self.config.take() {
            f.commit()?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for FolderOutput {
    fn drop(&mut self) {
        self.config = None;
        if !self.committed && self.created {
            // Only an empty folder: weights committed before a failure are left, named.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

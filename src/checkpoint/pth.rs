//! Reading a file written by `torch.save` (zip format, PyTorch 1.6 and later).
//!
//! The archive holds `<name>/data.pkl` (the object graph) and one record `<name>/data/<key>` per
//! storage. `torch.save` stores records uncompressed, so a tensor is a byte range of the memory
//! map; a record someone re-compressed is inflated into memory instead. Which dict inside the
//! pickle is the state dict is decided here (`--key`, or timm's order of preference, then
//! DeepSpeed's `module`), and so is which training code wrote the file, where its layout says
//! so (PyTorch Lightning, DeepSpeed).
//!
//! Objects of classes the pickle reader does not know are placeholders (see `pickle`): anywhere
//! else in the file they are left unread, so a Lightning checkpoint's OmegaConf config or a path
//! does not block reading the weights. Inside the chosen state dict every value must be a tensor,
//! so a placeholder there is an error naming the entry and the class.

use std::collections::HashMap;
use std::io::Cursor;

use anyhow::{bail, Context, Result};

use super::dtype::DType;
use super::pickle::{self, Obj, Pickle, TensorRef, Value};
use super::safetensors::checked_numel;

/// Largest data.pkl we read. The pickle holds only the object graph (tensor data lives in other
/// records): a ResNet-152 training checkpoint's is well under 1 MB.
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Keys that hold a state dict inside a training checkpoint, in the order timm prefers them,
/// then DeepSpeed's (`mp_rank_00_model_states.pt` keeps the model's state dict under `module`).
pub const STATE_DICT_KEYS: [&str; 5] = [
    "state_dict_ema",
    "model_ema",
    "state_dict",
    "model",
    "module",
];

/// Training code recognised from a checkpoint's top-level keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trainer {
    /// PyTorch Lightning (`pytorch-lightning_version`), with its version.
    Lightning(String),
    /// DeepSpeed's model-states file (`ds_version`), with its version.
    DeepSpeed(String),
}

impl std::fmt::Display for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trainer::Lightning(v) => write!(f, "PyTorch Lightning {v}"),
            Trainer::DeepSpeed(v) => write!(f, "DeepSpeed {v}"),
        }
    }
}

/// Where a tensor's bytes are: a record of the archive.
#[derive(Clone, Debug)]
pub enum Record {
    /// A byte range of the file itself.
    Mapped { start: usize, len: usize },
    /// A compressed record, inflated.
    Inflated(std::sync::Arc<Vec<u8>>),
}

#[derive(Debug)]
pub struct PthTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub record: Record,
    /// Offset into the record, in elements, and strides in elements.
    pub offset: usize,
    pub stride: Vec<usize>,
}

#[derive(Debug)]
pub struct PthContents {
    pub tensors: Vec<PthTensor>,
    /// The key path of the state dict inside the pickle, if it was not the top level.
    pub key: Option<String>,
    /// True when the key was chosen by preference rather than asked for.
    pub key_picked: bool,
    /// Other state-dict keys that were present but not chosen.
    pub other_keys: Vec<String>,
    /// The training code that wrote the file, when its top-level keys say so.
    pub trainer: Option<Trainer>,
    /// Classes and functions left as placeholders (all outside the state dict).
    pub placeholders: Vec<String>,
}

/// Whether `bytes` look like a zip archive (the modern torch.save format).
pub fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

/// Whether `bytes` look like the legacy (pre-1.6) torch.save format: a pickle that starts with
/// torch's magic number 0x1950a86a20f9469cfc6c as a LONG1. (Checking for the PROTO opcode alone
/// would also match a safetensors file whose header length happens to end in 0x80.)
pub fn is_legacy_pickle(bytes: &[u8]) -> bool {
    const MAGIC: [u8; 12] = [
        0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
    ];
    bytes.len() >= 14 && bytes[0] == 0x80 && bytes[2..14] == MAGIC
}

pub fn read(bytes: &[u8], key: Option<&str>) -> Result<PthContents> {
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bytes)).context("not a readable zip archive")?;
    let names: Vec<String> = archive
        .file_names()
        .map(|s| s.map(|s| s.to_string()))
        .collect::<Result<_, _>>()
        .context("zip archive has an unreadable file name")?;
    let pkl = names
        .iter()
        .filter(|n| n.ends_with("data.pkl"))
        .min_by_key(|n| n.len())
        .context("zip archive has no data.pkl record (not a torch.save file)")?
        .clone();
    let prefix = pkl.strip_suffix("data.pkl").unwrap().to_string();
    if let Some(i) = archive.index_for_name(&format!("{prefix}byteorder")) {
        let mut f = archive.by_index(i)?;
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).context("reading the byteorder record")?;
        if s.trim() != "little" {
            bail!(
                "tensors are stored {} endian; only little endian is supported",
                s.trim()
            );
        }
    }
    let pickle_bytes = {
        let f = archive.by_name(&pkl)?;
        if f.size() > MAX_PICKLE_BYTES {
            bail!("data.pkl claims {} bytes, over the {MAX_PICKLE_BYTES}-byte limit for a state dict's pickle", f.size());
        }
        let mut v = Vec::with_capacity(f.size().min(bytes.len() as u64) as usize);
        // The claimed size of a compressed record can lie: never inflate past the limit.
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_PICKLE_BYTES + 1), &mut v)
            .context("reading data.pkl")?;
        if v.len() as u64 > MAX_PICKLE_BYTES {
            bail!("data.pkl inflates past the {MAX_PICKLE_BYTES}-byte limit for a state dict's pickle");
        }
        v
    };
    let pk = pickle::parse(&pickle_bytes).context("data.pkl")?;
    let (dict, key, key_picked, other_keys) = select_state_dict(&pk, key)?;
    let trainer = trainer(&pk);

    let mut records: HashMap<String, Record> = HashMap::new();
    let mut tensors = Vec::with_capacity(dict.len());
    for (k, v) in dict {
        let name = match k {
            Value::Str(s) => s.to_string(),
            _ => bail!("state dict has a key that is not a string"),
        };
        let t = pk.tensor(v).with_context(|| {
            format!("tensor {name}: expected a tensor, found {}", pk.describe(v))
        })?;
        let record = match records.get(&t.storage.key) {
            Some(r) => r.clone(),
            None => {
                let r = open_record(&mut archive, &prefix, &t.storage.key, bytes.len())
                    .with_context(|| format!("tensor {name}"))?;
                records.insert(t.storage.key.clone(), r.clone());
                r
            }
        };
        check_bounds(&name, t, &record)?;
        tensors.push(PthTensor {
            name,
            dtype: t.storage.dtype,
            shape: t.shape.clone(),
            record,
            offset: t.offset,
            stride: t.stride.clone(),
        });
    }
    Ok(PthContents {
        tensors,
        key,
        key_picked,
        other_keys,
        trainer,
        placeholders: pk.placeholders.clone(),
    })
}

/// Which training code wrote the file, from the version string it leaves at the top level.
fn trainer(pk: &Pickle) -> Option<Trainer> {
    let root = pk.dict(&pk.root)?;
    let version = |k: &str| {
        root.iter().find_map(|(kk, v)| match (kk, v) {
            (Value::Str(a), Value::Str(b)) if &**a == k => Some(b.to_string()),
            _ => None,
        })
    };
    version("pytorch-lightning_version")
        .map(Trainer::Lightning)
        .or_else(|| version("ds_version").map(Trainer::DeepSpeed))
}

fn open_record(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    prefix: &str,
    key: &str,
    file_len: usize,
) -> Result<Record> {
    let name = format!("{prefix}data/{key}");
    let i = archive
        .index_for_name(&name)
        .with_context(|| format!("storage record {name} is missing from the archive"))?;
    let mut f = archive.by_index(i)?;
    let size = usize::try_from(f.size()).context("storage record is too large")?;
    if f.compression() == zip::CompressionMethod::Stored {
        let start = f.data_start().context("zip record has no data offset")? as usize;
        if start.checked_add(size).is_none_or(|e| e > file_len) {
            bail!("storage record {name} runs past the end of the file (truncated?)");
        }
        Ok(Record::Mapped { start, len: size })
    } else {
        if size > file_len.saturating_mul(1032) {
            bail!(
                "storage record {name} claims {size} bytes, more than its compressed size allows"
            );
        }
        let mut v = Vec::with_capacity(size);
        std::io::Read::read_to_end(&mut f, &mut v).with_context(|| format!("inflating {name}"))?;
        Ok(Record::Inflated(std::sync::Arc::new(v)))
    }
}

fn check_bounds(name: &str, t: &TensorRef, record: &Record) -> Result<()> {
    let elem = t.storage.dtype.size();
    let record_len = match record {
        Record::Mapped { len, .. } => *len,
        Record::Inflated(v) => v.len(),
    };
    checked_numel(&t.shape)
        .with_context(|| format!("tensor {name}: shape {:?} is too large", t.shape))?;
    // The last element any index can reach, if the tensor is not empty.
    let last = if t.shape.contains(&0) {
        None
    } else {
        let mut far = t.offset;
        for (&d, &s) in t.shape.iter().zip(&t.stride) {
            far = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(far))
                .with_context(|| format!("tensor {name}: strides overflow"))?;
        }
        Some(far)
    };
    if let Some(last) = last {
        let need = last
            .checked_add(1)
            .and_then(|n| n.checked_mul(elem))
            .with_context(|| format!("tensor {name}: too large"))?;
        if need > record_len {
            bail!(
                "tensor {name}: {} {:?} at offset {} needs {need} bytes of storage {}, which has {record_len}",
                t.storage.dtype,
                t.shape,
                t.offset,
                t.storage.key
            );
        }
    }
    Ok(())
}

type Selected<'a> = (&'a [(Value, Value)], Option<String>, bool, Vec<String>);

fn select_state_dict<'a>(pk: &'a Pickle, key: Option<&str>) -> Result<Selected<'a>> {
    let root = pk.dict(&pk.root).with_context(|| {
        let whole_module = matches!(pk.obj(&pk.root), Some(Obj::Placeholder(_)));
        format!(
            "the pickle holds {}, not a dict of tensors{}",
            pk.describe(&pk.root),
            if whole_module {
                " (a whole model saved with torch.save(model)? save model.state_dict() to read it here)"
            } else {
                ""
            }
        )
    })?;
    let lookup = |d: &'a [(Value, Value)], k: &str| -> Option<&'a Value> {
        d.iter()
            .find(|(kk, _)| matches!(kk, Value::Str(s) if &**s == k))
            .map(|(_, v)| v)
    };
    if let Some(key) = key {
        // A key may itself contain dots; prefer the literal key, then the nested path.
        if let Some(v) = lookup(root, key) {
            let d = pk.dict(v).with_context(|| {
                format!(
                    "--key {key}: holds {}, not a dict of tensors",
                    pk.describe(v)
                )
            })?;
            return Ok((d, Some(key.to_string()), false, Vec::new()));
        }
        let mut cur = root;
        for part in key.split('.') {
            let v = lookup(cur, part).with_context(|| {
                format!(
                    "--key {key}: no entry {part:?}; top-level keys: {}",
                    key_list(root)
                )
            })?;
            cur = pk.dict(v).with_context(|| {
                format!("--key {key}: {part:?} holds {}, not a dict", pk.describe(v))
            })?;
        }
        return Ok((cur, Some(key.to_string()), false, Vec::new()));
    }
    let all_tensors = !root.is_empty() && root.iter().all(|(_, v)| pk.tensor(v).is_some());
    if all_tensors {
        return Ok((root, None, false, Vec::new()));
    }
    let present: Vec<&str> = STATE_DICT_KEYS
        .into_iter()
        .filter(|k| lookup(root, k).and_then(|v| pk.dict(v)).is_some())
        .collect();
    match present.first() {
        Some(k) => {
            let d = pk.dict(lookup(root, k).unwrap()).unwrap();
            let others = present[1..].iter().map(|s| s.to_string()).collect();
            Ok((d, Some(k.to_string()), true, others))
        }
        None => bail!(
            "no state dict found: none of {} is a dict here; top-level keys: {} (choose one with --key)",
            STATE_DICT_KEYS.join(", "),
            key_list(root)
        ),
    }
}

fn key_list(d: &[(Value, Value)]) -> String {
    let keys: Vec<String> = d
        .iter()
        .take(20)
        .map(|(k, _)| match k {
            Value::Str(s) => s.to_string(),
            _ => "?".into(),
        })
        .collect();
    if keys.is_empty() {
        "(none)".into()
    } else {
        keys.join(", ")
    }
}

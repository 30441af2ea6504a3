//! What an output records about how it was made: ckpt's version, the command line, each input
//! file's name and sha256, and the `n_averaged` of inputs that were AveragedModel state dicts, in
//! the safetensors `__metadata__` (string values only, as the format requires; lists are JSON
//! text).
//!
//! Hashing is the most expensive part of averaging hot files (SHA-256 runs at about 2 GB/s per
//! core, slower than the averaging itself), and users rerun commands over the same snapshots
//! (`--last 5`, then `--last 10`). So digests are cached per file identity (device, inode,
//! size, modification time in ns), as git and DVC do, in `$CKPT_CACHE_DIR` or
//! `$XDG_CACHE_HOME/ckpt` or `~/.cache/ckpt`. A file rewritten in place gets a new mtime and is
//! hashed again. The cache is a convenience: failing to read or write it never fails a command.
//!
//! A digest describes the bytes the output was made of. It is computed from the input's memory
//! map, the same bytes the engines read, and keyed by the identity the file had when it was
//! opened (from its descriptor, not a later look at its path, which another process may have
//! replaced since). The writer checks that identity again before it commits an output
//! ([`super::guard::check_inputs`]), so a file that changed between its digest and the end of the
//! pass discards the output instead of getting a digest of other bytes; and a digest is cached only
//! if the file still had that identity once hashed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::guard::Identity;
use super::Checkpoint;

pub const KEY_VERSION: &str = "ckpt.version";
pub const KEY_COMMAND: &str = "ckpt.command";
pub const KEY_INPUTS: &str = "ckpt.inputs";
/// AveragedModel's `n_averaged` of each input that had one: `[{"file": ..., "n_averaged": N}]`.
pub const KEY_N_AVERAGED: &str = "ckpt.n_averaged";

const CACHE_FILE: &str = "sha256-v1.tsv";
/// Entries kept when the cache is compacted.
const CACHE_KEEP: usize = 4096;

/// Bytes hashed at a time: the most of a file's pages [`hash_inputs`] holds at once.
const PIECE: usize = 8 << 20;

/// sha256 of bytes, as lowercase hex, hashing [`PIECE`]s and calling `done` with the range of
/// each once it is hashed.
fn sha256_pieces(bytes: &[u8], mut done: impl FnMut(std::ops::Range<usize>)) -> String {
    let mut h = Sha256::new();
    for (k, piece) in bytes.chunks(PIECE).enumerate() {
        h.update(piece);
        done(k * PIECE..k * PIECE + piece.len());
    }
    format!("{:x}", h.finalize())
}

/// A file's identity as a digest cache key.
fn cache_key(id: &Identity) -> String {
    format!("{}\t{}\t{}\t{}", id.dev, id.ino, id.size, id.mtime_ns)
}

fn cache_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CKPT_CACHE_DIR") {
        return Some(PathBuf::from(d).join(CACHE_FILE));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("ckpt").join(CACHE_FILE))
}

fn read_cache(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (id, rest) = l.rsplit_once('\t')?;
            (rest.len() == 64 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| (id.to_string(), rest.to_string()))
        })
        .collect()
}

fn append_cache(path: &Path, old: &HashMap<String, String>, new: &[(String, String)]) {
    if new.is_empty() {
        return;
    }
    let Some(dir) = path.parent() else { return };
    let _ = std::fs::create_dir_all(dir);
    let mut lines: Vec<String> = new.iter().map(|(id, h)| format!("{id}\t{h}\n")).collect();
    if old.len() + new.len() > 2 * CACHE_KEEP {
        // Compact: keep the newest entries, replacing the file atomically.
        let mut kept: Vec<String> = old
            .iter()
            .take(CACHE_KEEP)
            .map(|(id, h)| format!("{id}\t{h}\n"))
            .collect();
        kept.append(&mut lines);
        if let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) {
            if tmp.write_all(kept.concat().as_bytes()).is_ok() {
                let _ = tmp.persist(path);
            }
        }
        return;
    }
    // One write per call with O_APPEND: concurrent ckpt processes interleave whole lines.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(lines.concat().as_bytes());
    }
}

/// sha256 of every file the checkpoints were read from (shards included), from their memory
/// maps, in parallel, using and filling the digest cache. Returns (file, digest) pairs.
pub fn hash_inputs(inputs: &[Checkpoint]) -> Vec<(PathBuf, String)> {
    let files: Vec<(&Checkpoint, usize)> = inputs
        .iter()
        .flat_map(|c| (0..c.files.len()).map(move |i| (c, i)))
        .collect();
    let cache_file = cache_path();
    let cache = cache_file.as_deref().map(read_cache).unwrap_or_default();
    let results: Vec<(PathBuf, String, Option<String>, bool)> = files
        .par_iter()
        .map(|(c, i)| {
            let path = c.files[*i].clone();
            let id = c.file_identity(*i).map(|id| cache_key(&id));
            match id.as_ref().and_then(|id| cache.get(id)) {
                Some(h) => (path, h.clone(), id, false),
                None => {
                    // Each hashed piece's pages of the map leave resident memory: hashing a
                    // file the job has finished with (`logits --input`'s batch tensor, read
                    // a batch at a time) would otherwise bring all of it back at once.
                    let h = sha256_pieces(c.file_bytes(*i), |r| c.release_file_range(*i, r));
                    // Changed while hashed: the output will be refused; cache nothing.
                    let id = id.filter(|_| c.file_unchanged(*i));
                    (path, h, id, true)
                }
            }
        })
        .collect();
    let fresh: Vec<(String, String)> = results
        .iter()
        .filter(|r| r.3)
        .filter_map(|(_, h, id, _)| Some((id.clone()?, h.clone())))
        .collect();
    if let Some(p) = &cache_file {
        append_cache(p, &cache, &fresh);
    }
    results.into_iter().map(|(p, h, _, _)| (p, h)).collect()
}

/// Builds the provenance entries for an output made by `command` from `inputs`.
pub fn metadata(command: &str, inputs: &[Checkpoint]) -> Result<BTreeMap<String, String>> {
    let list: Vec<serde_json::Value> = hash_inputs(inputs)
        .into_iter()
        .map(|(p, h)| {
            serde_json::json!({
                "file": p.file_name().unwrap_or(p.as_os_str()).to_string_lossy(),
                "sha256": h,
            })
        })
        .collect();
    let mut m = BTreeMap::new();
    // Hugging Face loaders expect this key in files written for PyTorch.
    m.insert("format".to_string(), "pt".to_string());
    m.insert(
        KEY_VERSION.to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    m.insert(KEY_COMMAND.to_string(), command.to_string());
    m.insert(KEY_INPUTS.to_string(), serde_json::to_string(&list)?);
    let averaged: Vec<serde_json::Value> = inputs
        .iter()
        .filter_map(|c| {
            let p = c.files.first()?;
            Some(serde_json::json!({
                "file": p.file_name().unwrap_or(p.as_os_str()).to_string_lossy(),
                "n_averaged": c.n_averaged?,
            }))
        })
        .collect();
    if !averaged.is_empty() {
        m.insert(
            KEY_N_AVERAGED.to_string(),
            serde_json::to_string(&averaged)?,
        );
    }
    Ok(m)
}

/// The command line as typed, quoted where a shell would need it.
pub fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 {
                return "ckpt".to_string();
            }
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

//! What an output records about how it was made: ckpt's version, the command line, and each
//! input file's name and sha256, in the safetensors `__metadata__` (string values only, as the
//! format requires; lists are JSON text).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

pub const KEY_VERSION: &str = "ckpt.version";
pub const KEY_COMMAND: &str = "ckpt.command";
pub const KEY_INPUTS: &str = "ckpt.inputs";

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read failed", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Builds the provenance entries for an output made by `command` from `inputs` (every file
/// read, shards included), hashing the inputs in parallel.
pub fn metadata(command: &str, inputs: &[PathBuf]) -> Result<BTreeMap<String, String>> {
    let hashes: Vec<String> = inputs
        .par_iter()
        .map(|p| sha256_file(p))
        .collect::<Result<_>>()?;
    let list: Vec<serde_json::Value> = inputs
        .iter()
        .zip(hashes)
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

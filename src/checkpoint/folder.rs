//! Hugging Face / timm model folders: the weights (`model.safetensors`, a sharded index, or
//! `pytorch_model.bin`) beside a `config.json` as timm's `save_for_hf` and `push_to_hub` write it.
//!
//! This module reads the config as data and says nothing about what it means to a model: the
//! architecture is a name (the model layer decides what it selects), the preprocessing values are
//! numbers and strings (the commands turn them into data options, with the flags winning). The
//! file's bytes are kept as read so that an output written as a folder carries the same config.
//!
//! Only the fields ckpt uses are checked, and only their types: anything else a config holds
//! (`model_args`, `label_names`, fields of later timm versions) is copied, never refused.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The config file's name in a model folder.
pub const CONFIG_NAME: &str = "config.json";

/// Largest config.json read (real ones are a few kilobytes; label names for 21k classes less
/// than a few megabytes).
const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// The weights files of a folder without safetensors, in the order timm's
/// `load_state_dict_from_path` prefers them.
pub const TORCH_WEIGHTS: [&str; 3] = ["pytorch_model.bin", "pytorch_model.pth", "model.pth"];

/// timm's `pretrained_cfg`: the preprocessing the weights were trained and tested with. Every
/// field is `None` when the config does not give it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PretrainedCfg {
    /// `[channels, height, width]`.
    pub input_size: Option<[u32; 3]>,
    /// The size timm's `validate.py` evaluates at by default, when larger than `input_size`.
    pub test_input_size: Option<[u32; 3]>,
    pub interpolation: Option<String>,
    pub crop_pct: Option<f64>,
    pub test_crop_pct: Option<f64>,
    pub crop_mode: Option<String>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

/// A model folder's config.json.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    /// The config file's path.
    pub config_path: PathBuf,
    /// timm's model name (`resnet50`, `tf_efficientnet_b0`).
    pub architecture: Option<String>,
    pub num_classes: Option<usize>,
    pub pretrained_cfg: PretrainedCfg,
    /// The file as read, for outputs written as folders.
    pub bytes: Vec<u8>,
}

impl ModelFolder {
    /// Reads `dir/config.json`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<ModelFolder>> {
        let path = dir.join(CONFIG_NAME);
        if !path.exists() {
            return Ok(None);
        }
        Self::read_file(&path).context(CONFIG_NAME).map(Some)
    }

    fn read_file(path: &Path) -> Result<ModelFolder> {
        let len = std::fs::metadata(path).context("cannot open")?.len();
        if len > MAX_CONFIG_BYTES {
            bail!("{len} bytes is too large for a model config");
        }
        let bytes = std::fs::read(path).context("cannot read")?;
        let mut f = parse(&bytes)?;
        f.config_path = path.to_path_buf();
        Ok(f)
    }

    /// What the config says, in one line (for `inspect` and notes).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = &self.architecture {
            parts.push(format!("architecture {a}"));
        }
        if let Some(n) = self.num_classes {
            parts.push(format!("{n} classes"));
        }
        let p = &self.pretrained_cfg;
        if let Some([_, h, w]) = p.input_size {
            parts.push(format!("input_size {h}x{w}"));
        }
        if let Some([_, h, w]) = p.test_input_size {
            parts.push(format!("test_input_size {h}x{w}"));
        }
        if let Some(i) = &p.interpolation {
            parts.push(format!("interpolation {i}"));
        }
        if let Some(c) = p.crop_pct {
            parts.push(format!("crop_pct {c}"));
        }
        if let Some(c) = &p.crop_mode {
            parts.push(format!("crop_mode {c}"));
        }
        if let Some(m) = p.mean {
            parts.push(format!("mean {}", rgb(m)));
        }
        if let Some(s) = p.std {
            parts.push(format!("std {}", rgb(s)));
        }
        parts.join(", ")
    }
}

/// `r,g,b` as the `--mean` and `--std` flags take it.
pub fn rgb(v: [f32; 3]) -> String {
    format!("{},{},{}", v[0], v[1], v[2])
}

/// Parses a config's bytes (the path is filled in by the caller).
pub fn parse(bytes: &[u8]) -> Result<ModelFolder> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| anyhow::anyhow!("not valid JSON: {e}"))?;
    let Value::Object(root) = &v else {
        bail!("not a JSON object");
    };
    let architecture = match root.get("architecture") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => bail!("architecture is {other}, expected a model name"),
    };
    let num_classes = count(root.get("num_classes"), "num_classes")?;
    let pretrained_cfg = match root.get("pretrained_cfg") {
        None | Some(Value::Null) => PretrainedCfg::default(),
        Some(Value::Object(p)) => {
            let field = |k: &str| p.get(k).filter(|v| !v.is_null());
            let pcfg = PretrainedCfg {
                input_size: size3(field("input_size"), "input_size")?,
                test_input_size: size3(field("test_input_size"), "test_input_size")?,
                interpolation: string(field("interpolation"), "interpolation")?,
                crop_pct: fraction(field("crop_pct"), "crop_pct")?,
                test_crop_pct: fraction(field("test_crop_pct"), "test_crop_pct")?,
                crop_mode: string(field("crop_mode"), "crop_mode")?,
                mean: floats3(field("mean"), "mean")?,
                std: floats3(field("std"), "std")?,
            };
            if let Some(s) = pcfg.std {
                if s.iter().any(|&x| x <= 0.0) {
                    bail!("pretrained_cfg.std is {}, expected positive values", rgb(s));
                }
            }
            // A pretrained_cfg may carry its own num_classes (timm writes both); they must agree.
            let inner = count(p.get("num_classes"), "pretrained_cfg.num_classes")?;
            if let (Some(a), Some(b)) = (num_classes, inner) {
                if a != b {
                    bail!("num_classes is {a} but pretrained_cfg.num_classes is {b}");
                }
            }
            pcfg
        }
        Some(other) => bail!("pretrained_cfg is {other}, expected an object"),
    };
    Ok(ModelFolder {
        config_path: PathBuf::new(),
        architecture,
        num_classes,
        pretrained_cfg,
        bytes: bytes.to_vec(),
    })
}

fn count(v: Option<&Value>, name: &str) -> Result<Option<usize>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k) if k > 0 => Ok(Some(k as usize)),
            _ => bail!("{name} is {n}, expected a positive whole number"),
        },
        Some(other) => bail!("{name} is {other}, expected a positive whole number"),
    }
}

fn string(v: Option<&Value>, name: &str) -> Result<Option<String>> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("pretrained_cfg.{name} is {other}, expected a string"),
    }
}

fn fraction(v: Option<&Value>, name: &str) -> Result<Option<f64>> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x > 0.0 && x <= 1.0 => Ok(Some(x)),
            _ => bail!("pretrained_cfg.{name} is {n}, expected a fraction in (0, 1]"),
        },
        Some(other) => bail!("pretrained_cfg.{name} is {other}, expected a fraction in (0, 1]"),
    }
}

fn numbers(v: &Value) -> Option<Vec<f64>> {
    v.as_array()?.iter().map(Value::as_f64).collect()
}

fn floats3(v: Option<&Value>, name: &str) -> Result<Option<[f32; 3]>> {
    let Some(v) = v else { return Ok(None) };
    match numbers(v).as_deref() {
        Some(&[r, g, b]) => Ok(Some([r as f32, g as f32, b as f32])),
        // One value for every channel, as timm allows for grey models.
        Some(&[x]) => Ok(Some([x as f32; 3])),
        _ => bail!("pretrained_cfg.{name} is {v}, expected three numbers"),
    }
}

fn size3(v: Option<&Value>, name: &str) -> Result<Option<[u32; 3]>> {
    let Some(v) = v else { return Ok(None) };
    let ok = |x: f64| (1.0..=65536.0).contains(&x) && x.fract() == 0.0;
    match numbers(v).as_deref() {
        Some(&[c, h, w]) if ok(c) && ok(h) && ok(w) => Ok(Some([c as u32, h as u32, w as u32])),
        _ => bail!("pretrained_cfg.{name} is {v}, expected [channels, height, width]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_save_for_hf_writes() {
        let f = parse(
            br#"{"architecture": "resnet18", "num_classes": 10, "model_args": {"channels": [8]},
                "pretrained_cfg": {"input_size": [3, 40, 40], "test_input_size": [3, 48, 48],
                "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "num_classes": 10,
                "pool_size": null, "license": "apache-2.0"}}"#,
        )
        .unwrap();
        assert_eq!(f.architecture.as_deref(), Some("resnet18"));
        assert_eq!(f.num_classes, Some(10));
        assert_eq!(f.pretrained_cfg.input_size, Some([3, 40, 40]));
        assert_eq!(f.pretrained_cfg.test_input_size, Some([3, 48, 48]));
        assert_eq!(f.pretrained_cfg.mean, Some([0.5; 3]));
        assert!(f.describe().contains("input_size 40x40"));
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        let err = |s: &str| parse(s.as_bytes()).unwrap_err().to_string();
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err("{").contains("not valid JSON"));
        assert!(err(r#"{"num_classes": -3}"#).contains("num_classes"));
        assert!(err(r#"{"pretrained_cfg": {"input_size": [224, 224]}}"#).contains("input_size"));
        assert!(err(r#"{"pretrained_cfg": {"crop_pct": 1.5}}"#).contains("crop_pct"));
        assert!(err(r#"{"pretrained_cfg": {"std": [0, 1, 1]}}"#).contains("std"));
        assert!(
            err(r#"{"num_classes": 10, "pretrained_cfg": {"num_classes": 5}}"#)
                .contains("pretrained_cfg.num_classes is 5")
        );
    }
}

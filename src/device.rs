//! `--device cpu|cuda[:N]|auto`: which candle device the forward passes run on.
//!
//! `auto` takes the first GPU when ckpt was built with the `cuda` feature and one is present, and
//! otherwise the CPU, saying so once; an explicit `cuda` that cannot be honoured is an error.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    #[default]
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!(
                    "unknown device {s:?}: expected cpu, cuda, cuda:N or auto"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

/// Resolves a spec (`None`: none asked for, which is `auto`) to a candle device. `note` receives
/// one line: which GPU runs the passes, or why `auto` falls back to the CPU. Nothing is said for
/// an explicit `cpu`, nor for a build without CUDA when no device was asked for: there the CPU is
/// the only choice and not news.
pub fn resolve(spec: Option<DeviceSpec>, note: impl Fn(&str)) -> Result<candle_core::Device> {
    let explicit = spec.is_some();
    match spec.unwrap_or_default() {
        DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        DeviceSpec::Cuda(n) => {
            let d = cuda(n)?;
            note(&format!("running on cuda:{n}"));
            Ok(d)
        }
        DeviceSpec::Auto => {
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                if let Ok(d) = candle_core::Device::new_cuda(0) {
                    note("--device auto: running on cuda:0");
                    return Ok(d);
                }
            }
            let why = if cfg!(feature = "cuda") {
                "no usable CUDA GPU found"
            } else if explicit {
                "this ckpt was built without the cuda feature"
            } else {
                return Ok(candle_core::Device::Cpu);
            };
            note(&format!("--device auto: {why}; running on the CPU"));
            Ok(candle_core::Device::Cpu)
        }
    }
}

fn cuda(n: usize) -> Result<candle_core::Device> {
    if !cfg!(feature = "cuda") {
        bail!("--device cuda:{n}: this ckpt was built without the cuda feature (rebuild with `cargo build --release --features cuda`, or use --device cpu)");
    }
    match candle_core::Device::new_cuda(n) {
        Ok(d) => Ok(d),
        Err(e) => bail!("--device cuda:{n}: no usable CUDA GPU: {e}"),
    }
}

//! The model zoo: recognising a CNN from its checkpoint's tensor names and shapes, and running it
//! in candle.
//!
//! The user gives us a checkpoint, not code. Each family (one file here) has a detector that
//! reads the hyper-parameters off the shapes (classes from the classifier, widths, groups,
//! blocks per stage, block type) and a builder that constructs the network through a
//! `VarBuilder` whose paths are the torchvision module paths. Adding a family is one file plus
//! one line in [`FAMILIES`].
//!
//! Inference is f32 whatever the stored dtype. BatchNorm layers are listable in forward order by
//! state-dict prefix and run in eval or calibrate mode (see [`layers`]); everything else always
//! runs as in eval (no dropout, no stochastic depth).

pub mod cpu_conv;
pub mod efficientnet;
pub mod fused;
pub mod layers;
pub mod mobilenet_v2;
pub mod resnet;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::checkpoint::dtype as ckdtype;
use crate::checkpoint::{shared_component, Checkpoint, N_AVERAGED};
pub use layers::{BatchStats, BnMode, BnObserver, Ctx};

/// Tensor names and shapes: all detection looks at.
pub type Shapes = BTreeMap<String, Vec<usize>>;

pub fn shapes_of(ck: &Checkpoint) -> Shapes {
    ck.tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect()
}

/// [`shapes_of`] without AveragedModel's `n_averaged` where `--keep-prefix` kept it as a tensor:
/// the names a wrapper prefix is looked for in.
pub fn weight_shapes(ck: &Checkpoint) -> Shapes {
    let mut s = shapes_of(ck);
    if ck.n_averaged.is_some() {
        s.remove(N_AVERAGED);
    }
    s
}

/// Why a family does not fit: the first missing or misshapen key, and how far detection got
/// (to point at the nearest family).
#[derive(Debug, Clone)]
pub struct Miss {
    pub matched: usize,
    pub reason: String,
}

impl Miss {
    pub fn new(matched: usize, reason: impl Into<String>) -> Miss {
        Miss {
            matched,
            reason: reason.into(),
        }
    }
}

/// Reads a shape that must be there, counting matches for [`Miss`].
pub struct Probe<'a> {
    pub shapes: &'a Shapes,
    pub matched: usize,
}

impl<'a> Probe<'a> {
    pub fn new(shapes: &'a Shapes) -> Probe<'a> {
        Probe { shapes, matched: 0 }
    }
    pub fn has(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }
    /// The shape of `key`, which must have `rank` dimensions.
    pub fn shape(&mut self, key: &str, rank: usize) -> std::result::Result<Vec<usize>, Miss> {
        match self.shapes.get(key) {
            Some(s) if s.len() == rank => {
                self.matched += 1;
                Ok(s.clone())
            }
            Some(s) => Err(Miss::new(
                self.matched,
                format!("tensor {key} has shape {s:?}, expected {rank} dimensions"),
            )),
            None => Err(Miss::new(self.matched, format!("no tensor {key}"))),
        }
    }
    pub fn expect(&mut self, key: &str, want: &[usize]) -> std::result::Result<(), Miss> {
        let s = self.shape(key, want.len())?;
        if s != want {
            return Err(Miss::new(
                self.matched,
                format!("tensor {key} has shape {s:?}, expected {want:?}"),
            ));
        }
        Ok(())
    }
    /// Output channels of an RGB stem convolution `key` with a k x k kernel: [C, 3, k, k].
    pub fn stem_channels(&mut self, key: &str, k: usize) -> std::result::Result<usize, Miss> {
        let s = self.shape(key, 4)?;
        if s[1..] != [3, k, k] {
            return Err(self.miss(format!(
                "tensor {key} has shape {s:?}, expected [C, 3, {k}, {k}]"
            )));
        }
        Ok(s[0])
    }

    pub fn miss(&self, reason: impl Into<String>) -> Miss {
        Miss::new(self.matched, reason)
    }
}

/// A detected architecture.
#[derive(Clone, Debug)]
pub enum Config {
    ResNet(resnet::Config),
    MobileNetV2(mobilenet_v2::Config),
    EfficientNet(efficientnet::Config),
}

impl Config {
    /// The torchvision name when the configuration is a standard one (`resnet50`), else a
    /// description (`resnet (Bottleneck [1, 1, 1, 1], groups 1)`).
    pub fn name(&self) -> String {
        match self {
            Config::ResNet(c) => c.name(),
            Config::MobileNetV2(c) => c.name(),
            Config::EfficientNet(c) => c.name(),
        }
    }
    pub fn family(&self) -> &'static str {
        match self {
            Config::ResNet(_) => "resnet",
            Config::MobileNetV2(_) => "mobilenet_v2",
            Config::EfficientNet(_) => "efficientnet",
        }
    }
    pub fn num_classes(&self) -> usize {
        match self {
            Config::ResNet(c) => c.num_classes,
            Config::MobileNetV2(c) => c.num_classes,
            Config::EfficientNet(c) => c.num_classes,
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} classes)", self.name(), self.num_classes())
    }
}

/// A family: its name, the `--arch` names it answers to, and its detector.
pub struct Family {
    pub name: &'static str,
    pub detect: fn(&Shapes) -> std::result::Result<Config, Miss>,
    /// Whether `--arch NAME` selects this family.
    pub accepts: fn(&str) -> bool,
}

pub const FAMILIES: [Family; 3] = [
    Family {
        name: "resnet",
        detect: resnet::detect,
        accepts: resnet::accepts,
    },
    Family {
        name: "mobilenet_v2",
        detect: mobilenet_v2::detect,
        accepts: mobilenet_v2::accepts,
    },
    Family {
        name: "efficientnet",
        detect: efficientnet::detect,
        accepts: efficientnet::accepts,
    },
];

/// Recognises the architecture, or explains which families were tried and where the nearest
/// one stopped matching. `arch` (from `--arch`) restricts detection to one family and, when it
/// names a standard configuration, requires that one.
pub fn detect(shapes: &Shapes, arch: Option<&str>) -> Result<Config> {
    match try_detect(shapes, arch)? {
        Ok(c) => Ok(c),
        Err(nearest) => bail!("{nearest}"),
    }
}

/// The outer error is a wrong `--arch`; the inner one says that no family fits the names.
fn try_detect(shapes: &Shapes, arch: Option<&str>) -> Result<std::result::Result<Config, String>> {
    let candidates: Vec<&Family> = match arch {
        Some(a) => {
            let f: Vec<&Family> = FAMILIES.iter().filter(|f| (f.accepts)(a)).collect();
            if f.is_empty() {
                bail!(
                    "--arch {a}: unknown architecture; known families: {}",
                    FAMILIES
                        .iter()
                        .map(|f| f.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            f
        }
        None => FAMILIES.iter().collect(),
    };
    let mut misses = Vec::new();
    for f in &candidates {
        match (f.detect)(shapes) {
            Ok(c) => {
                if let Some(a) = arch {
                    if a != f.name && c.name() != a {
                        bail!("--arch {a}: the checkpoint is a {}, not a {a}", c.name());
                    }
                }
                return Ok(Ok(c));
            }
            Err(m) => misses.push((f.name, m)),
        }
    }
    let tried: Vec<&str> = misses.iter().map(|(n, _)| *n).collect();
    let (nearest, why) = misses
        .iter()
        .max_by_key(|(_, m)| m.matched)
        .map(|(n, m)| (*n, m.reason.clone()))
        .unwrap();
    Ok(Err(format!(
        "not a supported architecture (tried {}); nearest is {nearest}: {why}",
        tried.join(", ")
    )))
}

/// How many leading components shared by every name detection removes at most (`model.` of a
/// LightningModule, then `module.` of a DDP inside it, ...).
const MAX_SHARED_COMPONENTS: usize = 3;

/// `shapes` with `prefix` removed from the names that carry it (the others left out).
fn under_prefix(shapes: &Shapes, prefix: &str) -> Shapes {
    shapes
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
        .collect()
}

/// As [`detect`], and when the names fit no family as they are, tries them without a leading
/// component shared by every name (a wrapper's attribute: `model.`, `net.`, `backbone.`), then
/// without the next one, up to [`MAX_SHARED_COMPONENTS`]. Returns the prefix that had to be
/// removed. When nothing fits, the error names a prefix under which some of the tensors would
/// (one that not every tensor carries).
pub fn detect_unwrapped(shapes: &Shapes, arch: Option<&str>) -> Result<(Config, Option<String>)> {
    let as_is = match try_detect(shapes, arch)? {
        Ok(c) => return Ok((c, None)),
        Err(e) => e,
    };
    let mut prefix = String::new();
    for _ in 0..MAX_SHARED_COMPONENTS {
        let Some(c) = shared_component(shapes.keys().map(|k| &k[prefix.len()..])) else {
            break;
        };
        prefix.push_str(&c);
        if let Ok(cfg) = try_detect(&under_prefix(shapes, &prefix), arch)? {
            return Ok((cfg, Some(prefix)));
        }
    }
    bail!("{as_is}{}", prefix_hint(shapes, arch))
}

/// Makes `ck`'s names the model's, for a command that runs it: when they fit no family as they
/// are, removes the shared leading components that make them fit (see [`detect_unwrapped`]), so
/// that the command's outputs use the plain names. With `keep_prefix` (`--keep-prefix`) the names
/// stay as they are, and when they do not fit, the error names the prefix that would.
pub fn use_model_names(
    ck: &mut Checkpoint,
    arch: Option<&str>,
    keep_prefix: bool,
) -> Result<Config> {
    let shapes = weight_shapes(ck);
    if keep_prefix {
        return match try_detect(&shapes, arch)? {
            Ok(c) => Ok(c),
            Err(e) => bail!("{e}{}", prefix_hint(&shapes, arch)),
        };
    }
    let (config, prefix) = detect_unwrapped(&shapes, arch)?;
    if let Some(p) = prefix {
        ck.remove_prefix(&p, &format!("the names fit {} without it", config.family()));
    }
    Ok(config)
}

/// "; ..." naming the prefix with the most tensors under which the names fit a family, or "".
/// Candidates are the first one or two components of every name.
fn prefix_hint(shapes: &Shapes, arch: Option<&str>) -> String {
    let mut candidates = std::collections::BTreeSet::new();
    for k in shapes.keys() {
        let mut end = 0;
        for _ in 0..2 {
            match k[end..].find('.') {
                Some(i) if end + i + 1 < k.len() => {
                    end += i + 1;
                    candidates.insert(&k[..end]);
                }
                _ => break,
            }
        }
    }
    // Bounds the work on a huge or hostile list of names (real models have a few dozen).
    let best = candidates
        .into_iter()
        .take(256)
        .filter_map(|p| {
            let sub = under_prefix(shapes, p);
            match try_detect(&sub, arch) {
                Ok(Ok(c)) => Some((sub.len(), p, c)),
                _ => None,
            }
        })
        .max_by_key(|(n, _, _)| *n);
    let Some((n, p, config)) = best else {
        return String::new();
    };
    if n == shapes.len() {
        return format!(
            "; without the prefix '{p}' the names fit {config}: leave out --keep-prefix"
        );
    }
    let outside: Vec<&str> = shapes
        .keys()
        .filter(|k| !k.starts_with(p))
        .take(3)
        .map(String::as_str)
        .collect();
    format!(
        "; the {n} tensors under '{p}' fit {config}, but {} are not under it ({}{}): save that module's state dict alone",
        shapes.len() - n,
        outside.join(", "),
        if shapes.len() - n > outside.len() { ", ..." } else { "" }
    )
}

/// A network built from a checkpoint.
pub struct Model {
    pub config: Config,
    net: Net,
    /// BN layers' state-dict prefixes in forward order.
    pub bn_layers: Vec<String>,
    pub device: Device,
}

enum Net {
    ResNet(resnet::ResNet),
    MobileNetV2(mobilenet_v2::MobileNetV2),
    EfficientNet(efficientnet::EfficientNet),
}

impl Model {
    /// Detects (or takes `arch`) and builds the model from `ck`'s tensors on `device`.
    pub fn load(ck: &Checkpoint, arch: Option<&str>, device: &Device) -> Result<Model> {
        Self::load_with(ck, arch, device, &HashMap::new())
    }

    /// As [`Model::load`], with some tensors replaced (recalibrated BN statistics, say).
    pub fn load_with(
        ck: &Checkpoint,
        arch: Option<&str>,
        device: &Device,
        overrides: &HashMap<String, Vec<f32>>,
    ) -> Result<Model> {
        let config = detect(&shapes_of(ck), arch).with_context(|| ck.path.display().to_string())?;
        Self::build(
            config,
            Box::new(CheckpointBackend { ck, overrides }),
            device,
        )
        .with_context(|| ck.path.display().to_string())
    }

    /// Builds a detected configuration from any tensor source.
    pub fn build(
        config: Config,
        backend: Box<dyn SimpleBackend + '_>,
        device: &Device,
    ) -> Result<Model> {
        let vb = VarBuilder::from_backend(backend, DType::F32, device.clone());
        let mut reg = layers::BnRegistry::default();
        let net = match &config {
            Config::ResNet(c) => Net::ResNet(resnet::ResNet::new(c, vb, &mut reg)?),
            Config::MobileNetV2(c) => {
                Net::MobileNetV2(mobilenet_v2::MobileNetV2::new(c, vb, &mut reg)?)
            }
            Config::EfficientNet(c) => {
                Net::EfficientNet(efficientnet::EfficientNet::new(c, vb, &mut reg)?)
            }
        };
        Ok(Model {
            config,
            net,
            bn_layers: reg.prefixes,
            device: device.clone(),
        })
    }

    /// Logits [N, classes] for a normalised batch [N, 3, H, W].
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4().context("input must be [N, 3, H, W]")?;
        if c != 3 {
            bail!("input has {c} channels, expected 3");
        }
        let y = match &self.net {
            Net::ResNet(m) => m.forward(x, ctx)?,
            Net::MobileNetV2(m) => m.forward(x, ctx)?,
            Net::EfficientNet(m) => m.forward(x, ctx)?,
        };
        Ok(y)
    }
}

/// Serves a checkpoint's tensors to a `VarBuilder`, converted to f32 on the target device.
struct CheckpointBackend<'a> {
    ck: &'a Checkpoint,
    overrides: &'a HashMap<String, Vec<f32>>,
}

impl SimpleBackend for CheckpointBackend<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor {name} has shape {:?}, expected {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .ck
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor {name}")))?;
        if let Some(v) = self.overrides.get(name) {
            return Tensor::from_slice(v, t.shape.clone(), dev)?.to_dtype(dtype);
        }
        if !t.dtype.is_arithmetic_float() {
            candle_core::bail!("tensor {name} is {}, expected a floating dtype", t.dtype);
        }
        let bytes = self.ck.bytes(t);
        let values = ckdtype::to_f32_vec(&bytes, t.dtype);
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            candle_core::bail!("tensor {name} has {} at element {i}", values[i]);
        }
        Tensor::from_vec(values, t.shape.clone(), dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.ck.get(name).is_some()
    }
}

/// Serves zeros of the listed shapes: builds a model from a key/shape list alone, which checks
/// every shape the builder asks for (used to test detection on real-size configurations
/// without their weights).
pub struct ShapeOnlyBackend {
    pub shapes: Shapes,
}

impl SimpleBackend for ShapeOnlyBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.shapes.get(name) {
            Some(have) if have.as_slice() == s.dims() => Tensor::zeros(s, dtype, dev),
            Some(have) => {
                candle_core::bail!("tensor {name} has shape {have:?}, expected {:?}", s.dims())
            }
            None => candle_core::bail!("no tensor {name}"),
        }
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.shapes.get(name) {
            Some(have) => Tensor::zeros(have.clone(), dtype, dev),
            None => candle_core::bail!("no tensor {name}"),
        }
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

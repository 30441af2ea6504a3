//! The model zoo: recognising a CNN from its checkpoint's tensor names and shapes, and running it
//! in candle.
//!
//! The user gives us a checkpoint, not code. A family (one file here) declares:
//!
//! - a detector that reads the hyper-parameters off the shapes (classes from the classifier,
//!   widths, groups, blocks per stage, block type) under the family's module paths, returning an
//!   [`Architecture`];
//! - that architecture's builder, which constructs the [`Network`] through a `VarBuilder` whose
//!   paths are the module paths (torchvision's), registering every BN layer in forward order;
//! - the namings its checkpoints come in (torchvision's is the identity; see [`naming`]).
//!
//! and is listed once in [`FAMILIES`]. Adding a family is that file, its `mod` line and one line
//! there (as VGG, MobileNetV3, RegNet, ConvNeXt, DenseNet, EfficientNetV2, ShuffleNetV2 and MNASNet
//! were added):
//! detection, `--arch`, `inspect`, the error for an unknown checkpoint and the tests all read the
//! registry. Adding a naming of an existing family (timm's, say) is a [`Naming`] in that family's
//! list: detection tries each naming, and building, the BN layer list and the statistics written
//! back all go through the naming that matched.
//!
//! A model runs in the context a forward pass gives it ([`Ctx`]): BN mode per layer (eval,
//! calibrate, train), the kernels chosen for this model ([`Kernels`]: the fast CPU kernels, or
//! candle's differentiable ops), and an observer of batch statistics. Parameters can be built as
//! candle `Var`s ([`BuildOptions::trainable`]) so that a training engine differentiates through
//! the parts it trains. Inference is f32 whatever the stored dtype; everything but BN always runs
//! as in eval (no dropout, no stochastic depth).

pub mod convnext;
pub mod cpu_conv;
pub mod densenet;
pub mod efficientnet;
pub mod efficientnet_v2;
pub mod fused;
pub mod layers;
pub mod mnasnet;
pub mod mobilenet_v2;
pub mod mobilenet_v3;
pub mod naming;
pub mod regnet;
pub mod resnet;
pub mod shufflenet_v2;
pub mod vgg;

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::checkpoint::dtype as ckdtype;
use crate::checkpoint::{shared_component, Checkpoint, N_AVERAGED};
pub use cpu_conv::Kernels;
pub use layers::{BatchNorm, BatchStats, BnMode, BnObserver, BnRegistry, Ctx};
pub use naming::Naming;

/// The families ckpt recognises, tried in this order. One line per family.
pub static FAMILIES: &[Family] = &[
    resnet::FAMILY,
    mobilenet_v2::FAMILY,
    efficientnet::FAMILY,
    vgg::FAMILY,
    mobilenet_v3::FAMILY,
    regnet::FAMILY,
    convnext::FAMILY,
    densenet::FAMILY,
    efficientnet_v2::FAMILY,
    shufflenet_v2::FAMILY,
    mnasnet::FAMILY,
];

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

    /// Output and input widths of a linear layer `key`: [O, I], or [O, I, 1, 1] where timm has a
    /// 1x1 convolution in its place (MobileNetV3's `conv_head`, ConvNeXt's `ConvMlp`); see
    /// [`layers::get_reshaped`].
    pub fn linear(&mut self, key: &str) -> std::result::Result<[usize; 2], Miss> {
        match self.shapes.get(key).map(Vec::as_slice) {
            Some(&[o, i, 1, 1]) => {
                self.matched += 1;
                Ok([o, i])
            }
            _ => {
                let s = self.shape(key, 2)?;
                Ok([s[0], s[1]])
            }
        }
    }

    pub fn miss(&self, reason: impl Into<String>) -> Miss {
        Miss::new(self.matched, reason)
    }
}

/// A detected configuration of one family: what its builder needs.
pub trait Architecture: fmt::Debug + Send + Sync + Any {
    /// The torchvision name when the configuration is a standard one (`resnet50`), else a
    /// description (`resnet (Bottleneck [1, 1, 1, 1], groups 1)`).
    fn name(&self) -> String;
    fn num_classes(&self) -> usize;
    /// Builds the network under module paths from `vb`, registering its BN layers in `reg` in
    /// forward order.
    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> candle_core::Result<Box<dyn Network>>;
    /// Where a fine-tune of the head looks: the classifier and the last BN before global
    /// pooling, by module path.
    fn head(&self) -> HeadPaths;
    /// Takes what the naming that matched says beyond the names: timm's MobileNetV3 and
    /// EfficientNetV2 have PyTorch's BN eps 1e-5 and momentum where torchvision's have their own.
    fn use_naming(&mut self, _naming: &Naming) {}
    /// Takes what a timm model name (`--arch`, or a model folder's `architecture`) says beyond
    /// the shapes: `tf_efficientnet_b0`'s TensorFlow "same" padding and BN eps 1e-3, say.
    fn set_variant(&mut self, _arch: &str) {}
    /// Whether `--arch NAME` names this configuration (its [`Architecture::name`] by default).
    fn answers_to(&self, arch: &str) -> bool {
        self.name() == arch
    }
    /// A line to say once when the shapes leave a choice open that was made without a name
    /// (the plain variant of a family whose `tf_` ports have the same shapes).
    fn notice(&self, _naming: &Naming) -> Option<String> {
        None
    }
}

/// The module paths a head fine-tune (FixRes) trains: the linear classifier after global
/// pooling (`fc`, `classifier.1`) and the last BN layer on the main path before the pool
/// (`layer4.2.bn3` in ResNet-50, `features.18.1` in MobileNetV2; none in ConvNeXt or a VGG
/// without BN). Each family names its own, so that no engine guesses from names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadPaths {
    pub classifier: String,
    pub last_bn: Option<String>,
}

/// A model's [`HeadPaths`] resolved: checkpoint keys, the BN layer there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub classifier: String,
    pub last_bn: String,
}

/// What the frozen part of a head fine-tune hands to the trained part: the input of the head BN
/// (the last BN before the pool, [`Architecture::head`]) and, in a residual block, the shortcut
/// added after that BN. With the backbone frozen and the transform deterministic it is the same
/// every epoch, which is what lets a fine-tune keep it instead of recomputing it.
#[derive(Clone, Debug)]
pub struct HeadInput {
    pub x: Tensor,
    pub residual: Option<Tensor>,
}

impl HeadInput {
    /// Images held.
    pub fn len(&self) -> usize {
        self.x.dims().first().copied().unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of the tensors' elements.
    pub fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        b(&self.x) + self.residual.as_ref().map_or(0, b)
    }
    /// Image `i` alone: a view sharing the batch's storage, not a copy.
    pub fn row(&self, i: usize) -> candle_core::Result<HeadInput> {
        Ok(HeadInput {
            x: self.x.narrow(0, i, 1)?,
            residual: self
                .residual
                .as_ref()
                .map(|r| r.narrow(0, i, 1))
                .transpose()?,
        })
    }
    /// Rows stacked into one batch, in order.
    pub fn stack(rows: &[&HeadInput]) -> candle_core::Result<HeadInput> {
        let xs: Vec<&Tensor> = rows.iter().map(|r| &r.x).collect();
        let residual = match rows
            .iter()
            .map(|r| r.residual.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(rs) if !rs.is_empty() => Some(Tensor::cat(&rs, 0)?),
            _ => None,
        };
        Ok(HeadInput {
            x: Tensor::cat(&xs, 0)?,
            residual,
        })
    }
}

/// A built network: logits from a normalised batch.
///
/// A network with a head BN also runs in two parts, for a head fine-tune: [`Network::forward_trunk`]
/// (everything before that BN, frozen: no autograd graph on the CPU's kernels) and
/// [`Network::forward_head`] (the BN, the shortcut, the activation, the pool and the
/// classifier). Chained, they compute what `forward` does in a context where the head BN is
/// the only one not in eval mode (`tests/models.rs` holds every family to that, bit for bit).
pub trait Network: Send + Sync {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> candle_core::Result<Tensor>;
    /// Everything before the head BN: its input, and the shortcut added after it.
    fn forward_trunk(&self, _x: &Tensor, _ctx: &mut Ctx) -> candle_core::Result<HeadInput> {
        candle_core::bail!("this network has no BatchNorm layer before its pooling")
    }
    /// Logits from [`Network::forward_trunk`]'s output.
    fn forward_head(&self, _input: &HeadInput, _ctx: &mut Ctx) -> candle_core::Result<Tensor> {
        candle_core::bail!("this network has no BatchNorm layer before its pooling")
    }
}

/// A family: its name, the `--arch` names it answers to, its detector and its namings.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    /// Reads a configuration off shapes under the family's module paths.
    pub detect: fn(&Shapes) -> std::result::Result<Box<dyn Architecture>, Miss>,
    /// Whether `--arch NAME` selects this family.
    pub accepts: fn(&str) -> bool,
    /// The namings checkpoints of this family come in, tried in order, given the checkpoint's
    /// names and shapes: where another library nests blocks by stage and torchvision numbers
    /// them in one sequence (timm's `blocks.2.1` for MobileNetV3's `features.5`), the map
    /// depends on the stage depths the checkpoint has.
    pub namings: fn(&Shapes) -> Vec<Naming>,
}

/// torchvision's naming, the identity: the namings of a family that has no other.
pub fn torchvision_naming(_: &Shapes) -> Vec<Naming> {
    vec![Naming::identity("torchvision")]
}

/// A detected architecture and the naming its checkpoint uses.
#[derive(Clone, Debug)]
pub struct Config {
    arch: Arc<dyn Architecture>,
    family: &'static Family,
    pub naming: Naming,
}

impl Config {
    pub fn name(&self) -> String {
        self.arch.name()
    }
    pub fn family(&self) -> &'static str {
        self.family.name
    }
    pub fn num_classes(&self) -> usize {
        self.arch.num_classes()
    }
    /// The classifier and last BN, by module path (see [`HeadPaths`]).
    pub fn head(&self) -> HeadPaths {
        self.arch.head()
    }
    /// What the shapes could not tell and was chosen without a name (see
    /// [`Architecture::notice`]).
    pub fn notice(&self) -> Option<String> {
        self.arch.notice(&self.naming)
    }
    /// The family's own configuration type (`resnet::Config`, ...).
    pub fn downcast<T: Architecture>(&self) -> Option<&T> {
        let any: &dyn Any = &*self.arch;
        any.downcast_ref::<T>()
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} classes)", self.name(), self.num_classes())?;
        if !self.naming.is_identity() {
            write!(f, ", {} naming", self.naming)?;
        }
        Ok(())
    }
}

/// The family names, for messages.
pub fn family_names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.name).collect()
}

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
    let candidates: Vec<&'static Family> = match arch {
        Some(a) => {
            let f: Vec<&Family> = FAMILIES.iter().filter(|f| (f.accepts)(a)).collect();
            if f.is_empty() {
                bail!(
                    "--arch {a}: unknown architecture; known families: {}",
                    family_names().join(", ")
                );
            }
            f
        }
        None => FAMILIES.iter().collect(),
    };
    let mut misses = Vec::new();
    for f in &candidates {
        let mut nearest: Option<Miss> = None;
        for naming in (f.namings)(shapes) {
            let canonical: Shapes = if naming.is_identity() {
                shapes.clone()
            } else {
                shapes
                    .iter()
                    .filter_map(|(k, v)| naming.path(k).map(|p| (p, v.clone())))
                    .collect()
            };
            match (f.detect)(&canonical) {
                Ok(mut a) => {
                    a.use_naming(&naming);
                    if let Some(name) = arch {
                        a.set_variant(name);
                    }
                    let c = Config {
                        arch: Arc::from(a),
                        family: f,
                        naming,
                    };
                    if let Some(a) = arch {
                        if a != f.name && !c.arch.answers_to(a) {
                            bail!("--arch {a}: the checkpoint is a {}, not a {a}", c.name());
                        }
                    }
                    return Ok(Ok(c));
                }
                Err(m) => {
                    let m = if naming.is_identity() {
                        m
                    } else {
                        Miss::new(m.matched, format!("({} naming) {}", naming, m.reason))
                    };
                    if nearest.as_ref().is_none_or(|n| m.matched > n.matched) {
                        nearest = Some(m);
                    }
                }
            }
        }
        if let Some(m) = nearest {
            misses.push((f.name, m));
        }
    }
    let tried: Vec<&str> = misses.iter().map(|(n, _)| *n).collect();
    let (nearest, why) = misses
        .iter()
        .max_by_key(|(_, m)| m.matched)
        .map(|(n, m)| (*n, m.reason.clone()))
        .unwrap_or(("none", "no family was tried".into()));
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
/// without the next one, up to `MAX_SHARED_COMPONENTS`. Returns the prefix that had to be
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

/// The `--arch` value a timm model name (a model folder's `architecture`) stands for: the name
/// itself when the shapes are that configuration (`resnet50`, `tf_efficientnet_b0`), else the
/// family that answers to the name, with its `tf_` variant kept (timm names configurations
/// ckpt's tables do not, `resnet10t`, and a config's `model_args` can change the widths of a
/// named model: such a model is its family, described by its shapes). An error when no family
/// takes the name, or the shapes are not of the family it names.
pub fn arch_for_model_name(shapes: &Shapes, name: &str) -> Result<String> {
    let families: Vec<&Family> = FAMILIES.iter().filter(|f| (f.accepts)(name)).collect();
    if families.is_empty() {
        bail!(
            "architecture {name}: not one ckpt runs (known families: {})",
            family_names().join(", ")
        );
    }
    let mut candidates = vec![name.to_string()];
    for f in &families {
        if name.starts_with("tf_") {
            candidates.push(format!("tf_{}", f.name));
        }
        candidates.push(f.name.to_string());
    }
    let mut last = None;
    for c in candidates {
        match detect_unwrapped(shapes, Some(&c)) {
            Ok(_) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .expect("at least one candidate")
        .context(format!("architecture {name}")))
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

/// How a model is built beyond its configuration.
#[derive(Default)]
pub struct BuildOptions<'a> {
    /// Parameters (by module path, e.g. `fc.weight`) built as candle `Var`s, for a training
    /// engine to differentiate and update; the rest are plain tensors.
    pub trainable: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
    /// Tensors (by checkpoint key) served instead of the checkpoint's: recalibrated BN
    /// statistics, say.
    pub overrides: Option<&'a HashMap<String, Vec<f32>>>,
}

/// A network built from a checkpoint.
pub struct Model {
    pub config: Config,
    net: Box<dyn Network>,
    /// BN layers' state-dict prefixes (checkpoint keys) in forward order.
    pub bn_layers: Vec<String>,
    /// The BN layers themselves, in the same order (their running statistics, momentum).
    pub bn: Vec<BatchNorm>,
    pub device: Device,
    /// The kernels this model's forward passes run on.
    pub kernels: Kernels,
    /// Parameters built as `Var`s, by checkpoint key.
    trainable: Vec<(String, Var)>,
}

impl Model {
    /// Detects (or takes `arch`) and builds the model from `ck`'s tensors on `device`.
    pub fn load(ck: &Checkpoint, arch: Option<&str>, device: &Device) -> Result<Model> {
        Self::load_with(ck, arch, device, &BuildOptions::default())
    }

    /// As [`Model::load`], with build options (trainable parameters, replaced tensors).
    pub fn load_with(
        ck: &Checkpoint,
        arch: Option<&str>,
        device: &Device,
        opts: &BuildOptions,
    ) -> Result<Model> {
        let config = detect(&shapes_of(ck), arch).with_context(|| ck.path.display().to_string())?;
        let empty = HashMap::new();
        let backend = CheckpointBackend {
            ck,
            naming: config.naming.clone(),
            overrides: opts.overrides.unwrap_or(&empty),
        };
        let model = Self::build_with(config, Box::new(backend), device, opts)
            .with_context(|| ck.path.display().to_string())?;
        // The model holds its own copies of the tensors now (issue 21: the file's pages were
        // a second copy of the weights in the resident memory of every job).
        ck.release_pages();
        Ok(model)
    }

    /// Builds a detected configuration from any tensor source that serves checkpoint keys.
    pub fn build(
        config: Config,
        backend: Box<dyn SimpleBackend + '_>,
        device: &Device,
    ) -> Result<Model> {
        let naming = config.naming.clone();
        let backend = NamedBackend {
            inner: backend,
            naming,
        };
        Self::build_with(config, Box::new(backend), device, &BuildOptions::default())
    }

    /// Builds from a backend that serves module paths.
    fn build_with(
        config: Config,
        backend: Box<dyn SimpleBackend + '_>,
        device: &Device,
        opts: &BuildOptions,
    ) -> Result<Model> {
        let vars = Arc::new(Mutex::new(Vec::new()));
        let backend: Box<dyn SimpleBackend + '_> = match opts.trainable {
            Some(pick) => Box::new(TrainableBackend {
                inner: backend,
                pick,
                vars: vars.clone(),
            }),
            None => backend,
        };
        let vb = VarBuilder::from_backend(backend, DType::F32, device.clone());
        let mut reg = BnRegistry::default();
        let net = config.arch.build(vb, &mut reg)?;
        let naming = &config.naming;
        let trainable = std::mem::take(&mut *vars.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|(p, v)| (naming.key(&p), v))
            .collect();
        Ok(Model {
            bn_layers: reg.prefixes.iter().map(|p| naming.key(p)).collect(),
            bn: reg.layers,
            config,
            net,
            device: device.clone(),
            kernels: Kernels::default(),
            trainable,
        })
    }

    /// The same model on other kernels.
    pub fn with_kernels(mut self, kernels: Kernels) -> Model {
        self.kernels = kernels;
        self
    }

    /// Logits [N, classes] for a normalised batch [N, 3, H, W], on this model's kernels.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (_, c, _, _) = x.dims4().context("input must be [N, 3, H, W]")?;
        if c != 3 {
            bail!("input has {c} channels, expected 3");
        }
        ctx.kernels = self.kernels;
        Ok(self.net.forward(x, ctx)?)
    }

    /// The part of [`Model::forward`] before the head BN (see [`Network::forward_trunk`]).
    pub fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let (_, c, _, _) = x.dims4().context("input must be [N, 3, H, W]")?;
        if c != 3 {
            bail!("input has {c} channels, expected 3");
        }
        ctx.kernels = self.kernels;
        Ok(self.net.forward_trunk(x, ctx)?)
    }

    /// Logits from the trunk's output (see [`Network::forward_head`]).
    pub fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        ctx.kernels = self.kernels;
        Ok(self.net.forward_head(input, ctx)?)
    }

    /// The head a fine-tune trains, by checkpoint key (through the naming), and the last BN's
    /// index in [`Model::bn`].
    pub fn head(&self) -> Result<(Head, usize)> {
        let h = self.config.head();
        let Some(bn) = &h.last_bn else {
            bail!(
                "{} has no BatchNorm layer before its pooling, which a head fine-tune trains",
                self.config.name()
            );
        };
        let last_bn = self.config.naming.key(bn);
        let index = self
            .bn_layers
            .iter()
            .position(|p| *p == last_bn)
            .with_context(|| format!("the model has no BN layer {last_bn}"))?;
        let key = Head {
            classifier: self.config.naming.key(&h.classifier),
            last_bn,
        };
        Ok((key, index))
    }

    /// The parameters built as `Var`s, by checkpoint key, in construction order.
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }
}

/// Serves a source's tensors under module paths, through a naming.
struct NamedBackend<'a> {
    inner: Box<dyn SimpleBackend + 'a>,
    naming: Naming,
}

impl SimpleBackend for NamedBackend<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.inner.get(s, &self.naming.key(name), h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(&self.naming.key(name), dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(&self.naming.key(name))
    }
}

/// Wraps a backend so that the parameters `pick` selects come out as `Var`s (recorded by path).
struct TrainableBackend<'a> {
    inner: Box<dyn SimpleBackend + 'a>,
    pick: &'a (dyn Fn(&str) -> bool + Sync),
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl TrainableBackend<'_> {
    fn wrap(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        if !(self.pick)(name) {
            return Ok(t);
        }
        let v = Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        self.vars
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), v));
        Ok(out)
    }
}

impl SimpleBackend for TrainableBackend<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, name, h, dtype, dev)?;
        self.wrap(name, t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.wrap(name, t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Serves a checkpoint's tensors to a `VarBuilder` under module paths (through the naming),
/// converted to f32 on the target device.
struct CheckpointBackend<'a> {
    ck: &'a Checkpoint,
    naming: Naming,
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
                "tensor {} has shape {:?}, expected {:?}",
                self.naming.key(name),
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, path: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let key = self.naming.key(path);
        let name = key.as_str();
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

    fn contains_tensor(&self, path: &str) -> bool {
        self.ck.get(&self.naming.key(path)).is_some()
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

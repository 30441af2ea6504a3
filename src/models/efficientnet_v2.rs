//! torchvision's EfficientNetV2 S/M/L (and other widths, depths or class counts of the same
//! stage layout).
//!
//! `features.0` is the stem (3x3, stride 2, BN, SiLU); `features.1` to `features.n` are stages
//! of blocks `features.{s}.{j}.block`, either Fused-MBConv (a k x k convolution with the stride,
//! BN, SiLU, then, when the expansion is not 1, a 1x1 projection with BN) or MBConv (as in
//! EfficientNet: 1x1 expansion, depthwise, squeeze-excitation, projection; told apart by the
//! squeeze-excitation's `fc1`); `features.n+1` is the 1x1 head (SiLU), `classifier.1` the
//! linear layer. BN has torchvision's eps 0.001. Widths, kernels and depths come from the
//! shapes; strides are torchvision's per-stage schedule, told apart by the number of stages
//! (6 for S, 7 for M and L).
//!
//! timm's EfficientNetV2s (`efficientnetv2_*`, `efficientnetv2_rw_*`, and the TensorFlow ports
//! `tf_efficientnetv2_*`) are the same network: `conv_stem`/`bn1`, `blocks.{s}.{j}` for
//! `features.{s+1}.{j}` (a ConvBnAct `conv`, `bn1` for a Fused-MBConv without expansion, an
//! edge residual `conv_exp`, `bn1`, `conv_pwl`, `bn2` for one with, an inverted residual as in
//! EfficientNet for an MBConv), `conv_head`/`bn2` and `classifier`. timm's BN has PyTorch's eps
//! 1e-5 (torchvision's here 1e-3); the `tf_` ports eps 1e-3 and TensorFlow's "same" padding on
//! strided convolutions, which only the name tells (`--arch tf_efficientnetv2_s`, or
//! `--arch tf_efficientnetv2` for any size).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::efficientnet::{timm_block_renames, BlockConfig, MbConv};
use super::layers::{global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Linear};
use super::naming::{has_module, stage_depths};
use super::{Architecture, Family, HeadInput, HeadPaths, Miss, Naming, Network, Probe, Shapes};

const EPS: f64 = 1e-3;
/// BN eps of timm's plain (not `tf_`) EfficientNetV2s.
const TIMM_EPS: f64 = 1e-5;
/// timm's sizes (a `tf_` port has its plain name's shapes): (name, blocks per stage, stage
/// widths, stem, head).
type Size = (
    &'static str,
    &'static [usize],
    &'static [usize],
    usize,
    usize,
);
const TIMM: [Size; 11] = [
    (
        "efficientnetv2_rw_t",
        &[2, 4, 4, 6, 9, 14],
        &[24, 40, 48, 104, 128, 208],
        24,
        1024,
    ),
    (
        "efficientnetv2_rw_s",
        &[2, 4, 4, 6, 9, 15],
        &[24, 48, 64, 128, 160, 272],
        24,
        1792,
    ),
    (
        "efficientnetv2_rw_m",
        &[3, 5, 5, 8, 15, 24],
        &[32, 56, 80, 152, 192, 328],
        32,
        2152,
    ),
    (
        "efficientnetv2_s",
        &[2, 4, 4, 6, 9, 15],
        &[24, 48, 64, 128, 160, 256],
        24,
        1280,
    ),
    (
        "efficientnetv2_m",
        &[3, 5, 5, 7, 14, 18, 5],
        &[24, 48, 80, 160, 176, 304, 512],
        24,
        1280,
    ),
    (
        "efficientnetv2_l",
        &[4, 7, 7, 10, 19, 25, 7],
        &[32, 64, 96, 192, 224, 384, 640],
        32,
        1280,
    ),
    (
        "efficientnetv2_xl",
        &[4, 8, 8, 16, 24, 32, 8],
        &[32, 64, 96, 192, 256, 512, 640],
        32,
        1280,
    ),
    (
        "efficientnetv2_b0",
        &[1, 2, 2, 3, 5, 8],
        &[16, 32, 48, 96, 112, 192],
        32,
        1280,
    ),
    (
        "efficientnetv2_b1",
        &[2, 3, 3, 4, 6, 9],
        &[16, 32, 48, 96, 112, 192],
        32,
        1280,
    ),
    (
        "efficientnetv2_b2",
        &[2, 3, 3, 4, 6, 10],
        &[16, 32, 56, 104, 120, 208],
        32,
        1408,
    ),
    (
        "efficientnetv2_b3",
        &[2, 3, 3, 5, 7, 12],
        &[16, 40, 56, 112, 136, 232],
        40,
        1536,
    ),
];
/// Stride of each stage's first block: S, then M and L.
const STRIDES_S: [usize; 6] = [1, 2, 2, 2, 1, 2];
const STRIDES_ML: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];
/// torchvision's sizes: (name, blocks per stage, stage widths, stem); the head is 1280 wide.
const STANDARD: [(&str, &[usize], &[usize], usize); 3] = [
    (
        "efficientnet_v2_s",
        &[2, 4, 4, 6, 9, 15],
        &[24, 48, 64, 128, 160, 256],
        24,
    ),
    (
        "efficientnet_v2_m",
        &[3, 5, 5, 7, 14, 18, 5],
        &[24, 48, 80, 160, 176, 304, 512],
        24,
    ),
    (
        "efficientnet_v2_l",
        &[4, 7, 7, 10, 19, 25, 7],
        &[32, 64, 96, 192, 224, 384, 640],
        32,
    ),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Block {
    /// Fused-MBConv: `hidden` is the k x k convolution's output, equal to `cout` without a
    /// projection (`squeeze` unused).
    Fused(BlockConfig),
    MbConv(BlockConfig),
}

impl Block {
    fn config(&self) -> &BlockConfig {
        match self {
            Block::Fused(c) | Block::MbConv(c) => c,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub stem: usize,
    pub stages: Vec<Vec<Block>>,
    pub last_channel: usize,
    pub num_classes: usize,
    /// In timm's naming: timm's BN eps, and its names.
    pub timm: bool,
    /// timm's TensorFlow port: "same" padding and BN eps 1e-3.
    pub tf: bool,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "efficientnet_v2",
    detect,
    accepts,
    namings,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("efficientnet_v2")
        || arch
            .strip_prefix("tf_")
            .unwrap_or(arch)
            .starts_with("efficientnetv2")
}

/// torchvision's, and timm's where the checkpoint has timm's `blocks`.
fn namings(shapes: &Shapes) -> Vec<Naming> {
    let mut n = vec![Naming::identity("torchvision")];
    n.extend(timm_naming(shapes));
    n
}

/// torchvision's module paths to the keys of a timm checkpoint (see the module doc); `None`
/// when the checkpoint has no `blocks.0.0`.
pub fn timm_naming(shapes: &Shapes) -> Option<Naming> {
    let depths = stage_depths(shapes, |s, j| format!("blocks.{s}.{j}"));
    if depths.is_empty() {
        return None;
    }
    let head = depths.len() + 1;
    let mut r: Vec<(String, String)> = vec![
        ("features.0.0".into(), "conv_stem".into()),
        ("features.0.1".into(), "bn1".into()),
        (format!("features.{head}.0"), "conv_head".into()),
        (format!("features.{head}.1"), "bn2".into()),
        ("classifier.1".into(), "classifier".into()),
    ];
    for (s, &depth) in depths.iter().enumerate() {
        for j in 0..depth {
            let tv = format!("features.{}.{j}.block", s + 1);
            let tm = format!("blocks.{s}.{j}");
            if has_module(shapes, &format!("{tm}.conv")) {
                r.push((format!("{tv}.0.0"), format!("{tm}.conv")));
                r.push((format!("{tv}.0.1"), format!("{tm}.bn1")));
            } else {
                r.extend(timm_block_renames(shapes, &tv, &tm));
            }
        }
    }
    Some(Naming {
        name: "timm",
        renames: r,
        prefix: String::new(),
    })
}

impl Config {
    fn eps(&self) -> f64 {
        if self.timm && !self.tf {
            TIMM_EPS
        } else {
            EPS
        }
    }
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "classifier.1".into(),
            last_bn: Some(format!("features.{}.1", self.stages.len() + 1)),
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(EfficientNetV2::new(self, vb, reg)?))
    }

    fn use_naming(&mut self, naming: &Naming) {
        self.timm = naming.name == "timm";
    }

    fn set_variant(&mut self, arch: &str) {
        self.tf = self.timm && arch.starts_with("tf_");
    }

    fn answers_to(&self, arch: &str) -> bool {
        (self.tf && arch == "tf_efficientnetv2") || self.name() == arch
    }

    fn notice(&self, naming: &Naming) -> Option<String> {
        (naming.name == "timm" && !self.tf).then(|| {
            "timm EfficientNetV2: running the plain variant (symmetric padding, BN eps 1e-5); \
             the shapes cannot tell a tf_efficientnetv2 port: give --arch tf_efficientnetv2 for one"
                .to_string()
        })
    }

    fn name(&self) -> String {
        let depths: Vec<usize> = self.stages.iter().map(Vec::len).collect();
        let widths: Vec<usize> = self
            .stages
            .iter()
            .map(|s| s.last().map_or(0, |b| b.config().cout))
            .collect();
        if self.timm {
            let tf = if self.tf { "tf_" } else { "" };
            for (name, d, w, stem, head) in TIMM {
                if depths == d && widths == w && self.stem == stem && self.last_channel == head {
                    return format!("{tf}{name}");
                }
            }
            return format!("{tf}efficientnetv2 (depths {depths:?}, widths {widths:?})");
        }
        for (name, d, w, stem) in STANDARD {
            if depths == d && widths == w && self.stem == stem && self.last_channel == 1280 {
                return name.into();
            }
        }
        format!("efficientnet_v2 (depths {depths:?}, widths {widths:?})")
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("features.0.0.weight", 3)?;
    let mut n = 0;
    while p.has(&format!("features.{}.0.block.0.0.weight", n + 1)) {
        n += 1;
    }
    let strides: &[usize] = match n {
        6 => &STRIDES_S,
        7 => &STRIDES_ML,
        _ => {
            return Err(p.miss(format!(
                "{n} stages under features.N.0.block, expected 6 (S) or 7 (M, L)"
            )))
        }
    };
    let mut cin = stem;
    let mut stages = Vec::new();
    for (s, &stage_stride) in strides.iter().enumerate() {
        let mut blocks = Vec::new();
        loop {
            let b = format!("features.{}.{}.block", s + 1, blocks.len());
            if !p.has(&format!("{b}.0.0.weight")) {
                break;
            }
            let stride = if blocks.is_empty() { stage_stride } else { 1 };
            let first = p.shape(&format!("{b}.0.0.weight"), 4)?;
            let se = (1..=2).find(|o| p.has(&format!("{b}.{o}.fc1.weight")));
            let block = match se {
                None => {
                    if first[1] != cin || first[2] != first[3] || first[2] % 2 == 0 {
                        return Err(p.miss(format!(
                            "tensor {b}.0.0.weight has shape {first:?}, expected a Fused-MBConv [C, {cin}, k, k]"
                        )));
                    }
                    let expand = p.has(&format!("{b}.1.0.weight"));
                    let cout = if expand {
                        p.shape(&format!("{b}.1.0.weight"), 4)?[0]
                    } else {
                        first[0]
                    };
                    Block::Fused(BlockConfig {
                        cin,
                        hidden: first[0],
                        squeeze: 0,
                        cout,
                        kernel: first[2],
                        stride,
                        expand,
                    })
                }
                Some(o) => {
                    let expand = o == 2;
                    let hidden = if expand { first[0] } else { cin };
                    let dw = p.shape(&format!("{b}.{}.0.weight", o - 1), 4)?;
                    if dw[0] != hidden || dw[1] != 1 || dw[2] != dw[3] || dw[2] % 2 == 0 {
                        return Err(p.miss(format!(
                            "tensor {b}.{}.0.weight has shape {dw:?}, expected a depthwise [{hidden}, 1, k, k]",
                            o - 1
                        )));
                    }
                    let fc1 = p.shape(&format!("{b}.{o}.fc1.weight"), 4)?;
                    let proj = p.shape(&format!("{b}.{}.0.weight", o + 1), 4)?;
                    Block::MbConv(BlockConfig {
                        cin,
                        hidden,
                        squeeze: fc1[0],
                        cout: proj[0],
                        kernel: dw[2],
                        stride,
                        expand,
                    })
                }
            };
            cin = block.config().cout;
            blocks.push(block);
        }
        stages.push(blocks);
    }
    let head = p.shape(&format!("features.{}.0.weight", n + 1), 4)?;
    if head[1] != cin {
        return Err(p.miss(format!(
            "tensor features.{}.0.weight has shape {head:?}, expected [C, {cin}, 1, 1]",
            n + 1
        )));
    }
    let fc = p.shape("classifier.1.weight", 2)?;
    Ok(Box::new(Config {
        stem,
        stages,
        last_channel: head[0],
        num_classes: fc[0],
        timm: false,
        tf: false,
    }))
}

enum Layer {
    Fused {
        conv: Box<ConvBn>,
        project: Option<Box<ConvBn>>,
        residual: bool,
    },
    MbConv(Box<MbConv>),
}

pub struct EfficientNetV2 {
    stem: ConvBn,
    layers: Vec<Layer>,
    head: ConvBn,
    classifier: Linear,
}

impl EfficientNetV2 {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<EfficientNetV2> {
        let f = vb.pp("features");
        let eps = c.eps();
        let cna = |v: VarBuilder, spec: ConvSpec, reg: &mut BnRegistry| {
            ConvBn::new(v.pp(0), v.pp(1), spec, eps, reg)
        };
        let stem = cna(
            f.pp(0),
            ConvSpec::new(3, c.stem, 3).stride(2).same_padding(c.tf),
            reg,
        )?;
        let mut layers = Vec::new();
        for (s, stage) in c.stages.iter().enumerate() {
            for (j, b) in stage.iter().enumerate() {
                let v = f.pp(s + 1).pp(j).pp("block");
                layers.push(match b {
                    Block::Fused(k) => {
                        let conv = Box::new(cna(
                            v.pp(0),
                            ConvSpec::new(k.cin, k.hidden, k.kernel)
                                .stride(k.stride)
                                .same_padding(c.tf),
                            reg,
                        )?);
                        let project = if k.expand {
                            Some(Box::new(cna(
                                v.pp(1),
                                ConvSpec::new(k.hidden, k.cout, 1),
                                reg,
                            )?))
                        } else {
                            None
                        };
                        Layer::Fused {
                            conv,
                            project,
                            residual: k.stride == 1 && k.cin == k.cout,
                        }
                    }
                    Block::MbConv(k) => Layer::MbConv(Box::new(MbConv::new(k, v, eps, c.tf, reg)?)),
                });
            }
        }
        let cin = c
            .stages
            .last()
            .and_then(|s| s.last())
            .map_or(c.stem, |b| b.config().cout);
        let n = c.stages.len() + 1;
        let head = cna(f.pp(n), ConvSpec::new(cin, c.last_channel, 1), reg)?;
        let classifier = Linear::new(vb.pp("classifier").pp(1), c.last_channel, c.num_classes)?;
        Ok(EfficientNetV2 {
            stem,
            layers,
            head,
            classifier,
        })
    }
}

impl Network for EfficientNetV2 {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.blocks(x, ctx)?;
        let x = self.head.forward_act(&x, ctx, Act::Silu)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        self.head.trunk(&self.blocks(x, ctx)?, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.head.head(input, ctx, Act::Silu)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }
}

impl EfficientNetV2 {
    /// The stem and the Fused-MBConv and MBConv blocks.
    fn blocks(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = self.stem.forward_act(x, ctx, Act::Silu)?;
        for l in &self.layers {
            x = match l {
                Layer::Fused {
                    conv,
                    project,
                    residual,
                } => {
                    let r = if *residual { Some(&x) } else { None };
                    match project {
                        Some(p) => {
                            let y = conv.forward_act(&x, ctx, Act::Silu)?;
                            p.forward_add_act(&y, r, ctx, Act::None)?
                        }
                        // The residual comes after the activation here.
                        None => {
                            let y = conv.forward_act(&x, ctx, Act::Silu)?;
                            match r {
                                Some(r) => (y + r)?,
                                None => y,
                            }
                        }
                    }
                }
                Layer::MbConv(b) => b.forward(&x, ctx)?,
            };
        }
        Ok(x)
    }
}

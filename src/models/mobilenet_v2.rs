//! torchvision's MobileNetV2, any `width_mult` and class count.
//!
//! `features.0` is the stem (3x3, stride 2, BN, ReLU6); `features.1` to `features.17` are
//! inverted residual blocks whose `conv` holds, when the expansion is not 1, a 1x1 expansion
//! (`conv.0`), then the depthwise 3x3 (`conv.1`, or `conv.0` without expansion), the 1x1
//! projection and its BN; `features.18` is the 1x1 head to `last_channel`; `classifier.1` the
//! linear layer. Strides are not in the shapes: they are torchvision's fixed schedule over the
//! 17 blocks (the first block of the 24, 32, 64 and 160 channel groups has stride 2), so a
//! checkpoint with another number of blocks is refused rather than guessed.
//!
//! timm's `mobilenetv2_*` are the same network nested by stage: `conv_stem`/`bn1`,
//! `blocks.{s}.{j}` numbered through the stages as `features.1`... (a depthwise-separable first
//! block `conv_dw`, `bn1`, `conv_pw`, `bn2`, then inverted residuals `conv_pw`, `bn1`,
//! `conv_dw`, `bn2`, `conv_pwl`, `bn3`), `conv_head`/`bn2` and `classifier`; the same BN. Its
//! deeper `mobilenetv2_110d`/`_120d` have more than 17 blocks and are refused, as above.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Linear};
use super::naming::{has_module, stage_depths};
use super::{Architecture, Family, HeadInput, HeadPaths, Miss, Naming, Network, Probe, Shapes};

const EPS: f64 = 1e-5;
/// Stride of each of the 17 inverted residual blocks in torchvision's configuration.
const STRIDES: [usize; 17] = [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1];

/// timm's widths: (name, stem, last channel, last block's output); `mobilenetv2_100` is
/// torchvision's `mobilenet_v2`.
const TIMM: [(&str, usize, usize, usize); 5] = [
    ("mobilenetv2_035", 16, 1280, 112),
    ("mobilenetv2_050", 16, 1280, 160),
    ("mobilenetv2_075", 24, 1280, 240),
    ("mobilenetv2_100", 32, 1280, 320),
    ("mobilenetv2_140", 48, 1792, 448),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub cin: usize,
    /// Expanded (hidden) channels; equal to `cin` when there is no expansion.
    pub hidden: usize,
    pub cout: usize,
    pub expand: bool,
    pub stride: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub stem: usize,
    pub blocks: Vec<BlockConfig>,
    pub last_channel: usize,
    pub num_classes: usize,
    /// In timm's naming (its name for the size).
    pub timm: bool,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "mobilenet_v2",
    detect,
    accepts,
    namings,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("mobilenet_v2") || arch.starts_with("mobilenetv2")
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
    // timm's EfficientNets and MobileNetV3s share these block names; MobileNetV2 has no
    // squeeze-excite.
    let se = |s: usize, j: usize| has_module(shapes, &format!("blocks.{s}.{j}.se"));
    if depths.is_empty() || (0..depths.len()).any(|s| (0..depths[s]).any(|j| se(s, j))) {
        return None;
    }
    let head = depths.iter().sum::<usize>() + 1;
    let mut r: Vec<(String, String)> = vec![
        ("features.0.0".into(), "conv_stem".into()),
        ("features.0.1".into(), "bn1".into()),
        (format!("features.{head}.0"), "conv_head".into()),
        (format!("features.{head}.1"), "bn2".into()),
        ("classifier.1".into(), "classifier".into()),
    ];
    let mut i = 1;
    for (s, &depth) in depths.iter().enumerate() {
        for j in 0..depth {
            let tm = format!("blocks.{s}.{j}");
            let leaves: &[(&str, &str)] = if has_module(shapes, &format!("{tm}.conv_pwl")) {
                &[
                    ("0.0", "conv_pw"),
                    ("0.1", "bn1"),
                    ("1.0", "conv_dw"),
                    ("1.1", "bn2"),
                    ("2", "conv_pwl"),
                    ("3", "bn3"),
                ]
            } else {
                &[
                    ("0.0", "conv_dw"),
                    ("0.1", "bn1"),
                    ("1", "conv_pw"),
                    ("2", "bn2"),
                ]
            };
            for (a, b) in leaves {
                r.push((format!("features.{i}.conv.{a}"), format!("{tm}.{b}")));
            }
            i += 1;
        }
    }
    Some(Naming {
        name: "timm",
        renames: r,
        prefix: String::new(),
    })
}

impl Architecture for Config {
    fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The 1x1 head's BN, and `classifier.1` (after dropout).
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "classifier.1".into(),
            last_bn: Some("features.18.1".into()),
        }
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(MobileNetV2::new(self, vb, reg)?))
    }

    fn use_naming(&mut self, naming: &Naming) {
        self.timm = naming.name == "timm";
    }

    fn name(&self) -> String {
        let out = self.blocks.last().map_or(0, |b| b.cout);
        let (table, variant) = if self.timm {
            (&TIMM[..], "mobilenetv2")
        } else {
            (&TIMM[3..4], "mobilenet_v2")
        };
        for &(name, stem, last, o) in table {
            if (stem, last, o) == (self.stem, self.last_channel, out) {
                return if self.timm {
                    name.into()
                } else {
                    variant.into()
                };
            }
        }
        format!(
            "{variant} (stem {}, last channel {})",
            self.stem, self.last_channel
        )
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("features.0.0.weight", 3)?;
    let mut cin = stem;
    let mut blocks = Vec::new();
    for (i, &stride) in STRIDES.iter().enumerate() {
        let f = format!("features.{}.conv", i + 1);
        let expand = p.has(&format!("{f}.3.weight"));
        let hidden = if expand {
            let hidden = p.shape(&format!("{f}.0.0.weight"), 4)?[0];
            p.expect(&format!("{f}.1.0.weight"), &[hidden, 1, 3, 3])?;
            hidden
        } else {
            p.expect(&format!("{f}.0.0.weight"), &[cin, 1, 3, 3])?;
            cin
        };
        let proj = p.shape(&format!("{f}.{}.weight", if expand { 2 } else { 1 }), 4)?;
        blocks.push(BlockConfig {
            cin,
            hidden,
            cout: proj[0],
            expand,
            stride,
        });
        cin = proj[0];
    }
    if p.has("features.19.0.weight") || p.has("features.19.conv.0.0.weight") {
        return Err(p.miss("more than torchvision's 17 inverted residual blocks"));
    }
    let head = p.shape("features.18.0.weight", 4)?;
    let fc = p.shape("classifier.1.weight", 2)?;
    Ok(Box::new(Config {
        stem,
        blocks,
        last_channel: head[0],
        num_classes: fc[0],
        timm: false,
    }))
}

struct Block {
    layers: Vec<ConvBn>,
    residual: bool,
}

pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<Block>,
    head: ConvBn,
    classifier: Linear,
}

impl MobileNetV2 {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<MobileNetV2> {
        let f = vb.pp("features");
        let cbr = |v: VarBuilder, spec: ConvSpec, reg: &mut BnRegistry| {
            ConvBn::new(v.pp(0), v.pp(1), spec, EPS, reg)
        };
        let stem = cbr(f.pp(0), ConvSpec::new(3, c.stem, 3).stride(2), reg)?;
        let mut blocks = Vec::new();
        for (i, b) in c.blocks.iter().enumerate() {
            let v = f.pp(i + 1).pp("conv");
            let mut layers = Vec::new();
            let mut k = 0;
            if b.expand {
                layers.push(cbr(v.pp(0), ConvSpec::new(b.cin, b.hidden, 1), reg)?);
                k = 1;
            }
            layers.push(cbr(
                v.pp(k),
                ConvSpec::new(b.hidden, b.hidden, 3)
                    .stride(b.stride)
                    .groups(b.hidden),
                reg,
            )?);
            layers.push(ConvBn::new(
                v.pp(k + 1),
                v.pp(k + 2),
                ConvSpec::new(b.hidden, b.cout, 1),
                EPS,
                reg,
            )?);
            blocks.push(Block {
                layers,
                residual: b.stride == 1 && b.cin == b.cout,
            });
        }
        let cin = c.blocks.last().map_or(c.stem, |b| b.cout);
        let head = cbr(f.pp(18), ConvSpec::new(cin, c.last_channel, 1), reg)?;
        let classifier = Linear::new(vb.pp("classifier").pp(1), c.last_channel, c.num_classes)?;
        Ok(MobileNetV2 {
            stem,
            blocks,
            head,
            classifier,
        })
    }
}

impl Network for MobileNetV2 {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.blocks(x, ctx)?;
        let x = self.head.forward_act(&x, ctx, Act::Relu6)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        self.head.trunk(&self.blocks(x, ctx)?, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.head.head(input, ctx, Act::Relu6)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }
}

impl MobileNetV2 {
    /// The stem and the inverted residual blocks.
    fn blocks(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = self.stem.forward_act(x, ctx, Act::Relu6)?;
        for b in &self.blocks {
            let (last, inner) = b.layers.split_last().expect("a block has layers");
            let mut y = x.clone();
            for l in inner {
                y = l.forward_act(&y, ctx, Act::Relu6)?;
            }
            let residual = if b.residual { Some(&x) } else { None };
            x = last.forward_add_act(&y, residual, ctx, Act::None)?;
        }
        Ok(x)
    }
}

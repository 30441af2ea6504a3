//! torchvision's RegNetX and RegNetY: every published size (`regnet_x_400mf` ...
//! `regnet_y_128gf`) and any other depths, widths, group widths or bottleneck widths the shapes
//! imply.
//!
//! `stem` is a 3x3 stride-2 convolution, BN, ReLU. `trunk_output.block{s}` (s = 1..4) holds
//! blocks `block{s}-{j}`, each a `ResBottleneckBlock`: an optional projection `proj` (1x1 with
//! the block's stride, BN), and `f`: `a` (1x1, BN, ReLU), `b` (3x3 grouped with the stride, BN,
//! ReLU), for RegNetY a squeeze-excitation `se` (`fc1`, ReLU, `fc2`, sigmoid), and `c` (1x1,
//! BN); the block's output is ReLU(proj(x) + f(x)). Then global pooling and `fc`. Widths,
//! groups (bottleneck width over `b`'s input channels per group) and squeeze widths are read per
//! block; the stride is 2 in the first block of each stage, as in every torchvision RegNet.
//!
//! timm's `regnetx_*` and `regnety_*` are the same network: `stem.conv`/`stem.bn`, stages
//! `s{s}` of blocks `b{j+1}` for `block{s}-{j}` (`conv1`, `conv2`, `se`, `conv3`, each a
//! `conv`/`bn` pair but `se`'s `fc1`/`fc2`, and `downsample` for `proj`), and `head.fc`;
//! squeeze-excite in the same place (after the 3x3), BN eps and momentum the same. timm
//! computes the shortcut's projection after `f`; the BN layers are listed in torchvision's order
//! either way, and each one's statistics are the same.
//!
//! torchvision computes `proj(x)` before `f(x)`, so the projection's BN comes first in forward
//! order (and in calibrate mode's reports).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{
    global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Gate, Linear, SqueezeExcite,
};
use super::naming::stage_depths;
use super::{Architecture, Family, HeadInput, HeadPaths, Miss, Naming, Network, Probe, Shapes};

const EPS: f64 = 1e-5;
/// torchvision's published sizes: (name, blocks per stage, stage widths); a `regnet_y` has
/// squeeze-excitations, a `regnet_x` none. The stem is 32 wide in all.
const STANDARD: [(&str, [usize; 4], [usize; 4]); 15] = [
    ("regnet_x_400mf", [1, 2, 7, 12], [32, 64, 160, 400]),
    ("regnet_x_800mf", [1, 3, 7, 5], [64, 128, 288, 672]),
    ("regnet_x_1_6gf", [2, 4, 10, 2], [72, 168, 408, 912]),
    ("regnet_x_3_2gf", [2, 6, 15, 2], [96, 192, 432, 1008]),
    ("regnet_x_8gf", [2, 5, 15, 1], [80, 240, 720, 1920]),
    ("regnet_x_16gf", [2, 6, 13, 1], [256, 512, 896, 2048]),
    ("regnet_x_32gf", [2, 7, 13, 1], [336, 672, 1344, 2520]),
    ("regnet_y_400mf", [1, 3, 6, 6], [48, 104, 208, 440]),
    ("regnet_y_800mf", [1, 3, 8, 2], [64, 144, 320, 784]),
    ("regnet_y_1_6gf", [2, 6, 17, 2], [48, 120, 336, 888]),
    ("regnet_y_3_2gf", [2, 5, 13, 1], [72, 216, 576, 1512]),
    ("regnet_y_8gf", [2, 4, 10, 1], [224, 448, 896, 2016]),
    ("regnet_y_16gf", [2, 4, 11, 1], [224, 448, 1232, 3024]),
    ("regnet_y_32gf", [2, 5, 12, 1], [232, 696, 1392, 3712]),
    ("regnet_y_128gf", [2, 7, 17, 1], [528, 1056, 2904, 7392]),
];
/// timm's sizes, as [`STANDARD`] (`regnety_002` has `regnetx_002`'s stages, `regnetx_004_tv`
/// is torchvision's `regnet_x_400mf`).
const TIMM: [(&str, [usize; 4], [usize; 4]); 30] = [
    ("regnetx_002", [1, 1, 4, 7], [24, 56, 152, 368]),
    ("regnetx_004", [1, 2, 7, 12], [32, 64, 160, 384]),
    ("regnetx_004_tv", [1, 2, 7, 12], [32, 64, 160, 400]),
    ("regnetx_006", [1, 3, 5, 7], [48, 96, 240, 528]),
    ("regnetx_008", [1, 3, 7, 5], [64, 128, 288, 672]),
    ("regnetx_016", [2, 4, 10, 2], [72, 168, 408, 912]),
    ("regnetx_032", [2, 6, 15, 2], [96, 192, 432, 1008]),
    ("regnetx_040", [2, 5, 14, 2], [80, 240, 560, 1360]),
    ("regnetx_064", [2, 4, 10, 1], [168, 392, 784, 1624]),
    ("regnetx_080", [2, 5, 15, 1], [80, 240, 720, 1920]),
    ("regnetx_120", [2, 5, 11, 1], [224, 448, 896, 2240]),
    ("regnetx_160", [2, 6, 13, 1], [256, 512, 896, 2048]),
    ("regnetx_320", [2, 7, 13, 1], [336, 672, 1344, 2520]),
    ("regnety_002", [1, 1, 4, 7], [24, 56, 152, 368]),
    ("regnety_004", [1, 3, 6, 6], [48, 104, 208, 440]),
    ("regnety_006", [1, 3, 7, 4], [48, 112, 256, 608]),
    ("regnety_008", [1, 3, 8, 2], [64, 128, 320, 768]),
    ("regnety_008_tv", [1, 3, 8, 2], [64, 144, 320, 784]),
    ("regnety_016", [2, 6, 17, 2], [48, 120, 336, 888]),
    ("regnety_032", [2, 5, 13, 1], [72, 216, 576, 1512]),
    ("regnety_040", [2, 6, 12, 2], [128, 192, 512, 1088]),
    ("regnety_064", [2, 7, 14, 2], [144, 288, 576, 1296]),
    ("regnety_080", [2, 4, 10, 1], [168, 448, 896, 2016]),
    ("regnety_080_tv", [2, 4, 10, 1], [224, 448, 896, 2016]),
    ("regnety_120", [2, 5, 11, 1], [224, 448, 896, 2240]),
    ("regnety_160", [2, 4, 11, 1], [224, 448, 1232, 3024]),
    ("regnety_320", [2, 5, 12, 1], [232, 696, 1392, 3712]),
    ("regnety_640", [2, 5, 12, 1], [328, 984, 1968, 4920]),
    ("regnety_1280", [2, 7, 17, 1], [528, 1056, 2904, 7392]),
    ("regnety_2560", [2, 7, 17, 1], [746, 1492, 4103, 10444]),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub cin: usize,
    /// Bottleneck width (`a`'s and `b`'s output channels).
    pub width: usize,
    pub groups: usize,
    /// Squeeze-excitation width (RegNetY).
    pub squeeze: Option<usize>,
    pub cout: usize,
    pub stride: usize,
    pub proj: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub stem: usize,
    pub stages: Vec<Vec<BlockConfig>>,
    pub num_classes: usize,
    /// In timm's naming (its names for the sizes).
    pub timm: bool,
}

impl Config {
    fn is_y(&self) -> bool {
        self.stages.iter().flatten().any(|b| b.squeeze.is_some())
    }
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "regnet",
    detect,
    accepts,
    namings,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("regnet")
}

/// torchvision's, and timm's where the checkpoint has timm's `s1.b1`.
fn namings(shapes: &Shapes) -> Vec<Naming> {
    let mut n = vec![Naming::identity("torchvision")];
    n.extend(timm_naming(shapes));
    n
}

/// torchvision's module paths to the keys of a timm checkpoint (see the module doc); `None`
/// when the checkpoint has no `s1.b1`.
pub fn timm_naming(shapes: &Shapes) -> Option<Naming> {
    let depths = stage_depths(shapes, |s, j| format!("s{}.b{}", s + 1, j + 1));
    if depths.is_empty() {
        return None;
    }
    let mut r: Vec<(String, String)> = [
        ("stem.0", "stem.conv"),
        ("stem.1", "stem.bn"),
        ("fc", "head.fc"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .into();
    const LEAVES: [(&str, &str); 10] = [
        ("f.a.0", "conv1.conv"),
        ("f.a.1", "conv1.bn"),
        ("f.b.0", "conv2.conv"),
        ("f.b.1", "conv2.bn"),
        ("f.se.fc1", "se.fc1"),
        ("f.se.fc2", "se.fc2"),
        ("f.c.0", "conv3.conv"),
        ("f.c.1", "conv3.bn"),
        ("proj.0", "downsample.conv"),
        ("proj.1", "downsample.bn"),
    ];
    for (s, &depth) in depths.iter().enumerate() {
        for j in 0..depth {
            let tv = format!("trunk_output.block{s}.block{s}-{j}", s = s + 1);
            let tm = format!("s{}.b{}", s + 1, j + 1);
            for (a, b) in LEAVES {
                r.push((format!("{tv}.{a}"), format!("{tm}.{b}")));
            }
        }
    }
    Some(Naming {
        name: "timm",
        renames: r,
        prefix: String::new(),
    })
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        let s = self.stages.len();
        let j = self.stages.last().map_or(0, |b| b.len().saturating_sub(1));
        HeadPaths {
            classifier: "fc".into(),
            last_bn: Some(format!("trunk_output.block{s}.block{s}-{j}.f.c.1")),
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(RegNet::new(self, vb, reg)?))
    }

    fn use_naming(&mut self, naming: &Naming) {
        self.timm = naming.name == "timm";
    }

    fn name(&self) -> String {
        let depths: Vec<usize> = self.stages.iter().map(Vec::len).collect();
        let widths: Vec<usize> = self
            .stages
            .iter()
            .map(|s| s.last().map_or(0, |b| b.cout))
            .collect();
        let (variant, table) = match (self.is_y(), self.timm) {
            (false, false) => ("regnet_x", &STANDARD[..]),
            (true, false) => ("regnet_y", &STANDARD[..]),
            (false, true) => ("regnetx", &TIMM[..]),
            (true, true) => ("regnety", &TIMM[..]),
        };
        for &(name, d, w) in table {
            if name.starts_with(variant) && self.stem == 32 && depths == d && widths == w {
                return name.into();
            }
        }
        let group_widths: Vec<usize> = self
            .stages
            .iter()
            .map(|s| s.first().map_or(0, |b| b.width / b.groups))
            .collect();
        format!("{variant} (depths {depths:?}, widths {widths:?}, group widths {group_widths:?})")
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("stem.0.weight", 3)?;
    p.expect("stem.1.running_mean", &[stem])?;
    let mut cin = stem;
    let mut stages = Vec::new();
    for s in 1..=4 {
        let mut blocks = Vec::new();
        loop {
            let b = format!("trunk_output.block{s}.block{s}-{}", blocks.len());
            if !p.has(&format!("{b}.f.a.0.weight")) {
                break;
            }
            let a = p.shape(&format!("{b}.f.a.0.weight"), 4)?;
            if a[1..] != [cin, 1, 1] {
                return Err(p.miss(format!(
                    "tensor {b}.f.a.0.weight has shape {a:?}, expected [W, {cin}, 1, 1]"
                )));
            }
            let width = a[0];
            let bw = p.shape(&format!("{b}.f.b.0.weight"), 4)?;
            if bw[0] != width || bw[1] == 0 || width % bw[1] != 0 || bw[2..] != [3, 3] {
                return Err(p.miss(format!(
                    "tensor {b}.f.b.0.weight has shape {bw:?}, expected a grouped [{width}, {width} / groups, 3, 3]"
                )));
            }
            let squeeze = if p.has(&format!("{b}.f.se.fc1.weight")) {
                Some(p.shape(&format!("{b}.f.se.fc1.weight"), 4)?[0])
            } else {
                None
            };
            let c = p.shape(&format!("{b}.f.c.0.weight"), 4)?;
            let first = blocks.is_empty();
            blocks.push(BlockConfig {
                cin,
                width,
                groups: width / bw[1],
                squeeze,
                cout: c[0],
                stride: if first { 2 } else { 1 },
                proj: p.has(&format!("{b}.proj.0.weight")),
            });
            cin = c[0];
        }
        if blocks.is_empty() {
            return Err(p.miss(format!(
                "no tensor trunk_output.block{s}.block{s}-0.f.a.0.weight"
            )));
        }
        stages.push(blocks);
    }
    let fc = p.shape("fc.weight", 2)?;
    if fc[1] != cin {
        return Err(p.miss(format!(
            "tensor fc.weight has shape {fc:?}, expected [classes, {cin}]"
        )));
    }
    Ok(Box::new(Config {
        stem,
        stages,
        num_classes: fc[0],
        timm: false,
    }))
}

struct Block {
    proj: Option<ConvBn>,
    a: ConvBn,
    b: ConvBn,
    se: Option<SqueezeExcite>,
    c: ConvBn,
}

impl Block {
    fn new(k: &BlockConfig, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Block> {
        let cna = |v: VarBuilder, spec: ConvSpec, reg: &mut BnRegistry| {
            ConvBn::new(v.pp(0), v.pp(1), spec, EPS, reg)
        };
        let proj = if k.proj {
            Some(cna(
                vb.pp("proj"),
                ConvSpec::new(k.cin, k.cout, 1).stride(k.stride),
                reg,
            )?)
        } else {
            if k.stride != 1 || k.cin != k.cout {
                candle_core::bail!("no tensor {}.proj.0.weight", vb.prefix());
            }
            None
        };
        let f = vb.pp("f");
        let a = cna(f.pp("a"), ConvSpec::new(k.cin, k.width, 1), reg)?;
        let b = cna(
            f.pp("b"),
            ConvSpec::new(k.width, k.width, 3)
                .stride(k.stride)
                .groups(k.groups),
            reg,
        )?;
        let se = match k.squeeze {
            Some(s) => Some(SqueezeExcite::new(
                f.pp("se"),
                k.width,
                s,
                Act::Relu,
                Gate::Sigmoid,
            )?),
            None => None,
        };
        let c = cna(f.pp("c"), ConvSpec::new(k.width, k.cout, 1), reg)?;
        Ok(Block { proj, a, b, se, c })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        // The projection first, as torchvision computes it (BN forward order).
        let identity = match &self.proj {
            Some(p) => p.forward(x, ctx)?,
            None => x.clone(),
        };
        let y = self.a.forward_relu(x, ctx)?;
        let mut y = self.b.forward_relu(&y, ctx)?;
        if let Some(se) = &self.se {
            y = se.forward(&y, ctx)?;
        }
        self.c.forward_add_act(&y, Some(&identity), ctx, Act::Relu)
    }

    /// `forward` up to `c`'s BN: its input and the shortcut.
    fn trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let identity = match &self.proj {
            Some(p) => p.forward(x, ctx)?,
            None => x.clone(),
        };
        let y = self.a.forward_relu(x, ctx)?;
        let mut y = self.b.forward_relu(&y, ctx)?;
        if let Some(se) = &self.se {
            y = se.forward(&y, ctx)?;
        }
        Ok(HeadInput {
            x: self.c.conv.forward(&y, ctx)?,
            residual: Some(identity),
        })
    }
}

pub struct RegNet {
    stem: ConvBn,
    blocks: Vec<Block>,
    fc: Linear,
}

impl RegNet {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<RegNet> {
        let stem = ConvBn::new(
            vb.pp("stem").pp(0),
            vb.pp("stem").pp(1),
            ConvSpec::new(3, c.stem, 3).stride(2),
            EPS,
            reg,
        )?;
        let t = vb.pp("trunk_output");
        let mut blocks = Vec::new();
        for (s, stage) in c.stages.iter().enumerate() {
            let vs = t.pp(format!("block{}", s + 1));
            for (j, b) in stage.iter().enumerate() {
                blocks.push(Block::new(b, vs.pp(format!("block{}-{j}", s + 1)), reg)?);
            }
        }
        let cin = c
            .stages
            .last()
            .and_then(|s| s.last())
            .map_or(c.stem, |b| b.cout);
        let fc = Linear::new(vb.pp("fc"), cin, c.num_classes)?;
        Ok(RegNet { stem, blocks, fc })
    }
}

impl Network for RegNet {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = self.stem.forward_relu(x, ctx)?;
        for b in &self.blocks {
            x = b.forward(&x, ctx)?;
        }
        self.fc.forward(&global_avg_pool(&x)?)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let (last, rest) = self
            .blocks
            .split_last()
            .expect("detection requires a block");
        let mut x = self.stem.forward_relu(x, ctx)?;
        for b in rest {
            x = b.forward(&x, ctx)?;
        }
        last.trunk(&x, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let last = self.blocks.last().expect("detection requires a block");
        let r = input.residual.as_ref();
        let x = last.c.bn.forward_add_act(&input.x, r, ctx, Act::Relu)?;
        self.fc.forward(&global_avg_pool(&x)?)
    }
}

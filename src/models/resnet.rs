//! torchvision's ResNet family: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d/64x4d,
//! wide_resnet50_2/101_2, and any other stage depths, widths, groups or class counts built from
//! `BasicBlock` or `Bottleneck` (v1.5: the stride is on the 3x3 convolution).
//!
//! timm's ResNets use the same module names, and the variants timm adds on the same layout are
//! options of this one structure, each read off the shapes (issue 16):
//!
//! - the deep stem of ResNet-C/D/S/E (`conv1.0`, `conv1.3`, `conv1.6`: three 3x3 convolutions,
//!   the first with stride 2, BN `conv1.1`, `conv1.4` and `bn1`, ReLU between) instead of the 7x7;
//! - ResNet-D's average-pool projection (`downsample.1` conv, `downsample.2` BN after
//!   `AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)` at index 0, which has no
//!   tensors) instead of the strided 1x1 `downsample.0`/`.1`;
//! - SE-ResNet/SE-ResNeXt's squeeze-excitation after the last BN of each block (`se.fc1`,
//!   `se.fc2` with biases, ReLU then sigmoid), before the shortcut is added.
//!
//! Detection reads: the stem from `conv1.weight` (or the deep stem's three), blocks per stage
//! from the `layer{s}.{i}` indices, the block type from the presence of `conv3`, inner widths
//! and groups from each stage's first `conv2.weight` [width, width / groups, 3, 3], output widths
//! from the last convolution, SE widths from `se.fc1`, and the classes from `fc.weight`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::fused::add_act_owned;
use super::layers::{
    avg_pool_2x2_s2_ceil, global_avg_pool, max_pool_3x3_s2_p1, Act, BnMode, BnRegistry, ConvBn,
    ConvSpec, Ctx, Gate, Linear, SqueezeExcite,
};
use super::{
    torchvision_naming, Architecture, Family, HeadInput, HeadPaths, Miss, Network, Probe, Shapes,
};

const EPS: f64 = 1e-5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub bottleneck: bool,
    pub stem: usize,
    pub blocks: [usize; 4],
    /// Inner width of each stage (conv1's output channels).
    pub widths: [usize; 4],
    /// Output channels of each stage.
    pub outs: [usize; 4],
    pub groups: usize,
    pub num_classes: usize,
    /// timm's deep stem: the widths of `conv1.0` and `conv1.3` (`conv1.6` gives `stem`); `None`
    /// for the 7x7 `conv1`.
    pub deep_stem: Option<[usize; 2]>,
    /// timm's average-pool projection (`downsample.1`, `downsample.2`).
    pub avg_down: bool,
    /// Squeeze width of each stage's SE module (timm's `se.fc1`), 0 for none.
    pub se: [usize; 4],
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "resnet",
    detect,
    accepts,
    namings: torchvision_naming,
};

pub fn accepts(arch: &str) -> bool {
    arch == "resnet"
        || arch.starts_with("resnet")
        || arch.starts_with("resnext")
        || arch.starts_with("wide_resnet")
        || arch.starts_with("seresne")
}

impl Architecture for Config {
    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(ResNet::new(self, vb, reg)?))
    }

    /// The last block's last BN on the main path (`bn3`, `bn2` in a BasicBlock), as the seed's
    /// `layer4[2].bn3`; a projection in that block (`downsample.1`) is the shortcut's.
    fn head(&self) -> HeadPaths {
        let n = if self.bottleneck { 3 } else { 2 };
        HeadPaths {
            classifier: "fc".into(),
            last_bn: Some(format!("layer4.{}.bn{n}", self.blocks[3] - 1)),
        }
    }

    fn name(&self) -> String {
        let std_names: [(&str, bool, [usize; 4], usize, usize); 10] = [
            ("resnet18", false, [2, 2, 2, 2], 1, 64),
            ("resnet34", false, [3, 4, 6, 3], 1, 64),
            ("resnet50", true, [3, 4, 6, 3], 1, 64),
            ("resnet101", true, [3, 4, 23, 3], 1, 64),
            ("resnet152", true, [3, 8, 36, 3], 1, 64),
            ("resnext50_32x4d", true, [3, 4, 6, 3], 32, 128),
            ("resnext101_32x8d", true, [3, 4, 23, 3], 32, 256),
            ("resnext101_64x4d", true, [3, 4, 23, 3], 64, 256),
            ("wide_resnet50_2", true, [3, 4, 6, 3], 1, 128),
            ("wide_resnet101_2", true, [3, 4, 23, 3], 1, 128),
        ];
        let standard_outs = if self.bottleneck {
            [256, 512, 1024, 2048]
        } else {
            [64, 128, 256, 512]
        };
        // timm's letters for the stem and projection (resnet50d: deep stem 32, 32, 64 and
        // average-pool projection).
        let letter = match (self.deep_stem, self.stem, self.avg_down) {
            (None, 64, false) => Some(""),
            (Some([32, 32]), 64, false) => Some("c"),
            (Some([32, 32]), 64, true) => Some("d"),
            (Some([64, 64]), 128, false) => Some("s"),
            (Some([64, 64]), 128, true) => Some("e"),
            _ => None,
        };
        let se = self.se.iter().any(|&w| w > 0);
        for (name, b, blocks, groups, w0) in std_names {
            let Some(letter) = letter else { break };
            if b == self.bottleneck
                && blocks == self.blocks
                && groups == self.groups
                && w0 == self.widths[0]
                && self.outs == standard_outs
            {
                // resnext50_32x4d -> resnext50d_32x4d, as timm names them.
                let (base, rest) = name.split_at(name.find('_').unwrap_or(name.len()));
                let se = if se { "se" } else { "" };
                return format!("{se}{base}{letter}{rest}");
            }
        }
        let mut extras = String::new();
        if let Some([a, b]) = self.deep_stem {
            extras += &format!(", deep stem [{a}, {b}, {}]", self.stem);
        }
        if self.avg_down {
            extras += ", average-pool projection";
        }
        if se {
            extras += &format!(", SE {:?}", self.se);
        }
        format!(
            "resnet ({} {:?}, widths {:?}, groups {}{extras})",
            if self.bottleneck {
                "Bottleneck"
            } else {
                "BasicBlock"
            },
            self.blocks,
            self.widths,
            self.groups
        )
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let (stem, deep_stem) = if p.has("conv1.0.weight") {
        let a = p.stem_channels("conv1.0.weight", 3)?;
        p.expect("conv1.1.running_mean", &[a])?;
        let b = p.shape("conv1.3.weight", 4)?[0];
        p.expect("conv1.3.weight", &[b, a, 3, 3])?;
        p.expect("conv1.4.running_mean", &[b])?;
        let stem = p.shape("conv1.6.weight", 4)?[0];
        p.expect("conv1.6.weight", &[stem, b, 3, 3])?;
        (stem, Some([a, b]))
    } else {
        (p.stem_channels("conv1.weight", 7)?, None)
    };
    p.expect("bn1.running_mean", &[stem])?;
    // A 4-d `downsample.1` is timm's average-pool projection's conv (torchvision's is a BN).
    let avg_down = (1..=4).any(|s| {
        shapes
            .get(&format!("layer{s}.0.downsample.1.weight"))
            .is_some_and(|w| w.len() == 4)
    });
    let mut se = [0; 4];
    let bottleneck = p.has("layer1.0.conv3.weight");
    let mut blocks = [0; 4];
    let mut widths = [0; 4];
    let mut outs = [0; 4];
    let mut groups = 1;
    for s in 0..4 {
        let layer = format!("layer{}", s + 1);
        while p.has(&format!("{layer}.{}.conv1.weight", blocks[s])) {
            blocks[s] += 1;
        }
        if blocks[s] == 0 {
            return Err(p.miss(format!("no tensor {layer}.0.conv1.weight")));
        }
        let c1 = p.shape(&format!("{layer}.0.conv1.weight"), 4)?;
        let c2 = p.shape(&format!("{layer}.0.conv2.weight"), 4)?;
        widths[s] = c1[0];
        if bottleneck {
            if c2[1] == 0 || c2[0] % c2[1] != 0 {
                return Err(p.miss(format!(
                    "tensor {layer}.0.conv2.weight has shape {c2:?}, not a grouped 3x3"
                )));
            }
            let g = c2[0] / c2[1];
            if s > 0 && g != groups {
                return Err(p.miss(format!("{layer} has {g} groups, layer1 has {groups}")));
            }
            groups = g;
            outs[s] = p.shape(&format!("{layer}.0.conv3.weight"), 4)?[0];
        } else {
            outs[s] = c2[0];
        }
        let fc1 = format!("{layer}.0.se.fc1.weight");
        if p.has(&fc1) {
            se[s] = p.shape(&fc1, 4)?[0];
        } else if s > 0 && se[0] > 0 {
            return Err(p.miss(format!("no tensor {fc1} (layer1 has SE)")));
        }
    }
    let fc = p.shape("fc.weight", 2)?;
    if fc[1] != outs[3] {
        return Err(p.miss(format!(
            "tensor fc.weight has shape {fc:?}, expected [classes, {}]",
            outs[3]
        )));
    }
    Ok(Box::new(Config {
        bottleneck,
        stem,
        blocks,
        widths,
        outs,
        groups,
        num_classes: fc[0],
        deep_stem,
        avg_down,
        se,
    }))
}

/// The shortcut's projection: a strided 1x1 conv and BN, or (timm's ResNet-D) a 2x2 average
/// pool then a 1x1 conv and BN.
struct Projection {
    pool: bool,
    conv: ConvBn,
}

impl Projection {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        if self.pool {
            return self.conv.forward(&avg_pool_2x2_s2_ceil(x)?, ctx);
        }
        self.conv.forward(x, ctx)
    }
}

struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<Projection>,
    se: Option<SqueezeExcite>,
}

impl Block {
    /// The block over `x`, taken by value: with every BN in eval mode, the output is written
    /// over the shortcut (the projection's fresh output, or `x` itself, which the caller hands
    /// over and nobody else holds), so the block's end keeps one output-sized tensor, not two.
    fn forward(&self, x: Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (last, inner) = self.convs.split_last().expect("a block has convolutions");
        let mut y = inner
            .first()
            .expect("a block has two convolutions or more")
            .forward_relu(&x, ctx)?;
        for c in &inner[1..] {
            y = c.forward_relu(&y, ctx)?;
        }
        let identity = |ctx: &mut Ctx, x: Tensor| match &self.downsample {
            Some(d) => d.forward(&x, ctx),
            None => Ok(x),
        };
        let own_eval = self
            .convs
            .iter()
            .chain(self.downsample.as_ref().map(|d| &d.conv))
            .all(|c| ctx.mode_of(c.bn.index) == BnMode::Eval);
        // The sum and ReLU are written over the block's fresh output where the kernels allow
        // (`add_act_owned`), so that calibrate mode holds no further activation for them.
        if let Some(se) = &self.se {
            let y = se.forward(&last.forward(&y, ctx)?, ctx)?;
            return add_act_owned(ctx.kernels, y, &identity(ctx, x)?, Act::Relu);
        }
        if !own_eval {
            // BN layers report (and train-mode layers update) in torchvision's forward order:
            // the last conv's before the projection's. A block whose BNs are all in eval mode
            // (the frozen blocks of a FixRes fine-tune) keeps the fused path below.
            let y = last.forward(&y, ctx)?;
            return add_act_owned(ctx.kernels, y, &identity(ctx, x)?, Act::Relu);
        }
        let identity = identity(ctx, x)?;
        last.forward_add_act_into(&y, identity, ctx, Act::Relu)
    }

    /// The block up to its last BN: that BN's input (the last convolution's output) and the
    /// shortcut. The projection's BN, if any, runs before the last BN here, unlike in
    /// `forward`: only the head BN is out of eval mode where this runs, so the order changes
    /// nothing.
    fn trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let (last, inner) = self.convs.split_last().expect("a block has convolutions");
        let mut y = x.clone();
        for c in inner {
            y = c.forward_relu(&y, ctx)?;
        }
        let residual = match &self.downsample {
            Some(d) => d.forward(x, ctx)?,
            None => x.clone(),
        };
        Ok(HeadInput {
            x: last.conv.forward(&y, ctx)?,
            residual: Some(residual),
        })
    }

    fn head_bn(&self) -> &ConvBn {
        self.convs.last().expect("a block has convolutions")
    }
}

pub struct ResNet {
    /// One conv (torchvision's 7x7) or three (timm's deep stem), each with BN and ReLU.
    stem: Vec<ConvBn>,
    stages: Vec<Vec<Block>>,
    fc: Linear,
}

impl ResNet {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<ResNet> {
        let stem = match c.deep_stem {
            None => vec![ConvBn::new(
                vb.pp("conv1"),
                vb.pp("bn1"),
                ConvSpec::new(3, c.stem, 7).stride(2),
                EPS,
                reg,
            )?],
            Some([a, b]) => {
                let v = vb.pp("conv1");
                vec![
                    ConvBn::new(v.pp(0), v.pp(1), ConvSpec::new(3, a, 3).stride(2), EPS, reg)?,
                    ConvBn::new(v.pp(3), v.pp(4), ConvSpec::new(a, b, 3), EPS, reg)?,
                    ConvBn::new(v.pp(6), vb.pp("bn1"), ConvSpec::new(b, c.stem, 3), EPS, reg)?,
                ]
            }
        };
        let mut cin = c.stem;
        let mut stages = Vec::new();
        for s in 0..4 {
            let vs = vb.pp(format!("layer{}", s + 1));
            let mut blocks = Vec::new();
            for i in 0..c.blocks[s] {
                let vbk = vs.pp(i);
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let (w, out) = (c.widths[s], c.outs[s]);
                let cb = |name: &str, spec: ConvSpec, reg: &mut BnRegistry| {
                    let n = name.chars().last().unwrap();
                    ConvBn::new(vbk.pp(name), vbk.pp(format!("bn{n}")), spec, EPS, reg)
                };
                let convs = if c.bottleneck {
                    vec![
                        cb("conv1", ConvSpec::new(cin, w, 1), reg)?,
                        cb(
                            "conv2",
                            ConvSpec::new(w, w, 3).stride(stride).groups(c.groups),
                            reg,
                        )?,
                        cb("conv3", ConvSpec::new(w, out, 1), reg)?,
                    ]
                } else {
                    vec![
                        cb("conv1", ConvSpec::new(cin, w, 3).stride(stride), reg)?,
                        cb("conv2", ConvSpec::new(w, out, 3), reg)?,
                    ]
                };
                // torchvision adds a projection whenever the shape changes; trust the
                // checkpoint on whether one is there.
                let d = vbk.pp("downsample");
                let (conv_at, pool) = if c.avg_down {
                    (1, stride > 1)
                } else {
                    (0, false)
                };
                let downsample = if d.contains_tensor(&format!("{conv_at}.weight")) {
                    let spec = ConvSpec::new(cin, out, 1).stride(if pool { 1 } else { stride });
                    let conv = ConvBn::new(d.pp(conv_at), d.pp(conv_at + 1), spec, EPS, reg)?;
                    Some(Projection { pool, conv })
                } else {
                    if stride != 1 || cin != out {
                        candle_core::bail!("no tensor {}.{conv_at}.weight", d.prefix());
                    }
                    None
                };
                let se = match c.se[s] {
                    0 => None,
                    w => Some(SqueezeExcite::new(
                        vbk.pp("se"),
                        out,
                        w,
                        Act::Relu,
                        Gate::Sigmoid,
                    )?),
                };
                blocks.push(Block {
                    convs,
                    downsample,
                    se,
                });
                cin = out;
            }
            stages.push(blocks);
        }
        let fc = Linear::new(vb.pp("fc"), cin, c.num_classes)?;
        Ok(ResNet { stem, stages, fc })
    }
}

impl Network for ResNet {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = x.clone();
        for conv in &self.stem {
            x = conv.forward_relu(&x, ctx)?;
        }
        let mut x = max_pool_3x3_s2_p1(&x, ctx)?;
        for stage in &self.stages {
            for b in stage {
                x = b.forward(x, ctx)?;
            }
        }
        self.fc.forward(&global_avg_pool(&x)?)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let (last, rest) = self.last_block();
        let mut x = x.clone();
        for conv in &self.stem {
            x = conv.forward_relu(&x, ctx)?;
        }
        let mut x = max_pool_3x3_s2_p1(&x, ctx)?;
        for b in rest {
            x = b.forward(x, ctx)?;
        }
        last.trunk(&x, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let (last, _) = self.last_block();
        let bn = &last.head_bn().bn;
        let x = match (&last.se, &input.residual) {
            // SE-ResNet's squeeze-excite sits between the head BN and the sum, as in `forward`.
            (Some(se), Some(r)) => (se.forward(&bn.forward(&input.x, ctx)?, ctx)? + r)?.relu()?,
            _ => bn.forward_add_act(&input.x, input.residual.as_ref(), ctx, Act::Relu)?,
        };
        self.fc.forward(&global_avg_pool(&x)?)
    }
}

impl ResNet {
    /// The last block, and every block before it in forward order.
    fn last_block(&self) -> (&Block, impl Iterator<Item = &Block>) {
        let last = self.stages[3]
            .last()
            .expect("detection requires a block per stage");
        let n = self.stages.iter().map(Vec::len).sum::<usize>() - 1;
        (last, self.stages.iter().flatten().take(n))
    }
}

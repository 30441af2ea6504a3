//! torchvision's EfficientNet B0 to B7 (and any width or depth multiplier, any class count).
//!
//! `features.0` is the stem (3x3, stride 2, BN, SiLU); `features.1` to `features.7` are stages
//! of MBConv blocks, each `features.{s}.{j}.block` holding an optional 1x1 expansion, the
//! depthwise k x k convolution, squeeze-excitation (`fc1`, `fc2` with biases; SiLU then
//! sigmoid), and the 1x1 projection with BN and no activation; `features.8` is the 1x1 head
//! (SiLU), `classifier.1` the linear layer. Kernel sizes, widths, squeeze widths and depths are
//! read from the shapes; strides are torchvision's per-stage schedule (the first block of
//! stages 2, 3, 4 and 6 has stride 2). Stochastic depth and dropout are identities in eval.

use candle_core::{Module, Result, Tensor};

use candle_nn::VarBuilder;

use super::layers::{
    global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Gate, Linear, SqueezeExcite,
};
use super::{
    torchvision_naming, Architecture, Family, HeadInput, HeadPaths, Miss, Network, Probe, Shapes,
};

const EPS: f64 = 1e-5;
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];
const STAGE_DEPTHS: [usize; 7] = [1, 2, 2, 3, 3, 4, 1];
/// (name, width multiplier, depth multiplier) of torchvision's B0 to B7.
const VARIANTS: [(&str, f64, f64); 8] = [
    ("efficientnet_b0", 1.0, 1.0),
    ("efficientnet_b1", 1.0, 1.1),
    ("efficientnet_b2", 1.1, 1.2),
    ("efficientnet_b3", 1.2, 1.4),
    ("efficientnet_b4", 1.4, 1.8),
    ("efficientnet_b5", 1.6, 2.2),
    ("efficientnet_b6", 1.8, 2.6),
    ("efficientnet_b7", 2.0, 3.1),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub cin: usize,
    pub hidden: usize,
    pub squeeze: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub stem: usize,
    /// Blocks per stage.
    pub stages: Vec<Vec<BlockConfig>>,
    pub last_channel: usize,
    pub num_classes: usize,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "efficientnet",
    detect,
    accepts,
    namings: torchvision_naming,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("efficientnet") && !arch.starts_with("efficientnet_v2")
}

/// torchvision's `_make_divisible(v, 8)`.
fn make_divisible(v: f64) -> usize {
    let d = 8.0;
    let mut n = ((v + d / 2.0) / d).floor() * d;
    n = n.max(d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

impl Architecture for Config {
    fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The 1x1 head's BN, and `classifier.1` (after dropout).
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "classifier.1".into(),
            last_bn: Some("features.8.1".into()),
        }
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(EfficientNet::new(self, vb, reg)?))
    }

    fn name(&self) -> String {
        let depths: Vec<usize> = self.stages.iter().map(Vec::len).collect();
        for (name, w, d) in VARIANTS {
            let want_depths: Vec<usize> = STAGE_DEPTHS
                .iter()
                .map(|&n| (n as f64 * d).ceil() as usize)
                .collect();
            if make_divisible(32.0 * w) == self.stem
                && want_depths == depths
                && make_divisible(320.0 * w) * 4 == self.last_channel
            {
                return name.to_string();
            }
        }
        format!(
            "efficientnet (stem {}, depths {depths:?}, last channel {})",
            self.stem, self.last_channel
        )
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("features.0.0.weight", 3)?;
    let mut cin = stem;
    let mut stages = Vec::new();
    for (s, &stage_stride) in STAGE_STRIDES.iter().enumerate() {
        let mut blocks = Vec::new();
        let mut j = 0;
        loop {
            let b = format!("features.{}.{j}.block", s + 1);
            if !p.has(&format!("{b}.0.0.weight")) {
                break;
            }
            // Four children with an expansion, three without.
            let expand = p.has(&format!("{b}.3.0.weight"));
            let o = usize::from(expand);
            let hidden = if expand {
                p.shape(&format!("{b}.0.0.weight"), 4)?[0]
            } else {
                cin
            };
            let dw = p.shape(&format!("{b}.{o}.0.weight"), 4)?;
            if dw[0] != hidden || dw[1] != 1 || dw[2] != dw[3] || dw[2] % 2 == 0 {
                return Err(p.miss(format!("tensor {b}.{o}.0.weight has shape {dw:?}, expected a depthwise [{hidden}, 1, k, k]")));
            }
            let fc1 = p.shape(&format!("{b}.{}.fc1.weight", o + 1), 4)?;
            let proj = p.shape(&format!("{b}.{}.0.weight", o + 2), 4)?;
            blocks.push(BlockConfig {
                cin,
                hidden,
                squeeze: fc1[0],
                cout: proj[0],
                kernel: dw[2],
                stride: if j == 0 { stage_stride } else { 1 },
                expand,
            });
            cin = proj[0];
            j += 1;
        }
        if blocks.is_empty() {
            return Err(p.miss(format!("no tensor features.{}.0.block.0.0.weight", s + 1)));
        }
        stages.push(blocks);
    }
    let head = p.shape("features.8.0.weight", 4)?;
    let fc = p.shape("classifier.1.weight", 2)?;
    Ok(Box::new(Config {
        stem,
        stages,
        last_channel: head[0],
        num_classes: fc[0],
    }))
}

/// An MBConv block (also EfficientNetV2's, with its own BN eps).
pub(super) struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: SqueezeExcite,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    pub(super) fn new(
        c: &BlockConfig,
        vb: VarBuilder,
        eps: f64,
        reg: &mut BnRegistry,
    ) -> Result<MbConv> {
        let cna = |v: VarBuilder, spec: ConvSpec, reg: &mut BnRegistry| {
            ConvBn::new(v.pp(0), v.pp(1), spec, eps, reg)
        };
        let mut k = 0;
        let expand = if c.expand {
            k = 1;
            Some(cna(vb.pp(0), ConvSpec::new(c.cin, c.hidden, 1), reg)?)
        } else {
            None
        };
        let depthwise = cna(
            vb.pp(k),
            ConvSpec::new(c.hidden, c.hidden, c.kernel)
                .stride(c.stride)
                .groups(c.hidden),
            reg,
        )?;
        let se = SqueezeExcite::new(vb.pp(k + 1), c.hidden, c.squeeze, Act::Silu, Gate::Sigmoid)?;
        let project = cna(vb.pp(k + 2), ConvSpec::new(c.hidden, c.cout, 1), reg)?;
        Ok(MbConv {
            expand,
            depthwise,
            se,
            project,
            residual: c.stride == 1 && c.cin == c.cout,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward_act(&y, ctx, Act::Silu)?;
        }
        y = self.depthwise.forward_act(&y, ctx, Act::Silu)?;
        y = self.se.forward(&y, ctx)?;
        let residual = if self.residual { Some(x) } else { None };
        self.project.forward_add_act(&y, residual, ctx, Act::None)
    }
}

pub struct EfficientNet {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
    classifier: Linear,
}

impl EfficientNet {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<EfficientNet> {
        let f = vb.pp("features");
        let stem = ConvBn::new(
            f.pp(0).pp(0),
            f.pp(0).pp(1),
            ConvSpec::new(3, c.stem, 3).stride(2),
            EPS,
            reg,
        )?;
        let mut blocks = Vec::new();
        for (s, stage) in c.stages.iter().enumerate() {
            for (j, b) in stage.iter().enumerate() {
                blocks.push(MbConv::new(b, f.pp(s + 1).pp(j).pp("block"), EPS, reg)?);
            }
        }
        let cin = c
            .stages
            .last()
            .and_then(|s| s.last())
            .map_or(c.stem, |b| b.cout);
        let head = ConvBn::new(
            f.pp(8).pp(0),
            f.pp(8).pp(1),
            ConvSpec::new(cin, c.last_channel, 1),
            EPS,
            reg,
        )?;
        let classifier = Linear::new(vb.pp("classifier").pp(1), c.last_channel, c.num_classes)?;
        Ok(EfficientNet {
            stem,
            blocks,
            head,
            classifier,
        })
    }
}

impl Network for EfficientNet {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.blocks(x, ctx)?;
        let x = self.head.forward_act(&x, ctx, Act::Silu)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let x = self.blocks(x, ctx)?;
        Ok(HeadInput {
            x: self.head.conv.forward(&x, ctx)?,
            residual: None,
        })
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self
            .head
            .bn
            .forward_add_act(&input.x, None, ctx, Act::Silu)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }
}

impl EfficientNet {
    /// The stem and the MBConv blocks.
    fn blocks(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = self.stem.forward_act(x, ctx, Act::Silu)?;
        for b in &self.blocks {
            x = b.forward(&x, ctx)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::make_divisible;

    #[test]
    fn divisible_widths_match_torchvision() {
        assert_eq!(make_divisible(32.0 * 1.1), 32);
        assert_eq!(make_divisible(32.0 * 1.2), 40);
        assert_eq!(make_divisible(320.0 * 1.8), 576);
        assert_eq!(make_divisible(16.0 * 0.25), 8);
    }
}

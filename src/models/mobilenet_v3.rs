//! torchvision's MobileNetV3 small and large, any `width_mult` (and `reduced_tail`), any class
//! count.
//!
//! `features.0` is the stem (3x3, stride 2, BN, hard-swish); `features.1` to `features.n` are
//! inverted residual blocks whose `block` holds an optional 1x1 expansion (absent when the
//! expansion ratio is 1), the depthwise k x k convolution, an optional squeeze-excitation
//! (`fc1`, ReLU, `fc2`, hard-sigmoid) and the 1x1 projection with BN and no activation;
//! `features.n+1` is the 1x1 head (hard-swish); `classifier.0` and `classifier.3` are linear
//! layers with a hard-swish between. Widths, kernel sizes and where the squeeze-excitations are
//! come from the shapes; each block's activation (ReLU or hard-swish) and stride are not in the
//! shapes and come from torchvision's table for the variant, told apart by the number of blocks
//! (11 small, 15 large). BN has torchvision's eps 0.001 and momentum 0.01.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{
    global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Gate, Linear, SqueezeExcite,
};
use super::{
    torchvision_naming, Architecture, Family, HeadInput, HeadPaths, Miss, Network, Probe, Shapes,
};

const EPS: f64 = 1e-3;
const MOMENTUM: f64 = 0.01;
/// (hard-swish, stride) of each block of `mobilenet_v3_small`.
const SMALL: [(bool, usize); 11] = [
    (false, 2),
    (false, 2),
    (false, 1),
    (true, 2),
    (true, 1),
    (true, 1),
    (true, 1),
    (true, 1),
    (true, 2),
    (true, 1),
    (true, 1),
];
/// (hard-swish, stride) of each block of `mobilenet_v3_large`.
const LARGE: [(bool, usize); 15] = [
    (false, 1),
    (false, 2),
    (false, 1),
    (false, 2),
    (false, 1),
    (false, 1),
    (true, 2),
    (true, 1),
    (true, 1),
    (true, 1),
    (true, 1),
    (true, 1),
    (true, 2),
    (true, 1),
    (true, 1),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub cin: usize,
    /// Expanded channels; equal to `cin` when there is no expansion.
    pub hidden: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: bool,
    /// Squeeze-excitation width, if the block has one.
    pub squeeze: Option<usize>,
    pub hardswish: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub large: bool,
    pub stem: usize,
    pub blocks: Vec<BlockConfig>,
    /// Output channels of the 1x1 head convolution.
    pub head: usize,
    /// Output width of `classifier.0`.
    pub last_channel: usize,
    pub num_classes: usize,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "mobilenet_v3",
    detect,
    accepts,
    namings: torchvision_naming,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("mobilenet_v3")
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "classifier.3".into(),
            last_bn: Some(format!("features.{}.1", self.blocks.len() + 1)),
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(MobileNetV3::new(self, vb, reg)?))
    }

    fn name(&self) -> String {
        let (variant, last, out) = if self.large {
            ("mobilenet_v3_large", 1280, 160)
        } else {
            ("mobilenet_v3_small", 1024, 96)
        };
        if self.stem == 16
            && self.last_channel == last
            && self.blocks.last().map(|b| b.cout) == Some(out)
        {
            variant.into()
        } else {
            format!(
                "{variant} (stem {}, last channel {})",
                self.stem, self.last_channel
            )
        }
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("features.0.0.weight", 3)?;
    p.expect("features.0.1.running_mean", &[stem])?;
    let mut n = 0;
    while p.has(&format!("features.{}.block.0.0.weight", n + 1)) {
        n += 1;
    }
    let table: &[(bool, usize)] = match n {
        11 => &SMALL,
        15 => &LARGE,
        _ => {
            return Err(p.miss(format!(
                "{n} inverted residual blocks under features.N.block, expected 11 (small) or 15 (large)"
            )))
        }
    };
    let mut cin = stem;
    let mut blocks = Vec::new();
    for (i, &(hardswish, stride)) in table.iter().enumerate() {
        let b = format!("features.{}.block", i + 1);
        let first = p.shape(&format!("{b}.0.0.weight"), 4)?;
        let expand = first[2] == 1;
        let o = usize::from(expand);
        let hidden = if expand { first[0] } else { cin };
        let dw = p.shape(&format!("{b}.{o}.0.weight"), 4)?;
        if dw[0] != hidden || dw[1] != 1 || dw[2] != dw[3] || dw[2] % 2 == 0 {
            return Err(p.miss(format!(
                "tensor {b}.{o}.0.weight has shape {dw:?}, expected a depthwise [{hidden}, 1, k, k]"
            )));
        }
        let squeeze = if p.has(&format!("{b}.{}.fc1.weight", o + 1)) {
            Some(p.shape(&format!("{b}.{}.fc1.weight", o + 1), 4)?[0])
        } else {
            None
        };
        let proj = p.shape(
            &format!("{b}.{}.0.weight", o + 1 + usize::from(squeeze.is_some())),
            4,
        )?;
        blocks.push(BlockConfig {
            cin,
            hidden,
            cout: proj[0],
            kernel: dw[2],
            stride,
            expand,
            squeeze,
            hardswish,
        });
        cin = proj[0];
    }
    let head = p.shape(&format!("features.{}.0.weight", n + 1), 4)?;
    let c0 = p.shape("classifier.0.weight", 2)?;
    let c3 = p.shape("classifier.3.weight", 2)?;
    Ok(Box::new(Config {
        large: n == 15,
        stem,
        blocks,
        head: head[0],
        last_channel: c0[0],
        num_classes: c3[0],
    }))
}

struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    act: Act,
    residual: bool,
}

impl Block {
    fn new(c: &BlockConfig, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Block> {
        let cna = |v: VarBuilder, spec: ConvSpec, reg: &mut BnRegistry| {
            ConvBn::new(v.pp(0), v.pp(1), spec, EPS, reg)
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
        k += 1;
        let se = match c.squeeze {
            Some(s) => {
                let v = vb.pp(k);
                k += 1;
                Some(SqueezeExcite::new(
                    v,
                    c.hidden,
                    s,
                    Act::Relu,
                    Gate::HardSigmoid,
                )?)
            }
            None => None,
        };
        let project = cna(vb.pp(k), ConvSpec::new(c.hidden, c.cout, 1), reg)?;
        Ok(Block {
            expand,
            depthwise,
            se,
            project,
            act: if c.hardswish {
                Act::Hardswish
            } else {
                Act::Relu
            },
            residual: c.stride == 1 && c.cin == c.cout,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward_act(&y, ctx, self.act)?;
        }
        y = self.depthwise.forward_act(&y, ctx, self.act)?;
        if let Some(se) = &self.se {
            y = se.forward(&y, ctx)?;
        }
        let residual = if self.residual { Some(x) } else { None };
        self.project.forward_add_act(&y, residual, ctx, Act::None)
    }
}

pub struct MobileNetV3 {
    stem: ConvBn,
    blocks: Vec<Block>,
    head: ConvBn,
    classifier: [Linear; 2],
}

impl MobileNetV3 {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<MobileNetV3> {
        reg.momentum = MOMENTUM;
        let f = vb.pp("features");
        let stem = ConvBn::new(
            f.pp(0).pp(0),
            f.pp(0).pp(1),
            ConvSpec::new(3, c.stem, 3).stride(2),
            EPS,
            reg,
        )?;
        let mut blocks = Vec::new();
        for (i, b) in c.blocks.iter().enumerate() {
            blocks.push(Block::new(b, f.pp(i + 1).pp("block"), reg)?);
        }
        let n = c.blocks.len() + 1;
        let cin = c.blocks.last().map_or(c.stem, |b| b.cout);
        let head = ConvBn::new(
            f.pp(n).pp(0),
            f.pp(n).pp(1),
            ConvSpec::new(cin, c.head, 1),
            EPS,
            reg,
        )?;
        let cl = vb.pp("classifier");
        let classifier = [
            Linear::new(cl.pp(0), c.head, c.last_channel)?,
            Linear::new(cl.pp(3), c.last_channel, c.num_classes)?,
        ];
        Ok(MobileNetV3 {
            stem,
            blocks,
            head,
            classifier,
        })
    }
}

impl Network for MobileNetV3 {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.blocks(x, ctx)?;
        let x = self.head.forward_act(&x, ctx, Act::Hardswish)?;
        self.classify(&x)
    }

    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        self.head.trunk(&self.blocks(x, ctx)?, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.head.head(input, ctx, Act::Hardswish)?;
        self.classify(&x)
    }
}

impl MobileNetV3 {
    /// The stem and the inverted residual blocks.
    fn blocks(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = self.stem.forward_act(x, ctx, Act::Hardswish)?;
        for b in &self.blocks {
            x = b.forward(&x, ctx)?;
        }
        Ok(x)
    }

    /// Pool, `classifier.0`, hard-swish, `classifier.3`.
    fn classify(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.classifier[0].forward(&global_avg_pool(x)?)?;
        self.classifier[1].forward(&Act::Hardswish.tensor(&x)?)
    }
}

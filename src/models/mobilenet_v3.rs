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
//!
//! timm's `mobilenetv3_large_*`/`mobilenetv3_small_*` are the same network nested by stage:
//! `conv_stem`/`bn1`, `blocks.{s}.{j}` numbered through the stages as `features.1`... (a
//! depthwise-separable first block `conv_dw`, `bn1`, `se`, `conv_pw`, `bn2`, then inverted
//! residuals `conv_pw`, `bn1`, `conv_dw`, `bn2`, `se`, `conv_pwl`, `bn3`; squeeze-excite
//! `conv_reduce`/`conv_expand`), the last stage's 1x1 ConvBnAct (`conv`, `bn1`) for the head
//! `features.n+1`, `conv_head` (a 1x1 convolution with bias after the pooling: `classifier.0`,
//! read through a reshape) and `classifier` (`classifier.3`). timm's BN has PyTorch's eps 1e-5
//! and momentum 0.1; its TensorFlow ports (`tf_mobilenetv3_*`) eps 1e-3 and "same" padding on
//! strided convolutions, which only the name tells (`--arch tf_mobilenetv3_large_100`, or
//! `--arch tf_mobilenetv3` for any size). timm's `*_minimal_*` variants (ReLU everywhere, no
//! squeeze-excite, 3x3 kernels) are refused: without squeeze-excite anywhere the activations
//! cannot be torchvision's.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::efficientnet::timm_block_renames;
use super::layers::{
    global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Gate, Linear, SqueezeExcite,
};
use super::naming::{has_module, stage_depths};
use super::{Architecture, Family, HeadInput, HeadPaths, Miss, Naming, Network, Probe, Shapes};

const EPS: f64 = 1e-3;
const MOMENTUM: f64 = 0.01;
/// BN eps and momentum of timm's (PyTorch's defaults); its `tf_` ports keep the momentum and
/// take eps 1e-3.
const TIMM_EPS: f64 = 1e-5;
const TIMM_MOMENTUM: f64 = 0.1;
/// timm's sizes: (large, width of the head convolution `features.n+1`, name suffix).
const TIMM_WIDTHS: [(bool, usize, &str); 5] = [
    (true, 960, "100"),
    (true, 720, "075"),
    (false, 576, "100"),
    (false, 432, "075"),
    (false, 288, "050"),
];
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
    /// In timm's naming: timm's BN eps and momentum, and its names.
    pub timm: bool,
    /// timm's TensorFlow port: "same" padding and BN eps 1e-3.
    pub tf: bool,
}

impl Config {
    /// BN eps and momentum.
    fn bn(&self) -> (f64, f64) {
        match (self.timm, self.tf) {
            (false, _) => (EPS, MOMENTUM),
            (true, false) => (TIMM_EPS, TIMM_MOMENTUM),
            (true, true) => (EPS, TIMM_MOMENTUM),
        }
    }
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "mobilenet_v3",
    detect,
    accepts,
    namings,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("mobilenet_v3")
        || arch
            .strip_prefix("tf_")
            .unwrap_or(arch)
            .starts_with("mobilenetv3")
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
    let mut r: Vec<(String, String)> = [
        ("features.0.0", "conv_stem"),
        ("features.0.1", "bn1"),
        ("classifier.0", "conv_head"),
        ("classifier.3", "classifier"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .into();
    let mut i = 1;
    for (s, &depth) in depths.iter().enumerate() {
        for j in 0..depth {
            let tm = format!("blocks.{s}.{j}");
            if has_module(shapes, &format!("{tm}.conv")) {
                r.push((format!("features.{i}.0"), format!("{tm}.conv")));
                r.push((format!("features.{i}.1"), format!("{tm}.bn1")));
            } else {
                r.extend(timm_block_renames(
                    shapes,
                    &format!("features.{i}.block"),
                    &tm,
                ));
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

    fn use_naming(&mut self, naming: &Naming) {
        self.timm = naming.name == "timm";
    }

    fn set_variant(&mut self, arch: &str) {
        self.tf = self.timm && arch.starts_with("tf_");
    }

    fn answers_to(&self, arch: &str) -> bool {
        (self.tf && arch == "tf_mobilenetv3") || self.name() == arch
    }

    fn notice(&self, naming: &Naming) -> Option<String> {
        (naming.name == "timm" && !self.tf).then(|| {
            "timm MobileNetV3: running the plain variant (symmetric padding, BN eps 1e-5); \
             the shapes cannot tell a tf_mobilenetv3 port: give --arch tf_mobilenetv3 for one"
                .to_string()
        })
    }

    fn name(&self) -> String {
        let (size, last, out) = if self.large {
            ("large", 1280, 160)
        } else {
            ("small", 1024, 96)
        };
        if !self.timm {
            let variant = format!("mobilenet_v3_{size}");
            return if self.stem == 16
                && self.last_channel == last
                && self.blocks.last().map(|b| b.cout) == Some(out)
            {
                variant
            } else {
                format!(
                    "{variant} (stem {}, last channel {})",
                    self.stem, self.last_channel
                )
            };
        }
        let variant = format!("{}mobilenetv3_{size}", if self.tf { "tf_" } else { "" });
        // timm's width multipliers, told by the head convolution's width.
        let multiplier = TIMM_WIDTHS
            .iter()
            .find(|(large, head, _)| *large == self.large && *head == self.head)
            .map(|(_, _, m)| m);
        match multiplier {
            Some(m) if self.stem == 16 && self.last_channel == last => format!("{variant}_{m}"),
            _ => format!(
                "{variant} (stem {}, last channel {})",
                self.stem, self.last_channel
            ),
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
    if blocks.iter().all(|b| b.squeeze.is_none()) {
        return Err(p.miss(
            "no squeeze-excitation in any block: timm's *_minimal_* variant (ReLU throughout), \
             which is not supported",
        ));
    }
    let head = p.shape(&format!("features.{}.0.weight", n + 1), 4)?;
    let c0 = p.linear("classifier.0.weight")?;
    let c3 = p.shape("classifier.3.weight", 2)?;
    Ok(Box::new(Config {
        large: n == 15,
        stem,
        blocks,
        head: head[0],
        last_channel: c0[0],
        num_classes: c3[0],
        timm: false,
        tf: false,
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
    /// `same`: TensorFlow "same" padding (timm's `tf_` ports).
    fn new(
        c: &BlockConfig,
        vb: VarBuilder,
        eps: f64,
        same: bool,
        reg: &mut BnRegistry,
    ) -> Result<Block> {
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
                .groups(c.hidden)
                .same_padding(same),
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
        let (eps, momentum) = c.bn();
        reg.momentum = momentum;
        let f = vb.pp("features");
        let stem = ConvBn::new(
            f.pp(0).pp(0),
            f.pp(0).pp(1),
            ConvSpec::new(3, c.stem, 3).stride(2).same_padding(c.tf),
            eps,
            reg,
        )?;
        let mut blocks = Vec::new();
        for (i, b) in c.blocks.iter().enumerate() {
            blocks.push(Block::new(b, f.pp(i + 1).pp("block"), eps, c.tf, reg)?);
        }
        let n = c.blocks.len() + 1;
        let cin = c.blocks.last().map_or(c.stem, |b| b.cout);
        let head = ConvBn::new(
            f.pp(n).pp(0),
            f.pp(n).pp(1),
            ConvSpec::new(cin, c.head, 1),
            eps,
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

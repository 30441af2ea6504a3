//! torchvision's EfficientNet B0 to B7 (and any width or depth multiplier, any class count).
//!
//! `features.0` is the stem (3x3, stride 2, BN, SiLU); `features.1` to `features.7` are stages
//! of MBConv blocks, each `features.{s}.{j}.block` holding an optional 1x1 expansion, the
//! depthwise k x k convolution, squeeze-excitation (`fc1`, `fc2` with biases; SiLU then
//! sigmoid), and the 1x1 projection with BN and no activation; `features.8` is the 1x1 head
//! (SiLU), `classifier.1` the linear layer. Kernel sizes, widths, squeeze widths and depths are
//! read from the shapes; strides are torchvision's per-stage schedule (the first block of
//! stages 2, 3, 4 and 6 has stride 2). Stochastic depth and dropout are identities in eval.
//!
//! timm's EfficientNets (`efficientnet_b*`, and the TensorFlow ports `tf_efficientnet_b*`) are
//! the same network under other names: `conv_stem`/`bn1`, `blocks.{s}.{j}` (stage 0's
//! depthwise-separable blocks `conv_dw`, `bn1`, `se`, `conv_pw`, `bn2`; the others' `conv_pw`,
//! `bn1`, `conv_dw`, `bn2`, `se`, `conv_pwl`, `bn3`; squeeze-excite `conv_reduce` and
//! `conv_expand`), `conv_head`/`bn2` and `classifier`: a [`Naming`] of this one structure. The
//! `tf_` ports differ in what the shapes cannot show: TensorFlow's "same" padding on strided
//! convolutions and BN eps 1e-3. They come from the timm name (`--arch tf_efficientnet_b0`, or
//! `--arch tf_efficientnet` for any size); a timm checkpoint without one runs as the plain
//! variant, and the model says so ([`Architecture::notice`]).

use candle_core::{Module, Result, Tensor};

use candle_nn::VarBuilder;

use super::layers::{
    global_avg_pool, Act, BnRegistry, ConvBn, ConvSpec, Ctx, Gate, Linear, SqueezeExcite,
};
use super::naming::has_module;
use super::{Architecture, Family, HeadInput, HeadPaths, Miss, Naming, Network, Probe, Shapes};

const EPS: f64 = 1e-5;
/// BN eps of timm's TensorFlow ports (`BN_EPS_TF_DEFAULT`).
const TF_EPS: f64 = 1e-3;
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
    /// timm's TensorFlow port: "same" padding and BN eps 1e-3.
    pub tf: bool,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "efficientnet",
    detect,
    accepts,
    namings,
};

pub fn accepts(arch: &str) -> bool {
    let plain = arch.strip_prefix("tf_").unwrap_or(arch);
    plain.starts_with("efficientnet")
        && !plain.starts_with("efficientnet_v2")
        && !plain.starts_with("efficientnetv2")
}

/// The most blocks per stage timm's naming is written out for (B7 has 13; B8 15). Each is eight
/// rules, which every key of a checkpoint tried against this family is matched with.
const MAX_BLOCKS: usize = 16;

/// torchvision's, then timm's (the same for `efficientnet_b*` and `tf_efficientnet_b*`).
fn namings(_: &Shapes) -> Vec<Naming> {
    vec![Naming::identity("torchvision"), timm_naming()]
}

/// torchvision's module paths to timm's keys. Stage 0 holds timm's depthwise-separable blocks
/// (no expansion: torchvision's `block.0` is the depthwise conv), the others inverted residuals.
pub fn timm_naming() -> Naming {
    let mut r: Vec<(String, String)> = vec![
        ("features.0.0".into(), "conv_stem".into()),
        ("features.0.1".into(), "bn1".into()),
        ("features.8.0".into(), "conv_head".into()),
        ("features.8.1".into(), "bn2".into()),
        ("classifier.1".into(), "classifier".into()),
    ];
    for s in 0..STAGE_STRIDES.len() {
        for j in 0..MAX_BLOCKS {
            let tv = format!("features.{}.{j}.block", s + 1);
            let tm = format!("blocks.{s}.{j}");
            let leaves: &[(&str, &str)] = if s == 0 {
                &[
                    ("0.0", "conv_dw"),
                    ("0.1", "bn1"),
                    ("1.fc1", "se.conv_reduce"),
                    ("1.fc2", "se.conv_expand"),
                    ("2.0", "conv_pw"),
                    ("2.1", "bn2"),
                ]
            } else {
                &[
                    ("0.0", "conv_pw"),
                    ("0.1", "bn1"),
                    ("1.0", "conv_dw"),
                    ("1.1", "bn2"),
                    ("2.fc1", "se.conv_reduce"),
                    ("2.fc2", "se.conv_expand"),
                    ("3.0", "conv_pwl"),
                    ("3.1", "bn3"),
                ]
            };
            for (a, b) in leaves {
                r.push((format!("{tv}.{a}"), format!("{tm}.{b}")));
            }
        }
    }
    Naming {
        name: "timm",
        renames: r,
        prefix: String::new(),
    }
}

/// Renames between a torchvision block `tv` (`features.3.0.block`, children numbered in forward
/// order) and a block `tm` of timm's `_efficientnet_blocks` with the same layers, by which of
/// timm's layers the checkpoint has: an inverted residual (`conv_pw`, `bn1`, `conv_dw`, `bn2`,
/// `se`, `conv_pwl`, `bn3`), an edge residual (`conv_exp`, `bn1`, `conv_pwl`, `bn2`) or a
/// depthwise-separable block (`conv_dw`, `bn1`, `se`, `conv_pw`, `bn2`); the squeeze-excite
/// (`conv_reduce`, `conv_expand`, before the projection) where the checkpoint has one. For the
/// families whose timm blocks vary per checkpoint (MobileNetV3, EfficientNetV2).
pub(super) fn timm_block_renames(shapes: &Shapes, tv: &str, tm: &str) -> Vec<(String, String)> {
    let has = |layer: &str| has_module(shapes, &format!("{tm}.{layer}"));
    let convs: &[(&str, &str)] = if has("conv_exp") {
        &[("conv_exp", "bn1"), ("conv_pwl", "bn2")]
    } else if has("conv_pwl") {
        &[("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")]
    } else {
        &[("conv_dw", "bn1"), ("conv_pw", "bn2")]
    };
    let mut r = Vec::new();
    for (i, (conv, bn)) in convs.iter().enumerate() {
        // Each child of `tv` is two renames.
        if i + 1 == convs.len() && has("se") {
            let k = r.len() / 2;
            r.push((format!("{tv}.{k}.fc1"), format!("{tm}.se.conv_reduce")));
            r.push((format!("{tv}.{k}.fc2"), format!("{tm}.se.conv_expand")));
        }
        let k = r.len() / 2;
        r.push((format!("{tv}.{k}.0"), format!("{tm}.{conv}")));
        r.push((format!("{tv}.{k}.1"), format!("{tm}.{bn}")));
    }
    r
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

    fn set_variant(&mut self, arch: &str) {
        self.tf = arch.starts_with("tf_");
    }

    fn answers_to(&self, arch: &str) -> bool {
        (self.tf && arch == "tf_efficientnet") || self.name() == arch
    }

    fn notice(&self, naming: &Naming) -> Option<String> {
        (naming.name == "timm" && !self.tf).then(|| {
            "timm EfficientNet: running the plain variant (symmetric padding, BN eps 1e-5); \
             the shapes cannot tell a tf_efficientnet port: give --arch tf_efficientnet for one"
                .to_string()
        })
    }

    fn name(&self) -> String {
        let tf = if self.tf { "tf_" } else { "" };
        format!("{tf}{}", self.plain_name())
    }
}

impl Config {
    fn plain_name(&self) -> String {
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
        tf: false,
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
    /// `same`: TensorFlow "same" padding on the depthwise convolution (timm's `tf_` ports).
    pub(super) fn new(
        c: &BlockConfig,
        vb: VarBuilder,
        eps: f64,
        same: bool,
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
                .groups(c.hidden)
                .same_padding(same),
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
        let eps = if c.tf { TF_EPS } else { EPS };
        let stem = ConvBn::new(
            f.pp(0).pp(0),
            f.pp(0).pp(1),
            ConvSpec::new(3, c.stem, 3).stride(2).same_padding(c.tf),
            eps,
            reg,
        )?;
        let mut blocks = Vec::new();
        for (s, stage) in c.stages.iter().enumerate() {
            for (j, b) in stage.iter().enumerate() {
                let v = f.pp(s + 1).pp(j).pp("block");
                blocks.push(MbConv::new(b, v, eps, c.tf, reg)?);
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
            eps,
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
        self.head.trunk(&self.blocks(x, ctx)?, ctx)
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.head.head(input, ctx, Act::Silu)?;
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
    use super::{make_divisible, timm_naming};

    #[test]
    fn timm_naming_is_one_to_one() {
        let n = timm_naming();
        let keys = [
            "conv_stem.weight",
            "blocks.0.0.conv_dw.weight",
            "blocks.0.0.se.conv_reduce.bias",
            "blocks.1.2.conv_pwl.weight",
            "blocks.6.0.bn3.running_var",
            "conv_head.weight",
            "classifier.bias",
        ];
        n.check(keys).unwrap();
        assert_eq!(
            n.path("blocks.0.0.conv_pw.weight").unwrap(),
            "features.1.0.block.2.0.weight"
        );
        assert_eq!(
            n.key("features.3.1.block.3.1.running_mean"),
            "blocks.2.1.bn3.running_mean"
        );
    }

    #[test]
    fn timm_block_renames_follow_the_blocks_layers() {
        use super::{timm_block_renames, Shapes};
        let shapes: Shapes = [
            "b.0.conv_dw.weight",
            "b.0.se.conv_reduce.weight",
            "b.0.conv_pw.weight",
            "b.1.conv_pw.weight",
            "b.1.conv_dw.weight",
            "b.1.conv_pwl.weight",
            "b.2.conv_exp.weight",
            "b.2.conv_pwl.weight",
        ]
        .iter()
        .map(|k| (k.to_string(), vec![1]))
        .collect();
        let leaves = |tm: &str| -> Vec<String> {
            timm_block_renames(&shapes, "t", tm)
                .into_iter()
                .map(|(tv, k)| format!("{tv}={}", &k[tm.len() + 1..]))
                .collect()
        };
        // Depthwise-separable with squeeze-excite, inverted residual without, edge residual.
        assert_eq!(
            leaves("b.0"),
            [
                "t.0.0=conv_dw",
                "t.0.1=bn1",
                "t.1.fc1=se.conv_reduce",
                "t.1.fc2=se.conv_expand",
                "t.2.0=conv_pw",
                "t.2.1=bn2"
            ]
        );
        assert_eq!(
            leaves("b.1"),
            [
                "t.0.0=conv_pw",
                "t.0.1=bn1",
                "t.1.0=conv_dw",
                "t.1.1=bn2",
                "t.2.0=conv_pwl",
                "t.2.1=bn3"
            ]
        );
        assert_eq!(
            leaves("b.2"),
            ["t.0.0=conv_exp", "t.0.1=bn1", "t.1.0=conv_pwl", "t.1.1=bn2"]
        );
    }

    #[test]
    fn divisible_widths_match_torchvision() {
        assert_eq!(make_divisible(32.0 * 1.1), 32);
        assert_eq!(make_divisible(32.0 * 1.2), 40);
        assert_eq!(make_divisible(320.0 * 1.8), 576);
        assert_eq!(make_divisible(16.0 * 0.25), 8);
    }
}

//! torchvision's ConvNeXt tiny/small/base/large, and any other widths, depths or class counts.
//!
//! `features.0` is the stem: a 4x4 stride-4 convolution with bias and a LayerNorm over channels
//! (`LayerNorm2d`, eps 1e-6). Stages are `features.1`, `.3`, `.5`, `.7`, each a sequence of
//! `CNBlock`s: `block.0` a 7x7 depthwise convolution with bias, `block.2` a LayerNorm over
//! channels, `block.3` Linear(C, 4C), GELU (erf), `block.5` Linear(4C, C), multiplied by the
//! per-channel `layer_scale` and added to the block's input. `features.2`, `.4`, `.6`
//! downsample: LayerNorm2d, then a 2x2 stride-2 convolution with bias. The head pools, applies
//! `classifier.0` (LayerNorm2d) and `classifier.2` (Linear). Stochastic depth is an identity in
//! eval. There is no BatchNorm: nothing for calibrate mode or `recal-bn` to do.
//!
//! timm's `convnext_*` are the same network: `stem.0`/`stem.1`, `stages.{s}.downsample.0`/`.1`
//! (stages 1 to 3), blocks `stages.{s}.blocks.{j}` (`conv_dw`, `norm`, `mlp.fc1`, `mlp.fc2`,
//! `gamma`), `head.norm` and `head.fc`. Two differences are in shapes only, read through a
//! reshape: `gamma` is `[C]` (torchvision's `layer_scale` `[C, 1, 1]`), and the small sizes
//! (`convnext_atto` to `_nano`, timm's `conv_mlp`) hold the MLP as 1x1 convolutions
//! ([4C, C, 1, 1]) where the others have linear layers.
//!
//! The block's linear layers are run as 1x1 convolutions on the channels-first tensor (bias in
//! the epilogue); the layer scale is folded into the second one's weights and bias, and the
//! residual add into its epilogue. GELU runs in the first one's epilogue (`Act::GeluErf`), and
//! the LayerNorm over channels is one fused kernel on the CPU (`fused::channel_layer_norm`);
//! candle's ops elsewhere. On the CPU kernels with no autograd graph (eval, `logits`,
//! `sweep-res`), the LayerNorm, both linear layers, GELU and the residual are one op over
//! blocks of the batch's pixels (`cpu_conv::mlp`), so the 4C-wide hidden activation never
//! leaves the cache.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::cpu_conv::mlp::{self, mlp_residual};
use super::cpu_conv::{conv2d, cpu_kernels_for, Act, Geometry};
use super::fused::channel_layer_norm;
use super::layers::{get_reshaped, global_avg_pool, BnRegistry, Conv2d, ConvSpec, Ctx, Linear};
use super::naming::stage_depths;
use super::{Architecture, Family, HeadPaths, Miss, Naming, Network, Probe, Shapes};

const EPS: f64 = 1e-6;
/// torchvision's sizes: (name, blocks per stage, stage widths).
const STANDARD: [(&str, [usize; 4], [usize; 4]); 4] = [
    ("convnext_tiny", [3, 3, 9, 3], [96, 192, 384, 768]),
    ("convnext_small", [3, 3, 27, 3], [96, 192, 384, 768]),
    ("convnext_base", [3, 3, 27, 3], [128, 256, 512, 1024]),
    ("convnext_large", [3, 3, 27, 3], [192, 384, 768, 1536]),
];
/// timm's other sizes with a LayerNorm (its `convnext_tiny` to `_large` are torchvision's).
const TIMM: [(&str, [usize; 4], [usize; 4]); 5] = [
    ("convnext_atto", [2, 2, 6, 2], [40, 80, 160, 320]),
    ("convnext_femto", [2, 2, 6, 2], [48, 96, 192, 384]),
    ("convnext_pico", [2, 2, 6, 2], [64, 128, 256, 512]),
    ("convnext_nano", [2, 2, 8, 2], [80, 160, 320, 640]),
    ("convnext_xlarge", [3, 3, 27, 3], [256, 512, 1024, 2048]),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub depths: [usize; 4],
    pub widths: [usize; 4],
    /// Hidden width of each stage's blocks (4 x the width in torchvision's).
    pub hidden: [usize; 4],
    pub num_classes: usize,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "convnext",
    detect,
    accepts,
    namings,
};

/// torchvision's, and timm's where the checkpoint has timm's `stages.0.blocks.0`.
fn namings(shapes: &Shapes) -> Vec<Naming> {
    let mut n = vec![Naming::identity("torchvision")];
    n.extend(timm_naming(shapes));
    n
}

/// torchvision's module paths to the keys of a timm checkpoint (see the module doc); `None`
/// when the checkpoint has no `stages.0.blocks.0`.
pub fn timm_naming(shapes: &Shapes) -> Option<Naming> {
    let depths = stage_depths(shapes, |s, j| format!("stages.{s}.blocks.{j}"));
    if depths.is_empty() {
        return None;
    }
    let mut r: Vec<(String, String)> = [
        ("features.0", "stem"),
        ("classifier.0", "head.norm"),
        ("classifier.2", "head.fc"),
    ]
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .into();
    for (s, &depth) in depths.iter().enumerate() {
        if s > 0 {
            r.push((
                format!("features.{}", 2 * s),
                format!("stages.{s}.downsample"),
            ));
        }
        for j in 0..depth {
            let tv = format!("features.{}.{j}", 2 * s + 1);
            let tm = format!("stages.{s}.blocks.{j}");
            for (a, b) in [
                ("block.0", "conv_dw"),
                ("block.2", "norm"),
                ("block.3", "mlp.fc1"),
                ("block.5", "mlp.fc2"),
                ("layer_scale", "gamma"),
            ] {
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

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("convnext")
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "classifier.2".into(),
            last_bn: None,
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, _reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(ConvNeXt::new(self, vb)?))
    }

    fn name(&self) -> String {
        for &(name, d, w) in STANDARD.iter().chain(&TIMM) {
            if self.depths == d && self.widths == w && self.hidden == w.map(|c| 4 * c) {
                return name.into();
            }
        }
        format!(
            "convnext (depths {:?}, widths {:?})",
            self.depths, self.widths
        )
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let stem = p.stem_channels("features.0.0.weight", 4)?;
    p.expect("features.0.1.weight", &[stem])?;
    let (mut depths, mut widths, mut hidden) = ([0; 4], [0; 4], [0; 4]);
    let mut cin = stem;
    for s in 0..4 {
        let f = 2 * s + 1;
        if s > 0 {
            let d = p.shape(&format!("features.{}.1.weight", f - 1), 4)?;
            if d[1..] != [cin, 2, 2] {
                return Err(p.miss(format!(
                    "tensor features.{}.1.weight has shape {d:?}, expected [C, {cin}, 2, 2]",
                    f - 1
                )));
            }
            cin = d[0];
        }
        p.expect(&format!("features.{f}.0.block.0.weight"), &[cin, 1, 7, 7])?;
        hidden[s] = p.linear(&format!("features.{f}.0.block.3.weight"))?[0];
        while p.has(&format!("features.{f}.{}.layer_scale", depths[s])) {
            depths[s] += 1;
        }
        if depths[s] == 0 {
            return Err(p.miss(format!("no tensor features.{f}.0.layer_scale")));
        }
        widths[s] = cin;
    }
    // timm's `convnext_*_mlp` has a hidden layer before `head.fc` (outside the naming, so under
    // its own name here) that the structure lacks: refused rather than left out.
    if p.has("head.pre_logits.fc.weight") {
        return Err(p.miss(
            "tensor head.pre_logits.fc.weight: timm's MLP head (convnext_*_mlp) is not supported",
        ));
    }
    let fc = p.shape("classifier.2.weight", 2)?;
    if fc[1] != cin {
        return Err(p.miss(format!(
            "tensor classifier.2.weight has shape {fc:?}, expected [classes, {cin}]"
        )));
    }
    Ok(Box::new(Config {
        depths,
        widths,
        hidden,
        num_classes: fc[0],
    }))
}

/// LayerNorm over the channels of [N, C, H, W] (torchvision's `LayerNorm2d`, and `nn.LayerNorm`
/// on the channels-last view inside a block): biased variance, eps 1e-6.
struct ChannelNorm {
    /// [1, C, 1, 1], and the same values for the CPU kernel.
    weight: (Tensor, Vec<f32>),
    bias: (Tensor, Vec<f32>),
}

impl ChannelNorm {
    fn new(vb: VarBuilder, c: usize) -> Result<ChannelNorm> {
        let (w, b) = (vb.get(c, "weight")?, vb.get(c, "bias")?);
        let values = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok(ChannelNorm {
            weight: (w.reshape((1, c, 1, 1))?, values(&w)?),
            bias: (b.reshape((1, c, 1, 1))?, values(&b)?),
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        channel_layer_norm(
            ctx.kernels,
            x,
            (&self.weight.1, &self.weight.0),
            (&self.bias.1, &self.bias.0),
            EPS,
        )
    }
}

/// A convolution with bias and a geometry of its own (the stem's 4x4 stride 4 and the
/// downsampling 2x2 stride 2 have no padding), or a linear layer as a 1x1 convolution.
struct Conv {
    weight: Tensor,
    bias: (Vec<f32>, Tensor),
    geometry: Geometry,
}

impl Conv {
    fn patchify(vb: VarBuilder, cin: usize, cout: usize, k: usize) -> Result<Conv> {
        let weight = vb.get((cout, cin, k, k), "weight")?;
        Conv::with(weight, vb.get(cout, "bias")?, k, 0)
    }

    /// `nn.Linear(cin, cout)` at `vb`, times `scale` per output (the layer scale), if any.
    fn linear(vb: VarBuilder, cin: usize, cout: usize, scale: Option<&Tensor>) -> Result<Conv> {
        let mut weight = get_reshaped(&vb, &[cout, cin], "weight")?;
        let mut bias = vb.get(cout, "bias")?;
        if let Some(s) = scale {
            weight = weight.broadcast_mul(&s.reshape((cout, 1))?)?;
            bias = (bias * s)?;
        }
        Conv::with(weight.reshape((cout, cin, 1, 1))?, bias, 1, 0)
    }

    fn with(weight: Tensor, bias: Tensor, stride: usize, padding: usize) -> Result<Conv> {
        Ok(Conv {
            weight,
            bias: (bias.to_dtype(DType::F32)?.to_vec1()?, bias),
            geometry: Geometry {
                stride,
                padding,
                groups: 1,
            },
        })
    }

    fn forward(&self, x: &Tensor, residual: Option<&Tensor>, ctx: &Ctx) -> Result<Tensor> {
        self.forward_act(x, residual, ctx, Act::None)
    }

    /// act(conv(x) + bias + residual), the activation in the convolution's epilogue.
    fn forward_act(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        ctx: &Ctx,
        act: Act,
    ) -> Result<Tensor> {
        let bias = Some((self.bias.0.as_slice(), &self.bias.1));
        conv2d(
            ctx.kernels,
            x,
            &self.weight,
            self.geometry,
            bias,
            residual,
            act,
        )
    }
}

struct Block {
    depthwise: Conv2d,
    norm: ChannelNorm,
    expand: Conv,
    /// `block.5` with the layer scale folded in.
    project: Conv,
}

impl Block {
    fn new(vb: VarBuilder, c: usize, hidden: usize) -> Result<Block> {
        let b = vb.pp("block");
        let scale = get_reshaped(&vb, &[c], "layer_scale")?;
        Ok(Block {
            depthwise: Conv2d::new(b.pp(0), ConvSpec::new(c, c, 7).groups(c).bias())?,
            norm: ChannelNorm::new(b.pp(2), c)?,
            expand: Conv::linear(b.pp(3), c, hidden, None)?,
            project: Conv::linear(b.pp(5), hidden, c, Some(&scale))?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let y = self.depthwise.forward(x, ctx)?;
        let (w1, w2) = (&self.expand.weight, &self.project.weight);
        if cpu_kernels_for(&y, ctx.kernels)
            && [&y, x, w1, w2]
                .iter()
                .all(|t| t.dtype() == DType::F32 && !t.track_op())
        {
            let norm = mlp::ChannelNorm {
                weight: &self.norm.weight.1,
                bias: &self.norm.bias.1,
                eps: EPS as f32,
            };
            return mlp_residual(
                &y,
                x,
                Some(norm),
                (w1, &self.expand.bias.0),
                (w2, &self.project.bias.0),
                Act::GeluErf,
            );
        }
        let y = self.norm.forward(&y, ctx)?;
        let y = self.expand.forward_act(&y, None, ctx, Act::GeluErf)?;
        self.project.forward(&y, Some(x), ctx)
    }
}

struct Stage {
    /// LayerNorm and 2x2 stride-2 convolution (none before the first stage).
    down: Option<(ChannelNorm, Conv)>,
    blocks: Vec<Block>,
}

pub struct ConvNeXt {
    stem: (Conv, ChannelNorm),
    stages: Vec<Stage>,
    norm: ChannelNorm,
    fc: Linear,
}

impl ConvNeXt {
    pub fn new(c: &Config, vb: VarBuilder) -> Result<ConvNeXt> {
        let f = vb.pp("features");
        let stem = (
            Conv::patchify(f.pp(0).pp(0), 3, c.widths[0], 4)?,
            ChannelNorm::new(f.pp(0).pp(1), c.widths[0])?,
        );
        let mut stages = Vec::new();
        for s in 0..4 {
            let w = c.widths[s];
            let down = if s > 0 {
                let d = f.pp(2 * s);
                Some((
                    ChannelNorm::new(d.pp(0), c.widths[s - 1])?,
                    Conv::patchify(d.pp(1), c.widths[s - 1], w, 2)?,
                ))
            } else {
                None
            };
            let blocks = (0..c.depths[s])
                .map(|j| Block::new(f.pp(2 * s + 1).pp(j), w, c.hidden[s]))
                .collect::<Result<Vec<_>>>()?;
            stages.push(Stage { down, blocks });
        }
        let cl = vb.pp("classifier");
        Ok(ConvNeXt {
            stem,
            stages,
            norm: ChannelNorm::new(cl.pp(0), c.widths[3])?,
            fc: Linear::new(cl.pp(2), c.widths[3], c.num_classes)?,
        })
    }
}

impl Network for ConvNeXt {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut x = self
            .stem
            .1
            .forward(&self.stem.0.forward(x, None, ctx)?, ctx)?;
        for Stage { down, blocks } in &self.stages {
            if let Some((norm, conv)) = down {
                x = conv.forward(&norm.forward(&x, ctx)?, None, ctx)?;
            }
            for b in blocks {
                x = b.forward(&x, ctx)?;
            }
        }
        let x = global_avg_pool(&x)?.unsqueeze(2)?.unsqueeze(3)?;
        self.fc
            .forward(&self.norm.forward(&x, ctx)?.flatten_from(1)?)
    }
}

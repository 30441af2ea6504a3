//! torchvision's DenseNet-121/161/169/201, and any other growth rate, bottleneck width, block
//! lengths, initial width or class count.
//!
//! `features.conv0` (7x7 stride 2), `norm0`, ReLU, a 3x3 stride-2 max pool; then dense blocks
//! `features.denseblock{b}` of layers `denselayer{l}` (from 1), each BN (`norm1`), ReLU, 1x1
//! `conv1`, BN (`norm2`), ReLU, 3x3 `conv2` to `growth` channels, whose output is concatenated
//! to its input; between blocks `features.transition{b}`: BN, ReLU, 1x1 `conv`, 2x2 average pool.
//! Then `features.norm5`, ReLU, global pooling and `classifier`.
//!
//! BN comes before its convolution (pre-activation), so only `norm2` can be folded (into
//! `conv1`, whose output it normalises); `norm1`, the transitions' `norm` and `norm5` run as
//! BN + ReLU passes of their own. On the CPU kernels in eval mode each block's layers write into
//! one preallocated buffer and read the channels before theirs as a view; elsewhere (candle's
//! ops, calibrate and train modes) each layer concatenates its input and output as torchvision
//! does.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::cpu_conv::cpu_kernels_for;
use super::fused::write_channels;
use super::layers::{
    global_avg_pool, max_pool_3x3_s2_p1, Act, BatchNorm, BnRegistry, Conv2d, ConvBn, ConvSpec, Ctx,
    Linear,
};
use super::{
    torchvision_naming, Architecture, Family, HeadInput, HeadPaths, Miss, Network, Probe, Shapes,
};

const EPS: f64 = 1e-5;
/// torchvision's sizes: (name, growth rate, layers per block, initial width).
const STANDARD: [(&str, usize, [usize; 4], usize); 4] = [
    ("densenet121", 32, [6, 12, 24, 16], 64),
    ("densenet161", 48, [6, 12, 36, 24], 96),
    ("densenet169", 32, [6, 12, 32, 32], 64),
    ("densenet201", 32, [6, 12, 48, 32], 64),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub init: usize,
    pub growth: usize,
    /// `conv1`'s output width (bn_size x growth).
    pub bottleneck: usize,
    /// Layers per dense block.
    pub blocks: Vec<usize>,
    /// Output width of each transition (one fewer than blocks).
    pub transitions: Vec<usize>,
    pub num_classes: usize,
}

/// The registry's entry (see `models::FAMILIES`).
pub const FAMILY: Family = Family {
    name: "densenet",
    detect,
    accepts,
    namings: torchvision_naming,
};

pub fn accepts(arch: &str) -> bool {
    arch.starts_with("densenet")
}

impl Architecture for Config {
    fn head(&self) -> HeadPaths {
        HeadPaths {
            classifier: "classifier".into(),
            last_bn: Some("features.norm5".into()),
        }
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn build(&self, vb: VarBuilder, reg: &mut BnRegistry) -> Result<Box<dyn Network>> {
        Ok(Box::new(DenseNet::new(self, vb, reg)?))
    }

    fn name(&self) -> String {
        for (name, g, b, init) in STANDARD {
            if self.growth == g && self.blocks == b && self.init == init && self.bottleneck == 4 * g
            {
                return name.into();
            }
        }
        format!(
            "densenet (growth {}, blocks {:?}, initial width {})",
            self.growth, self.blocks, self.init
        )
    }
}

pub fn detect(shapes: &Shapes) -> std::result::Result<Box<dyn Architecture>, Miss> {
    let mut p = Probe::new(shapes);
    let init = p.stem_channels("features.conv0.weight", 7)?;
    p.expect("features.norm0.running_mean", &[init])?;
    let (mut blocks, mut transitions) = (Vec::new(), Vec::new());
    let (mut growth, mut bottleneck) = (0, 0);
    let mut c = init;
    for b in 1.. {
        let block = format!("features.denseblock{b}");
        if b > 1 {
            if !p.has(&format!("{block}.denselayer1.conv1.weight")) {
                break;
            }
            let t = p.shape(&format!("features.transition{}.conv.weight", b - 1), 4)?;
            if t[1..] != [c, 1, 1] {
                return Err(p.miss(format!(
                    "tensor features.transition{}.conv.weight has shape {t:?}, expected [C, {c}, 1, 1]",
                    b - 1
                )));
            }
            c = t[0];
            transitions.push(c);
        }
        let mut n = 0;
        while p.has(&format!("{block}.denselayer{}.conv1.weight", n + 1)) {
            let l = format!("{block}.denselayer{}", n + 1);
            let c1 = p.shape(&format!("{l}.conv1.weight"), 4)?;
            let c2 = p.shape(&format!("{l}.conv2.weight"), 4)?;
            if c1[1] != c || c2[1..] != [c1[0], 3, 3] {
                return Err(p.miss(format!(
                    "tensors {l}.conv1.weight {c1:?} and conv2.weight {c2:?} do not follow {c} channels"
                )));
            }
            (growth, bottleneck) = (c2[0], c1[0]);
            c += growth;
            n += 1;
        }
        if n == 0 {
            return Err(p.miss(format!("no tensor {block}.denselayer1.conv1.weight")));
        }
        blocks.push(n);
    }
    p.expect("features.norm5.running_mean", &[c])?;
    let fc = p.shape("classifier.weight", 2)?;
    Ok(Box::new(Config {
        init,
        growth,
        bottleneck,
        blocks,
        transitions,
        num_classes: fc[0],
    }))
}

struct Layer {
    norm1: BatchNorm,
    /// conv1 with norm2 folded in.
    conv1: ConvBn,
    conv2: Conv2d,
}

struct Transition {
    norm: BatchNorm,
    conv: Conv2d,
}

pub struct DenseNet {
    stem: ConvBn,
    blocks: Vec<(Vec<Layer>, Option<Transition>)>,
    norm5: BatchNorm,
    classifier: Linear,
}

impl DenseNet {
    pub fn new(c: &Config, vb: VarBuilder, reg: &mut BnRegistry) -> Result<DenseNet> {
        let f = vb.pp("features");
        let stem = ConvBn::new(
            f.pp("conv0"),
            f.pp("norm0"),
            ConvSpec::new(3, c.init, 7).stride(2),
            EPS,
            reg,
        )?;
        let mut ch = c.init;
        let mut blocks = Vec::new();
        for (b, &n) in c.blocks.iter().enumerate() {
            let vbb = f.pp(format!("denseblock{}", b + 1));
            let mut layers = Vec::new();
            for l in 0..n {
                let v = vbb.pp(format!("denselayer{}", l + 1));
                layers.push(Layer {
                    norm1: BatchNorm::new(v.pp("norm1"), ch, EPS, reg)?,
                    conv1: ConvBn::new(
                        v.pp("conv1"),
                        v.pp("norm2"),
                        ConvSpec::new(ch, c.bottleneck, 1),
                        EPS,
                        reg,
                    )?,
                    conv2: Conv2d::new(v.pp("conv2"), ConvSpec::new(c.bottleneck, c.growth, 3))?,
                });
                ch += c.growth;
            }
            let transition = match c.transitions.get(b) {
                Some(&out) => {
                    let v = f.pp(format!("transition{}", b + 1));
                    let t = Transition {
                        norm: BatchNorm::new(v.pp("norm"), ch, EPS, reg)?,
                        conv: Conv2d::new(v.pp("conv"), ConvSpec::new(ch, out, 1))?,
                    };
                    ch = out;
                    Some(t)
                }
                None => None,
            };
            blocks.push((layers, transition));
        }
        let norm5 = BatchNorm::new(f.pp("norm5"), ch, EPS, reg)?;
        let classifier = Linear::new(vb.pp("classifier"), ch, c.num_classes)?;
        Ok(DenseNet {
            stem,
            blocks,
            norm5,
            classifier,
        })
    }
}

/// Whether a dense block runs in one buffer ([`DenseNet::block_in_buffer`]): the CPU kernels in
/// eval mode (no batch statistics to take over a view, no graph to keep).
fn block_buffer(x: &Tensor, ctx: &Ctx) -> bool {
    ctx.all_eval() && cpu_kernels_for(x, ctx.kernels) && x.rank() == 4 && !x.track_op()
}

impl DenseNet {
    /// A dense block whose layers write their outputs into one [N, C_in + layers x growth, H, W]
    /// buffer, each reading the channels before its own as a view, and normalise those into one
    /// reused buffer: the values of the concatenating loop, without copying the block's growing
    /// input once per layer, and without faulting in two fresh, larger tensors each time.
    fn block_in_buffer(layers: &[Layer], x: Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (n, c0, h, w) = x.dims4()?;
        let mut widths = Vec::with_capacity(layers.len());
        let mut c = c0;
        for l in layers {
            widths.push(c);
            c += l.conv2.out_channels();
        }
        let buf = Tensor::zeros((n, c, h, w), x.dtype(), x.device())?;
        write_channels(&buf, &x, 0)?;
        drop(x);
        // norm1's output, for every layer: the widest layer's size, of which each takes the
        // front as a contiguous [N, c, H, W].
        let widest = widths.last().copied().unwrap_or(c0);
        let normed = Tensor::zeros(n * widest * h * w, buf.dtype(), buf.device())?;
        for (l, &c) in layers.iter().zip(&widths) {
            let y = normed.narrow(0, 0, n * c * h * w)?.reshape((n, c, h, w))?;
            l.norm1
                .eval_act_into(&buf.narrow(1, 0, c)?, &y, Act::Relu)?;
            let y = l.conv1.forward_relu(&y, ctx)?;
            let y = l.conv2.forward(&y, ctx)?;
            write_channels(&buf, &y, c)?;
        }
        Ok(buf)
    }
}

impl Network for DenseNet {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let input = self.forward_trunk(x, ctx)?;
        self.forward_head(&input, ctx)
    }

    /// Everything before `norm5`, which has no convolution to fold into: `forward` is the two
    /// halves in every mode.
    fn forward_trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<HeadInput> {
        let x = self.stem.forward_relu(x, ctx)?;
        let mut x = max_pool_3x3_s2_p1(&x, ctx)?;
        for (layers, transition) in &self.blocks {
            if block_buffer(&x, ctx) {
                x = Self::block_in_buffer(layers, x, ctx)?;
            } else {
                for l in layers {
                    let y = l.norm1.forward_add_act(&x, None, ctx, Act::Relu)?;
                    let y = l.conv1.forward_relu(&y, ctx)?;
                    let y = l.conv2.forward(&y, ctx)?;
                    x = Tensor::cat(&[&x, &y], 1)?;
                }
            }
            if let Some(t) = transition {
                let y = t.norm.forward_add_act(&x, None, ctx, Act::Relu)?;
                x = t.conv.forward(&y, ctx)?.avg_pool2d(2)?;
            }
        }
        Ok(HeadInput { x, residual: None })
    }

    fn forward_head(&self, input: &HeadInput, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.norm5.forward_add_act(&input.x, None, ctx, Act::Relu)?;
        self.classifier.forward(&global_avg_pool(&x)?)
    }
}

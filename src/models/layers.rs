//! The layers our CNNs are made of, each reading its own leaf tensors through a `VarBuilder`
//! whose path is the PyTorch module path, so a missing or misshapen tensor is reported under its
//! real state-dict key.
//!
//! BatchNorm is ours rather than candle-nn's: every BN layer knows its state-dict prefix and its
//! position in forward order, and runs in one of two modes. In eval it applies the running
//! statistics, folded once into a per-channel scale and shift. In calibrate it normalises with
//! the batch's own statistics, as PyTorch's train mode does, and reports that batch's mean,
//! biased variance and element count to an observer; its running statistics are not touched
//! (the estimators in the recal-bn engine decide what to do with the reports).

use candle_core::{DType, Module, Result, Tensor};

pub use super::cpu_conv::Act;
use super::cpu_conv::{self, Geometry};
use super::fused::{channel_affine, channel_moments};
use candle_nn::VarBuilder;

/// How BatchNorm layers behave during a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Running statistics, as `model.eval()`.
    #[default]
    Eval,
    /// Batch statistics, as `model.train()` for BN only; each layer reports to the observer.
    Calibrate,
}

/// One batch's statistics of one BN layer's input, per channel.
#[derive(Clone, Debug)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    /// Biased (population) variance of the batch, the one the layer normalises with.
    pub var: Vec<f32>,
    /// Elements per channel: N * H * W.
    pub count: usize,
}

/// Receives the statistics of every BN layer in calibrate mode, in forward order.
pub trait BnObserver {
    fn observe(&mut self, layer: usize, stats: BatchStats) -> Result<()>;
}

/// The state of one forward pass.
#[derive(Default)]
pub struct Ctx<'a> {
    pub mode: BnMode,
    pub observer: Option<&'a mut dyn BnObserver>,
}

impl<'a> Ctx<'a> {
    pub fn eval() -> Ctx<'a> {
        Ctx::default()
    }
    pub fn calibrate(observer: &'a mut dyn BnObserver) -> Ctx<'a> {
        Ctx {
            mode: BnMode::Calibrate,
            observer: Some(observer),
        }
    }
}

/// Collects the BN layers' prefixes in construction (= forward) order while a model is built.
#[derive(Default, Debug)]
pub struct BnRegistry {
    pub prefixes: Vec<String>,
}

/// The state-dict path a VarBuilder stands for.
fn path_of(vb: &VarBuilder) -> String {
    vb.prefix()
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    /// The bias as a tensor (candle's path) and as values (the CPU path's epilogue).
    bias: Option<(Vec<f32>, Tensor)>,
    geometry: Geometry,
}

/// Shape of a convolution, as torch.nn.Conv2d takes it.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub groups: usize,
    pub bias: bool,
}

impl ConvSpec {
    pub fn new(cin: usize, cout: usize, k: usize) -> ConvSpec {
        ConvSpec {
            cin,
            cout,
            k,
            stride: 1,
            groups: 1,
            bias: false,
        }
    }
    pub fn stride(mut self, s: usize) -> ConvSpec {
        self.stride = s;
        self
    }
    pub fn groups(mut self, g: usize) -> ConvSpec {
        self.groups = g;
        self
    }
    pub fn bias(mut self) -> ConvSpec {
        self.bias = true;
        self
    }
}

impl Conv2d {
    /// Reads `weight` [cout, cin / groups, k, k] (and `bias` [cout]); padding is (k - 1) / 2 as
    /// in every torchvision CNN here.
    pub fn new(vb: VarBuilder, s: ConvSpec) -> Result<Conv2d> {
        let weight = vb.get((s.cout, s.cin / s.groups, s.k, s.k), "weight")?;
        let bias = if s.bias {
            let b = vb.get(s.cout, "bias")?;
            Some((b.to_dtype(DType::F32)?.to_vec1()?, b))
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            geometry: Geometry {
                stride: s.stride,
                padding: (s.k - 1) / 2,
                groups: s.groups,
            },
        })
    }
}

impl Conv2d {
    /// The same convolution with each output channel's weights multiplied by `scale[c]` (BN
    /// folded in); the bias, if any, is dropped (callers fold it into their shift).
    fn scaled(&self, scale: &Tensor) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: self.weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?,
            bias: None,
            ..self.clone()
        })
    }
}

impl Conv2d {
    /// act(conv(x) + bias), fused on the CPU.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|(v, t)| (v.as_slice(), t));
        cpu_conv::conv2d(x, &self.weight, self.geometry, bias, None, act)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::None)
    }
}

#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub index: usize,
    pub prefix: String,
    /// gamma and beta, for calibrate mode's normalisation.
    weight_v: Vec<f32>,
    bias_v: Vec<f32>,
    eps: f64,
    /// Eval mode: y = x * scale[c] + shift[c], both [C].
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        eps: f64,
        reg: &mut BnRegistry,
    ) -> Result<BatchNorm> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let mean = vb.get(channels, "running_mean")?;
        let var = vb.get(channels, "running_var")?;
        let scale = (&weight / (var + eps)?.sqrt()?)?;
        let shift = (&bias - (mean * &scale)?)?;
        let prefix = path_of(&vb);
        reg.prefixes.push(prefix.clone());
        Ok(BatchNorm {
            index: reg.prefixes.len() - 1,
            prefix,
            weight_v: weight.to_dtype(DType::F32)?.to_vec1()?,
            bias_v: bias.to_dtype(DType::F32)?.to_vec1()?,
            eps,
            scale,
            shift,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.forward_add_act(x, None, ctx, Act::None)
    }

    /// act(BN(x) + residual), one pass on the CPU.
    pub fn forward_add_act(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        ctx: &mut Ctx,
        act: Act,
    ) -> Result<Tensor> {
        match ctx.mode {
            BnMode::Eval => channel_affine(x, Some(&self.scale), &self.shift, residual, act),
            BnMode::Calibrate => {
                let (n, c, h, w) = x.dims4()?;
                let (mean, var) = channel_moments(x)?;
                let scale: Vec<f32> = (0..c)
                    .map(|i| self.weight_v[i] / (var[i] as f64 + self.eps).sqrt() as f32)
                    .collect();
                let shift: Vec<f32> = (0..c)
                    .map(|i| self.bias_v[i] - mean[i] * scale[i])
                    .collect();
                if let Some(obs) = ctx.observer.as_deref_mut() {
                    obs.observe(
                        self.index,
                        BatchStats {
                            mean,
                            var,
                            count: n * h * w,
                        },
                    )?;
                }
                let dev = x.device();
                let (scale, shift) = (Tensor::new(scale, dev)?, Tensor::new(shift, dev)?);
                let (scale, shift) = (scale.to_dtype(x.dtype())?, shift.to_dtype(x.dtype())?);
                channel_affine(x, Some(&scale), &shift, residual, act)
            }
        }
    }
}

/// A convolution followed by BatchNorm: torchvision's `Conv2dNormActivation` without the
/// activation, at `vb.pp(0)` and `vb.pp(1)`, or any two named children.
///
/// In eval mode the BN scale is folded into a copy of the convolution's weights, leaving one
/// per-channel shift, applied with the activation (and a residual, if any) in the convolution's
/// epilogue; calibrate mode runs the original convolution so that BN sees the un-normalised
/// activations.
#[derive(Clone, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    folded: Conv2d,
    shift: (Vec<f32>, Tensor),
}

impl ConvBn {
    pub fn new(
        conv: VarBuilder,
        bn: VarBuilder,
        s: ConvSpec,
        eps: f64,
        reg: &mut BnRegistry,
    ) -> Result<ConvBn> {
        let conv = Conv2d::new(conv, s)?;
        let bn = BatchNorm::new(bn, s.cout, eps, reg)?;
        let folded = conv.scaled(&bn.scale)?;
        let shift = match &conv.bias {
            Some((_, b)) => ((b * &bn.scale)? + &bn.shift)?,
            None => bn.shift.clone(),
        };
        Ok(ConvBn {
            conv,
            bn,
            folded,
            shift: (shift.to_dtype(DType::F32)?.to_vec1()?, shift),
        })
    }

    /// Conv, BN.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.forward_act(x, ctx, Act::None)
    }

    /// Conv, BN, ReLU.
    pub fn forward_relu(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.forward_act(x, ctx, Act::Relu)
    }

    /// Conv, BN, activation.
    pub fn forward_act(&self, x: &Tensor, ctx: &mut Ctx, act: Act) -> Result<Tensor> {
        self.forward_add_act(x, None, ctx, act)
    }

    /// act(BN(conv(x)) + residual): the end of a residual block.
    pub fn forward_add_act(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        ctx: &mut Ctx,
        act: Act,
    ) -> Result<Tensor> {
        match ctx.mode {
            BnMode::Eval => {
                let shift = Some((self.shift.0.as_slice(), &self.shift.1));
                let f = &self.folded;
                cpu_conv::conv2d(x, &f.weight, f.geometry, shift, residual, act)
            }
            BnMode::Calibrate => {
                self.bn
                    .forward_add_act(&self.conv.forward(x)?, residual, ctx, act)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
        Ok(Linear {
            weight: vb.get((cout, cin), "weight")?,
            bias: vb.get(cout, "bias")?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Global average pooling to [N, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

pub use super::cpu_conv::max_pool_3x3_s2_p1;

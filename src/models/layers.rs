//! The layers our CNNs are made of, each reading its own leaf tensors through a `VarBuilder`
//! whose path is the module path, so a missing or misshapen tensor is reported under its real
//! state-dict key (the model's [`Naming`](super::naming::Naming) maps one to the other).
//!
//! BatchNorm is ours rather than candle-nn's: every BN layer knows its module path and its
//! position in forward order, and runs in one of three modes. In eval it applies the running
//! statistics, folded once into a per-channel scale and shift. In calibrate it normalises with
//! the batch's own statistics, as PyTorch's train mode does, and reports that batch's mean,
//! biased variance and element count to an observer; its running statistics are not touched
//! (the estimators in the recal-bn engine decide what to do with the reports). In train it also
//! normalises with the batch's statistics, through candle's differentiable ops, and updates its
//! running statistics with momentum as `nn.BatchNorm2d.train()` does. A forward pass's [`Ctx`]
//! says which mode each layer runs in and which kernels run it.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Result, Tensor};

use super::cpu_conv::{self, Geometry};
pub use super::cpu_conv::{Act, Kernels};
use super::fused::{self, channel_affine, channel_affine_owned, channel_moments};
use candle_nn::VarBuilder;

/// How BatchNorm layers behave during a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BnMode {
    /// Running statistics, as `model.eval()`.
    #[default]
    Eval,
    /// Batch statistics, as `model.train()` for BN only; each layer reports to the observer and
    /// keeps its running statistics.
    Calibrate,
    /// Batch statistics through differentiable ops, and the running statistics updated with
    /// momentum, as `model.train()`.
    Train,
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

/// The state of one forward pass: how BN layers run, on which kernels, and who hears their
/// batch statistics.
#[derive(Default)]
pub struct Ctx<'a> {
    /// The mode of every BN layer not named in `layer_modes`.
    pub mode: BnMode,
    /// Per-layer modes by BN index (forward order), e.g. one layer in train mode and the rest
    /// in eval, as FixRes runs them.
    pub layer_modes: Option<&'a [BnMode]>,
    /// Momentum of train-mode running updates instead of each layer's own.
    pub momentum: Option<f64>,
    pub observer: Option<&'a mut dyn BnObserver>,
    /// Set from the model by [`Model::forward`](super::Model::forward).
    pub kernels: Kernels,
}

impl<'a> Ctx<'a> {
    pub fn eval() -> Ctx<'a> {
        Ctx::default()
    }
    pub fn calibrate(observer: &'a mut dyn BnObserver) -> Ctx<'a> {
        Ctx {
            mode: BnMode::Calibrate,
            observer: Some(observer),
            ..Ctx::default()
        }
    }
    pub fn train() -> Ctx<'a> {
        Ctx {
            mode: BnMode::Train,
            ..Ctx::default()
        }
    }
    /// The mode BN layer `index` runs in.
    pub fn mode_of(&self, index: usize) -> BnMode {
        self.layer_modes
            .and_then(|m| m.get(index).copied())
            .unwrap_or(self.mode)
    }
    /// Whether every layer runs in eval mode (the folded, fused path).
    pub fn all_eval(&self) -> bool {
        self.mode == BnMode::Eval
            && self
                .layer_modes
                .is_none_or(|m| m.iter().all(|&x| x == BnMode::Eval))
    }
}

/// Collects the BN layers in construction (= forward) order while a model is built.
#[derive(Debug)]
pub struct BnRegistry {
    /// Module paths, in forward order.
    pub prefixes: Vec<String>,
    /// The layers themselves (clones share their running statistics).
    pub layers: Vec<BatchNorm>,
    /// Train-mode momentum of the layers built from here on: PyTorch's default unless the
    /// family's builder sets its own.
    pub momentum: f64,
}

impl Default for BnRegistry {
    fn default() -> BnRegistry {
        BnRegistry {
            prefixes: Vec::new(),
            layers: Vec::new(),
            momentum: 0.1,
        }
    }
}

/// The module path a VarBuilder stands for.
fn path_of(vb: &VarBuilder) -> String {
    vb.prefix()
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    /// The bias as a tensor (candle's path) and as values (the CPU path's epilogue).
    bias: Option<(Vec<f32>, Tensor)>,
    geometry: Geometry,
    /// (kernel, stride) when the input is padded as TensorFlow's "same" before a convolution
    /// with no padding of its own.
    same: Option<(usize, usize)>,
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
    /// TensorFlow's "same" padding (timm's `tf_` ports): total padding
    /// `max((ceil(n / s) - 1) * s + k - n, 0)` per axis, the odd pixel after; otherwise
    /// PyTorch's symmetric `(k - 1) / 2`. The two differ only for strided or even kernels.
    pub same: bool,
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
            same: false,
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
    /// TensorFlow "same" padding when `same` (see [`ConvSpec::same`]).
    pub fn same_padding(mut self, same: bool) -> ConvSpec {
        self.same = same;
        self
    }
}

impl Conv2d {
    /// Output channels (the weight's first dimension).
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Reads `weight` `[cout, cin / groups, k, k]` (and `bias` `[cout]`); padding is (k - 1) / 2 as
    /// in every torchvision CNN here.
    pub fn new(vb: VarBuilder, s: ConvSpec) -> Result<Conv2d> {
        let weight = vb.get((s.cout, s.cin / s.groups, s.k, s.k), "weight")?;
        let bias = if s.bias {
            let b = vb.get(s.cout, "bias")?;
            Some((b.to_dtype(DType::F32)?.to_vec1()?, b))
        } else {
            None
        };
        // "Same" equals the symmetric padding for an odd kernel at stride 1.
        let same = (s.same && (s.stride > 1 || s.k % 2 == 0)).then_some((s.k, s.stride));
        Ok(Conv2d {
            weight,
            bias,
            geometry: Geometry {
                stride: s.stride,
                padding: if same.is_some() { 0 } else { (s.k - 1) / 2 },
                groups: s.groups,
            },
            same,
        })
    }

    /// `x` padded with zeros as TensorFlow's "same" padding does, when this convolution uses it.
    fn padded(&self, x: &Tensor) -> Result<Tensor> {
        let Some((k, s)) = self.same else {
            return Ok(x.clone());
        };
        let mut x = x.clone();
        for dim in [2, 3] {
            let n = x.dim(dim)?;
            let total = ((n.div_ceil(s) - 1) * s + k).saturating_sub(n);
            if total > 0 {
                x = x.pad_with_zeros(dim, total / 2, total - total / 2)?;
            }
        }
        Ok(x)
    }

    /// The same convolution with each output channel's weights multiplied by `scale[c]` (BN
    /// folded in); the bias, if any, is dropped (callers fold it into their shift).
    fn scaled(&self, scale: &Tensor) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: self.weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?,
            bias: None,
            ..self.clone()
        })
    }

    /// act(conv(x) + bias), fused on the CPU's fast kernels.
    pub fn forward_act(&self, x: &Tensor, ctx: &Ctx, act: Act) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|(v, t)| (v.as_slice(), t));
        let x = self.padded(x)?;
        cpu_conv::conv2d(
            ctx.kernels,
            &x,
            &self.weight,
            self.geometry,
            bias,
            None,
            act,
        )
    }

    /// conv(x) + bias.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.forward_act(x, ctx, Act::None)
    }
}

/// Running statistics that train mode updates.
#[derive(Debug)]
pub struct Running {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    /// Train-mode batches seen since the model was built.
    pub batches: u64,
}

#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub index: usize,
    /// The module path.
    pub prefix: String,
    /// gamma and beta: values for calibrate mode's normalisation, tensors (trainable ones are
    /// candle `Var`s) for train mode's.
    weight_v: Vec<f32>,
    bias_v: Vec<f32>,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    /// PyTorch's `momentum` (0.1 unless a family's builder sets another).
    pub momentum: f64,
    /// Eval mode: y = x * scale[c] + shift[c], both [C].
    scale: Tensor,
    shift: Tensor,
    /// Shared by the clones of a layer.
    running: Arc<Mutex<Running>>,
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
        let scale = (&weight / (&var + eps)?.sqrt()?)?;
        let shift = (&bias - (&mean * &scale)?)?;
        let prefix = path_of(&vb);
        let bn = BatchNorm {
            index: reg.prefixes.len(),
            prefix,
            weight_v: weight.to_dtype(DType::F32)?.to_vec1()?,
            bias_v: bias.to_dtype(DType::F32)?.to_vec1()?,
            weight,
            bias,
            eps,
            momentum: reg.momentum,
            scale,
            shift,
            running: Arc::new(Mutex::new(Running {
                mean: mean.to_dtype(DType::F32)?.to_vec1()?,
                var: var.to_dtype(DType::F32)?.to_vec1()?,
                batches: 0,
            })),
        };
        reg.prefixes.push(bn.prefix.clone());
        reg.layers.push(bn.clone());
        Ok(bn)
    }

    /// The running statistics as train mode has left them (as loaded, before any).
    pub fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.forward_add_act(x, None, ctx, Act::None)
    }

    /// Eval mode on the CPU kernels: `act(bn(x))` written into `dst` (see
    /// [`fused::channel_affine_into`]); the caller has checked both.
    pub fn eval_act_into(&self, x: &Tensor, dst: &Tensor, act: Act) -> Result<()> {
        fused::channel_affine_into(dst, x, &self.scale, &self.shift, act)
    }

    /// act(BN(x) + residual), one pass on the CPU's fast kernels.
    pub fn forward_add_act(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        ctx: &mut Ctx,
        act: Act,
    ) -> Result<Tensor> {
        let k = ctx.kernels;
        match ctx.mode_of(self.index) {
            BnMode::Eval => channel_affine(k, x, Some(&self.scale), &self.shift, residual, act),
            BnMode::Calibrate => {
                let (scale, shift) = self.calibrate_affine(x, ctx)?;
                let dev = x.device();
                let (scale, shift) = (Tensor::new(scale, dev)?, Tensor::new(shift, dev)?);
                let (scale, shift) = (scale.to_dtype(x.dtype())?, shift.to_dtype(x.dtype())?);
                channel_affine(k, x, Some(&scale), &shift, residual, act)
            }
            BnMode::Train
                if cpu_conv::train_kernels_for(x, k) && self.weight.dtype() == DType::F32 =>
            {
                self.train_kernels(residual, ctx, act, |fused| {
                    cpu_conv::train::batch_norm(x, &self.weight, &self.bias, self.eps, fused)
                })
            }
            BnMode::Train => {
                let y = self.train_forward(x, ctx)?;
                let y = match residual {
                    Some(r) => (y + r)?,
                    None => y,
                };
                act.tensor(&y)
            }
        }
    }

    /// Train mode on the train kernels: `run(fused)` normalises (applying `fused`, the
    /// activation when there is no residual) and gives the batch's moments, which the running
    /// statistics follow; then the residual and the activation, if not fused.
    fn train_kernels(
        &self,
        residual: Option<&Tensor>,
        ctx: &mut Ctx,
        act: Act,
        run: impl FnOnce(Act) -> Result<(Tensor, Vec<f32>, Vec<f32>)>,
    ) -> Result<Tensor> {
        let fused = if residual.is_none() && cpu_conv::train::supports(act) {
            act
        } else {
            Act::None
        };
        let (y, mean, var) = run(fused)?;
        let (n, _, h, w) = y.dims4()?;
        self.update_running(mean, var, n * h * w, ctx)?;
        if residual.is_none() && fused == act {
            Ok(y)
        } else {
            cpu_conv::train::add_act(&y, residual, act)
        }
    }

    /// Calibrate mode's normalisation of `x` as (scale, shift) per channel, from the batch's
    /// moments, which the context's observer hears.
    fn calibrate_affine(&self, x: &Tensor, ctx: &mut Ctx) -> Result<(Vec<f32>, Vec<f32>)> {
        let (n, c, h, w) = x.dims4()?;
        let (mean, var) = channel_moments(ctx.kernels, x)?;
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
        Ok((scale, shift))
    }

    /// [`BatchNorm::forward_add_act`] of an activation the caller hands over (a convolution's
    /// fresh output): in calibrate mode the normalisation is written over it, so the layer does
    /// not hold its input and its output at once.
    pub fn forward_add_act_owned(
        &self,
        x: Tensor,
        residual: Option<&Tensor>,
        ctx: &mut Ctx,
        act: Act,
    ) -> Result<Tensor> {
        if ctx.mode_of(self.index) != BnMode::Calibrate {
            return self.forward_add_act(&x, residual, ctx, act);
        }
        let (scale, shift) = self.calibrate_affine(&x, ctx)?;
        channel_affine_owned(ctx.kernels, x, &scale, &shift, residual, act)
    }

    /// Train mode: (x - mean) / sqrt(var + eps) * gamma + beta with the batch's mean and biased
    /// variance, all in candle ops so that gradients reach gamma, beta and x; then the running
    /// statistics move towards the batch's (unbiased variance), as PyTorch's do.
    fn train_forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let count = n * h * w;
        let per_channel = |t: &Tensor| -> Result<Tensor> {
            t.transpose(0, 1)?
                .reshape((c, count))?
                .mean_keepdim(1)?
                .reshape((1, c, 1, 1))
        };
        let mean = per_channel(x)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = per_channel(&centred.sqr()?)?;
        let inv_std = (&var + self.eps)?.sqrt()?.recip()?;
        let y = centred
            .broadcast_mul(&inv_std)?
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?;
        let mean_v: Vec<f32> = mean.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let var_v: Vec<f32> = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        self.update_running(mean_v, var_v, count, ctx)?;
        Ok(y)
    }

    /// Moves the running statistics towards one batch's mean and biased variance `var_v` over
    /// `count` elements per channel (PyTorch's update: unbiased variance, the layer's or the
    /// context's momentum), and reports the batch to the context's observer.
    fn update_running(
        &self,
        mean_v: Vec<f32>,
        var_v: Vec<f32>,
        count: usize,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let c = mean_v.len();
        let m = ctx.momentum.unwrap_or(self.momentum);
        let bessel = if count > 1 {
            count as f64 / (count as f64 - 1.0)
        } else {
            f64::NAN
        };
        {
            let mut r = self.running();
            for i in 0..c {
                r.mean[i] = ((1.0 - m) * r.mean[i] as f64 + m * mean_v[i] as f64) as f32;
                r.var[i] = ((1.0 - m) * r.var[i] as f64 + m * var_v[i] as f64 * bessel) as f32;
            }
            r.batches += 1;
        }
        if let Some(obs) = ctx.observer.as_deref_mut() {
            obs.observe(
                self.index,
                BatchStats {
                    mean: mean_v,
                    var: var_v,
                    count,
                },
            )?;
        }
        Ok(())
    }
}

/// A convolution followed by BatchNorm: torchvision's `Conv2dNormActivation` without the
/// activation, at `vb.pp(0)` and `vb.pp(1)`, or any two named children.
///
/// In eval mode the BN scale is folded into a copy of the convolution's weights, leaving one
/// per-channel shift, applied with the activation (and a residual, if any) in the convolution's
/// epilogue; the other modes run the original convolution so that BN sees the un-normalised
/// activations. The folded copy is made on the first eval-mode pass, so a job that only
/// calibrates (recal-bn) never holds the weights twice (issue 21); for trained layers it is made
/// with the layer, from the weights as built, as it always was.
#[derive(Clone, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    folded: std::sync::OnceLock<Conv2d>,
    shift: (Vec<f32>, Tensor),
}

impl ConvBn {
    /// The convolution alone: the input of a network's head BN (this layer's), for
    /// `Network::forward_trunk`.
    pub fn trunk(&self, x: &Tensor, ctx: &mut Ctx) -> Result<super::HeadInput> {
        Ok(super::HeadInput {
            x: self.conv.forward(x, ctx)?,
            residual: None,
        })
    }

    /// The BN and `act` on [`ConvBn::trunk`]'s output (and its shortcut, if any): a network's
    /// head up to its pool, for `Network::forward_head`.
    pub fn head(&self, input: &super::HeadInput, ctx: &mut Ctx, act: Act) -> Result<Tensor> {
        self.bn
            .forward_add_act(&input.x, input.residual.as_ref(), ctx, act)
    }

    pub fn new(
        conv: VarBuilder,
        bn: VarBuilder,
        s: ConvSpec,
        eps: f64,
        reg: &mut BnRegistry,
    ) -> Result<ConvBn> {
        let conv = Conv2d::new(conv, s)?;
        let bn = BatchNorm::new(bn, s.cout, eps, reg)?;
        let folded = std::sync::OnceLock::new();
        if conv.weight.track_op() || bn.scale.track_op() {
            let _ = folded.set(conv.scaled(&bn.scale)?);
        }
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

    /// The convolution with the BN scale folded into its weights (made on first use).
    fn folded(&self) -> Result<&Conv2d> {
        if let Some(f) = self.folded.get() {
            return Ok(f);
        }
        // Two threads may both fold; one result is kept, and both are the same.
        let _ = self.folded.set(self.conv.scaled(&self.bn.scale)?);
        Ok(self.folded.get().expect("set just above"))
    }

    /// What eval mode convolves: the input padded as the layer pads, the folded convolution,
    /// and the per-channel shift its epilogue adds.
    #[allow(clippy::type_complexity)]
    fn eval_operands(&self, x: &Tensor) -> Result<(Tensor, &Conv2d, Option<(&[f32], &Tensor)>)> {
        let f = self.folded()?;
        let shift = Some((self.shift.0.as_slice(), &self.shift.1));
        Ok((f.padded(x)?, f, shift))
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
        match ctx.mode_of(self.bn.index) {
            BnMode::Eval => {
                let (x, f, shift) = self.eval_operands(x)?;
                cpu_conv::conv2d(ctx.kernels, &x, &f.weight, f.geometry, shift, residual, act)
            }
            BnMode::Train if self.fuses_in_train(x, ctx.kernels) => {
                let x = self.conv.padded(x)?;
                let (conv, bn) = (&self.conv, &self.bn);
                bn.train_kernels(residual, ctx, act, |fused| {
                    let (w, g) = (&conv.weight, conv.geometry);
                    cpu_conv::train::conv_batch_norm(&x, w, g, &bn.weight, &bn.bias, bn.eps, fused)
                })
            }
            BnMode::Calibrate | BnMode::Train => {
                let y = self.conv.forward(x, ctx)?;
                self.bn.forward_add_act_owned(y, residual, ctx, act)
            }
        }
    }

    /// Whether train mode runs the convolution and the BN as one op of the train kernels
    /// ([`cpu_conv::train::conv_batch_norm`]): f32 on the CPU, no convolution bias, and a
    /// gradient to compute through the convolution.
    fn fuses_in_train(&self, x: &Tensor, k: cpu_conv::Kernels) -> bool {
        cpu_conv::train_kernels_for(x, k)
            && self.conv.bias.is_none()
            && self.conv.weight.dtype() == DType::F32
            && self.bn.weight.dtype() == DType::F32
            && (x.track_op() || self.conv.weight.track_op())
    }

    /// [`ConvBn::forward_add_act`] with the residual handed over: in eval mode on the fast
    /// kernels the result is written over the residual's storage
    /// ([`cpu_conv::conv2d_into_residual`]), so the block's end holds no second output-sized
    /// tensor. The caller vouches that no other tensor shares `residual`'s storage.
    pub fn forward_add_act_into(
        &self,
        x: &Tensor,
        residual: Tensor,
        ctx: &mut Ctx,
        act: Act,
    ) -> Result<Tensor> {
        match ctx.mode_of(self.bn.index) {
            BnMode::Eval => {
                let (x, f, shift) = self.eval_operands(x)?;
                cpu_conv::conv2d_into_residual(
                    ctx.kernels,
                    &x,
                    &f.weight,
                    f.geometry,
                    shift,
                    residual,
                    act,
                )
            }
            BnMode::Calibrate | BnMode::Train => self.forward_add_act(x, Some(&residual), ctx, act),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Reads `weight` [cout, cin] (or timm's 1x1 convolution's [cout, cin, 1, 1], see
    /// [`get_reshaped`]) and `bias` `[cout]`.
    pub fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
        Ok(Linear {
            weight: get_reshaped(&vb, &[cout, cin], "weight")?,
            bias: vb.get(cout, "bias")?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// `vb.get(shape, name)`, also taking the tensor stored with the same dimensions but for ones
/// added or left out: timm stores a 1x1 convolution where torchvision has a linear layer
/// (MobileNetV3's `conv_head`, the small ConvNeXts' `mlp.fc1`: [O, I, 1, 1] for [O, I]) and
/// ConvNeXt's layer scale as `[C]` where torchvision has `[C, 1, 1]`. Only the reading reshapes:
/// the checkpoint's tensor, and whatever is written back from it, keeps its stored shape (a
/// trained `Var` included, reshaped in the graph).
pub fn get_reshaped(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    let non_unit = |d: &[usize]| d.iter().copied().filter(|&n| n != 1).collect::<Vec<_>>();
    if vb.contains_tensor(name) {
        let t = vb.get_unchecked(name)?;
        if t.dims() == shape {
            return Ok(t);
        }
        if non_unit(t.dims()) == non_unit(shape) {
            return t.reshape(shape);
        }
    }
    // Also the error, naming the checkpoint's key, when the shapes differ otherwise.
    vb.get(shape, name)
}

/// The gate a squeeze-excitation multiplies by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// EfficientNet's and RegNetY's.
    Sigmoid,
    /// min(max(x + 3, 0), 6) / 6, MobileNetV3's.
    HardSigmoid,
}

/// torchvision's `SqueezeExcitation` at `vb` (`fc1`, `fc2`: 1x1 convolutions with biases):
/// x * gate(fc2(act(fc1(mean over H, W of x)))). The squeezed tensor is [N, C, 1, 1], too small
/// to need a kernel of its own: candle's ops.
#[derive(Clone, Debug)]
pub struct SqueezeExcite {
    fc1: Conv2d,
    fc2: Conv2d,
    act: Act,
    gate: Gate,
}

impl SqueezeExcite {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        squeeze: usize,
        act: Act,
        gate: Gate,
    ) -> Result<SqueezeExcite> {
        Ok(SqueezeExcite {
            fc1: Conv2d::new(vb.pp("fc1"), ConvSpec::new(channels, squeeze, 1).bias())?,
            fc2: Conv2d::new(vb.pp("fc2"), ConvSpec::new(squeeze, channels, 1).bias())?,
            act,
            gate,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let s = x.mean_keepdim((2, 3))?;
        let s = self
            .fc2
            .forward(&self.fc1.forward_act(&s, ctx, self.act)?, ctx)?;
        let s = match self.gate {
            Gate::Sigmoid => candle_nn::ops::sigmoid(&s)?,
            Gate::HardSigmoid => ((s + 3.0)?.clamp(0f32, 6f32)? / 6.0)?,
        };
        fused::plane_scale(ctx.kernels, x, &s)
    }
}

/// Global average pooling to [N, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// torch.nn.AdaptiveAvgPool2d((oh, ow)): output cell i averages input rows
/// floor(i * H / oh) .. ceil((i + 1) * H / oh) (bins overlap, or repeat rows, when H is not a
/// multiple of oh), and likewise for columns. Written as two small matrix products (pooling
/// matrices [W, ow] and [H, oh]), so one code path serves every size, the identity included.
pub fn adaptive_avg_pool(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    let pooling = |n: usize, out: usize| -> Result<Tensor> {
        let mut m = vec![0f32; n * out];
        for i in 0..out {
            let (a, b) = (i * n / out, ((i + 1) * n).div_ceil(out));
            for r in a..b {
                m[r * out + i] = 1.0 / (b - a) as f32;
            }
        }
        Tensor::from_vec(m, (n, out), x.device())?.to_dtype(x.dtype())
    };
    // [N, C, H, W] x [W, ow] -> [N, C, H, ow]; transposed, x [H, oh] -> [N, C, ow, oh].
    let y = x.broadcast_matmul(&pooling(w, ow)?)?;
    let y = y
        .transpose(2, 3)?
        .contiguous()?
        .broadcast_matmul(&pooling(h, oh)?)?;
    y.transpose(2, 3)?.contiguous()
}

/// torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), timm's average-pool
/// projection (ResNet-D): an odd last row or column is averaged alone. Written, as
/// [`adaptive_avg_pool`], as two products with pooling matrices: each window is a product of a
/// row range and a column range, and each average divides by the cells inside the input.
pub fn avg_pool_2x2_s2_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pooling = |n: usize| -> Result<Tensor> {
        let out = n.div_ceil(2);
        let mut m = vec![0f32; n * out];
        for i in 0..out {
            let (a, b) = (2 * i, (2 * i + 2).min(n));
            for r in a..b {
                m[r * out + i] = 1.0 / (b - a) as f32;
            }
        }
        Tensor::from_vec(m, (n, out), x.device())?.to_dtype(x.dtype())
    };
    let y = x.contiguous()?.broadcast_matmul(&pooling(w)?)?;
    let y = y
        .transpose(2, 3)?
        .contiguous()?
        .broadcast_matmul(&pooling(h)?)?;
    y.transpose(2, 3)?.contiguous()
}

/// torch.nn.MaxPool2d(3, 2, 1) on the context's kernels.
pub fn max_pool_3x3_s2_p1(x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    cpu_conv::max_pool_3x3_s2_p1(ctx.kernels, x)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Var};

    use super::*;

    fn bn(channels: usize, reg: &mut BnRegistry) -> (BatchNorm, Var, Var) {
        let dev = Device::Cpu;
        let w =
            Var::from_vec(vec![1.5f32, -0.5, 2.0][..channels].to_vec(), channels, &dev).unwrap();
        let b =
            Var::from_vec(vec![0.1f32, 0.2, -0.3][..channels].to_vec(), channels, &dev).unwrap();
        let t: HashMap<String, Tensor> = [
            ("bn.weight", w.as_tensor().clone()),
            ("bn.bias", b.as_tensor().clone()),
            (
                "bn.running_mean",
                Tensor::new(&[0.5f32, -1.0, 0.0][..channels], &dev).unwrap(),
            ),
            (
                "bn.running_var",
                Tensor::new(&[2.0f32, 1.0, 0.5][..channels], &dev).unwrap(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        (
            BatchNorm::new(vb.pp("bn"), channels, 1e-5, reg).unwrap(),
            w,
            b,
        )
    }

    /// Train mode normalises with the batch's biased variance, moves the running statistics
    /// with momentum and the unbiased variance (PyTorch's formulas, written out here), and is
    /// differentiable in gamma and beta; calibrate mode normalises the same way and leaves the
    /// running statistics alone.
    #[test]
    fn train_mode_is_pytorchs_and_differentiable() {
        let mut reg = BnRegistry {
            momentum: 0.25,
            ..BnRegistry::default()
        };
        let (layer, w, b) = bn(3, &mut reg);
        let x = Tensor::randn(0.3f32, 2.0, (4, 3, 5, 6), &Device::Cpu).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let n = 4 * 5 * 6;
        let mut ctx = Ctx::train();
        let y = layer.forward(&x, &mut ctx).unwrap();
        let ys: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let weights = [1.5f64, -0.5, 2.0];
        let biases = [0.1f64, 0.2, -0.3];
        let (old_mean, old_var) = ([0.5f64, -1.0, 0.0], [2.0f64, 1.0, 0.5]);
        let r = layer.running();
        for c in 0..3 {
            let vals: Vec<f64> = (0..4)
                .flat_map(|i| xs[(i * 3 + c) * 30..][..30].iter().map(|&v| v as f64))
                .collect();
            let mean = vals.iter().sum::<f64>() / n as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            for i in 0..4 {
                for j in 0..30 {
                    let k = (i * 3 + c) * 30 + j;
                    let want = (xs[k] as f64 - mean) / (var + 1e-5).sqrt() * weights[c] + biases[c];
                    assert!((ys[k] as f64 - want).abs() < 1e-4, "{} vs {want}", ys[k]);
                }
            }
            let rm = 0.75 * old_mean[c] + 0.25 * mean;
            let rv = 0.75 * old_var[c] + 0.25 * var * n as f64 / (n - 1) as f64;
            assert!((r.mean[c] as f64 - rm).abs() < 1e-5, "running mean");
            assert!((r.var[c] as f64 - rv).abs() < 1e-4, "running var");
        }
        assert_eq!(r.batches, 1);
        drop(r);
        // d(sum(y))/d(beta) = N*H*W per channel; d(sum(y * x))/d(gamma) = sum(xhat * x).
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gb: Vec<f32> = grads.get(b.as_tensor()).unwrap().to_vec1().unwrap();
        assert!(gb.iter().all(|g| (*g - n as f32).abs() < 1e-3), "{gb:?}");
        assert!(grads.get(w.as_tensor()).is_some());

        let mut ctx = Ctx::default();
        let modes = [BnMode::Calibrate];
        ctx.layer_modes = Some(&modes);
        let yc = layer.forward(&x, &mut ctx).unwrap();
        let diff = (yc - &y).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        assert_eq!(
            layer.running().batches,
            1,
            "calibrate leaves the running statistics"
        );
    }
}

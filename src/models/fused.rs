//! Per-channel maps over NCHW tensors on the CPU: the affine map `act(x * scale[c] + shift[c] +
//! residual)` as one pass, and a BN layer's batch moments.
//!
//! candle computes `x.broadcast_mul(scale).broadcast_add(shift)` with two strided passes whose
//! per-element index arithmetic makes them about 20 times slower than a contiguous unary op
//! (`../shared/CANDLE-NOTES.md`: eval BN 58 ms vs ReLU 2.8 ms on 32x64x56x56). In eval mode the
//! BN scale is folded into the convolution's weights, so what remains after each convolution is
//! a per-channel shift, here done in place of those passes. Other devices, dtypes and layouts
//! take candle's broadcast ops.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp1, InplaceOp2, Layout, Result, Shape, Tensor,
    D,
};
use rayon::prelude::*;

use super::cpu_conv::{cpu_kernels_for, Act, Kernels, Simd};

struct ChannelAffine {
    scale: Option<Vec<f32>>,
    shift: Vec<f32>,
    act: Act,
}

impl ChannelAffine {
    fn run(&self, x: &[f32], dims: &[usize], residual: Option<&[f32]>) -> Vec<f32> {
        let mut out = x.to_vec();
        self.apply(&mut out, dims, residual);
        out
    }

    /// The map over `out` in place.
    fn apply(&self, out: &mut [f32], dims: &[usize], residual: Option<&[f32]>) {
        let c = dims[1];
        let plane: usize = dims[2..].iter().product::<usize>().max(1);
        let simd = Simd::detect();
        out.par_chunks_mut(plane).enumerate().for_each(|(j, ys)| {
            let r = residual.map(|r| &r[j * plane..][..plane]);
            self.map_plane(simd, j % c, ys, r);
        });
    }

    /// The map over one plane of channel `ch`, in place.
    fn map_plane(&self, simd: Simd, ch: usize, ys: &mut [f32], residual: Option<&[f32]>) {
        let s = self.scale.as_ref().map_or(1.0, |s| s[ch]);
        simd.epilogue(ys, s, self.shift[ch], residual, self.act);
    }
}

fn contiguous_f32_mut<'s>(storage: &'s mut CpuStorage, layout: &Layout) -> Result<&'s mut [f32]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("channel-affine needs a contiguous tensor".into())
    })?;
    match storage {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("channel-affine needs f32"),
    }
}

impl InplaceOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let out = contiguous_f32_mut(storage, layout)?;
        self.apply(out, layout.shape().dims(), None);
        Ok(())
    }
}

impl InplaceOp2 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine-residual-in-place"
    }

    fn cpu_fwd(
        &self,
        xs: &mut CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        if xl.shape() != rl.shape() {
            candle_core::bail!(
                "channel-affine: residual {:?} for {:?}",
                rl.shape(),
                xl.shape()
            );
        }
        let r = contiguous_f32(rs, rl)?;
        let out = contiguous_f32_mut(xs, xl)?;
        self.apply(out, xl.shape().dims(), Some(r));
        Ok(())
    }
}

fn contiguous_f32<'s>(storage: &'s CpuStorage, layout: &Layout) -> Result<&'s [f32]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("channel-affine needs a contiguous tensor".into())
    })?;
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("channel-affine needs f32"),
    }
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let out = self.run(x, layout.shape().dims(), None);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// For a layout that is not contiguous but whose every image (index of the first dimension) is
/// one contiguous run, as `narrow(1, 0, c)` of a contiguous tensor gives: (the first value's
/// offset, the values per image, the offset from one image to the next).
fn image_runs(layout: &Layout) -> Option<(usize, usize, usize)> {
    let dims = layout.shape().dims();
    let strides = layout.stride();
    if dims.len() < 2 || layout.is_contiguous() {
        return None;
    }
    let mut expect = 1;
    for (d, s) in dims.iter().zip(strides).skip(1).rev() {
        if *d != 1 && *s != expect {
            return None;
        }
        expect *= d;
    }
    (strides[0] >= expect).then_some((layout.start_offset(), expect, strides[0]))
}

/// `x * s` for x [N, C, ...] and a gate s [N, C, 1, ...] (squeeze-excitation's): on the CPU
/// kernels one pass, a plane per task, in place of candle's broadcast multiply; elsewhere (and
/// where either side keeps a graph) candle's.
pub fn plane_scale(k: Kernels, x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let fits = x.rank() >= 2
        && s.rank() == x.rank()
        && s.dims()[..2] == x.dims()[..2]
        && s.dims()[2..].iter().all(|&d| d == 1);
    if fits && cpu_kernels_for(x, k) && cpu_kernels_for(s, k) && !(x.track_op() || s.track_op()) {
        let gate: Vec<f32> = s.flatten_all()?.to_vec1()?;
        return x.contiguous()?.apply_op1_no_bwd(&PlaneScale { gate });
    }
    x.broadcast_mul(s)
}

struct PlaneScale {
    gate: Vec<f32>,
}

impl CustomOp1 for PlaneScale {
    fn name(&self) -> &'static str {
        "plane-scale"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let planes = self.gate.len().max(1);
        let plane = x.len() / planes;
        let mut out = Vec::with_capacity(x.len());
        if plane > 0 {
            out.spare_capacity_mut()[..x.len()]
                .par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .zip(&self.gate)
                .for_each(|((o, xs), &g)| {
                    for (d, v) in o.iter_mut().zip(xs) {
                        d.write(v * g);
                    }
                });
        }
        // SAFETY: the planes cover all x.len() values, each written above.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `act(x * scale[c] + shift[c])` written into `dst` (a contiguous f32 tensor on the CPU shaped
/// as `x`, that nothing else reads meanwhile), `x` contiguous or one run per image (see
/// `image_runs`): each plane is copied and mapped while it is in cache. DenseNet's layers
/// normalise their block's channels into one reused buffer this way, instead of a fresh and
/// larger tensor each (whose pages the kernel would fault in and zero every time).
pub fn channel_affine_into(
    dst: &Tensor,
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    act: Act,
) -> Result<()> {
    if dst.shape() != x.shape() || x.rank() < 2 {
        candle_core::bail!("channel-affine: {:?} into {:?}", x.shape(), dst.shape());
    }
    let x = match image_runs(x.layout()) {
        Some(_) => x.clone(),
        None => x.contiguous()?,
    };
    let op = ChannelAffine {
        scale: Some(scale.to_vec1::<f32>()?),
        shift: shift.to_vec1::<f32>()?,
        act,
    };
    dst.inplace_op2(&x, &AffineInto(op))
}

struct AffineInto(ChannelAffine);

impl InplaceOp2 for AffineInto {
    fn name(&self) -> &'static str {
        "channel-affine-into"
    }

    fn cpu_fwd(
        &self,
        ds: &mut CpuStorage,
        dl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<()> {
        let dst = contiguous_f32_mut(ds, dl)?;
        let dims = xl.shape().dims();
        let (start, image, stride) = match image_runs(xl) {
            Some(r) => r,
            None => {
                let (start, end) = xl.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("channel-affine needs whole images".into())
                })?;
                let image = (end - start) / dims[0].max(1);
                (start, image, image)
            }
        };
        let CpuStorage::F32(x) = xs else {
            candle_core::bail!("channel-affine needs f32")
        };
        let c = dims[1];
        let plane = image / c.max(1);
        let op = &self.0;
        let simd = Simd::detect();
        dst.par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(j, ys)| {
                let (i, ch) = (j / c, j % c);
                ys.copy_from_slice(&x[start + i * stride + ch * plane..][..plane]);
                op.map_plane(simd, ch, ys, None);
            });
        Ok(())
    }
}

/// Writes `src` [N, c, ...] into channels `at .. at + c` of `dst` [N, C, ...] in place (a
/// contiguous f32 tensor on the CPU that nothing else reads meanwhile): DenseNet's layers append
/// their output to the block's buffer so, instead of concatenating the block's input afresh.
pub fn write_channels(dst: &Tensor, src: &Tensor, at: usize) -> Result<()> {
    let (n, c) = (src.dim(0)?, src.dim(1)?);
    let (dn, dc) = (dst.dim(0)?, dst.dim(1)?);
    if dn != n || at + c > dc || dst.dims()[2..] != src.dims()[2..] {
        candle_core::bail!(
            "write channels: {:?} at channel {at} of {:?}",
            src.shape(),
            dst.shape()
        );
    }
    dst.inplace_op2(&src.contiguous()?, &WriteChannels { at })
}

struct WriteChannels {
    at: usize,
}

impl InplaceOp2 for WriteChannels {
    fn name(&self) -> &'static str {
        "write-channels"
    }

    fn cpu_fwd(
        &self,
        ds: &mut CpuStorage,
        dl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let src = contiguous_f32(ss, sl)?;
        let dst = contiguous_f32_mut(ds, dl)?;
        let n = dl.shape().dims()[0];
        if n == 0 {
            return Ok(());
        }
        let (image_dst, image_src) = (dst.len() / n, src.len() / n);
        let plane = image_src / sl.shape().dims()[1].max(1);
        dst.par_chunks_mut(image_dst)
            .zip(src.par_chunks(image_src.max(1)))
            .for_each(|(d, s)| d[self.at * plane..][..image_src].copy_from_slice(s));
        Ok(())
    }
}

impl CustomOp2 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.shape() != rl.shape() {
            candle_core::bail!(
                "channel-affine: residual {:?} for {:?}",
                rl.shape(),
                xl.shape()
            );
        }
        let (x, r) = (contiguous_f32(xs, xl)?, contiguous_f32(rs, rl)?);
        let out = self.run(x, xl.shape().dims(), Some(r));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `act(x * scale[c] + shift[c] + residual)` over `[N, C, ...]`; `scale` and `shift` are `[C]`
/// tensors, the residual is shaped as x.
pub fn channel_affine(
    k: Kernels,
    x: &Tensor,
    scale: Option<&Tensor>,
    shift: &Tensor,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    let graph = scale.is_some_and(|s| s.track_op()) || shift.track_op();
    if cpu_kernels_for(x, k) && x.rank() >= 2 && !(graph && k == Kernels::Train) {
        let x = x.contiguous()?;
        let op = ChannelAffine {
            scale: scale.map(|s| s.to_vec1::<f32>()).transpose()?,
            shift: shift.to_vec1::<f32>()?,
            act,
        };
        return match residual {
            Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op),
            None => x.apply_op1_no_bwd(&op),
        };
    }
    let c = shift.dim(0)?;
    let mut view = vec![1usize; x.rank()];
    view[1] = c;
    let mut y = match scale {
        Some(s) => x.broadcast_mul(&s.reshape(view.clone())?)?,
        None => x.clone(),
    };
    y = y.broadcast_add(&shift.reshape(view)?)?;
    if let Some(r) = residual {
        y = (y + r)?;
    }
    act.tensor(&y)
}

/// [`channel_affine`] written over `x` itself, returning it: for an activation nobody else
/// holds (a convolution's fresh output in calibrate mode), so that a layer keeps one
/// activation alive instead of two at its peak. `x` must be contiguous; on other devices,
/// dtypes or kernels this is [`channel_affine`] into a new tensor.
pub fn channel_affine_owned(
    k: Kernels,
    x: Tensor,
    scale: &[f32],
    shift: &[f32],
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    if cpu_kernels_for(&x, k) && x.rank() >= 2 && x.is_contiguous() && !x.is_variable() {
        let op = ChannelAffine {
            scale: Some(scale.to_vec()),
            shift: shift.to_vec(),
            act,
        };
        match residual {
            Some(r) => x.inplace_op2(&r.contiguous()?, &op)?,
            None => x.inplace_op1(&op)?,
        }
        return Ok(x);
    }
    let dev = x.device();
    let (scale, shift) = (Tensor::new(scale, dev)?, Tensor::new(shift, dev)?);
    let (scale, shift) = (scale.to_dtype(x.dtype())?, shift.to_dtype(x.dtype())?);
    channel_affine(k, &x, Some(&scale), &shift, residual, act)
}

/// act(x + residual), written over `x` where [`channel_affine_owned`] can (an `x` nobody else
/// holds); candle's ops elsewhere.
pub fn add_act_owned(k: Kernels, x: Tensor, residual: &Tensor, act: Act) -> Result<Tensor> {
    if cpu_kernels_for(&x, k) && x.rank() >= 2 && x.is_contiguous() && !x.is_variable() {
        let c = x.dim(1)?;
        return channel_affine_owned(k, x, &vec![1.0; c], &vec![0.0; c], Some(residual), act);
    }
    act.tensor(&(x + residual)?)
}

/// LayerNorm over the channels of each pixel (ConvNeXt's `LayerNorm2d`): biased variance.
struct ChannelNorm<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

impl CustomOp1 for ChannelNorm<'_> {
    fn name(&self) -> &'static str {
        "channel-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let (_, c, h, w) = layout.shape().dims4()?;
        if self.weight.len() != c || self.bias.len() != c {
            candle_core::bail!(
                "channel norm: {} weights for {c} channels",
                self.weight.len()
            );
        }
        let p = h * w;
        let mut out = x.to_vec();
        if p == 0 || c == 0 {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        let simd = Simd::detect();
        // Per image, over the channel planes in turn: the mean, then the variance about it (two
        // passes, as stable as candle's), then the result (see `channel_norm_columns`).
        out.par_chunks_mut(c * p)
            .for_each_init(Vec::new, |stats, o| {
                simd.channel_norm_columns(o, p, (self.weight, self.bias, self.eps), stats)
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// LayerNorm over the channels of `x` `[N, C, H, W]` with `weight` and `bias` `[C]` (the same
/// values as `weight_t` and `bias_t`, shaped `[1, C, 1, 1]`): on the CPU's fast kernels one pass
/// for the mean, one for the variance and one writing the result, per image; elsewhere (other
/// devices and dtypes, a graph to differentiate, candle's kernels) candle's ops, seven passes.
pub fn channel_layer_norm(
    k: Kernels,
    x: &Tensor,
    (weight, weight_t): (&[f32], &Tensor),
    (bias, bias_t): (&[f32], &Tensor),
    eps: f64,
) -> Result<Tensor> {
    if cpu_kernels_for(x, k) && x.rank() == 4 && !x.track_op() {
        let op = ChannelNorm {
            weight,
            bias,
            eps: eps as f32,
        };
        return x.contiguous()?.apply_op1_no_bwd(&op);
    }
    let centred = x.broadcast_sub(&x.mean_keepdim(1)?)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight_t)?
        .broadcast_add(bias_t)
}

/// Per-channel mean and biased variance of an [N, C, ...] tensor over every axis but the
/// channel one, as f32 (what a BN layer normalises with in train mode).
///
/// On the CPU in f32: one task per channel, one pass over its planes straight from the NCHW
/// layout summing, in f64, the deviations from the channel's first value and their squares
/// (shifted so that the variance does not come from the difference of two large sums: its
/// error is f64's rounding times the squared distance of that value from the mean in standard
/// deviations). The earlier two-pass version read each activation again for the squared
/// deviations from the mean, from memory: a channel's planes do not stay in cache at batch 64
/// (3.2 MB for one of MobileNetV2's 112 x 112 channels). One pass, with the sums vectorised as
/// well (`Simd::shifted_sums`): 11.6 -> 8.7 % of a MobileNetV2 soup's samples, and its recal-bn
/// over 448 images at batch 64 6.1 -> 5.4-5.6 s (session 10).
///
/// Elsewhere candle's reductions over a [C, N * H * W] copy, two-pass in f32 as PyTorch's CPU
/// kernel. Either agrees with PyTorch's batch statistics well inside the 1e-4 the recal-bn tests
/// hold them to; the f64 sums are the closer to exact.
pub fn channel_moments(k: Kernels, x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        candle_core::bail!("channel moments of a tensor of shape {dims:?}");
    }
    let (n, c) = (dims[0], dims[1]);
    let plane: usize = dims[2..].iter().product();
    let count = (n * plane).max(1) as f64;
    if cpu_kernels_for(x, k) {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("channel moments: not contiguous".into()))?;
        let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
            candle_core::bail!("channel moments: not an f32 CPU tensor");
        };
        let v = &v[start..end];
        let planes = |ch: usize| (0..n).map(move |i| &v[(i * c + ch) * plane..][..plane]);
        let simd = Simd::detect();
        let (mean, var): (Vec<f32>, Vec<f32>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let shift = planes(ch)
                    .next()
                    .and_then(|p| p.first())
                    .map_or(0.0, |&x| x as f64);
                let (sum, sq) = planes(ch)
                    .map(|p| simd.shifted_sums(p, shift))
                    .fold((0.0, 0.0), |(s, q), (ps, pq)| (s + ps, q + pq));
                let d = sum / count;
                let var = (sq / count - d * d).max(0.0);
                ((shift + d) as f32, var as f32)
            })
            .unzip();
        return Ok((mean, var));
    }
    let flat = x.transpose(0, 1)?.reshape((c, n * plane))?;
    let mean = flat.mean_keepdim(D::Minus1)?;
    let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
    let to_vec = |t: Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
    Ok((to_vec(mean)?, to_vec(var)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass shifted moments against exact ones (two passes in f64 over f64 copies), on
    /// channels whose mean is far from zero against their spread (where the unshifted one-pass
    /// formula loses the variance), near zero, and constant.
    #[test]
    fn channel_moments_are_exact_in_f32_in_one_pass() {
        let (n, c, h, w) = (3, 4, 5, 7);
        let offsets = [1000.0f32, -3.5, 0.0, 250.0];
        let spreads = [1e-3f32, 2.0, 1.0, 0.0];
        let mut x = vec![0f32; n * c * h * w];
        for (i, v) in x.iter_mut().enumerate() {
            let ch = i / (h * w) % c;
            *v = offsets[ch] + spreads[ch] * ((i as f32 * 0.731).sin() + 0.25);
        }
        let t = Tensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
        let (mean, var) = channel_moments(Kernels::Fast, &t).unwrap();
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| x[(i * c + ch) * h * w..][..h * w].iter().map(|&v| v as f64))
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / vals.len() as f64;
            assert_eq!(mean[ch], m as f32, "channel {ch} mean");
            let err = (var[ch] as f64 - v).abs();
            assert!(
                err <= 1e-6 * v,
                "channel {ch} variance {} against {v}",
                var[ch]
            );
        }
        assert_eq!(var[3], 0.0);
    }

    /// Squeeze-excitation's gate: the same bits as candle's broadcast multiply, on the CPU
    /// kernels and through candle's ops.
    #[test]
    fn plane_scale_is_the_broadcast_multiply() {
        let dev = Device::Cpu;
        let x: Vec<f32> = (0..2 * 3 * 4 * 5)
            .map(|i| (i as f32 * 0.61).cos())
            .collect();
        let x = Tensor::from_vec(x, (2, 3, 4, 5), &dev).unwrap();
        let g = Tensor::new(&[0.5f32, -1.5, 2.25, 0.0, 1.0, -0.125], &dev)
            .unwrap()
            .reshape((2, 3, 1, 1))
            .unwrap();
        let want: Vec<f32> = x
            .broadcast_mul(&g)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for k in [Kernels::Fast, Kernels::Candle] {
            let got: Vec<f32> = plane_scale(k, &x, &g)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{k:?}");
        }
    }

    /// DenseNet's block buffer: channels written in place at an offset, and the first channels
    /// of a wider tensor (a view, one run per image) mapped as their contiguous copy is, into a
    /// new tensor and into the front of a reused buffer.
    #[test]
    fn views_of_the_first_channels_and_writes_at_a_channel_offset() {
        let dev = Device::Cpu;
        let (n, c, h, w) = (3, 5, 2, 3);
        let all: Vec<f32> = (0..n * c * h * w)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let full = Tensor::from_vec(all, (n, c, h, w), &dev).unwrap();
        let buf = Tensor::zeros((n, c, h, w), DType::F32, &dev).unwrap();
        write_channels(&buf, &full.narrow(1, 0, 2).unwrap(), 0).unwrap();
        write_channels(&buf, &full.narrow(1, 2, 3).unwrap(), 2).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            a == b
        };
        assert!(same(&buf, &full));
        assert!(
            write_channels(&buf, &full, 1).is_err(),
            "past the last channel"
        );

        let view = full.narrow(1, 0, 3).unwrap();
        assert_eq!(image_runs(view.layout()), Some((0, 3 * h * w, c * h * w)));
        assert_eq!(
            image_runs(full.layout()),
            None,
            "contiguous: the plain path"
        );
        assert_eq!(
            image_runs(full.narrow(1, 1, 3).unwrap().layout()),
            Some((h * w, 3 * h * w, c * h * w))
        );
        assert_eq!(
            image_runs(full.narrow(2, 0, 1).unwrap().layout()),
            None,
            "rows cut"
        );
        let s = Tensor::new(&[0.5f32, -2.0, 3.0], &dev).unwrap();
        let b = Tensor::new(&[1.0f32, 0.0, -1.0], &dev).unwrap();
        let want = channel_affine(
            Kernels::Fast,
            &view.contiguous().unwrap(),
            Some(&s),
            &b,
            None,
            Act::Relu,
        )
        .unwrap();
        let got = channel_affine(Kernels::Fast, &view, Some(&s), &b, None, Act::Relu).unwrap();
        assert!(same(&got, &want));
        let scratch = Tensor::zeros(n * c * h * w, DType::F32, &dev).unwrap();
        let front = scratch
            .narrow(0, 0, n * 3 * h * w)
            .unwrap()
            .reshape((n, 3, h, w))
            .unwrap();
        channel_affine_into(&front, &view, &s, &b, Act::Relu).unwrap();
        assert!(same(&front, &want));
    }

    #[test]
    fn equals_broadcast_ops() {
        // Deterministic inputs, |values| below 8 after the affine map: fused multiply-add and
        // candle's separate multiply and add then differ by under 1e-6.
        let wave = |f: f32, a: f32| {
            let v: Vec<f32> = (0..120).map(|i| a * (i as f32 * f).sin()).collect();
            Tensor::from_vec(v, (2, 3, 4, 5), &Device::Cpu).unwrap()
        };
        let (x, r) = (wave(0.7, 2.0), wave(1.3, 1.0));
        let s = Tensor::new(&[0.5f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, 0.0, -1.0], &Device::Cpu).unwrap();
        for act in Act::ALL {
            for res in [None, Some(&r)] {
                let got = channel_affine(Kernels::Fast, &x, Some(&s), &b, res, act).unwrap();
                // The same map written over a copy of x, on both kernel choices.
                let (sv, bv) = (s.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                for k in [Kernels::Fast, Kernels::Candle] {
                    let owned = x.copy().unwrap();
                    let got_owned = channel_affine_owned(k, owned, &sv, &bv, res, act).unwrap();
                    let d: f32 = (&got_owned - &got)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    assert!(d < 1e-6, "owned {k:?} {act:?}: {d:e}");
                }
                let mut want = x
                    .broadcast_mul(&s.reshape((1, 3, 1, 1)).unwrap())
                    .unwrap()
                    .broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap())
                    .unwrap();
                if let Some(r) = res {
                    want = (want + r).unwrap();
                }
                let want = act.tensor(&want).unwrap();
                let d: f32 = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(d < 1e-6, "{act:?}, residual {}: {d:e}", res.is_some());
            }
        }
    }

    /// The fused LayerNorm over channels against candle's seven passes, for a plane of several
    /// pixels and for pooled [N, C, 1, 1] input.
    #[test]
    fn channel_layer_norm_equals_candles_ops() {
        for (n, c, h, w) in [(3, 24, 5, 7), (2, 16, 1, 1)] {
            let v: Vec<f32> = (0..n * c * h * w)
                .map(|i| 3.0 * (i as f32 * 0.37).sin() + 0.5 * (i % 7) as f32)
                .collect();
            let x = Tensor::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap();
            let wv: Vec<f32> = (0..c).map(|i| 0.5 + 0.1 * i as f32).collect();
            let bv: Vec<f32> = (0..c).map(|i| (i as f32 * 0.9).cos()).collect();
            let wt = Tensor::from_vec(wv.clone(), (1, c, 1, 1), &Device::Cpu).unwrap();
            let bt = Tensor::from_vec(bv.clone(), (1, c, 1, 1), &Device::Cpu).unwrap();
            let run = |k| {
                channel_layer_norm(k, &x, (&wv, &wt), (&bv, &bt), 1e-6)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (fast, candle) = (run(Kernels::Fast), run(Kernels::Candle));
            let worst = fast
                .iter()
                .zip(&candle)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "[{n}, {c}, {h}, {w}]: {worst:e}");
            // Not the input, not constant: the normalisation happened.
            assert!(candle.iter().any(|&y| (y - candle[0]).abs() > 0.1));
        }
    }
}

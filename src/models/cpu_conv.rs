//! Convolutions on the CPU at gemm speed, with their epilogue (per-channel shift, residual add,
//! activation) fused in.
//!
//! candle 0.11's CPU conv2d reaches about a seventh of this machine's f32 peak, and its grouped
//! convolution runs group by group (depthwise: 0.16 GFLOP/s, `../shared/CANDLE-NOTES.md`). Here,
//! for f32 NCHW tensors on the CPU:
//!
//! - dense and grouped convolutions are an im2col (skipped for 1x1 stride-1, where the input
//!   plane already is the gemm's right-hand side) into the `gemm` crate, one image per rayon task
//!   when the batch can keep every thread busy, else one image at a time with gemm's own threads;
//! - depthwise convolutions (groups = channels) are a direct kernel, one plane per task, whose
//!   stride-1 inner loop is a contiguous multiply-add the compiler vectorises;
//! - the epilogue `act(conv + shift[c] + residual)` runs on each image's output while it is still
//!   in cache, replacing three or four full passes over the activation.
//!
//! Everything else (other devices and dtypes, or `CKPT_CPU_CONV=candle` to measure the
//! difference) takes candle's conv2d and tensor ops, so a model is one description for CPU and
//! CUDA. Results agree with candle's path to float rounding (summation order): tests in
//! `tests/models.rs` hold them to 1e-5 of the output's scale for every shape class the supported
//! families use.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// The activation a convolution's epilogue applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Act {
    #[default]
    None,
    Relu,
    /// min(max(x, 0), 6), MobileNetV2's.
    Relu6,
    /// x * sigmoid(x), EfficientNet's.
    Silu,
}

impl Act {
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            Act::None => v,
            Act::Relu => v.max(0.0),
            Act::Relu6 => v.clamp(0.0, 6.0),
            Act::Silu => v / (1.0 + (-v).exp()),
        }
    }

    /// The same activation with candle's tensor ops.
    pub fn tensor(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(x.clone()),
            Act::Relu => x.relu(),
            Act::Relu6 => x.clamp(0f32, 6f32),
            Act::Silu => x.silu(),
        }
    }
}

/// Geometry of a convolution: torch.nn.Conv2d's with equal padding on both axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

/// Whether the fast path is on: `CKPT_CPU_CONV=candle` turns it off (for benchmarks and for
/// checking a result against candle's own convolution).
fn fast_path_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("CKPT_CPU_CONV").map_or(true, |v| v != "candle"))
}

/// `act(conv2d(x, weight) + shift[c] + residual)`: x is [N, Cin, H, W], weight
/// [Cout, Cin / groups, K, K], shift [Cout] (a missing shift is zero), residual shaped as the
/// output. On the CPU in f32 this is one fused pass (see the module doc); elsewhere candle's ops.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    g: Geometry,
    shift: Option<(&[f32], &Tensor)>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if cpu_f32 && fast_path_enabled() {
        let op = ConvOp {
            g,
            shift: shift.map(|s| s.0),
            act,
        };
        let (x, weight) = (x.contiguous()?, weight.contiguous()?);
        return match residual {
            Some(r) => x.apply_op3_no_bwd(&weight, &r.contiguous()?, &op),
            None => x.apply_op2_no_bwd(&weight, &op),
        };
    }
    candle_conv2d(x, weight, g, shift.map(|s| s.1), residual, act)
}

/// The reference path: candle's conv2d, then broadcast shift, residual and activation.
pub fn candle_conv2d(
    x: &Tensor,
    weight: &Tensor,
    g: Geometry,
    shift: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    let mut y = x.conv2d(weight, g.padding, g.stride, 1, g.groups)?;
    if let Some(s) = shift {
        y = y.broadcast_add(&s.reshape(((), 1, 1))?)?;
    }
    if let Some(r) = residual {
        y = (y + r)?;
    }
    act.tensor(&y)
}

struct ConvOp<'a> {
    g: Geometry,
    shift: Option<&'a [f32]>,
    act: Act,
}

/// The f32 slice a contiguous CPU tensor covers.
fn f32_slice<'s>(s: &'s CpuStorage, l: &Layout, what: &str) -> Result<&'s [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("cpu conv: {what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("cpu conv: {what} is not f32"),
    }
}

/// Sizes of one convolution, checked against each other.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    ho: usize,
    wo: usize,
}

impl ConvOp<'_> {
    fn dims(&self, x: &Layout, w: &Layout) -> Result<Dims> {
        let (n, cin, h, wd) = x.shape().dims4()?;
        let (cout, cin_g, k, k2) = w.shape().dims4()?;
        let g = self.g;
        if k != k2 || g.groups == 0 || cin_g * g.groups != cin || cout % g.groups != 0 {
            candle_core::bail!(
                "cpu conv: weight {:?} does not fit input {:?} with {} groups",
                w.shape(),
                x.shape(),
                g.groups
            );
        }
        if h + 2 * g.padding < k || wd + 2 * g.padding < k || g.stride == 0 {
            candle_core::bail!("cpu conv: input {:?} is smaller than the kernel", x.shape());
        }
        if let Some(s) = self.shift {
            if s.len() != cout {
                candle_core::bail!("cpu conv: {} shifts for {cout} channels", s.len());
            }
        }
        Ok(Dims {
            n,
            cin,
            h,
            w: wd,
            cout,
            k,
            ho: (h + 2 * g.padding - k) / g.stride + 1,
            wo: (wd + 2 * g.padding - k) / g.stride + 1,
        })
    }

    fn run(&self, x: &[f32], w: &[f32], residual: Option<&[f32]>, d: Dims) -> Result<Vec<f32>> {
        let out_len = d.n * d.cout * d.ho * d.wo;
        if let Some(r) = residual {
            if r.len() != out_len {
                candle_core::bail!("cpu conv: residual of {} values for {out_len}", r.len());
            }
        }
        let mut out = vec![0f32; out_len];
        if self.g.groups == d.cin && d.cout == d.cin {
            self.depthwise(x, w, residual, d, &mut out);
        } else {
            self.dense(x, w, residual, d, &mut out);
        }
        Ok(out)
    }

    /// Grouped or dense convolution: per image, per group, im2col + gemm; then the epilogue.
    fn dense(&self, x: &[f32], w: &[f32], residual: Option<&[f32]>, d: Dims, out: &mut [f32]) {
        let g = self.g;
        let (cin_g, cout_g) = (d.cin / g.groups, d.cout / g.groups);
        let p = d.ho * d.wo;
        let kk = cin_g * d.k * d.k;
        let direct = d.k == 1 && g.stride == 1 && g.padding == 0;
        let plane_in = d.h * d.w;
        let image = |i: usize, out_img: &mut [f32], col: &mut Vec<f32>, par: Parallelism| {
            let x_img = &x[i * d.cin * plane_in..][..d.cin * plane_in];
            for gi in 0..g.groups {
                let xg = &x_img[gi * cin_g * plane_in..][..cin_g * plane_in];
                let rhs = if direct {
                    xg
                } else {
                    col.resize(kk * p, 0.0);
                    im2col(xg, cin_g, d, g, col);
                    &col[..]
                };
                let wg = &w[gi * cout_g * kk..][..cout_g * kk];
                let dst = &mut out_img[gi * cout_g * p..][..cout_g * p];
                // SAFETY: dst is cout_g x p row-major, wg cout_g x kk, rhs kk x p, each slice
                // exactly that long (checked by the slicing above), and dst aliases neither.
                unsafe {
                    gemm::gemm(
                        cout_g,
                        p,
                        kk,
                        dst.as_mut_ptr(),
                        1,
                        p as isize,
                        false,
                        wg.as_ptr(),
                        1,
                        kk as isize,
                        rhs.as_ptr(),
                        1,
                        p as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
            }
            let r = residual.map(|r| &r[i * d.cout * p..][..d.cout * p]);
            self.epilogue(out_img, r, 0, p);
        };
        let threads = rayon::current_num_threads();
        let img_len = d.cout * p;
        if d.n >= threads || threads == 1 {
            out.par_chunks_mut(img_len)
                .enumerate()
                .for_each_init(Vec::new, |col, (i, o)| image(i, o, col, Parallelism::None));
        } else {
            let mut col = Vec::new();
            for (i, o) in out.chunks_mut(img_len).enumerate() {
                image(i, o, &mut col, Parallelism::Rayon(threads));
            }
        }
    }

    /// Depthwise convolution, one output plane per task, epilogue included.
    fn depthwise(&self, x: &[f32], w: &[f32], residual: Option<&[f32]>, d: Dims, out: &mut [f32]) {
        let (plane_in, p, kk) = (d.h * d.w, d.ho * d.wo, d.k * d.k);
        out.par_chunks_mut(p).enumerate().for_each(|(j, o)| {
            let c = j % d.cout;
            depthwise_plane(
                &x[j * plane_in..][..plane_in],
                &w[c * kk..][..kk],
                d,
                self.g,
                o,
            );
            let r = residual.map(|r| &r[j * p..][..p]);
            self.epilogue(o, r, c, p);
        });
    }

    /// act(out + shift[c] + residual) over whole planes of `p` values, the first being channel
    /// `c0` (the rest follow in channel order).
    fn epilogue(&self, out: &mut [f32], residual: Option<&[f32]>, c0: usize, p: usize) {
        for (j, plane) in out.chunks_mut(p).enumerate() {
            let b = self.shift.map_or(0.0, |s| s[c0 + j]);
            let r = residual.map(|r| &r[j * p..][..p]);
            macro_rules! each {
                ($act:expr) => {
                    match r {
                        Some(r) => plane
                            .iter_mut()
                            .zip(r)
                            .for_each(|(v, &r)| *v = $act(*v + b + r)),
                        None => plane.iter_mut().for_each(|v| *v = $act(*v + b)),
                    }
                };
            }
            match self.act {
                Act::None => each!(|v| v),
                Act::Relu => each!(|v: f32| v.max(0.0)),
                Act::Relu6 => each!(|v: f32| v.clamp(0.0, 6.0)),
                Act::Silu => each!(|v| Act::Silu.apply(v)),
            }
        }
    }
}

/// For output column `o` of a row, the input column is o * stride + tap - padding; the outputs
/// whose input column falls inside [0, len) are `lo..hi`.
#[inline]
fn valid_range(len: usize, out_len: usize, tap: usize, g: Geometry) -> (usize, usize) {
    let lo = g
        .padding
        .saturating_sub(tap)
        .div_ceil(g.stride)
        .min(out_len);
    let hi = if len + g.padding > tap {
        ((len + g.padding - tap - 1) / g.stride + 1).min(out_len)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Unfolds one group's input planes [cin_g, H, W] into `col` [cin_g * K * K, Ho * Wo], rows in
/// (channel, ky, kx) order: the weight's own layout.
fn im2col(x: &[f32], cin_g: usize, d: Dims, g: Geometry, col: &mut [f32]) {
    let (k, p) = (d.k, d.ho * d.wo);
    let (x_lo, x_hi): (Vec<_>, Vec<_>) = (0..k).map(|kx| valid_range(d.w, d.wo, kx, g)).unzip();
    for ci in 0..cin_g {
        let plane = &x[ci * d.h * d.w..][..d.h * d.w];
        for ky in 0..k {
            let (y_lo, y_hi) = valid_range(d.h, d.ho, ky, g);
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * p..][..p];
                row[..y_lo * d.wo].fill(0.0);
                row[y_hi * d.wo..].fill(0.0);
                let (lo, hi) = (x_lo[kx], x_hi[kx]);
                for oy in y_lo..y_hi {
                    let src = &plane[(oy * g.stride + ky - g.padding) * d.w..][..d.w];
                    let dst = &mut row[oy * d.wo..][..d.wo];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if lo == hi {
                        continue;
                    }
                    let first = lo * g.stride + kx - g.padding;
                    if g.stride == 1 {
                        dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                    } else {
                        for (v, s) in dst[lo..hi]
                            .iter_mut()
                            .zip(src[first..].iter().step_by(g.stride))
                        {
                            *v = *s;
                        }
                    }
                }
            }
        }
    }
}

/// One plane of a depthwise convolution: `out` [Ho, Wo] = sum over taps of w[ky, kx] times the
/// shifted input plane [H, W].
fn depthwise_plane(x: &[f32], w: &[f32], d: Dims, g: Geometry, out: &mut [f32]) {
    let k = d.k;
    for ky in 0..k {
        let (y_lo, y_hi) = valid_range(d.h, d.ho, ky, g);
        for kx in 0..k {
            let wt = w[ky * k + kx];
            let (lo, hi) = valid_range(d.w, d.wo, kx, g);
            if lo == hi {
                continue;
            }
            let first = lo * g.stride + kx - g.padding;
            for oy in y_lo..y_hi {
                let src = &x[(oy * g.stride + ky - g.padding) * d.w..][..d.w];
                let dst = &mut out[oy * d.wo + lo..oy * d.wo + hi];
                if g.stride == 1 {
                    for (o, s) in dst.iter_mut().zip(&src[first..first + (hi - lo)]) {
                        *o += wt * s;
                    }
                } else {
                    for (o, s) in dst.iter_mut().zip(src[first..].iter().step_by(g.stride)) {
                        *o += wt * s;
                    }
                }
            }
        }
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(xl, wl)?;
        let out = self.run(
            f32_slice(xs, xl, "input")?,
            f32_slice(ws, wl, "weight")?,
            None,
            d,
        )?;
        Ok((CpuStorage::F32(out), Shape::from((d.n, d.cout, d.ho, d.wo))))
    }
}

impl CustomOp3 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "cpu-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(xl, wl)?;
        let shape = Shape::from((d.n, d.cout, d.ho, d.wo));
        if rl.shape() != &shape {
            candle_core::bail!("cpu conv: residual {:?} for output {:?}", rl.shape(), shape);
        }
        let (x, w) = (f32_slice(xs, xl, "input")?, f32_slice(ws, wl, "weight")?);
        let out = self.run(x, w, Some(f32_slice(rs, rl, "residual")?), d)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

//! The CPU kernels with backward passes: what [`super::Kernels::Train`] runs a trained model's
//! hot path on (f32 on the CPU), as candle custom ops whose `bwd` calls kernels of their own.
//!
//! candle 0.11 differentiates its CPU conv2d through its own convolution and transposed
//! convolution, which are slow (the module doc of `cpu_conv`), and train-mode BatchNorm through
//! a dozen broadcast ops. Here:
//!
//! - convolution: the forward is `cpu_conv`'s; the input gradient is, per image and group, the
//!   gemm `W^T dY` into an unfolded block, folded back onto the input (col2im, the adjoint of
//!   the forward's im2col, in the same blocks of output rows); the weight gradient is the gemm
//!   `dY col^T` over the same unfolded blocks, summed over images in one accumulator per
//!   thread; for small planes (the late layers' 7 x 7) several images are stacked into one
//!   product at least 384 deep, so that the accumulator is not read and written per image for
//!   a product 49 deep. 1x1 stride-1 convolutions skip the unfolding both ways; the input
//!   gradient of a dense 3x3 stride-1 one with enough channels is itself a 3x3 stride-1
//!   convolution (of dY, the kernels turned and transposed) and runs on [`winograd`]. Per layer
//!   (`cargo bench --bench cpu_conv -- --backward`), the gradients run at about the forward's
//!   speed (130-300 GFLOP/s on ResNet-50's dense layers on a 2-core AVX-512 Xeon);
//! - depthwise convolution: the input gradient scatters each output row into a zero-padded,
//!   phase-split plane (the forward's layout, so each tap is again one contiguous multiply-add)
//!   and reads the interior back; the weight gradient is one dot product per tap and row over
//!   the forward's padded plane, one channel per task;
//! - BatchNorm in train mode, `act(gamma (x - mean) / sqrt(var + eps) + beta)` with the batch's
//!   mean and biased variance (two passes in f64 per channel), is one op whose backward gives x,
//!   gamma and beta their gradients in two passes; the caller updates the running statistics
//!   from the moments it returns. A convolution followed by its BN is one op of both
//!   ([`conv_batch_norm`]), so that the gradient between them never passes through candle's
//!   backward (which zeroes a buffer for every intermediate gradient and adds into it);
//! - `act(x + residual)` (ReLU, ReLU6 or none) and the 3x3 stride-2 max pool (the gradient to
//!   each window's first maximum, as PyTorch's) are ops of their own.
//!
//! A backward pass computes only the gradients candle will use (an argument that tracks no
//! graph, such as the input image, gets none), and has no backward of its own: second
//! derivatives are not needed. Each op's gradients are checked against candle's autograd on
//! every shape class the families use (the tests below).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{
    f32_slice, im2col, madd, split_phases, valid_range, winograd, Act, ColBuffers, ConvOp, Dims,
    Geometry, MaxPool3x3S2, PaddedPlane, Simd, COL_BLOCK_BYTES,
};

/// Whether the train kernels take `act` (the others go through candle's ops).
pub fn supports(act: Act) -> bool {
    matches!(act, Act::None | Act::Relu | Act::Relu6)
}

/// `conv2d(x, weight)` with a backward pass, for contiguous f32 CPU tensors.
pub fn conv2d(x: &Tensor, weight: &Tensor, g: Geometry) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, Conv { g })
}

/// `act(x + residual)` (or `act(x)`) with a backward pass: one op for the activations that
/// [`supports`] takes, candle's ops for the others.
pub fn add_act(x: &Tensor, residual: Option<&Tensor>, act: Act) -> Result<Tensor> {
    if !supports(act) {
        return act.tensor(&match residual {
            Some(r) => (x + r)?,
            None => x.clone(),
        });
    }
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op2(&r.contiguous()?, AddAct { act }),
        None if act == Act::None => Ok(x),
        None => x.apply_op1(AddAct { act }),
    }
}

/// Train-mode BatchNorm with `act` fused in (candle's ops after it for an activation that
/// [`supports`] does not take), over [N, C, H, W]: returns the output and the batch's
/// per-channel mean and biased variance.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Act,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    if !supports(act) {
        let (y, mean, var) = batch_norm(x, gamma, beta, eps, Act::None)?;
        return Ok((act.tensor(&y)?, mean, var));
    }
    let saved = Arc::new(Mutex::new(None));
    let op = BnTrain {
        eps,
        act,
        saved: saved.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let (mean, var) = moments(&saved, "batch norm: no statistics")?;
    Ok((y, mean, var))
}

/// Train-mode `act(BN(conv2d(x, weight)))` as one graph node (`act` one that [`supports`]
/// takes): [`conv2d`] then [`batch_norm`], with gamma and beta as one argument of 2C values. The gradient
/// between the two never goes through candle's backward, which would zero a buffer for it and
/// add it there (a memset and an add over every activation: about a seventh of a MobileNetV2
/// step under `perf`). The convolution's output stays in the op for the backward pass, which
/// drops it. Returns the output and the batch's per-channel mean and biased variance.
pub fn conv_batch_norm(
    x: &Tensor,
    weight: &Tensor,
    g: Geometry,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Act,
) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
    if !supports(act) {
        candle_core::bail!("conv + batch norm: {act:?} is not a train-kernel activation");
    }
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnTrain {
        conv: Conv { g },
        bn: BnTrain {
            eps,
            act,
            saved: saved.clone(),
        },
        conv_out: Mutex::new(None),
    };
    let params = Tensor::cat(&[gamma, beta], 0)?;
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &params, op)?;
    let (mean, var) = moments(&saved, "conv + batch norm: no statistics")?;
    Ok((y, mean, var))
}

/// torch.nn.MaxPool2d(3, 2, 1) with a backward pass.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

fn storage(v: Vec<f32>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (CpuStorage::F32(v), shape.into())
}

// ---------------------------------------------------------------------------------------------
// Convolution.

struct Conv {
    g: Geometry,
}

impl Conv {
    fn forward_op(&self) -> ConvOp<'static> {
        ConvOp {
            g: self.g,
            shift: None,
            act: Act::None,
        }
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "cpu-conv2d-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward_op().cpu_forward((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x
            .track_op()
            .then(|| conv2d_input_grad(x, w, dy, self.g))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| conv2d_weight_grad(x, w, dy, self.g))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// The input gradient of [`conv2d`]`(x, w, g)` for the output gradient `dy`, as its backward
/// pass computes it.
pub fn conv2d_input_grad(x: &Tensor, w: &Tensor, dy: &Tensor, g: Geometry) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    dy.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &ConvInputGrad { g, h, w: wd })
}

/// The weight gradient of [`conv2d`]`(x, w, g)` for the output gradient `dy`, as its backward
/// pass computes it.
pub fn conv2d_weight_grad(x: &Tensor, w: &Tensor, dy: &Tensor, g: Geometry) -> Result<Tensor> {
    let k = w.dim(2)?;
    x.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &ConvWeightGrad { g, k })
}

/// The convolution's input gradient from (dY, W).
struct ConvInputGrad {
    g: Geometry,
    h: usize,
    w: usize,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cout, ho, wo) = dyl.shape().dims4()?;
        let (_, cin_g, k, _) = wl.shape().dims4()?;
        let d = Dims {
            n,
            cin: cin_g * self.g.groups,
            h: self.h,
            w: self.w,
            cout,
            k,
            ho,
            wo,
        };
        let (dy, w) = (
            f32_slice(dys, dyl, "output grad")?,
            f32_slice(ws, wl, "weight")?,
        );
        let dx = if super::depthwise(self.g, d.cin, d.cout) {
            depthwise_input_grad(dy, w, d, self.g)
        } else {
            dense_input_grad(dy, w, d, self.g)
        };
        Ok(storage(dx, (n, d.cin, d.h, d.w)))
    }
}

/// The convolution's weight gradient from (X, dY).
struct ConvWeightGrad {
    g: Geometry,
    k: usize,
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "cpu-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (_, cout, ho, wo) = dyl.shape().dims4()?;
        let d = Dims {
            n,
            cin,
            h,
            w,
            cout,
            k: self.k,
            ho,
            wo,
        };
        let (x, dy) = (
            f32_slice(xs, xl, "input")?,
            f32_slice(dys, dyl, "output grad")?,
        );
        let cin_g = cin / self.g.groups;
        let dw = if super::depthwise(self.g, d.cin, d.cout) {
            depthwise_weight_grad(x, dy, d, self.g)
        } else {
            dense_weight_grad(x, dy, d, self.g)
        };
        Ok(storage(dw, (cout, cin_g, self.k, self.k)))
    }
}

/// dst (m x n, row stride `dst_rs`) = lhs (m x k) * rhs (k x n), or += when `accumulate`; each
/// operand given by its pointer, column stride and row stride.
///
/// # Safety
/// Every index the strides reach must lie inside its operand; dst must not overlap the others.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
    par: Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Blocks of output rows unfolded at a time: the forward's.
fn row_blocks(d: Dims, kk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = (COL_BLOCK_BYTES / (4 * kk * d.wo).max(1)).clamp(1, d.ho);
    (0..d.ho)
        .step_by(chunk)
        .map(move |r| r..(r + chunk).min(d.ho))
}

fn is_direct(d: Dims, g: Geometry) -> bool {
    d.k == 1 && g.stride == 1 && g.padding == 0
}

/// dX of a dense or grouped convolution: per image and group, col = W_g^T dY_g per block of
/// output rows, folded back onto dX_g.
fn dense_input_grad(dy: &[f32], w: &[f32], d: Dims, g: Geometry) -> Vec<f32> {
    if winograd::applies(d, g) {
        return winograd_input_grad(dy, w, d, g.padding);
    }
    let (cin_g, cout_g) = (d.cin / g.groups, d.cout / g.groups);
    let (p, plane_in) = (d.ho * d.wo, d.h * d.w);
    let kk = cin_g * d.k * d.k;
    let simd = Simd::detect();
    let image = |i: usize, dx_img: &mut [f32], col: &mut Vec<f32>, par: Parallelism| {
        let dy_img = &dy[i * d.cout * p..][..d.cout * p];
        for gi in 0..g.groups {
            let wg = &w[gi * cout_g * kk..][..cout_g * kk];
            let dyg = &dy_img[gi * cout_g * p..][..cout_g * p];
            let dxg = &mut dx_img[gi * cin_g * plane_in..][..cin_g * plane_in];
            if is_direct(d, g) {
                // SAFETY: W_g^T is cin_g x cout_g (wg transposed), dY_g cout_g x p, dX_g
                // cin_g x p, disjoint.
                unsafe {
                    gemm_strided(
                        (cin_g, p, cout_g),
                        dxg.as_mut_ptr(),
                        p,
                        false,
                        (wg.as_ptr(), kk, 1),
                        (dyg.as_ptr(), 1, p),
                        par,
                    )
                };
                continue;
            }
            for rows in row_blocks(d, kk) {
                let n = rows.len() * d.wo;
                col.resize(kk * n, 0.0);
                // SAFETY: col is kk x n; W_g^T kk x cout_g; dY_g's columns rows.start * wo ..
                // + n lie inside its p.
                unsafe {
                    gemm_strided(
                        (kk, n, cout_g),
                        col.as_mut_ptr(),
                        n,
                        false,
                        (wg.as_ptr(), kk, 1),
                        (dyg.as_ptr().add(rows.start * d.wo), 1, p),
                        par,
                    )
                };
                simd.col2im(col, cin_g, d, g, rows, dxg);
            }
        }
    };
    let mut dx = vec![0f32; d.n * d.cin * plane_in];
    let threads = rayon::current_num_threads();
    if d.n >= threads || threads == 1 {
        dx.par_chunks_mut(d.cin * plane_in)
            .enumerate()
            .for_each_init(Vec::new, |col, (i, o)| image(i, o, col, Parallelism::None));
    } else {
        let mut col = Vec::new();
        for (i, o) in dx.chunks_mut(d.cin * plane_in).enumerate() {
            image(i, o, &mut col, Parallelism::Rayon(threads));
        }
    }
    dx
}

/// dX of a 3x3 stride-1 convolution with padding `pad`: the convolution of dY with padding
/// 2 - pad and the kernels turned and transposed, on [`winograd`].
fn winograd_input_grad(dy: &[f32], w: &[f32], d: Dims, pad: usize) -> Vec<f32> {
    // The gradient's convolution: dY in, dX out.
    let dg = Dims {
        n: d.n,
        cin: d.cout,
        h: d.ho,
        w: d.wo,
        cout: d.cin,
        k: 3,
        ho: d.h,
        wo: d.w,
    };
    let u = winograd::transform_weights(w, d.cin, d.cout, true);
    let len = d.n * d.cin * d.h * d.w;
    let mut dx = Vec::with_capacity(len);
    let out = winograd::Shared(dx.as_mut_ptr());
    let p = d.h * d.w;
    winograd::conv(dy, &u, dg, 2 - pad, |plane, at, seg| {
        // SAFETY: winograd::conv hands each segment of dX over once, inside its capacity.
        unsafe { out.write(plane * p + at, seg) };
    });
    // SAFETY: every value was stored (winograd::conv hands over the whole output).
    unsafe { dx.set_len(len) };
    dx
}

/// dW of a dense or grouped convolution: per image and group, dW_g += dY_g col^T per block of
/// output rows, the images split into one contiguous range per thread, each with its own
/// accumulator.
fn dense_weight_grad(x: &[f32], dy: &[f32], d: Dims, g: Geometry) -> Vec<f32> {
    let (cin_g, cout_g) = (d.cin / g.groups, d.cout / g.groups);
    let (p, plane_in) = (d.ho * d.wo, d.h * d.w);
    let kk = cin_g * d.k * d.k;
    let len = d.cout * kk;
    let images = |imgs: Range<usize>, acc: &mut [f32], bufs: &mut ColBuffers, par: Parallelism| {
        let ColBuffers { col, phases, .. } = bufs;
        for i in imgs {
            let x_img = &x[i * d.cin * plane_in..][..d.cin * plane_in];
            let dy_img = &dy[i * d.cout * p..][..d.cout * p];
            for gi in 0..g.groups {
                let xg = &x_img[gi * cin_g * plane_in..][..cin_g * plane_in];
                let dyg = &dy_img[gi * cout_g * p..][..cout_g * p];
                let acc_g = &mut acc[gi * cout_g * kk..][..cout_g * kk];
                if is_direct(d, g) {
                    // SAFETY: dY_g is cout_g x p, X_g^T p x cin_g (= kk), acc_g cout_g x kk.
                    unsafe {
                        gemm_strided(
                            (cout_g, kk, p),
                            acc_g.as_mut_ptr(),
                            kk,
                            true,
                            (dyg.as_ptr(), 1, p),
                            (xg.as_ptr(), p, 1),
                            par,
                        )
                    };
                    continue;
                }
                let xg = split_phases(xg, d, g, phases);
                for rows in row_blocks(d, kk) {
                    let n = rows.len() * d.wo;
                    col.resize(kk * n, 0.0);
                    im2col(&xg, cin_g, d, g, rows.clone(), col);
                    // SAFETY: dY_g's columns rows.start * wo .. + n lie inside its p; col^T is
                    // n x kk (col transposed); acc_g cout_g x kk.
                    unsafe {
                        gemm_strided(
                            (cout_g, kk, n),
                            acc_g.as_mut_ptr(),
                            kk,
                            true,
                            (dyg.as_ptr().add(rows.start * d.wo), 1, p),
                            (col.as_ptr(), n, 1),
                            par,
                        )
                    };
                }
            }
        }
    };
    // Late layers have small planes (7 x 7 = 49 columns): one gemm per image would accumulate
    // into the whole weight gradient (up to 9 MB) for a product only 49 deep. Instead the
    // unfolded images and their output gradients are stacked side by side, about
    // STACK_COLUMNS columns at a time, into one deeper product.
    let per_gemm = STACK_COLUMNS.div_ceil(p).max(1);
    let stacked = |imgs: Range<usize>, acc: &mut [f32], bufs: &mut Stacked, par: Parallelism| {
        let Stacked {
            col,
            phases,
            cols,
            dys,
        } = bufs;
        for start in imgs.clone().step_by(per_gemm) {
            let batch = start..(start + per_gemm).min(imgs.end);
            let q = batch.len() * p;
            for gi in 0..g.groups {
                cols.resize(kk * q, 0.0);
                dys.resize(cout_g * q, 0.0);
                for (j, i) in batch.clone().enumerate() {
                    let xg = &x[(i * d.cin + gi * cin_g) * plane_in..][..cin_g * plane_in];
                    let dyg = &dy[(i * d.cout + gi * cout_g) * p..][..cout_g * p];
                    place(dys, dyg, p, q, j * p);
                    if is_direct(d, g) {
                        place(cols, xg, p, q, j * p);
                    } else {
                        let xp = split_phases(xg, d, g, phases);
                        col.resize(kk * p, 0.0);
                        im2col(&xp, cin_g, d, g, 0..d.ho, col);
                        place(cols, col, p, q, j * p);
                    }
                }
                let acc_g = &mut acc[gi * cout_g * kk..][..cout_g * kk];
                // SAFETY: dys is cout_g x q, cols^T q x kk (cols transposed), acc_g cout_g x kk.
                unsafe {
                    gemm_strided(
                        (cout_g, kk, q),
                        acc_g.as_mut_ptr(),
                        kk,
                        true,
                        (dys.as_ptr(), 1, q),
                        (cols.as_ptr(), q, 1),
                        par,
                    )
                };
            }
        }
    };
    let work = |imgs: Range<usize>, acc: &mut [f32], par: Parallelism| {
        if p < STACK_COLUMNS {
            stacked(imgs, acc, &mut Stacked::default(), par)
        } else {
            images(imgs, acc, &mut ColBuffers::default(), par)
        }
    };
    let threads = rayon::current_num_threads();
    if d.n >= threads && threads > 1 {
        let per = d.n.div_ceil(threads);
        let parts: Vec<Vec<f32>> = (0..threads)
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0f32; len];
                let imgs = (t * per).min(d.n)..((t + 1) * per).min(d.n);
                work(imgs, &mut acc, Parallelism::None);
                acc
            })
            .collect();
        let mut parts = parts.into_iter();
        let mut dw = parts.next().unwrap_or_else(|| vec![0f32; len]);
        for part in parts {
            dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
        }
        dw
    } else {
        let mut dw = vec![0f32; len];
        let par = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        work(0..d.n, &mut dw, par);
        dw
    }
}

/// Columns of one stacked weight-gradient product (see `dense_weight_grad`): about what the
/// gemm crate takes as one depth block.
const STACK_COLUMNS: usize = 384;

/// A thread's buffers for the stacked weight gradient: one image unfolded, the phase-split
/// input, and the stacked unfolded images and output gradients.
#[derive(Default)]
struct Stacked {
    col: Vec<f32>,
    phases: Vec<f32>,
    cols: Vec<f32>,
    dys: Vec<f32>,
}

/// Copies `src` [rows, p] into columns off .. off + p of `dst` [rows, q].
fn place(dst: &mut [f32], src: &[f32], p: usize, q: usize, off: usize) {
    for (s, d) in src.chunks_exact(p).zip(dst.chunks_exact_mut(q)) {
        d[off..off + p].copy_from_slice(s);
    }
}

/// Adds the unfolded block `col` [cin_g * K * K, rows.len() * Wo] back onto one group's input
/// gradient [cin_g, H, W]: the adjoint of `im2col`.
#[inline(always)]
fn col2im(col: &[f32], cin_g: usize, d: Dims, g: Geometry, rows: Range<usize>, dx: &mut [f32]) {
    let (k, s) = (d.k, g.stride);
    let len = rows.len() * d.wo;
    for ci in 0..cin_g {
        let plane = &mut dx[ci * d.h * d.w..][..d.h * d.w];
        for ky in 0..k {
            let (y_lo, y_hi) = valid_range(d.h, d.ho, ky, g);
            for kx in 0..k {
                let row = &col[((ci * k + ky) * k + kx) * len..][..len];
                let (lo, hi) = valid_range(d.w, d.wo, kx, g);
                if lo == hi {
                    continue;
                }
                for (oy, src) in rows.clone().zip(row.chunks(d.wo)) {
                    if oy < y_lo || oy >= y_hi {
                        continue;
                    }
                    let iy = oy * s + ky - g.padding;
                    let dst = &mut plane[iy * d.w..][..d.w];
                    // Input column of output column o: o * s + kx - padding.
                    let first = lo * s + kx - g.padding;
                    if s == 1 {
                        let dst = &mut dst[first..first + (hi - lo)];
                        dst.iter_mut().zip(&src[lo..hi]).for_each(|(a, b)| *a += b);
                    } else {
                        for (j, &v) in src[lo..hi].iter().enumerate() {
                            dst[first + j * s] += v;
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Depthwise convolution.

/// dX of a depthwise convolution, one plane per task.
fn depthwise_input_grad(dy: &[f32], w: &[f32], d: Dims, g: Geometry) -> Vec<f32> {
    let (plane_in, p, kk) = (d.h * d.w, d.ho * d.wo, d.k * d.k);
    let simd = Simd::detect();
    let mut dx = vec![0f32; d.n * d.cin * plane_in];
    dx.par_chunks_mut(plane_in)
        .enumerate()
        .for_each_init(Vec::new, |buf, (j, o)| {
            let c = j % d.cin;
            let dy = &dy[j * p..][..p];
            simd.depthwise_input_plane(dy, &w[c * kk..][..kk], d, g, buf, o);
        });
    dx
}

/// dW of a depthwise convolution, one channel per task, summed over images (in f64 across
/// planes).
fn depthwise_weight_grad(x: &[f32], dy: &[f32], d: Dims, g: Geometry) -> Vec<f32> {
    let (plane_in, p, kk) = (d.h * d.w, d.ho * d.wo, d.k * d.k);
    let simd = Simd::detect();
    (0..d.cin)
        .into_par_iter()
        .map_init(PaddedPlane::default, |buf, c| {
            let mut acc = vec![0f64; kk];
            let mut taps = vec![0f32; kk];
            for i in 0..d.n {
                let j = i * d.cin + c;
                let x = &x[j * plane_in..][..plane_in];
                let dy = &dy[j * p..][..p];
                simd.depthwise_weight_plane(x, dy, d, g, buf, &mut taps);
                acc.iter_mut().zip(&taps).for_each(|(a, &t)| *a += t as f64);
            }
            acc
        })
        .flatten_iter()
        .map(|v| v as f32)
        .collect()
}

/// One plane of a depthwise input gradient: each output row, times each tap's weight, is added
/// into a zero-padded, phase-split plane (the forward's layout: see `depthwise_plane`), whose
/// interior is then the gradient.
#[inline(always)]
fn depthwise_input_plane<const FMA: bool>(
    dy: &[f32],
    w: &[f32],
    d: Dims,
    g: Geometry,
    buf: &mut Vec<f32>,
    dx: &mut [f32],
) {
    let (k, s, pad) = (d.k, g.stride, g.padding);
    let wp = d.w + 2 * pad;
    let lp = wp.div_ceil(s);
    let row_len = s * lp;
    buf.clear();
    buf.resize((d.h + 2 * pad) * row_len, 0.0);
    for oy in 0..d.ho {
        let src = &dy[oy * d.wo..][..d.wo];
        for ky in 0..k {
            let row = &mut buf[(oy * s + ky) * row_len..][..row_len];
            for kx in 0..k {
                let wt = w[ky * k + kx];
                let dst = &mut row[(kx % s) * lp + kx / s..][..d.wo];
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o = madd::<FMA>(wt, v, *o);
                }
            }
        }
    }
    for iy in 0..d.h {
        let row = &buf[(iy + pad) * row_len..][..row_len];
        let dst = &mut dx[iy * d.w..][..d.w];
        if s == 1 {
            dst.copy_from_slice(&row[pad..pad + d.w]);
        } else {
            for (ix, v) in dst.iter_mut().enumerate() {
                let c = ix + pad;
                *v = row[(c % s) * lp + c / s];
            }
        }
    }
}

/// One plane's contribution to a depthwise weight gradient: taps[ky * K + kx] = the dot
/// product of dY with the padded input shifted by the tap.
#[inline(always)]
fn depthwise_weight_plane<const FMA: bool>(
    x: &[f32],
    dy: &[f32],
    d: Dims,
    g: Geometry,
    buf: &mut PaddedPlane,
    taps: &mut [f32],
) {
    let (k, s) = (d.k, g.stride);
    let (row_len, lp) = buf.fill(x, d, g);
    let buf = &buf.data[..];
    let mut acc = vec![[0f32; 8]; k * k];
    for oy in 0..d.ho {
        let src = &dy[oy * d.wo..][..d.wo];
        for ky in 0..k {
            let row = &buf[(oy * s + ky) * row_len..][..row_len];
            for kx in 0..k {
                let a = &mut acc[ky * k + kx];
                let xs = &row[(kx % s) * lp + kx / s..][..d.wo];
                let (c1, c2) = (src.chunks_exact(8), xs.chunks_exact(8));
                for (&u, &v) in c1.remainder().iter().zip(c2.remainder()) {
                    a[0] = madd::<FMA>(u, v, a[0]);
                }
                for (u, v) in c1.zip(c2) {
                    for l in 0..8 {
                        a[l] = madd::<FMA>(u[l], v[l], a[l]);
                    }
                }
            }
        }
    }
    for (t, a) in taps.iter_mut().zip(&acc) {
        *t = a.iter().sum();
    }
}

// ---------------------------------------------------------------------------------------------
// BatchNorm, activations, max pool.

/// Whether an activation passes the gradient at output value `y`: PyTorch's threshold and
/// hardtanh backward (strict inequalities).
#[inline(always)]
fn passes(act: Act, y: f32) -> bool {
    match act {
        Act::Relu => y > 0.0,
        Act::Relu6 => y > 0.0 && y < 6.0,
        _ => true,
    }
}

/// `act` as a const parameter, so that the mask in the hot loops is resolved at compile time.
const NONE: u8 = 0;
const RELU: u8 = 1;
const RELU6: u8 = 2;

fn act_code(act: Act) -> u8 {
    match act {
        Act::Relu => RELU,
        Act::Relu6 => RELU6,
        _ => NONE,
    }
}

#[inline(always)]
fn masked<const A: u8>(y: f32, g: f32) -> f32 {
    let pass = match A {
        RELU => y > 0.0,
        RELU6 => y > 0.0 && y < 6.0,
        _ => true,
    };
    if pass {
        g
    } else {
        0.0
    }
}

/// g masked by the activation's derivative at the outputs y, in parallel chunks.
fn mask_grad(act: Act, y: &[f32], g: &[f32]) -> Vec<f32> {
    let mut out = g.to_vec();
    out.par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(o, y)| {
            o.iter_mut()
                .zip(y)
                .for_each(|(o, &y)| *o = if passes(act, y) { *o } else { 0.0 })
        });
    out
}

struct AddAct {
    act: Act,
}

impl AddAct {
    fn run(&self, x: &[f32], r: Option<&[f32]>) -> Vec<f32> {
        let simd = Simd::detect();
        let mut out = x.to_vec();
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
            let r = r.map(|r| &r[i * CHUNK..][..o.len()]);
            simd.epilogue(o, 1.0, 0.0, r, self.act);
        });
        out
    }

    fn grad(&self, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        if self.act == Act::None {
            return Ok(dy.clone());
        }
        y.apply_op2_no_bwd(&dy.contiguous()?, &MaskGrad { act: self.act })
    }
}

impl CustomOp1 for AddAct {
    fn name(&self) -> &'static str {
        "cpu-act-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "input")?;
        Ok(storage(self.run(x, None), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(y, dy)?))
    }
}

impl CustomOp2 for AddAct {
    fn name(&self) -> &'static str {
        "cpu-add-act-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.shape() != rl.shape() {
            candle_core::bail!("add-act: residual {:?} for {:?}", rl.shape(), xl.shape());
        }
        let (x, r) = (f32_slice(xs, xl, "input")?, f32_slice(rs, rl, "residual")?);
        Ok(storage(self.run(x, Some(r)), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.grad(y, dy)?;
        Ok((x.track_op().then(|| g.clone()), r.track_op().then_some(g)))
    }
}

/// dY masked by the activation's derivative, from (Y, dY).
struct MaskGrad {
    act: Act,
}

impl CustomOp2 for MaskGrad {
    fn name(&self) -> &'static str {
        "cpu-act-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (
            f32_slice(ys, yl, "output")?,
            f32_slice(gs, gl, "output grad")?,
        );
        Ok(storage(mask_grad(self.act, y, g), yl.shape().clone()))
    }
}

/// The per-channel mean and biased variance of a forward pass, for its backward and its caller.
type Moments = (Vec<f32>, Vec<f32>);

/// The moments a forward pass saved (`missing`, the error when it has not run).
fn moments(saved: &Mutex<Option<Moments>>, missing: &str) -> Result<Moments> {
    saved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| candle_core::Error::Msg(missing.into()))
}

struct BnTrain {
    eps: f64,
    act: Act,
    saved: Arc<Mutex<Option<Moments>>>,
}

/// The planes of channel `c` in an [N, C, plane] buffer.
fn channel_planes(
    v: &[f32],
    n: usize,
    c: usize,
    ch: usize,
    plane: usize,
) -> impl Iterator<Item = &[f32]> {
    (0..n).map(move |i| &v[(i * c + ch) * plane..][..plane])
}

/// Sum over `v` in 8 f32 lanes (exact enough within one plane), returned as f64.
#[inline(always)]
fn lanes<const N: usize>(len: usize, f: impl Fn(usize) -> [f32; N]) -> [f64; N] {
    let mut acc = [[0f32; 8]; N];
    let full = len / 8 * 8;
    for base in (0..full).step_by(8) {
        for l in 0..8 {
            let v = f(base + l);
            for (a, v) in acc.iter_mut().zip(v) {
                a[l] += v;
            }
        }
    }
    let mut out = [0f64; N];
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a.iter().map(|&x| x as f64).sum();
    }
    for i in full..len {
        for (o, v) in out.iter_mut().zip(f(i)) {
            *o += v as f64;
        }
    }
    out
}

impl BnTrain {
    fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
        let (n, c, h, w) = l.shape().dims4()?;
        Ok((n, c, h * w))
    }

    /// The forward pass over x ([N, C, plane] in `dims`): the batch's moments (saved for the
    /// backward pass and the caller), then `act(gamma xhat + beta)` into a new buffer.
    fn normalise(
        &self,
        x: &[f32],
        dims: (usize, usize, usize),
        gamma: &[f32],
        beta: &[f32],
    ) -> Result<Vec<f32>> {
        let (n, c, plane) = dims;
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("batch norm: {} weights for {c} channels", gamma.len());
        }
        let count = (n * plane).max(1) as f64;
        let (mean, var): (Vec<f32>, Vec<f32>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let sum: f64 = channel_planes(x, n, c, ch, plane)
                    .map(|p| lanes(p.len(), |i| [p[i]])[0])
                    .sum();
                let mean = sum / count;
                let m = mean as f32;
                let sq: f64 = channel_planes(x, n, c, ch, plane)
                    .map(|p| lanes(p.len(), |i| [(p[i] - m) * (p[i] - m)])[0])
                    .sum();
                // The deviations from the f32 mean, corrected for its rounding.
                let dm = mean - m as f64;
                (m, (sq / count - dm * dm).max(0.0) as f32)
            })
            .unzip();
        let scale: Vec<f32> = (0..c)
            .map(|i| (gamma[i] as f64 / (var[i] as f64 + self.eps).sqrt()) as f32)
            .collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
        let simd = Simd::detect();
        let mut out = x.to_vec();
        out.par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(j, ys)| {
                let ch = j % c;
                simd.epilogue(ys, scale[ch], shift[ch], None, self.act);
            });
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((mean, var));
        Ok(out)
    }

    /// The backward pass from the forward's input x, output y and output gradient dy: dX
    /// (when `x_grad`) and [dgamma, dbeta].
    fn grad(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        x_grad: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let (mean, var) = moments(&self.saved, "batch norm backward before forward")?;
        let op = BnGrad {
            eps: self.eps,
            act: self.act,
            gamma: gamma.to_vec1()?,
            mean,
            var,
            x_grad,
            params: Mutex::new(Vec::new()),
        };
        let dx = x.apply_op3_no_bwd(y, &dy.contiguous()?, &op)?;
        let params = std::mem::take(&mut *op.params.lock().unwrap_or_else(|e| e.into_inner()));
        let params = Tensor::from_vec(params, 2 * gamma.elem_count(), x.device())?;
        Ok((x_grad.then_some(dx), params))
    }
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "cpu-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "input")?;
        let (gamma, beta) = (f32_slice(gs, gl, "weight")?, f32_slice(bs, bl, "bias")?);
        let out = self.normalise(x, Self::dims(xl)?, gamma, beta)?;
        Ok(storage(out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One op computes all three.
        let c = gamma.elem_count();
        let (dx, params) = self.grad(x, gamma, y, dy, x.track_op())?;
        let dgamma = gamma
            .track_op()
            .then(|| params.narrow(0, 0, c))
            .transpose()?;
        let dbeta = beta
            .track_op()
            .then(|| params.narrow(0, c, c))
            .transpose()?;
        Ok((dx, dgamma, dbeta))
    }
}

/// BatchNorm's backward from (X, Y, dY): dX (when wanted), then dgamma and dbeta, flat.
struct BnGrad {
    eps: f64,
    act: Act,
    gamma: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    x_grad: bool,
    /// [dgamma, dbeta], beside the op's output dX.
    params: Mutex<Vec<f32>>,
}

impl BnGrad {
    /// dX (empty without `x_grad`) and [dgamma, dbeta]. dX is its own buffer of x's size, not
    /// packed with the parameters' gradients, so that it reuses the block of a freed
    /// activation of the same size (the allocator's cache) and is written once, not zeroed first.
    fn run<const A: u8>(
        &self,
        x: &[f32],
        y: &[f32],
        g: &[f32],
        dims: (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let (n, c, plane) = dims;
        let count = (n * plane).max(1) as f64;
        // Per channel: inv_std, sum(dY') and sum(dY' xhat), dY' the masked gradient.
        let sums: Vec<(f64, f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let m = self.mean[ch];
                let (mut s, mut sx) = (0f64, 0f64);
                for i in 0..n {
                    let o = (i * c + ch) * plane;
                    let (x, y, g) = (&x[o..][..plane], &y[o..][..plane], &g[o..][..plane]);
                    let [a, b] = lanes(plane, |k| {
                        let gm = masked::<A>(y[k], g[k]);
                        [gm, gm * (x[k] - m)]
                    });
                    s += a;
                    sx += b;
                }
                let inv_std = 1.0 / (self.var[ch] as f64 + self.eps).sqrt();
                (inv_std, s, sx * inv_std)
            })
            .collect();
        let mut params = vec![0f32; 2 * c];
        for (ch, &(_, s, sx)) in sums.iter().enumerate() {
            params[ch] = sx as f32;
            params[c + ch] = s as f32;
        }
        let len = if self.x_grad { n * c * plane } else { 0 };
        let mut dx = Vec::with_capacity(len);
        if self.x_grad {
            // dX = a dY' + b x + e with a = gamma inv_std, b = -a inv_std sum(dY' xhat) / M,
            // e = -a sum(dY') / M - b mean: gamma inv_std (dY' - sum(dY') / M - xhat
            // sum(dY' xhat) / M) written per element as one multiply-add chain.
            let coef: Vec<(f32, f32, f32)> = sums
                .iter()
                .enumerate()
                .map(|(ch, &(inv_std, s, sx))| {
                    let a = self.gamma[ch] as f64 * inv_std;
                    let b = -a * inv_std * sx / count;
                    let e = -a * s / count - b * self.mean[ch] as f64;
                    (a as f32, b as f32, e as f32)
                })
                .collect();
            dx.spare_capacity_mut()[..len]
                .par_chunks_mut(plane.max(1))
                .enumerate()
                .for_each(|(j, d)| {
                    let (a, b, e) = coef[j % c];
                    let o = j * plane;
                    let (x, y, g) = (&x[o..][..plane], &y[o..][..plane], &g[o..][..plane]);
                    for k in 0..plane {
                        d[k].write(a * masked::<A>(y[k], g[k]) + (b * x[k] + e));
                    }
                });
            // SAFETY: every element of 0..len was written just above (the chunks cover it).
            unsafe { dx.set_len(len) };
        }
        (dx, params)
    }
}

impl CustomOp3 for BnGrad {
    fn name(&self) -> &'static str {
        "cpu-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = BnTrain::dims(xl)?;
        let x = f32_slice(xs, xl, "input")?;
        let (y, g) = (
            f32_slice(ys, yl, "output")?,
            f32_slice(gs, gl, "output grad")?,
        );
        let (dx, params) = match act_code(self.act) {
            RELU => self.run::<RELU>(x, y, g, dims),
            RELU6 => self.run::<RELU6>(x, y, g, dims),
            _ => self.run::<NONE>(x, y, g, dims),
        };
        *self.params.lock().unwrap_or_else(|e| e.into_inner()) = params;
        // Without x_grad, an empty dX.
        let shape = if self.x_grad {
            xl.shape().clone()
        } else {
            Shape::from(0)
        };
        Ok(storage(dx, shape))
    }
}

/// [`conv_batch_norm`]'s op: (x, weight, [gamma, beta]).
struct ConvBnTrain {
    conv: Conv,
    bn: BnTrain,
    /// The convolution's output, from the forward pass to the backward pass.
    conv_out: Mutex<Option<(Vec<f32>, Shape)>>,
}

impl CustomOp3 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "cpu-conv2d-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (conv_out, shape) = match self.conv.cpu_fwd(xs, xl, ws, wl)? {
            (CpuStorage::F32(v), shape) => (v, shape),
            _ => candle_core::bail!("cpu conv: the output is not f32"),
        };
        let (n, c, h, w) = shape.dims4()?;
        let params = f32_slice(ps, pl, "batch norm weights")?;
        if params.len() != 2 * c {
            candle_core::bail!("batch norm: {} weights for {c} channels", params.len() / 2);
        }
        let (gamma, beta) = params.split_at(c);
        let y = self.bn.normalise(&conv_out, (n, c, h * w), gamma, beta)?;
        *self.conv_out.lock().unwrap_or_else(|e| e.into_inner()) = Some((conv_out, shape.clone()));
        Ok(storage(y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (v, shape) = self
            .conv_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "conv + batch norm: a second backward pass through one graph (the first \
                     frees the saved convolution output)"
                        .into(),
                )
            })?;
        let conv_out = Tensor::from_vec(v, shape, x.device())?;
        let c = conv_out.dim(1)?;
        // dConv, the gradient at the convolution's output, and [dgamma, dbeta].
        let (dconv, dparams) = self
            .bn
            .grad(&conv_out, &params.narrow(0, 0, c)?, y, dy, true)?;
        drop(conv_out);
        let dconv = dconv.ok_or_else(|| {
            candle_core::Error::Msg("conv + batch norm: no gradient for the convolution".into())
        })?;
        let dx = x
            .track_op()
            .then(|| conv2d_input_grad(x, w, &dconv, self.conv.g))
            .transpose()?;
        let dw = w
            .track_op()
            .then(|| conv2d_weight_grad(x, w, &dconv, self.conv.g))
            .transpose()?;
        Ok((dx, dw, params.track_op().then_some(dparams)))
    }
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "cpu-max-pool-3x3-s2-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        MaxPool3x3S2.cpu_fwd(s, l)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &MaxPoolGrad)?))
    }
}

/// The max pool's input gradient from (X, dY): each output's gradient to the first maximum of
/// its window in row-major order, as PyTorch's.
struct MaxPoolGrad;

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "cpu-max-pool-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (
            f32_slice(xs, xl, "input")?,
            f32_slice(gs, gl, "output grad")?,
        );
        let (_, _, h, w) = xl.shape().dims4()?;
        let (_, _, ho, wo) = gl.shape().dims4()?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .zip(g.par_chunks(ho * wo))
            .for_each(|((dx, x), g)| {
                for oy in 0..ho {
                    let (y0, y1) = ((2 * oy).saturating_sub(1), (2 * oy + 1).min(h - 1));
                    for ox in 0..wo {
                        let (x0, x1) = ((2 * ox).saturating_sub(1), (2 * ox + 1).min(w - 1));
                        let mut best = (f32::NEG_INFINITY, y0 * w + x0);
                        for iy in y0..=y1 {
                            for ix in x0..=x1 {
                                let v = x[iy * w + ix];
                                if v > best.0 || v.is_nan() {
                                    best = (v, iy * w + ix);
                                }
                            }
                        }
                        dx[best.1] += g[oy * wo + ox];
                    }
                }
            });
        Ok(storage(dx, xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Instruction-set dispatch (see `Simd`).

impl Simd {
    fn col2im(
        self,
        col: &[f32],
        cin_g: usize,
        d: Dims,
        g: Geometry,
        rows: Range<usize>,
        dx: &mut [f32],
    ) {
        match self {
            Simd::Baseline => col2im(col, cin_g, d, g, rows, dx),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma | Simd::Avx512 => unsafe { col2im_avx2(col, cin_g, d, g, rows, dx) },
        }
    }

    fn depthwise_input_plane(
        self,
        dy: &[f32],
        w: &[f32],
        d: Dims,
        g: Geometry,
        buf: &mut Vec<f32>,
        dx: &mut [f32],
    ) {
        match self {
            Simd::Baseline => depthwise_input_plane::<false>(dy, w, d, g, buf, dx),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma | Simd::Avx512 => unsafe {
                depthwise_input_plane_avx2(dy, w, d, g, buf, dx)
            },
        }
    }

    fn depthwise_weight_plane(
        self,
        x: &[f32],
        dy: &[f32],
        d: Dims,
        g: Geometry,
        buf: &mut PaddedPlane,
        taps: &mut [f32],
    ) {
        match self {
            Simd::Baseline => depthwise_weight_plane::<false>(x, dy, d, g, buf, taps),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma | Simd::Avx512 => unsafe {
                depthwise_weight_plane_avx2(x, dy, d, g, buf, taps)
            },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn col2im_avx2(
    col: &[f32],
    cin_g: usize,
    d: Dims,
    g: Geometry,
    rows: Range<usize>,
    dx: &mut [f32],
) {
    col2im(col, cin_g, d, g, rows, dx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_input_plane_avx2(
    dy: &[f32],
    w: &[f32],
    d: Dims,
    g: Geometry,
    buf: &mut Vec<f32>,
    dx: &mut [f32],
) {
    depthwise_input_plane::<true>(dy, w, d, g, buf, dx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_weight_plane_avx2(
    x: &[f32],
    dy: &[f32],
    d: Dims,
    g: Geometry,
    buf: &mut PaddedPlane,
    taps: &mut [f32],
) {
    depthwise_weight_plane::<true>(x, dy, d, g, buf, taps)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // A fixed pseudo-random fill (splitmix64), so that failures reproduce.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// max |a - b| over max |b|: the error relative to the tensor's scale.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let s: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        d / s.max(1e-12)
    }

    /// Gradients of sum(f(vars) * r) for a fixed random r, in the order of `vars`.
    fn grads(vars: &[&Var], y: &Tensor, seed: u64) -> Vec<Tensor> {
        let r = randn(y.dims(), seed);
        let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter()
            .map(|v| g.get(v.as_tensor()).expect("a gradient").clone())
            .collect()
    }

    /// The gradients of each of `vars` through `ours` and through `want` (the same random
    /// weighting of the output) agree within `tol` of their scale.
    fn assert_same_grads(vars: &[&Var], ours: &Tensor, want: &Tensor, tol: f32, what: &str) {
        let (got, exp) = (grads(vars, ours, 9), grads(vars, want, 9));
        for (i, (a, b)) in got.iter().zip(&exp).enumerate() {
            let e = rel(a, b);
            assert!(e < tol, "{what}: gradient {i} off by {e:e}");
        }
    }

    /// Convolution gradients equal candle's autograd on every shape class the families use:
    /// (cin, cout, k, stride, groups, side).
    #[test]
    fn conv_gradients_are_candles() {
        let cases = [
            (8, 16, 1, 1, 1, 9),  // 1x1 s1 (the direct path)
            (8, 16, 1, 2, 1, 9),  // 1x1 s2 (ResNet's downsample)
            (8, 12, 3, 1, 1, 10), // 3x3 s1
            (8, 12, 3, 2, 1, 11), // 3x3 s2, odd side
            (3, 8, 7, 2, 1, 17),  // 7x7 s2 stem
            (8, 12, 3, 1, 4, 9),  // grouped (ResNeXt, RegNet)
            (8, 8, 3, 2, 2, 10),  // grouped, strided
            (6, 6, 3, 1, 6, 9),   // depthwise 3x3 s1
            (6, 6, 3, 2, 6, 10),  // depthwise 3x3 s2
            (6, 6, 5, 1, 6, 9),   // depthwise 5x5 s1
            (6, 6, 5, 2, 6, 11),  // depthwise 5x5 s2
            // Planes of 384 outputs or more: the weight gradient one image at a time (smaller
            // ones are stacked).
            (4, 8, 3, 1, 1, 20),
            (4, 8, 1, 1, 1, 20),
            (4, 8, 3, 2, 2, 40),
            // The last stages of a small input: planes of 1 to 4 pixels.
            (8, 12, 3, 2, 1, 2),
            (8, 12, 3, 2, 1, 4),
            (8, 12, 3, 1, 1, 1),
            (8, 16, 1, 2, 1, 2),
            (6, 6, 3, 2, 6, 2),
            (6, 6, 3, 1, 6, 1),
            // 3x3 s1 with 32 channels or more and 128 together: Winograd, forward and input
            // gradient; odd and even planes, one smaller than a tile.
            (32, 96, 3, 1, 1, 9),
            (96, 32, 3, 1, 1, 6),
            (64, 64, 3, 1, 1, 1),
        ];
        for (i, &(cin, cout, k, stride, groups, side)) in cases.iter().enumerate() {
            // Batch 1 takes gemm's own threads, batch 3 one image per task.
            for n in [1, 3] {
                let g = Geometry {
                    stride,
                    padding: (k - 1) / 2,
                    groups,
                };
                let x = Var::from_tensor(&randn(&[n, cin, side, side], i as u64)).unwrap();
                let w =
                    Var::from_tensor(&randn(&[cout, cin / groups, k, k], 100 + i as u64)).unwrap();
                let ours = conv2d(x.as_tensor(), w.as_tensor(), g).unwrap();
                let want = x
                    .as_tensor()
                    .conv2d(w.as_tensor(), g.padding, stride, 1, groups)
                    .unwrap();
                let what = format!("case {i} {:?}, batch {n}", cases[i]);
                assert!(rel(&ours, &want) < 1e-5, "{what}: forward");
                let got = grads(&[&x, &w], &ours, 7);
                let exp = grads(&[&x, &w], &want, 7);
                for (name, a, b) in [("input", &got[0], &exp[0]), ("weight", &got[1], &exp[1])] {
                    assert_eq!(a.dims(), b.dims(), "{what}: {name}");
                    let r = rel(a, b);
                    assert!(r < 1e-4, "{what}: {name} gradient off by {r:e}");
                }
            }
        }
    }

    /// The input image tracks no graph: no input gradient is computed for it, and the weight's
    /// is still right.
    #[test]
    fn a_conv_on_an_untracked_input_gives_only_the_weight_gradient() {
        let x = randn(&[2, 3, 9, 9], 1);
        let w = Var::from_tensor(&randn(&[4, 3, 3, 3], 2)).unwrap();
        let g = Geometry {
            stride: 2,
            padding: 1,
            groups: 1,
        };
        let ours = conv2d(&x, w.as_tensor(), g).unwrap();
        let want = x.conv2d(w.as_tensor(), 1, 2, 1, 1).unwrap();
        let (a, b) = (grads(&[&w], &ours, 3), grads(&[&w], &want, 3));
        assert!(rel(&a[0], &b[0]) < 1e-4);
    }

    /// candle's ops for train-mode BN (the formula `BatchNorm::train_forward` uses).
    fn candle_bn(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let per_channel = |t: &Tensor| {
            t.transpose(0, 1)
                .unwrap()
                .reshape((c, n * h * w))
                .unwrap()
                .mean_keepdim(1)
                .unwrap()
                .reshape((1, c, 1, 1))
                .unwrap()
        };
        let mean = per_channel(x);
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = per_channel(&centred.sqr().unwrap());
        let inv_std = (var + eps).unwrap().sqrt().unwrap().recip().unwrap();
        centred
            .broadcast_mul(&inv_std)
            .unwrap()
            .broadcast_mul(&gamma.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    /// Train-mode BN with each activation, alone and before a residual, gives candle's output
    /// and gradients for x, gamma, beta and the residual, and the batch's moments.
    #[test]
    fn batch_norm_and_activations_are_candles() {
        let (n, c, side) = (4, 5, 7);
        for act in [Act::None, Act::Relu, Act::Relu6, Act::Silu, Act::Hardswish] {
            for with_residual in [false, true] {
                // Shifted and scaled per channel, so that ReLU6 clips at both ends.
                let x = Var::from_tensor(
                    &(randn(&[n, c, side, side], 1) * 4.0)
                        .unwrap()
                        .broadcast_add(&randn(&[1, c, 1, 1], 2))
                        .unwrap(),
                )
                .unwrap();
                let gamma = Var::from_tensor(&(randn(&[c], 3) * 4.0).unwrap()).unwrap();
                let beta = Var::from_tensor(&(randn(&[c], 4) * 3.0).unwrap()).unwrap();
                let r = Var::from_tensor(&randn(&[n, c, side, side], 5)).unwrap();
                let (xt, gt, bt) = (x.as_tensor(), gamma.as_tensor(), beta.as_tensor());
                let fused = if with_residual { Act::None } else { act };
                let (y, mean, var) = batch_norm(xt, gt, bt, 1e-5, fused).unwrap();
                let mut want = candle_bn(xt, gt, bt, 1e-5);
                let ours = if with_residual {
                    want = (want + r.as_tensor()).unwrap();
                    add_act(&y, Some(r.as_tensor()), act).unwrap()
                } else {
                    y
                };
                let want = act.tensor(&want).unwrap();
                let what = format!("{act:?}, residual {with_residual}");
                assert!(rel(&ours, &want) < 1e-5, "{what}: forward");
                let mut vars = vec![&x, &gamma, &beta];
                if with_residual {
                    vars.push(&r);
                }
                assert_same_grads(&vars, &ours, &want, 1e-4, &what);
                // The moments, in f64 by hand.
                let xs: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
                let plane = side * side;
                for ch in 0..c {
                    let vals: Vec<f64> = (0..n)
                        .flat_map(|i| xs[(i * c + ch) * plane..][..plane].iter())
                        .map(|&v| v as f64)
                        .collect();
                    let m = vals.iter().sum::<f64>() / vals.len() as f64;
                    let v = vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / vals.len() as f64;
                    assert!((mean[ch] as f64 - m).abs() < 1e-6 * (1.0 + m.abs()));
                    assert!((var[ch] as f64 - v).abs() < 1e-5 * v);
                }
            }
        }
    }

    /// The fused train-mode conv + BN is the two ops in sequence: the same output, moments and
    /// gradients for the input, the weight, gamma and beta (dense, strided, 1x1 and depthwise
    /// layers; each activation the train kernels take; with and without a residual after it;
    /// an input image that tracks no graph gets no gradient and the others are still right).
    #[test]
    fn conv_batch_norm_is_conv_then_batch_norm() {
        let cases = [
            (6, 8, 3, 1, 1),
            (6, 8, 3, 2, 1),
            (6, 8, 1, 1, 1),
            (6, 6, 3, 1, 6),
        ];
        for (i, &(cin, cout, k, stride, groups)) in cases.iter().enumerate() {
            for act in [Act::None, Act::Relu, Act::Relu6] {
                for (with_residual, tracked_input) in [(false, true), (true, true), (false, false)]
                {
                    let g = Geometry {
                        stride,
                        padding: (k - 1) / 2,
                        groups,
                    };
                    let side = 9;
                    let x = Var::from_tensor(&randn(&[3, cin, side, side], i as u64)).unwrap();
                    let w =
                        Var::from_tensor(&(randn(&[cout, cin / groups, k, k], 20) * 2.0).unwrap())
                            .unwrap();
                    let gamma = Var::from_tensor(&(randn(&[cout], 3) * 4.0).unwrap()).unwrap();
                    let beta = Var::from_tensor(&(randn(&[cout], 4) * 3.0).unwrap()).unwrap();
                    let xt = if tracked_input {
                        x.as_tensor().clone()
                    } else {
                        x.as_tensor().detach()
                    };
                    let (wt, gt, bt) = (w.as_tensor(), gamma.as_tensor(), beta.as_tensor());
                    let fused = if with_residual { Act::None } else { act };
                    let (y, mean, var) = conv_batch_norm(&xt, wt, g, gt, bt, 1e-5, fused).unwrap();
                    let conv = conv2d(&xt, wt, g).unwrap();
                    let (want, want_mean, want_var) =
                        batch_norm(&conv, gt, bt, 1e-5, fused).unwrap();
                    let r = randn(y.dims(), 5);
                    let (ours, want) = if with_residual {
                        (
                            add_act(&y, Some(&r), act).unwrap(),
                            add_act(&want, Some(&r), act).unwrap(),
                        )
                    } else {
                        (y, want)
                    };
                    let what = format!("case {:?}, {act:?}, residual {with_residual}, input tracked {tracked_input}", cases[i]);
                    assert_eq!(rel(&ours, &want), 0.0, "{what}: forward");
                    assert_eq!((mean, var), (want_mean, want_var), "{what}: moments");
                    let mut vars = vec![&w, &gamma, &beta];
                    if tracked_input {
                        vars.push(&x);
                    }
                    assert_same_grads(&vars, &ours, &want, 1e-6, &what);
                    if !tracked_input {
                        let (y, _, _) = conv_batch_norm(&xt, wt, g, gt, bt, 1e-5, fused).unwrap();
                        let store = y.sum_all().unwrap().backward().unwrap();
                        assert!(
                            store.get(x.as_tensor()).is_none(),
                            "{what}: an input gradient"
                        );
                        assert!(store.get(wt).is_some(), "{what}: no weight gradient");
                        // A second backward pass through the same graph is an error, not a panic.
                        assert!(
                            y.sum_all().unwrap().backward().is_err(),
                            "{what}: second pass"
                        );
                    }
                }
            }
        }
    }

    /// BN over an input that tracks no graph: gamma's and beta's gradients are those of the
    /// tracked case, and the input gets none.
    #[test]
    fn batch_norm_on_an_untracked_input_gives_only_the_parameter_gradients() {
        let x = Var::from_tensor(&(randn(&[3, 4, 5, 5], 1) * 2.0).unwrap()).unwrap();
        let gamma = Var::from_tensor(&randn(&[4], 2)).unwrap();
        let beta = Var::from_tensor(&randn(&[4], 3)).unwrap();
        let (gt, bt) = (gamma.as_tensor(), beta.as_tensor());
        let (tracked, _, _) = batch_norm(x.as_tensor(), gt, bt, 1e-5, Act::Relu).unwrap();
        let (untracked, _, _) =
            batch_norm(&x.as_tensor().detach(), gt, bt, 1e-5, Act::Relu).unwrap();
        assert_same_grads(
            &[&gamma, &beta],
            &untracked,
            &tracked,
            1e-6,
            "untracked input",
        );
        let r = randn(untracked.dims(), 4);
        let store = (&untracked * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(store.get(x.as_tensor()).is_none());
    }

    /// The max pool's gradient is the candle-composed pool's on distinct values (no ties), for
    /// even and odd sides.
    #[test]
    fn max_pool_gradient_is_the_composed_pools() {
        for (h, w) in [(8, 8), (9, 7)] {
            let x = Var::from_tensor(&randn(&[2, 3, h, w], 11)).unwrap();
            let ours = max_pool_3x3_s2_p1(x.as_tensor()).unwrap();
            let want = super::super::max_pool_3x3_s2_p1_differentiable(x.as_tensor()).unwrap();
            assert_eq!(rel(&ours, &want), 0.0);
            let (a, b) = (grads(&[&x], &ours, 12), grads(&[&x], &want, 12));
            assert!(rel(&a[0], &b[0]) < 1e-6, "{h}x{w}");
        }
    }
}

//! Convolutions on the CPU at gemm speed, with their epilogue (per-channel shift, residual add,
//! activation) fused in.
//!
//! candle 0.11's CPU conv2d reaches about a seventh of this machine's f32 peak, and its grouped
//! convolution runs group by group (depthwise: 0.16 GFLOP/s, `../shared/CANDLE-NOTES.md`). Here,
//! for f32 NCHW tensors on the CPU:
//!
//! - dense and grouped convolutions are an im2col (skipped for 1x1 stride-1, where the input
//!   plane already is the gemm's right-hand side) into the `gemm` crate, one image per rayon task
//!   when the batch can keep every thread busy, else one image at a time with gemm's own threads.
//!   Output rows are unfolded in blocks of about a core's L2, and strided convolutions unfold
//!   from a copy of the input whose rows are split into stride phases, so every copy is a
//!   contiguous run rather than a gather;
//! - dense 3x3 stride-1 convolutions with 32 channels or more each way and 128 together
//!   (ResNet's, VGG's, DenseNet's) run on
//!   Winograd's F(2x2, 3x3) instead ([`winograd`]): 16 multiply-adds per 2 x 2 output tile and
//!   channel pair instead of 36, as 16 gemms over the channels; so do their input gradients;
//! - depthwise convolutions (groups = channels) are a direct kernel, one plane per task, over a
//!   zero-padded, phase-split copy of the plane, so each tap is a contiguous multiply-add of one
//!   output row that stays in L1;
//! - the epilogue `act(conv + shift[c] + residual)` runs on each image's output while it is still
//!   in cache, replacing three or four full passes over the activation (the same kernel serves
//!   calibrate-mode BN in `fused`);
//! - ResNet's 3x3 stride-2 max pool is one pass per plane;
//! - ConvNeXt's inverted bottleneck (two pointwise layers around GELU, plus the residual) is one
//!   op over blocks of the batch's pixels ([`mlp`]).
//!
//! The element-wise kernels are compiled for baseline x86-64 and for AVX2 + FMA (the epilogues
//! and the blocked depthwise kernel for AVX-512 as well, see `Simd`) and picked at run time;
//! gemm dispatches its own. Measured speeds: README.md, "Performance", and
//! `cargo bench --bench cpu_conv`.
//!
//! These kernels keep no autograd graph. A model being trained runs on [`Kernels::Train`]: the
//! same kernels where nothing is trained, and where something is, the ones in [`train`], which
//! have backward passes of their own.
//!
//! Everything else (other devices and dtypes, or the candle kernels chosen for a model, to
//! measure the difference) takes candle's conv2d and tensor ops, so a model is one description
//! for CPU and CUDA. Results agree with candle's path to float rounding (summation order): tests in
//! `tests/models.rs` hold them to 1e-5 of the output's scale for every shape class the supported
//! families use.

use std::ops::Range;
use std::sync::OnceLock;

pub mod mlp;
pub mod train;
pub mod winograd;

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Tensor,
};
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
    /// x * min(max(x + 3, 0), 6) / 6, MobileNetV3's.
    Hardswish,
    /// x * (1 + erf(x / sqrt 2)) / 2, ConvNeXt's (torch's exact GELU, not the tanh one).
    GeluErf,
}

impl Act {
    /// Every activation (for tests that try each).
    pub const ALL: [Act; 6] = [
        Act::None,
        Act::Relu,
        Act::Relu6,
        Act::Silu,
        Act::Hardswish,
        Act::GeluErf,
    ];

    /// The same activation with candle's tensor ops.
    pub fn tensor(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(x.clone()),
            Act::Relu => x.relu(),
            Act::Relu6 => x.clamp(0f32, 6f32),
            Act::Silu => x.silu(),
            Act::Hardswish => x * ((x + 3.0)?.clamp(0f32, 6f32)? / 6.0)?,
            Act::GeluErf => x.gelu_erf(),
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

/// Which kernels a model's forward passes run on. Chosen per model (a frozen teacher on the fast
/// kernels next to a trained student on candle's differentiable ops) and carried in the forward
/// pass's context, never read from the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The kernels here and in `fused` wherever they apply (f32 on the CPU), candle's ops
    /// elsewhere. They have no backward pass.
    #[default]
    Fast,
    /// candle's ops everywhere: the path CUDA takes, differentiable.
    Candle,
    /// Fast and differentiable, for a model being trained: where a tensor carries an autograd
    /// graph (its input or its parameters are trained), the kernels of [`train`] (convolutions,
    /// train-mode BN, ReLU/ReLU6 with a residual, the stem's max pool) with backward passes of
    /// their own, candle's ops for the rest; where none does, the same as `Fast`.
    Train,
}

/// Whether the CPU kernels here and in `fused`, which keep no autograd graph, take `x` under
/// `k`: an f32 tensor on the CPU with the fast kernels chosen, or the train kernels and no graph
/// to keep.
pub fn cpu_kernels_for(x: &Tensor, k: Kernels) -> bool {
    let fast = match k {
        Kernels::Fast => true,
        Kernels::Train => !x.track_op(),
        Kernels::Candle => false,
    };
    fast && on_cpu_f32(x)
}

/// Whether the train kernels take `x` under `k` (whether it needs them is the caller's test).
pub fn train_kernels_for(x: &Tensor, k: Kernels) -> bool {
    k == Kernels::Train && on_cpu_f32(x)
}

fn on_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `act(conv2d(x, weight) + shift[c] + residual)`: x is [N, Cin, H, W], weight
/// `[Cout, Cin / groups, K, K]`, shift `[Cout]` (a missing shift is zero), residual shaped as the
/// output. On the CPU in f32 this is one fused pass (see the module doc); elsewhere candle's ops.
pub fn conv2d(
    k: Kernels,
    x: &Tensor,
    weight: &Tensor,
    g: Geometry,
    shift: Option<(&[f32], &Tensor)>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    if train_kernels_for(x, k)
        && weight.dtype() == DType::F32
        && (x.track_op() || weight.track_op())
    {
        let y = train::conv2d(x, weight, g)?;
        let y = match shift {
            Some((_, s)) => y.broadcast_add(&s.reshape(((), 1, 1))?)?,
            None => y,
        };
        return train::add_act(&y, residual, act);
    }
    if cpu_kernels_for(x, k) && weight.dtype() == DType::F32 {
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

type Uninit = std::mem::MaybeUninit<f32>;

/// A thread's scratch space for the dense path: the unfolded block and the phase-split input.
#[derive(Default)]
struct ColBuffers {
    col: Vec<f32>,
    phases: Vec<f32>,
    /// One image's output, for [`ConvOp::dense_into_residual`].
    out: Vec<f32>,
}

/// Size of one unfolded block of the input (see `dense`): a core's L2 on the machines measured.
const COL_BLOCK_BYTES: usize = 1 << 20;

/// dst[:, c0..c0 + n] = lhs [m x k] * rhs [k x n], where dst has `p` columns; rhs is row-major
/// with n columns.
///
/// # Safety
/// dst must hold m x p values, c0 + n <= p, lhs m x k values, rhs k x n values, and dst must not
/// overlap either input. gemm writes every element of the block without reading it.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    dst: &mut [Uninit],
    p: usize,
    c0: usize,
    n: usize,
    lhs: &[f32],
    m: usize,
    k: usize,
    rhs: &[f32],
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * p && c0 + n <= p && lhs.len() >= m * k && rhs.len() >= k * n);
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(c0).cast::<f32>(),
            1,
            p as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The slice as initialised values.
///
/// # Safety
/// Every element must have been written.
unsafe fn assume_init(s: &mut [Uninit]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller vouches for initialisation.
    unsafe { &mut *(s as *mut [Uninit] as *mut [f32]) }
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
        // Not zeroed up front (a pass over the whole output, evicting it from cache): the dense
        // path's gemm writes every element (it does not read dst), the depthwise path zeroes
        // each plane just before accumulating into it.
        let mut out = Vec::with_capacity(out_len);
        let spare = &mut out.spare_capacity_mut()[..out_len];
        if depthwise(self.g, d.cin, d.cout) {
            self.depthwise(x, w, residual, d, spare);
        } else {
            self.dense(x, w, residual, d, spare);
        }
        // SAFETY: every element of the first out_len was written (see above).
        unsafe { out.set_len(out_len) };
        Ok(out)
    }

    /// Grouped or dense convolution: per image, per group, im2col + gemm; then the epilogue.
    fn dense(&self, x: &[f32], w: &[f32], residual: Option<&[f32]>, d: Dims, out: &mut [Uninit]) {
        if winograd::applies(d, self.g) {
            let p = d.ho * d.wo;
            let out = winograd::Shared(out.as_mut_ptr().cast::<f32>());
            let u = winograd::transform_weights(w, d.cout, d.cin, false);
            winograd::conv(x, &u, d, self.g.padding, |plane, at, seg| {
                let r = residual.map(|r| &r[plane * p + at..][..seg.len()]);
                self.epilogue(seg, r, plane % d.cout, seg.len());
                // SAFETY: winograd::conv hands each segment of the output over once.
                unsafe { out.write(plane * p + at, seg) };
            });
            return;
        }
        let img_len = d.cout * d.ho * d.wo;
        self.per_image(d, out, |i, out_img, bufs, par| {
            self.dense_image(x, w, d, i, out_img, bufs, par);
            // SAFETY: dense_image wrote every element of this image's output.
            let out_img = unsafe { assume_init(out_img) };
            let r = residual.map(|r| &r[i * img_len..][..img_len]);
            self.epilogue(out_img, r, 0, d.ho * d.wo);
        });
    }

    /// [`Self::dense`] written over the residual: each image's output is computed in a buffer
    /// of one image, finished by the same epilogue, and copied over that image's residual, so
    /// the result has the same bits as the dense path's and no batch-sized output is allocated.
    fn dense_into_residual(&self, x: &[f32], w: &[f32], d: Dims, residual: &mut [f32]) {
        if winograd::applies(d, self.g) {
            let p = d.ho * d.wo;
            let res = winograd::Shared(residual.as_mut_ptr());
            let u = winograd::transform_weights(w, d.cout, d.cin, false);
            winograd::conv(x, &u, d, self.g.padding, |plane, at, seg| {
                // SAFETY: winograd::conv hands each segment of the output over once.
                let r = unsafe { res.slice(plane * p + at, seg.len()) };
                self.epilogue(seg, Some(r), plane % d.cout, seg.len());
                r.copy_from_slice(seg);
            });
            return;
        }
        let img_len = d.cout * d.ho * d.wo;
        // SAFETY: a view of initialised values as possibly uninitialised ones, only written
        // through with initialised values.
        let res = unsafe { &mut *(residual as *mut [f32] as *mut [Uninit]) };
        self.per_image(d, res, |i, res_img, bufs, par| {
            let mut own = std::mem::take(&mut bufs.out);
            own.clear();
            own.reserve(img_len);
            let spare = &mut own.spare_capacity_mut()[..img_len];
            self.dense_image(x, w, d, i, spare, bufs, par);
            // SAFETY: dense_image wrote all img_len values.
            unsafe { own.set_len(img_len) };
            // SAFETY: the residual was initialised (it is a tensor's storage).
            let r = unsafe { assume_init(res_img) };
            self.epilogue(&mut own, Some(r), 0, d.ho * d.wo);
            r.copy_from_slice(&own);
            bufs.out = own;
        });
    }

    /// Runs `image(i, that image's output, scratch, gemm parallelism)` for every image: one
    /// image per rayon task when the batch keeps every thread busy, else one at a time with
    /// gemm's own threads.
    fn per_image<F>(&self, d: Dims, out: &mut [Uninit], image: F)
    where
        F: Fn(usize, &mut [Uninit], &mut ColBuffers, Parallelism) + Sync,
    {
        let threads = rayon::current_num_threads();
        let img_len = d.cout * d.ho * d.wo;
        if d.n >= threads || threads == 1 {
            out.par_chunks_mut(img_len)
                .enumerate()
                .for_each_init(ColBuffers::default, |b, (i, o)| {
                    image(i, o, b, Parallelism::None)
                });
        } else {
            let mut bufs = ColBuffers::default();
            for (i, o) in out.chunks_mut(img_len).enumerate() {
                image(i, o, &mut bufs, Parallelism::Rayon(threads));
            }
        }
    }

    /// Image `i`'s convolution (no epilogue) into `out_img`, every element written.
    #[allow(clippy::too_many_arguments)]
    fn dense_image(
        &self,
        x: &[f32],
        w: &[f32],
        d: Dims,
        i: usize,
        out_img: &mut [Uninit],
        bufs: &mut ColBuffers,
        par: Parallelism,
    ) {
        let g = self.g;
        let (cin_g, cout_g) = (d.cin / g.groups, d.cout / g.groups);
        let p = d.ho * d.wo;
        let kk = cin_g * d.k * d.k;
        let direct = d.k == 1 && g.stride == 1 && g.padding == 0;
        let plane_in = d.h * d.w;
        // Unfold a block of output rows at a time, so that the unfolded block (written once,
        // read by gemm's packing) stays in L2 instead of going out to memory and back.
        let chunk_rows = (COL_BLOCK_BYTES / (4 * kk * d.wo).max(1)).clamp(1, d.ho);
        let ColBuffers { col, phases, .. } = bufs;
        let x_img = &x[i * d.cin * plane_in..][..d.cin * plane_in];
        for gi in 0..g.groups {
            let xg = &x_img[gi * cin_g * plane_in..][..cin_g * plane_in];
            let wg = &w[gi * cout_g * kk..][..cout_g * kk];
            let dst_g = &mut out_img[gi * cout_g * p..][..cout_g * p];
            if direct {
                // SAFETY: as below, with the whole plane as the right-hand side.
                unsafe { gemm_into(dst_g, p, 0, p, wg, cout_g, kk, xg, par) };
                continue;
            }
            let xg = split_phases(xg, d, g, phases);
            for rows in (0..d.ho)
                .step_by(chunk_rows)
                .map(|r| r..(r + chunk_rows).min(d.ho))
            {
                let n = rows.len() * d.wo;
                col.resize(kk * n, 0.0);
                im2col(&xg, cin_g, d, g, rows.clone(), col);
                // SAFETY: dst_g is cout_g x p, wg cout_g x kk, col kk x n, and the columns
                // rows.start * wo .. + n lie inside p; dst_g aliases neither input.
                unsafe { gemm_into(dst_g, p, rows.start * d.wo, n, wg, cout_g, kk, col, par) };
            }
        }
    }

    /// Depthwise convolution, one output plane per task, epilogue included.
    fn depthwise(
        &self,
        x: &[f32],
        w: &[f32],
        residual: Option<&[f32]>,
        d: Dims,
        out: &mut [Uninit],
    ) {
        let (plane_in, p, kk) = (d.h * d.w, d.ho * d.wo, d.k * d.k);
        let simd = Simd::detect();
        if blocks_channels(d) {
            // Eight channels a task, interleaved (see [`depthwise_block8`]).
            out.par_chunks_mut(LANES * p).enumerate().for_each_init(
                PaddedBlock::default,
                |buf, (j, o)| {
                    let c0 = j * LANES % d.cout;
                    let x = &x[j * LANES * plane_in..][..LANES * plane_in];
                    simd.depthwise_block8(x, &w[c0 * kk..][..LANES * kk], d, self.g, buf, o);
                    // SAFETY: depthwise_block8 writes every output of the block.
                    let o = unsafe { assume_init(o) };
                    let r = residual.map(|r| &r[j * LANES * p..][..LANES * p]);
                    self.epilogue(o, r, c0, p);
                },
            );
            return;
        }
        out.par_chunks_mut(p)
            .enumerate()
            .for_each_init(PaddedPlane::default, |buf, (j, o)| {
                let c = j % d.cout;
                let x = &x[j * plane_in..][..plane_in];
                o.fill(Uninit::new(0.0));
                // SAFETY: just written.
                let o = unsafe { assume_init(o) };
                simd.depthwise_plane(x, &w[c * kk..][..kk], d, self.g, buf, o);
                let r = residual.map(|r| &r[j * p..][..p]);
                self.epilogue(o, r, c, p);
            });
    }

    /// act(out + shift[c] + residual) over whole planes of `p` values, the first being channel
    /// `c0` (the rest follow in channel order).
    fn epilogue(&self, out: &mut [f32], residual: Option<&[f32]>, c0: usize, p: usize) {
        let simd = Simd::detect();
        for (j, plane) in out.chunks_mut(p).enumerate() {
            let b = self.shift.map_or(0.0, |s| s[c0 + j]);
            let r = residual.map(|r| &r[j * p..][..p]);
            simd.epilogue(plane, 1.0, b, r, self.act);
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

/// One group's input planes [cin_g, H, W] with each row split into `stride` phases (phase q
/// holds columns q, q + s, q + 2s, ...; row length s * lp), so that every unfolded row segment
/// is a contiguous copy even for strided convolutions; for stride 1 the planes themselves.
struct Phased<'a> {
    data: &'a [f32],
    /// Values per phase.
    lp: usize,
}

fn split_phases<'a>(x: &'a [f32], d: Dims, g: Geometry, buf: &'a mut Vec<f32>) -> Phased<'a> {
    let s = g.stride;
    if s == 1 {
        return Phased { data: x, lp: d.w };
    }
    let lp = d.w.div_ceil(s);
    buf.resize(x.len() / d.w * s * lp, 0.0);
    for (src, dst) in x.chunks_exact(d.w).zip(buf.chunks_exact_mut(s * lp)) {
        for (q, phase) in dst.chunks_exact_mut(lp).enumerate() {
            for (v, &x) in phase.iter_mut().zip(src[q.min(d.w)..].iter().step_by(s)) {
                *v = x;
            }
        }
    }
    Phased { data: buf, lp }
}

/// Unfolds output rows `rows` of one group's input (as phases) into `col`
/// [cin_g * K * K, rows.len() * Wo], rows in (channel, ky, kx) order: the weight's own layout.
fn im2col(x: &Phased, cin_g: usize, d: Dims, g: Geometry, rows: Range<usize>, col: &mut [f32]) {
    let (k, s) = (d.k, g.stride);
    let len = rows.len() * d.wo;
    let row_len = s * x.lp;
    for ci in 0..cin_g {
        let plane = &x.data[ci * d.h * row_len..][..d.h * row_len];
        for ky in 0..k {
            let (y_lo, y_hi) = valid_range(d.h, d.ho, ky, g);
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * len..][..len];
                let (lo, hi) = valid_range(d.w, d.wo, kx, g);
                // Input column of output column o: o * s + t, in phase t mod s at o + t div s.
                let t = kx as isize - g.padding as isize;
                let (q, shift) = (t.rem_euclid(s as isize) as usize, t.div_euclid(s as isize));
                for (oy, dst) in rows.clone().zip(row.chunks_mut(d.wo)) {
                    if oy < y_lo || oy >= y_hi || lo == hi {
                        dst.fill(0.0);
                        continue;
                    }
                    let iy = oy * s + ky - g.padding;
                    let src = &plane[iy * row_len + q * x.lp..][..x.lp];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let first = (lo as isize + shift) as usize;
                    dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                }
            }
        }
    }
}

/// Which instruction set the element-wise kernels below are compiled for, picked at run time:
/// the crate is built for baseline x86-64, and these loops are 2-3x faster with AVX2 and FMA
/// (the gemm crate dispatches the same way).
///
/// `Avx512` (AVX-512F on top of AVX2 and FMA): the epilogues, the blocked depthwise kernel and
/// the LayerNorm over columns have a build for it (16-lane vectors, 32 vector registers); every
/// other kernel runs its AVX2 build there. The operations per element are the same, so each
/// build gives the same bits. GELU's epilogue, for one: 0.92 -> 0.51 ns an element on one core
/// of the AMD EPYC (Zen 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    pub(crate) fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            static BEST: OnceLock<Simd> = OnceLock::new();
            *BEST.get_or_init(|| {
                if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                    Simd::Baseline
                } else if is_x86_feature_detected!("avx512f") {
                    Simd::Avx512
                } else {
                    Simd::Avx2Fma
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        Simd::Baseline
    }

    /// Every build this CPU can run, baseline first (for tests that compare them).
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Simd> {
        let mut v = vec![Simd::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            match Simd::detect() {
                Simd::Avx512 => v.extend([Simd::Avx2Fma, Simd::Avx512]),
                Simd::Avx2Fma => v.push(Simd::Avx2Fma),
                Simd::Baseline => {}
            }
        }
        v
    }

    fn depthwise_plane(
        self,
        x: &[f32],
        w: &[f32],
        d: Dims,
        g: Geometry,
        buf: &mut PaddedPlane,
        out: &mut [f32],
    ) {
        match self {
            Simd::Baseline => depthwise_plane::<false>(x, w, d, g, buf, out),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma | Simd::Avx512 => unsafe { depthwise_plane_avx2(x, w, d, g, buf, out) },
        }
    }

    fn depthwise_block8(
        self,
        x: &[f32],
        w: &[f32],
        d: Dims,
        g: Geometry,
        buf: &mut PaddedBlock,
        out: &mut [Uninit],
    ) {
        match self {
            Simd::Baseline => depthwise_block8::<false>(x, w, d, g, buf, out),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => unsafe { depthwise_block8_avx2(x, w, d, g, buf, out) },
            // SAFETY: detect() found AVX-512F, AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { depthwise_block8_avx512(x, w, d, g, buf, out) },
        }
    }

    /// The sums of `x - shift` and of its square over `v` (see [`shifted_sums`]).
    pub(crate) fn shifted_sums(self, v: &[f32], shift: f64) -> (f64, f64) {
        match self {
            Simd::Baseline => shifted_sums(v, shift),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma | Simd::Avx512 => unsafe { shifted_sums_avx2(v, shift) },
        }
    }

    /// LayerNorm over the rows of `x` [C, cols] for each column, in place (see
    /// [`channel_norm_columns`]); `stats` is scratch.
    pub(crate) fn channel_norm_columns(
        self,
        x: &mut [f32],
        cols: usize,
        norm: (&[f32], &[f32], f32),
        stats: &mut Vec<f32>,
    ) {
        match self {
            Simd::Baseline => channel_norm_columns(x, cols, norm, stats),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => unsafe { channel_norm_columns_avx2(x, cols, norm, stats) },
            // SAFETY: detect() found AVX-512F, AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { channel_norm_columns_avx512(x, cols, norm, stats) },
        }
    }

    /// act(v * scale + shift + residual) over one plane, in place.
    pub(crate) fn epilogue(
        self,
        plane: &mut [f32],
        scale: f32,
        shift: f32,
        residual: Option<&[f32]>,
        act: Act,
    ) {
        match self {
            Simd::Baseline => epilogue::<false>(plane, scale, shift, residual, act),
            // SAFETY: detect() found AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => unsafe { epilogue_avx2(plane, scale, shift, residual, act) },
            // SAFETY: detect() found AVX-512F, AVX2 and FMA on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { epilogue_avx512(plane, scale, shift, residual, act) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn depthwise_plane_avx2(
    x: &[f32],
    w: &[f32],
    d: Dims,
    g: Geometry,
    buf: &mut PaddedPlane,
    out: &mut [f32],
) {
    depthwise_plane::<true>(x, w, d, g, buf, out)
}

/// Defines `$avx2` and `$avx512`, two builds of the same call `$call` with the arguments
/// given: for AVX2 + FMA, and for AVX-512F on top of them (see [`Simd`]).
macro_rules! simd_builds {
    ($avx2:ident, $avx512:ident, ($($arg:ident: $ty:ty),* $(,)?), $call:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) {
            $call
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn $avx512($($arg: $ty),*) {
            $call
        }
    };
}

simd_builds!(
    epilogue_avx2,
    epilogue_avx512,
    (plane: &mut [f32], scale: f32, shift: f32, residual: Option<&[f32]>, act: Act),
    epilogue::<true>(plane, scale, shift, residual, act)
);

/// The sums of `x - shift` and of its square over `v`, in f64 (a BN layer's batch moments,
/// `fused::channel_moments`), in one pass of 8 independent running sums each: a single running
/// sum is a chain of dependent additions (one per 4 cycles), eight of them pipeline, and in the
/// AVX build vectorise (two 4-lane vectors for each; LLVM left the portable loop scalar, 14 %
/// of a MobileNetV2 soup's samples). The same additions in the same order in every build,
/// without fused multiply-adds: the same bits.
fn shifted_sums(v: &[f32], shift: f64) -> (f64, f64) {
    let (mut sum, mut sq) = ([0f64; 8], [0f64; 8]);
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for ((s, q), &x) in sum.iter_mut().zip(sq.iter_mut()).zip(c) {
            let d = x as f64 - shift;
            *s += d;
            *q += d * d;
        }
    }
    finish_shifted_sums(sum, sq, tail, shift)
}

/// The lanes' sums, then the values past the last whole 8, added in the same order by every
/// build.
#[inline(always)]
fn finish_shifted_sums(sum: [f64; 8], sq: [f64; 8], tail: &[f32], shift: f64) -> (f64, f64) {
    let (mut tail_sum, mut tail_sq) = (0f64, 0f64);
    for &x in tail {
        let d = x as f64 - shift;
        tail_sum += d;
        tail_sq += d * d;
    }
    (
        sum.iter().sum::<f64>() + tail_sum,
        sq.iter().sum::<f64>() + tail_sq,
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn shifted_sums_avx2(v: &[f32], shift: f64) -> (f64, f64) {
    use std::arch::x86_64::*;
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    let s = _mm256_set1_pd(shift);
    let (mut s_lo, mut s_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let (mut q_lo, mut q_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    for c in chunks {
        // SAFETY: `c` holds 8 f32s; unaligned loads.
        let x = _mm256_loadu_ps(c.as_ptr());
        let lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), s);
        let hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)), s);
        s_lo = _mm256_add_pd(s_lo, lo);
        s_hi = _mm256_add_pd(s_hi, hi);
        q_lo = _mm256_add_pd(q_lo, _mm256_mul_pd(lo, lo));
        q_hi = _mm256_add_pd(q_hi, _mm256_mul_pd(hi, hi));
    }
    let (mut sum, mut sq) = ([0f64; 8], [0f64; 8]);
    _mm256_storeu_pd(sum.as_mut_ptr(), s_lo);
    _mm256_storeu_pd(sum.as_mut_ptr().add(4), s_hi);
    _mm256_storeu_pd(sq.as_mut_ptr(), q_lo);
    _mm256_storeu_pd(sq.as_mut_ptr().add(4), q_hi);
    finish_shifted_sums(sum, sq, tail, shift)
}

simd_builds!(
    channel_norm_columns_avx2,
    channel_norm_columns_avx512,
    (x: &mut [f32], cols: usize, norm: (&[f32], &[f32], f32), stats: &mut Vec<f32>),
    channel_norm_columns(x, cols, norm, stats)
);

/// LayerNorm over the rows of `x` [C, cols] for each column (ConvNeXt's over the channels of
/// each pixel: an image's planes in `fused::channel_layer_norm`, a block of pixels in `mlp`), in
/// place, with `(weight, bias, eps)`: the mean, the biased variance about it (two passes, as
/// stable as candle's), then (v - mean) * rstd * weight + bias, summed over the rows in order in
/// f32 and without fused multiply-adds, so that every build gives the same bits.
#[inline(always)]
fn channel_norm_columns(
    x: &mut [f32],
    cols: usize,
    (weight, bias, eps): (&[f32], &[f32], f32),
    stats: &mut Vec<f32>,
) {
    let c = weight.len();
    debug_assert_eq!(x.len(), c * cols);
    stats.clear();
    stats.resize(2 * cols, 0.0);
    let (mean, rstd) = stats.split_at_mut(cols);
    let inv_c = 1.0 / c as f32;
    for row in x.chunks_exact(cols) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m *= inv_c);
    for row in x.chunks_exact(cols) {
        rstd.iter_mut()
            .zip(&*mean)
            .zip(row)
            .for_each(|((s, &m), &v)| *s += (v - m) * (v - m));
    }
    rstd.iter_mut()
        .for_each(|s| *s = 1.0 / (*s * inv_c + eps).sqrt());
    for ((row, &wc), &bc) in x.chunks_exact_mut(cols).zip(weight).zip(bias) {
        for ((y, &m), &r) in row.iter_mut().zip(&*mean).zip(&*rstd) {
            *y = (*y - m) * r * wc + bc;
        }
    }
}

/// a * b + c, fused where the CPU has FMA (a call into libm where it has not, so not there).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// act(v * s + b + residual) over one plane (s = 1 after a convolution: exactly v + b).
#[inline(always)]
fn epilogue<const FMA: bool>(
    plane: &mut [f32],
    s: f32,
    b: f32,
    residual: Option<&[f32]>,
    act: Act,
) {
    macro_rules! each {
        ($act:expr) => {
            match residual {
                Some(r) => plane
                    .iter_mut()
                    .zip(r)
                    .for_each(|(v, &r)| *v = $act(madd::<FMA>(*v, s, b) + r)),
                None => plane
                    .iter_mut()
                    .for_each(|v| *v = $act(madd::<FMA>(*v, s, b))),
            }
        };
    }
    match act {
        Act::None => each!(|v| v),
        Act::Relu => each!(|v: f32| v.max(0.0)),
        Act::Relu6 => each!(|v: f32| v.clamp(0.0, 6.0)),
        Act::Silu => each!(|v: f32| v / (1.0 + exp::<FMA>(-v))),
        Act::Hardswish => each!(|v: f32| v * ((v + 3.0).clamp(0.0, 6.0) / 6.0)),
        Act::GeluErf => each!(|v: f32| gelu_erf::<FMA>(v)),
    }
}

/// x * (1 + erf(x / sqrt 2)) / 2 without branches (so that a loop over a slice vectorises),
/// erf by Abramowitz and Stegun 7.1.26: 1 - t (a1 + t (a2 + ...)) e^(-a^2) with t = 1 / (1 + p a)
/// for a = |x|, the sign put back; its absolute error is at most 1.5e-7, so GELU's is at most
/// 7.5e-8 |x|.
#[inline(always)]
pub(crate) fn gelu_erf<const FMA: bool>(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / madd::<FMA>(0.327_591_1, a, 1.0);
    let mut p = 1.061_405_4;
    p = madd::<FMA>(p, t, -1.453_152_1);
    p = madd::<FMA>(p, t, 1.421_413_8);
    p = madd::<FMA>(p, t, -0.284_496_74);
    p = madd::<FMA>(p, t, 0.254_829_6);
    let erf_a = 1.0 - p * t * exp::<FMA>(-a * a);
    let erf = erf_a.copysign(z);
    0.5 * x * (1.0 + erf)
}

/// e^x in f32 without branches, so that a loop over a slice vectorises (libm's expf does not):
/// round x / ln 2 to n with the 1.5 * 2^23 trick, reduce to r = x - n ln 2 in two steps, a
/// degree-6 polynomial for e^r on [-ln 2 / 2, ln 2 / 2] (Cephes' expf coefficients), then
/// scale by 2^n through the exponent bits. Relative error about 2e-7 over the clamped range
/// [-87, 88]; beyond it the result saturates (e^-87 ~ 1.6e-38, e^88 ~ 1.7e38), which SiLU never
/// notices.
#[inline(always)]
fn exp<const FMA: bool>(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let t = madd::<FMA>(x, std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = madd::<FMA>(n, -0.693_359_4, x);
    let r = madd::<FMA>(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 0.166_666_65);
    p = madd::<FMA>(p, r, 0.5);
    let y = madd::<FMA>(p, r * r, r) + 1.0;
    // t's low mantissa bits hold n (|n| <= 127 here).
    let n_int = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// A thread's zero-padded, phase-split copy of one input plane (see [`depthwise_plane`]).
#[derive(Default)]
struct PaddedPlane {
    /// [H, W, K, stride, padding] of the layout `data` holds.
    layout: [usize; 5],
    data: Vec<f32>,
}

/// One plane of a depthwise convolution: `out` [Ho, Wo] (zeroed by the caller) += sum over taps of w[ky, kx] times the
/// input plane [H, W] shifted by the tap.
///
/// The input is first copied into `buf` zero-padded and, for stride s, split into s phases per
/// row (phase q holds columns q, q + s, q + 2s, ...), so that every tap is a contiguous
/// multiply-add of one output row: output column o of tap kx reads phase kx % s at o + kx / s.
/// Rows go outermost, so an output row stays in L1 across all k * k taps.
#[inline(always)]
fn depthwise_plane<const FMA: bool>(
    x: &[f32],
    w: &[f32],
    d: Dims,
    g: Geometry,
    buf: &mut PaddedPlane,
    out: &mut [f32],
) {
    let (k, s) = (d.k, g.stride);
    let (row_len, lp) = buf.fill(x, d, g);
    let buf = &buf.data[..];
    for oy in 0..d.ho {
        let dst = &mut out[oy * d.wo..][..d.wo];
        for ky in 0..k {
            let row = &buf[(oy * s + ky) * row_len..][..row_len];
            for kx in 0..k {
                let wt = w[ky * k + kx];
                let src = &row[(kx % s) * lp + kx / s..][..d.wo];
                for (o, &v) in dst.iter_mut().zip(src) {
                    *o = madd::<FMA>(wt, v, *o);
                }
            }
        }
    }
}

/// Channels a [`depthwise_block8`] task takes: one AVX2 vector.
const LANES: usize = 8;

/// Whether a depthwise layer (see [`depthwise`]) runs eight channels at a time: a channel count that splits into
/// whole blocks (every family's does) and output rows of at most 64. [`depthwise_plane`]'s row
/// vectors run part empty on short rows (a 7-wide row is all remainder), and the blocked kernel
/// was faster down to 56 x 56: `ckpt logits` of 96 images at 224 px, 2 threads (whole process),
/// MobileNetV3-small 0.36 -> 0.27 s, ConvNeXt-T 5.2 -> 4.5 s, MobileNetV2 1.03 -> 0.90 s,
/// EfficientNet-B0 1.68 -> 1.44 s with this bound; with 16 instead of 64 less of that (0.29,
/// 4.6, 0.97, 1.57 s), with 128 the same as 64.
fn blocks_channels(d: Dims) -> bool {
    d.wo <= 64 && d.cout % LANES == 0
}

/// A thread's scratch for [`depthwise_block8`]: eight planes interleaved and zero-padded.
#[derive(Default)]
struct PaddedBlock {
    /// [H, W, K, stride, padding] of the layout `data` holds.
    layout: [usize; 5],
    data: Vec<[f32; LANES]>,
    taps: Vec<[f32; LANES]>,
}

/// Eight planes of a depthwise convolution at once: `out` [8, Ho, Wo] = sum over taps of
/// w[c, ky, kx] times input plane c [H, W] shifted by the tap, every output written.
///
/// Small planes leave [`depthwise_plane`]'s row vectors mostly empty; here the vector runs
/// across channels instead (oneDNN's blocked layout): the eight planes are interleaved into a
/// zero-padded [Hp, Wp, 8] buffer, each tap is one multiply-add of eight lanes, and each output
/// position's eight sums are stored back to the eight planes.
#[inline(always)]
fn depthwise_block8<const FMA: bool>(
    x: &[f32],
    w: &[f32],
    d: Dims,
    g: Geometry,
    buf: &mut PaddedBlock,
    out: &mut [Uninit],
) {
    let (k, s, pad) = (d.k, g.stride, g.padding);
    let (hp, wp) = (d.h + 2 * pad, d.w + 2 * pad);
    let (plane_in, kk) = (d.h * d.w, k * k);
    // The padding is zeroed when the layout changes; each block overwrites the interior.
    let layout = [d.h, d.w, k, s, pad];
    if buf.layout != layout {
        buf.layout = layout;
        buf.data.clear();
        buf.data.resize(hp * wp, [0.0; LANES]);
    }
    for iy in 0..d.h {
        let row = &mut buf.data[(iy + pad) * wp + pad..][..d.w];
        for (ix, v) in row.iter_mut().enumerate() {
            for (l, v) in v.iter_mut().enumerate() {
                *v = x[l * plane_in + iy * d.w + ix];
            }
        }
    }
    buf.taps.clear();
    buf.taps
        .extend((0..kk).map(|t| std::array::from_fn(|l| w[l * kk + t])));
    let (data, taps) = (&buf.data[..], &buf.taps[..]);
    match s {
        1 => block8_rows::<FMA, 1>(data, taps, d, 1, wp, out),
        2 => block8_rows::<FMA, 2>(data, taps, d, 2, wp, out),
        _ => block8_rows::<FMA, 0>(data, taps, d, s, wp, out),
    }
}

/// [`depthwise_block8`]'s output rows from the interleaved padded planes `data`, for stride
/// `S` (0: the stride `s` given at run time; 1 and 2 are compiled as constants, so that the
/// taps' offsets are too).
#[inline(always)]
fn block8_rows<const FMA: bool, const S: usize>(
    data: &[[f32; LANES]],
    taps: &[[f32; LANES]],
    d: Dims,
    s: usize,
    wp: usize,
    out: &mut [Uninit],
) {
    let s = if S == 0 { s } else { S };
    let p = d.ho * d.wo;
    for oy in 0..d.ho {
        let mut ox = 0;
        let rows = &data[oy * s * wp..];
        let out_row = oy * d.wo;
        while ox + 8 <= d.wo {
            block8_outputs::<FMA, 8>(rows, taps, d.k, s, wp, ox, &mut out[out_row..], p);
            ox += 8;
        }
        while ox + 2 <= d.wo {
            block8_outputs::<FMA, 2>(rows, taps, d.k, s, wp, ox, &mut out[out_row..], p);
            ox += 2;
        }
        if ox < d.wo {
            block8_outputs::<FMA, 1>(rows, taps, d.k, s, wp, ox, &mut out[out_row..], p);
        }
    }
}

/// Outputs `ox .. ox + B` of one output row of [`depthwise_block8`]: `rows` starts at the
/// padded input row of the first tap row, `out` at the output row in the first plane (planes
/// `p` apart). The B positions' sums are independent chains held in registers and each tap's
/// weights are loaded once for all of them (one sum at a time is a chain of k * k dependent
/// multiply-adds, bound by their latency); each sum adds its taps in the same order as one
/// position alone, so B does not change the bits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block8_outputs<const FMA: bool, const B: usize>(
    rows: &[[f32; LANES]],
    taps: &[[f32; LANES]],
    k: usize,
    s: usize,
    wp: usize,
    ox: usize,
    out: &mut [Uninit],
    p: usize,
) {
    let mut acc = [[0f32; LANES]; B];
    let span = (B - 1) * s + k;
    for ky in 0..k {
        let row = &rows[ky * wp + ox * s..][..span];
        let tw = &taps[ky * k..][..k];
        for (kx, t) in tw.iter().enumerate() {
            for (b, a) in acc.iter_mut().enumerate() {
                debug_assert!(b * s + kx < span);
                // SAFETY: b < B and kx < k, so b * s + kx < (B - 1) * s + k = row.len().
                let v = unsafe { row.get_unchecked(b * s + kx) };
                for l in 0..LANES {
                    a[l] = madd::<FMA>(t[l], v[l], a[l]);
                }
            }
        }
    }
    for (b, a) in acc.iter().enumerate() {
        for (l, &v) in a.iter().enumerate() {
            out[l * p + ox + b] = Uninit::new(v);
        }
    }
}

simd_builds!(
    depthwise_block8_avx2,
    depthwise_block8_avx512,
    (x: &[f32], w: &[f32], d: Dims, g: Geometry, buf: &mut PaddedBlock, out: &mut [Uninit]),
    depthwise_block8::<true>(x, w, d, g, buf, out)
);

impl PaddedPlane {
    /// Copies plane `x` [H, W] in, zero-padded and phase-split (see [`depthwise_plane`]);
    /// returns (row length, values per phase).
    #[inline(always)]
    fn fill(&mut self, x: &[f32], d: Dims, g: Geometry) -> (usize, usize) {
        let (k, s, pad) = (d.k, g.stride, g.padding);
        let (hp, wp) = (d.h + 2 * pad, d.w + 2 * pad);
        let lp = wp.div_ceil(s);
        let row_len = s * lp;
        // The padding is zeroed when the layout changes and never written after: the planes of
        // one layer share a layout, and each overwrites exactly the interior of the one before.
        let layout = [d.h, d.w, k, s, pad];
        if self.layout != layout {
            self.layout = layout;
            self.data.clear();
            self.data.resize(hp * row_len, 0.0);
        }
        let buf = &mut self.data[..];
        for iy in 0..d.h {
            let src = &x[iy * d.w..][..d.w];
            let row = &mut buf[(iy + pad) * row_len..][..row_len];
            match s {
                1 => row[pad..pad + d.w].copy_from_slice(src),
                2 => {
                    let (even, odd) = row.split_at_mut(lp);
                    for (ix, &v) in src.iter().enumerate() {
                        let c = ix + pad;
                        if c & 1 == 0 {
                            even[c >> 1] = v;
                        } else {
                            odd[c >> 1] = v;
                        }
                    }
                }
                _ => {
                    for (ix, &v) in src.iter().enumerate() {
                        let c = ix + pad;
                        row[(c % s) * lp + c / s] = v;
                    }
                }
            }
        }
        (row_len, lp)
    }
}

impl ConvOp<'_> {
    /// The CPU forward of both custom ops: without and with a residual.
    fn cpu_forward(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(xl, wl)?;
        let shape = Shape::from((d.n, d.cout, d.ho, d.wo));
        let r = match residual {
            Some((rs, rl)) => {
                if rl.shape() != &shape {
                    candle_core::bail!("cpu conv: residual {:?} for output {shape:?}", rl.shape());
                }
                Some(f32_slice(rs, rl, "residual")?)
            }
            None => None,
        };
        let (x, w) = (f32_slice(xs, xl, "input")?, f32_slice(ws, wl, "weight")?);
        Ok((CpuStorage::F32(self.run(x, w, r, d)?), shape))
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
        self.cpu_forward((xs, xl), (ws, wl), None)
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
        self.cpu_forward((xs, xl), (ws, wl), Some((rs, rl)))
    }
}

impl InplaceOp3 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "cpu-conv2d-into-residual"
    }

    fn cpu_fwd(
        &self,
        rs: &mut CpuStorage,
        rl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<()> {
        let d = self.dims(xl, wl)?;
        if rl.shape().dims() != [d.n, d.cout, d.ho, d.wo] {
            candle_core::bail!(
                "cpu conv: residual {:?} for output {:?}",
                rl.shape(),
                (d.n, d.cout, d.ho, d.wo)
            );
        }
        if depthwise(self.g, d.cin, d.cout) {
            candle_core::bail!("cpu conv: a depthwise convolution is not written in place");
        }
        let (x, w) = (f32_slice(xs, xl, "input")?, f32_slice(ws, wl, "weight")?);
        let (start, end) = rl.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("cpu conv: residual is not contiguous".into())
        })?;
        let r = match rs {
            CpuStorage::F32(v) => &mut v[start..end],
            _ => candle_core::bail!("cpu conv: residual is not f32"),
        };
        self.dense_into_residual(x, w, d, r);
        Ok(())
    }
}

/// Whether a convolution runs on the depthwise kernel (one group per channel) rather than as
/// im2col + gemm.
fn depthwise(g: Geometry, cin: usize, cout: usize) -> bool {
    g.groups == cin && cout == cin
}

/// [`conv2d`] with a residual nobody else holds: `act(conv(x) + shift + residual)` written over
/// the residual's storage and returned, the same values as [`conv2d`]'s. A residual block's end
/// then holds the shortcut and no second output-sized tensor (issue 21). The caller vouches that
/// no other tensor shares `residual`'s storage (a fresh output of the block's projection, or a
/// block input handed over by value). Where the fast kernels do not run (other devices, dtypes,
/// a graph to differentiate, a depthwise convolution), this is [`conv2d`] into a new tensor.
pub fn conv2d_into_residual(
    k: Kernels,
    x: &Tensor,
    weight: &Tensor,
    g: Geometry,
    shift: Option<(&[f32], &Tensor)>,
    residual: Tensor,
    act: Act,
) -> Result<Tensor> {
    let depthwise = depthwise(g, x.dim(1)?, weight.dim(0)?);
    let in_place = cpu_kernels_for(x, k)
        && weight.dtype() == DType::F32
        && residual.dtype() == DType::F32
        && !(x.track_op() || weight.track_op() || residual.track_op())
        && !residual.is_variable()
        && residual.is_contiguous()
        && !depthwise;
    if !in_place {
        return conv2d(k, x, weight, g, shift, Some(&residual), act);
    }
    let op = ConvOp {
        g,
        shift: shift.map(|s| s.0),
        act,
    };
    residual.inplace_op3(&x.contiguous()?, &weight.contiguous()?, &op)?;
    Ok(residual)
}

/// torch.nn.MaxPool2d(3, stride 2, padding 1) over [N, C, H, W] (the ResNet stem's pool). On
/// the CPU in f32 one pass per plane (a row maximum of three input rows, then of three columns);
/// elsewhere candle's pool over an edge-replicated copy, which is exact for a maximum since the
/// replicated value is already in the window.
///
/// When `x` carries an autograd graph (a layer upstream is trained), the pool is composed of
/// differentiable ops instead (candle's pool has no backward for a window larger than its
/// stride): the maximum of the nine strided views of the edge-replicated input. A tie splits
/// the gradient where PyTorch gives it to the first maximum; the ties that occur (an edge and
/// its replicated copy, zeros after a ReLU, which passes no gradient) do not change the result.
pub fn max_pool_3x3_s2_p1(k: Kernels, x: &Tensor) -> Result<Tensor> {
    if x.track_op() && train_kernels_for(x, k) && x.rank() == 4 {
        return train::max_pool_3x3_s2_p1(x);
    }
    if x.track_op() {
        return max_pool_3x3_s2_p1_differentiable(x);
    }
    if cpu_kernels_for(x, k) && x.rank() == 4 {
        return x.contiguous()?.apply_op1_no_bwd(&MaxPool3x3S2);
    }
    x.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride(3, 2)
}

fn max_pool_3x3_s2_p1_differentiable(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // One replicated row (column) before, and after as many as make 2 * ho + 2 in all.
    let p = x
        .pad_with_same(2, 1, 2 * ho + 1 - h)?
        .pad_with_same(3, 1, 2 * wo + 1 - w)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        for dx in 0..3 {
            let view = p
                .narrow(2, dy, 2 * ho)?
                .narrow(3, dx, 2 * wo)?
                .reshape((n, c, ho, 2, wo, 2))?
                .narrow(3, 0, 1)?
                .narrow(5, 0, 1)?
                .reshape((n, c, ho, wo))?;
            out = Some(match out {
                None => view,
                Some(o) => o.maximum(&view)?,
            });
        }
    }
    Ok(out.expect("nine views"))
}

struct MaxPool3x3S2;

impl candle_core::CustomOp1 for MaxPool3x3S2 {
    fn name(&self) -> &'static str {
        "cpu-max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "input")?;
        let (n, c, h, w) = l.shape().dims4()?;
        if h == 0 || w == 0 {
            candle_core::bail!("max pool: empty input {:?}", l.shape());
        }
        let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let mut out = vec![0f32; n * c * ho * wo];
        out.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each_init(Vec::new, |rowmax, (o, plane)| {
                rowmax.resize(w, 0.0);
                for oy in 0..ho {
                    let (y0, y1) = ((2 * oy).saturating_sub(1), (2 * oy + 1).min(h - 1));
                    rowmax.copy_from_slice(&plane[y0 * w..][..w]);
                    for iy in y0 + 1..=y1 {
                        for (m, &v) in rowmax.iter_mut().zip(&plane[iy * w..][..w]) {
                            *m = m.max(v);
                        }
                    }
                    for (ox, v) in o[oy * wo..][..wo].iter_mut().enumerate() {
                        let (x0, x1) = ((2 * ox).saturating_sub(1), (2 * ox + 1).min(w - 1));
                        *v = rowmax[x0..=x1]
                            .iter()
                            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The approximation's 7.5e-8 |x| plus f32 rounding (measured: 1.53e-7 of max(|x|, 1)).
    #[test]
    fn gelu_is_within_2e_7_of_the_exact_one() {
        let mut worst = 0f64;
        for i in -12_000..12_000 {
            let x = i as f32 * 1e-3 + 0.000_37;
            let xd = x as f64;
            let want = 0.5 * xd * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            for got in [gelu_erf::<false>(x), gelu_erf::<true>(x)] {
                worst = worst.max((got as f64 - want).abs() / xd.abs().max(1.0));
            }
        }
        assert!(worst < 2e-7, "worst error {worst:e} (of max(|x|, 1))");
        assert_eq!(gelu_erf::<true>(0.0), 0.0);
        assert!(gelu_erf::<true>(-30.0).abs() < 1e-30 && gelu_erf::<true>(30.0) == 30.0);
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 0.000_37;
            let want = (x as f64).exp();
            for got in [exp::<false>(x), exp::<true>(x)] {
                worst = worst.max(((got as f64 - want) / want).abs());
            }
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        // Saturates instead of overflowing: SiLU of a large negative input is -0, not NaN.
        assert!(exp::<false>(200.0).is_finite() && exp::<false>(-200.0) >= 0.0);
    }

    /// Reproducible values in [-1, 1) from a small LCG, fixed by `seed` (shared with the
    /// Winograd tests).
    pub(super) fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every build of the epilogue (baseline, AVX2, AVX-512 where the CPU has them) gives the
    /// bits of the others with FMA, and each activation, with and without a residual, at
    /// lengths that leave every vector remainder (0 to 16 values past a whole vector).
    #[test]
    fn epilogue_builds_agree_bit_for_bit() {
        let builds = Simd::all();
        for len in (1..40).chain([256, 1000]) {
            let x: Vec<f32> = values(len, len as u32).iter().map(|v| v * 8.0).collect();
            let r = values(len, 7 + len as u32);
            for act in Act::ALL {
                for res in [None, Some(r.as_slice())] {
                    let run = |simd: Simd| {
                        let mut y = x.clone();
                        simd.epilogue(&mut y, 1.5, -0.25, res, act);
                        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    };
                    // The baseline has no FMA (a * b + c rounds twice): compared with the
                    // fused builds within rounding, and the fused builds with each other exactly.
                    let fused: Vec<Simd> = builds[1..].to_vec();
                    if let Some(&first) = fused.first() {
                        let want = run(first);
                        for &b in &fused[1..] {
                            assert_eq!(run(b), want, "{b:?} vs {first:?}, {act:?}, len {len}");
                        }
                    }
                    let base = run(Simd::Baseline);
                    let fma = run(*builds.last().unwrap());
                    for (j, (&b, &f)) in base.iter().zip(&fma).enumerate() {
                        let (b, f) = (f32::from_bits(b), f32::from_bits(f));
                        assert!(
                            (b - f).abs() <= 1e-5 * f.abs().max(1.0),
                            "baseline {b} vs {f}, {act:?}, len {len}, value {j}"
                        );
                    }
                }
            }
        }
    }

    /// Every build of the BN moments' shifted sums gives the same bits, at lengths that leave
    /// every remainder of the 8 lanes, and they are the sums (to f64 rounding).
    #[test]
    fn shifted_sums_builds_agree_bit_for_bit() {
        for len in (0..40).chain([1000, 12544]) {
            let v: Vec<f32> = values(len, 11 + len as u32)
                .iter()
                .map(|x| x * 4.0 + 3.0)
                .collect();
            let shift = v.first().map_or(0.0, |&x| x as f64);
            let want = Simd::Baseline.shifted_sums(&v, shift);
            for simd in Simd::all() {
                let got = simd.shifted_sums(&v, shift);
                assert_eq!(
                    (got.0.to_bits(), got.1.to_bits()),
                    (want.0.to_bits(), want.1.to_bits()),
                    "{simd:?}, len {len}"
                );
            }
            let d: Vec<f64> = v.iter().map(|&x| x as f64 - shift).collect();
            let (s, q): (f64, f64) = (d.iter().sum(), d.iter().map(|d| d * d).sum());
            assert!(
                (want.0 - s).abs() <= 1e-12 * q.sqrt().max(1.0) * len as f64,
                "len {len}"
            );
            assert!((want.1 - q).abs() <= 1e-12 * q.max(1.0), "len {len}");
        }
    }

    /// The LayerNorm over the columns of a block (`mlp`'s) gives the bits of
    /// `fused::channel_layer_norm` over the same pixels (a tensor's planes, the op's layout and
    /// thread split), on every build.
    #[test]
    fn column_norm_is_channel_layer_norm_bit_for_bit() {
        use candle_core::Device;
        let (c, cols) = (24, 37);
        let x: Vec<f32> = values(c * cols, 3).iter().map(|v| v * 3.0 + 0.5).collect();
        let (w, b) = (values(c, 4), values(c, 5));
        let dev = Device::Cpu;
        let t = Tensor::from_vec(x.clone(), (1, c, 1, cols), &dev).unwrap();
        let wt = Tensor::from_vec(w.clone(), (1, c, 1, 1), &dev).unwrap();
        let bt = Tensor::from_vec(b.clone(), (1, c, 1, 1), &dev).unwrap();
        let want =
            crate::models::fused::channel_layer_norm(Kernels::Fast, &t, (&w, &wt), (&b, &bt), 1e-6)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        for simd in Simd::all() {
            let mut y = x.clone();
            simd.channel_norm_columns(&mut y, cols, (&w, &b, 1e-6), &mut Vec::new());
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want), "{simd:?}");
        }
    }

    /// The blocked depthwise kernel (eight channels a task, up to eight output positions a
    /// step) gives the bits of the one-plane kernel, which sums each output's taps in the same
    /// order, on every build: strides 1 and 2 (compiled as constants) and 3 (the stride read at
    /// run time), kernels 3, 5 and 7, rows of 1 to 19 outputs (every mix of 8-, 2- and
    /// 1-position steps), planes smaller than the kernel.
    #[test]
    fn blocked_depthwise_is_the_plane_kernel_bit_for_bit() {
        let mut checked = 0;
        for simd in Simd::all() {
            for (k, stride) in [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (3, 3)] {
                for (h, w) in [(1, 1), (2, 3), (7, 7), (9, 13), (19, 19), (12, 57)] {
                    let g = Geometry {
                        stride,
                        padding: (k - 1) / 2,
                        groups: LANES,
                    };
                    let (ho, wo) = (
                        (h + 2 * g.padding - k) / stride + 1,
                        (w + 2 * g.padding - k) / stride + 1,
                    );
                    let d = Dims {
                        n: 1,
                        cin: LANES,
                        h,
                        w,
                        cout: LANES,
                        k,
                        ho,
                        wo,
                    };
                    let x = values(LANES * h * w, (k * 100 + h * 10 + w) as u32);
                    let wt = values(LANES * k * k, (stride * 1000 + k) as u32);
                    let mut blocked = vec![Uninit::new(f32::NAN); LANES * ho * wo];
                    simd.depthwise_block8(&x, &wt, d, g, &mut PaddedBlock::default(), &mut blocked);
                    let mut buf = PaddedPlane::default();
                    for c in 0..LANES {
                        let mut plane = vec![0f32; ho * wo];
                        let xc = &x[c * h * w..][..h * w];
                        simd.depthwise_plane(
                            xc,
                            &wt[c * k * k..][..k * k],
                            d,
                            g,
                            &mut buf,
                            &mut plane,
                        );
                        for (j, want) in plane.iter().enumerate() {
                            // SAFETY: depthwise_block8 writes every output (NaN otherwise).
                            let got = unsafe { blocked[c * ho * wo + j].assume_init() };
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{simd:?}, k {k} stride {stride}, {h}x{w}, channel {c}, output {j}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 0);
    }

    /// A convolution written over its residual gives the bits of the one into a new tensor, for
    /// dense (im2col and Winograd), strided and grouped convolutions, on one thread and on several (a batch smaller
    /// than the pool runs gemm's own threads); a depthwise one falls back to a new tensor.
    fn got_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn regression_21_conv_into_residual_is_the_conv_with_the_residual() {
        let dev = candle_core::Device::Cpu;
        let val = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 1999) as f32 / 1999.0 - 0.5)
                .collect()
        };
        // (n, cin, cout, k, stride, padding, groups, side)
        let cases = [
            (2, 8, 16, 1, 1, 0, 1, 9),
            (3, 8, 16, 3, 1, 1, 1, 7),
            (1, 8, 12, 3, 2, 1, 1, 9),
            (4, 8, 8, 3, 1, 1, 4, 6),
            (2, 6, 6, 3, 1, 1, 6, 5),
            (3, 32, 96, 3, 1, 1, 1, 7),
        ];
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (case, &(n, cin, cout, k, stride, padding, groups, side)) in
                cases.iter().enumerate()
            {
                let g = Geometry {
                    stride,
                    padding,
                    groups,
                };
                let ho = (side + 2 * padding - k) / stride + 1;
                let x =
                    Tensor::from_vec(val(n * cin * side * side, case), (n, cin, side, side), &dev)
                        .unwrap();
                let w_shape = (cout, cin / groups, k, k);
                let w = Tensor::from_vec(val(cout * cin / groups * k * k, case + 7), w_shape, &dev)
                    .unwrap();
                let shift: Vec<f32> = val(cout, case + 3);
                let shift_t = Tensor::new(shift.as_slice(), &dev).unwrap();
                let r_vals = val(n * cout * ho * ho, case + 11);
                let r = Tensor::from_vec(r_vals.clone(), (n, cout, ho, ho), &dev).unwrap();
                let fresh = Tensor::from_vec(r_vals.clone(), (n, cout, ho, ho), &dev).unwrap();
                // A second handle on the residual's storage shows where the result went (the
                // caller of the real thing vouches that there is none).
                let spy = fresh.clone();
                let (want, got) = pool.install(|| {
                    let s = Some((shift.as_slice(), &shift_t));
                    let want = conv2d(Kernels::Fast, &x, &w, g, s, Some(&r), Act::Relu).unwrap();
                    let got = conv2d_into_residual(Kernels::Fast, &x, &w, g, s, fresh, Act::Relu)
                        .unwrap();
                    (want, got)
                });
                let spied: Vec<f32> = spy.flatten_all().unwrap().to_vec1().unwrap();
                let depthwise = groups == cin && cout == cin;
                let expect_spy = if depthwise { &r_vals } else { &got_vec(&got) };
                assert_eq!(&spied, expect_spy, "case {case}: in place {}", !depthwise);
                let (want, got): (Vec<f32>, Vec<f32>) = (
                    want.flatten_all().unwrap().to_vec1().unwrap(),
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                );
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "case {case}, {threads} threads: not the same bits");
                // The residual the reference read is untouched.
                let r_now: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(r_now, r_vals, "case {case}");
            }
        }
    }

    /// The differentiable pool gives the fast pool's values, and its gradient reaches each
    /// window's maximum once (by brute force), for even and odd sides.
    #[test]
    fn differentiable_max_pool_is_the_pool_and_routes_gradients_to_the_maxima() {
        let dev = candle_core::Device::Cpu;
        for (h, w) in [(6, 6), (7, 5)] {
            let n = 2 * 3 * h * w;
            // Distinct values (no ties), in a scrambled order.
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % n) as f32 * 0.01 - 1.0)
                .collect();
            let var = candle_core::Var::from_vec(v.clone(), (2, 3, h, w), &dev).unwrap();
            let y = max_pool_3x3_s2_p1(Kernels::Candle, var.as_tensor()).unwrap();
            let fast = max_pool_3x3_s2_p1(Kernels::Fast, &var.as_tensor().detach()).unwrap();
            let (yv, fv): (Vec<f32>, Vec<f32>) = (
                y.flatten_all().unwrap().to_vec1().unwrap(),
                fast.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(yv, fv, "{h}x{w}");
            let r: Vec<f32> = (0..yv.len()).map(|i| 1.0 + i as f32).collect();
            let rt = Tensor::from_vec(r.clone(), y.shape(), &dev).unwrap();
            let g = (y * rt).unwrap().sum_all().unwrap().backward().unwrap();
            let gv: Vec<f32> = g
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
            let mut want = vec![0f32; n];
            for plane in 0..6 {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut best = (f32::NEG_INFINITY, 0);
                        for y in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
                            for x in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
                                let i = plane * h * w + y * w + x;
                                if v[i] > best.0 {
                                    best = (v[i], i);
                                }
                            }
                        }
                        want[best.1] += r[plane * ho * wo + oy * wo + ox];
                    }
                }
            }
            for (i, (a, b)) in gv.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-3, "{h}x{w} [{i}]: {a} vs {b}");
            }
        }
    }
}

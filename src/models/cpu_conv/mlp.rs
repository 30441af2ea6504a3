//! An inverted bottleneck of two pointwise layers with its residual, fused on the CPU:
//! `out = residual + W2 act(W1 norm(z) + b1) + b2` over every pixel of an f32 NCHW batch
//! (ConvNeXt's block after its depthwise convolution: norm the LayerNorm over channels; the
//! layer scale is folded into W2 and b2 by the caller).
//!
//! As two 1x1 convolutions, each image's hidden activation (4C x H x W: 4.8 MB at ConvNeXt-T's
//! first stage) is written by one gemm, read and written again by the activation, and read by
//! the next gemm, out of L3 or memory; and at 7 x 7 (the last stage) each image is a gemm of 49
//! columns, where gemm packs a weight matrix of up to 9 MB for every image. Here the columns of
//! the batch (pixels, image after image) are taken a block at a time instead: the block's inputs
//! are gathered into one matrix and normalised there, the hidden block is computed, activated
//! while still in cache and projected, and the result is written back with the bias and the
//! residual added.
//!
//! - Planes of [`SPLIT_MIN_PLANE`] pixels or more: blocks of about `HIDDEN_BLOCK_BYTES` of
//!   hidden activation (within a core's L2), one block per rayon task, gemm on one thread.
//! - Smaller planes: blocks of whole-batch width (up to `BATCH_BLOCK_BYTES` of hidden
//!   activation), each gemm on every thread, so the weights are packed once for many images.
//!
//! Each output sums the same products as the two convolutions do; it differs from them only
//! where gemm blocks a different column count differently (tests: `tests/models.rs`).

use candle_core::{DType, Result, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::winograd::Shared;
use super::{f32_slice, gemm_into, Act, Simd, Uninit};

/// Planes at least this large are split into blocks, one a task; smaller ones are batched.
pub const SPLIT_MIN_PLANE: usize = 128;
/// Hidden activation per block on the split path.
const HIDDEN_BLOCK_BYTES: usize = 512 << 10;
/// Hidden activation per block on the batched path.
const BATCH_BLOCK_BYTES: usize = 16 << 20;
/// Columns of a block come in multiples of this: gemm's micro-panel height (a block's columns
/// are the rows of gemm's column-major problem) and the fewest a block has.
const COLUMN_STEP: usize = 64;

/// LayerNorm over the channels of each pixel, with its weight and bias `[C]` and epsilon.
#[derive(Clone, Copy)]
pub struct ChannelNorm<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub eps: f32,
}

/// `residual + W2 act(W1 norm(z) + b1) + b2`: z and residual `[N, C, H, W]`, w1 `[D, C]` (or
/// `[D, C, 1, 1]`), b1 `[D]`, w2 `[C, D]` (or `[C, D, 1, 1]`), b2 `[C]`; every tensor f32 on the
/// CPU.
/// `norm` (if any) normalises each block's gathered inputs in cache, with the arithmetic of
/// `fused::channel_layer_norm` (the same bits), instead of a pass over the whole tensor.
pub fn mlp_residual(
    z: &Tensor,
    residual: &Tensor,
    norm: Option<ChannelNorm>,
    (w1, b1): (&Tensor, &[f32]),
    (w2, b2): (&Tensor, &[f32]),
    act: Act,
) -> Result<Tensor> {
    let (n, c, h, w) = z.dims4()?;
    let d = w1.dim(0)?;
    if residual.dims() != z.dims()
        || w1.elem_count() != d * c
        || w2.dims().first() != Some(&c)
        || w2.elem_count() != c * d
        || b1.len() != d
        || b2.len() != c
        || norm.is_some_and(|n| n.weight.len() != c || n.bias.len() != c)
    {
        candle_core::bail!(
            "fused mlp: input {:?}, residual {:?}, weights {:?} and {:?}, biases {} and {} do not fit",
            z.dims(),
            residual.dims(),
            w1.dims(),
            w2.dims(),
            b1.len(),
            b2.len()
        );
    }
    for t in [z, residual, w1, w2] {
        if t.dtype() != DType::F32 {
            candle_core::bail!("fused mlp: needs f32, got {:?}", t.dtype());
        }
    }
    let (z, residual, w1, w2) = (
        z.contiguous()?,
        residual.contiguous()?,
        w1.contiguous()?,
        w2.contiguous()?,
    );
    let (zs, zl) = z.storage_and_layout();
    let (rs, rl) = residual.storage_and_layout();
    let (w1s, w1l) = w1.storage_and_layout();
    let (w2s, w2l) = w2.storage_and_layout();
    let (Storage::Cpu(zs), Storage::Cpu(rs), Storage::Cpu(w1s), Storage::Cpu(w2s)) =
        (&*zs, &*rs, &*w1s, &*w2s)
    else {
        candle_core::bail!("fused mlp: needs CPU tensors");
    };
    let m = Mlp {
        z: f32_slice(zs, zl, "mlp input")?,
        residual: f32_slice(rs, rl, "mlp residual")?,
        w1: f32_slice(w1s, w1l, "mlp weight")?,
        w2: f32_slice(w2s, w2l, "mlp weight")?,
        b1,
        b2,
        norm,
        act,
        c,
        d,
        plane: h * w,
    };
    let out = m.run(n);
    Tensor::from_vec(out, (n, c, h, w), z.device())
}

struct Mlp<'a> {
    z: &'a [f32],
    residual: &'a [f32],
    w1: &'a [f32],
    w2: &'a [f32],
    b1: &'a [f32],
    b2: &'a [f32],
    norm: Option<ChannelNorm<'a>>,
    act: Act,
    c: usize,
    d: usize,
    plane: usize,
}

/// A thread's block buffers: inputs [C, cols], hidden [D, cols], outputs [C, cols].
#[derive(Default)]
struct Block {
    input: Vec<f32>,
    /// Per-column mean and reciprocal standard deviation for the norm.
    stats: Vec<f32>,
    hidden: Vec<Uninit>,
    output: Vec<Uninit>,
}

impl Mlp<'_> {
    fn run(&self, n: usize) -> Vec<f32> {
        let total = n * self.plane;
        let mut out: Vec<f32> = Vec::with_capacity(total * self.c);
        let dst = Shared(out.as_mut_ptr());
        let threads = rayon::current_num_threads();
        // Blocks of whole multiples of gemm's 64-row micro-panel where they can be (the
        // block's columns are gemm's rows: a remainder runs a narrower, slower kernel).
        let columns = |budget: usize, blocks_multiple: usize| {
            let cap = (budget / (4 * self.d)).max(COLUMN_STEP);
            let blocks = total.div_ceil(cap).next_multiple_of(blocks_multiple);
            total.div_ceil(blocks).next_multiple_of(COLUMN_STEP)
        };
        if self.plane >= SPLIT_MIN_PLANE || threads == 1 {
            let cols = columns(HIDDEN_BLOCK_BYTES, threads);
            (0..total.div_ceil(cols))
                .into_par_iter()
                .for_each_init(Block::default, |b, t| {
                    let q = t * cols..((t + 1) * cols).min(total);
                    self.block(q, b, dst, Parallelism::None);
                });
        } else {
            let cols = columns(BATCH_BLOCK_BYTES, 1);
            let mut b = Block::default();
            for q0 in (0..total).step_by(cols) {
                let q = q0..(q0 + cols).min(total);
                self.block(q, &mut b, dst, Parallelism::Rayon(threads));
            }
        }
        // SAFETY: the blocks cover columns 0..total once each, and every block writes all C
        // channels of its columns: every value is written.
        unsafe { out.set_len(total * self.c) };
        out
    }

    /// The segments of global columns `q` (pixel `q % plane` of image `q / plane`) image by
    /// image: (offset of the segment's first pixel in channel 0 of the [N, C, H, W] tensor,
    /// length, position in the block).
    fn segments(&self, q: std::ops::Range<usize>) -> impl Iterator<Item = (usize, usize, usize)> {
        let plane = self.plane;
        let c = self.c;
        let mut at = q.start;
        std::iter::from_fn(move || {
            (at < q.end).then(|| {
                let (img, pix) = (at / plane, at % plane);
                let len = (plane - pix).min(q.end - at);
                let seg = (img * c * plane + pix, len, at - q.start);
                at += len;
                seg
            })
        })
    }

    /// Columns `q` through both layers into `dst` (the [N, C, H, W] output).
    fn block(&self, q: std::ops::Range<usize>, b: &mut Block, dst: Shared, par: Parallelism) {
        let (c, d, plane, cols) = (self.c, self.d, self.plane, q.len());
        if cols == 0 {
            return;
        }
        let parallel = matches!(par, Parallelism::Rayon(_));
        let simd = Simd::detect();
        b.input.resize(c * cols, 0.0);
        b.hidden.resize(d * cols, Uninit::new(0.0));
        b.output.resize(c * cols, Uninit::new(0.0));
        each_row(&mut b.input, cols, parallel, |ch, row| {
            for (at, len, pos) in self.segments(q.clone()) {
                row[pos..][..len].copy_from_slice(&self.z[at + ch * plane..][..len]);
            }
        });
        if let Some(n) = self.norm {
            // One thread even on the batched path: C x cols values, small next to the gemms.
            simd.channel_norm_columns(&mut b.input, cols, (n.weight, n.bias, n.eps), &mut b.stats);
        }
        // SAFETY: hidden is d x cols, w1 d x c, input c x cols; none overlap.
        unsafe { gemm_into(&mut b.hidden, cols, 0, cols, self.w1, d, c, &b.input, par) };
        // SAFETY: gemm wrote every element.
        let hidden = unsafe { super::assume_init(&mut b.hidden) };
        each_row(hidden, cols, parallel, |j, row| {
            simd.epilogue(row, 1.0, self.b1[j], None, self.act)
        });
        // SAFETY: output is c x cols, w2 c x d, hidden d x cols; none overlap.
        unsafe { gemm_into(&mut b.output, cols, 0, cols, self.w2, c, d, hidden, par) };
        // SAFETY: gemm wrote every element.
        let output = unsafe { super::assume_init(&mut b.output) };
        each_row(output, cols, parallel, |ch, row| {
            for (at, len, pos) in self.segments(q.clone()) {
                let at = at + ch * plane;
                // SAFETY: this block's columns are its own (blocks are disjoint), so no other
                // task writes or reads out[at..at + len]; it lies inside the output.
                unsafe {
                    dst.write(at, &row[pos..][..len]);
                    let o = dst.slice(at, len);
                    simd.epilogue(
                        o,
                        1.0,
                        self.b2[ch],
                        Some(&self.residual[at..][..len]),
                        Act::None,
                    );
                }
            }
        });
    }
}

/// `f(i, row i)` over the `cols`-wide rows of `m`: on every thread when `parallel` (a block of
/// the whole batch, gemm on all threads too), else on this one (a block is a task).
fn each_row(m: &mut [f32], cols: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    if parallel {
        m.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        m.chunks_mut(cols)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
}

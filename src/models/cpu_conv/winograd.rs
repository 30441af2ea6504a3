//! Winograd's minimal filtering F(2x2, 3x3) for dense 3x3 stride-1 convolutions: ResNet's 3x3
//! layers, VGG's, DenseNet's, and the input gradient of each (the input gradient of a
//! 3x3 stride-1 convolution is itself one, over the output gradient, with the kernel turned by
//! 180 degrees and its two channel axes swapped).
//!
//! Each output tile of 2 x 2 values comes from a 4 x 4 input tile d and a kernel g as
//! `A^T [(G g G^T) * (B^T d B)] A` (Lavin and Gray, 2016), so the 36 multiply-adds per tile and
//! channel pair of the direct convolution become 16: summed over input channels, the 16
//! element-wise products are 16 independent matrix products, `M_k = U_k V_k` with U_k
//! [Cout x Cin] (the transformed kernels) and V_k [Cin x tiles] (the transformed input tiles),
//! which run on the gemm crate like im2col's one product does. The transforms are additions (and
//! halvings of the kernel), a few per value.
//!
//! Work is cut into chunks of whole tile rows (one row of 2 x 2 tiles across an image), several
//! rows and images a chunk, sized so that V and M of a chunk stay near a core's cache; one chunk
//! per rayon task. A finished chunk hands each output segment (one channel, the chunk's rows of
//! one image) to the caller, which applies its epilogue while the segment is in L1 and stores it.
//!
//! Rounding differs from the direct sum's by a few units in the last place (the transforms add
//! and subtract values of mixed sign before the products): the tests hold it to 1e-5 of the
//! output's scale, as every fast kernel here is held to candle's.

use std::sync::OnceLock;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{gemm_into, Dims, Geometry, Uninit};

/// Input or output channels below this, or fewer than [`MIN_CHANNEL_SUM`] both together:
/// im2col + gemm, whose one product over all nine taps is deeper than Winograd's sixteen over
/// the channels alone. `cargo bench --bench cpu_conv`, with and without `CKPT_WINOGRAD=0`, batch
/// 32, 2 threads (GFLOP/s of the direct convolution's multiply-adds, two runs): 32 -> 32 at 56 px
/// 131-152 against 153-154 (no gain), DenseNet's 128 -> 32 at 28 px 162-169 against 144-145,
/// 64 -> 64 at 56 px 233-237 against 174-179.
const MIN_CHANNELS: usize = 32;
const MIN_CHANNEL_SUM: usize = 128;

/// Bytes of V and M together a chunk aims at (see [`chunk_units`]).
const CHUNK_BYTES: usize = 1 << 20;

/// Fewest tiles a chunk takes however many channels there are: below this the gemm's packing of
/// U (16 x Cout x Cin values, read again by every chunk) outweighs its products.
const MIN_TILES: usize = 128;

/// Whether a convolution of these sizes runs here: 3x3, stride 1, one group, padding at most 2
/// (the input gradient of a convolution with padding p is one with padding 2 - p), and enough
/// channels.
pub(super) fn applies(d: Dims, g: Geometry) -> bool {
    enabled()
        && d.k == 3
        && g.stride == 1
        && g.groups == 1
        && g.padding <= 2
        && d.cin >= MIN_CHANNELS
        && d.cout >= MIN_CHANNELS
        && d.cin + d.cout >= MIN_CHANNEL_SUM
}

/// The environment variable that, set to `0`, turns this path off for the process: how the
/// benchmarks (`benches/cpu_conv.rs`, `benches/train_bench.py --no-winograd`) measure it against
/// im2col + gemm in the same run. Not a user setting: results agree either way.
pub const DISABLE_ENV: &str = "CKPT_WINOGRAD";

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(DISABLE_ENV).is_none_or(|v| v != "0"))
}

/// The transformed kernels U [16][rows][cols], `U_k[o][i] = (G g G^T)_k` for the 3x3 kernel g of
/// output channel o and input channel i: with `gradient` false, `w` is the forward's
/// [rows][cols][3][3] and g its kernel; with `gradient` true, `w` is the forward's
/// [cols][rows][3][3] and g the forward's kernel of (i, o) turned by 180 degrees, the input
/// gradient's.
pub(super) fn transform_weights(w: &[f32], rows: usize, cols: usize, gradient: bool) -> Vec<f32> {
    debug_assert_eq!(w.len(), rows * cols * 9);
    let plane = rows * cols;
    let mut u = vec![0f32; 16 * plane];
    // One output channel a task: its 16 runs of `cols` values, one per k.
    let per_row: Vec<Vec<f32>> = (0..rows)
        .into_par_iter()
        .map(|o| {
            let mut out = vec![0f32; 16 * cols];
            for i in 0..cols {
                let mut g = [0f32; 9];
                if gradient {
                    let src = &w[(i * rows + o) * 9..][..9];
                    for (t, v) in g.iter_mut().enumerate() {
                        *v = src[8 - t];
                    }
                } else {
                    g.copy_from_slice(&w[(o * cols + i) * 9..][..9]);
                }
                for (k, v) in kernel_tile(&g).into_iter().enumerate() {
                    out[k * cols + i] = v;
                }
            }
            out
        })
        .collect();
    for (o, out) in per_row.iter().enumerate() {
        for k in 0..16 {
            u[k * plane + o * cols..][..cols].copy_from_slice(&out[k * cols..][..cols]);
        }
    }
    u
}

/// G g G^T for a row-major 3x3 kernel, as 16 values row-major.
#[inline]
fn kernel_tile(g: &[f32; 9]) -> [f32; 16] {
    // Rows: G g, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
    let mut t = [[0f32; 3]; 4];
    for c in 0..3 {
        let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
        t[0][c] = g0;
        t[1][c] = 0.5 * (g0 + g1 + g2);
        t[2][c] = 0.5 * (g0 - g1 + g2);
        t[3][c] = g2;
    }
    // Columns: (G g) G^T.
    let mut u = [0f32; 16];
    for (r, row) in t.iter().enumerate() {
        u[4 * r] = row[0];
        u[4 * r + 1] = 0.5 * (row[0] + row[1] + row[2]);
        u[4 * r + 2] = 0.5 * (row[0] - row[1] + row[2]);
        u[4 * r + 3] = row[2];
    }
    u
}

/// A thread's scratch: the chunk's transformed input and products, four padded input rows and
/// one output segment.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
    line: Vec<f32>,
    seg: Vec<f32>,
}

/// Tile rows a chunk takes: enough tiles for the gemm (at least [`MIN_TILES`]) and V + M about
/// [`CHUNK_BYTES`], but never so many that some thread gets no chunk.
fn chunk_units(d: Dims, tiles_w: usize, units: usize, threads: usize) -> usize {
    let tiles = (CHUNK_BYTES / (64 * (d.cin + d.cout))).max(MIN_TILES);
    (tiles / tiles_w).max(1).min(units.div_ceil(threads)).max(1)
}

/// The convolution of `x` [n, cin, h, w] with the kernels `u` ([`transform_weights`] of
/// [cout][cin]) at stride 1 and `pad` zeros each side, into `store(plane, offset, values)`:
/// plane `image * cout + channel`, `values` the `values.len() / wo` output rows of that plane
/// from row `offset / wo` on, which `store` may change in place (its epilogue) and must store.
/// Every output value is handed over exactly once, from one thread or another.
pub(super) fn conv<S>(x: &[f32], u: &[f32], d: Dims, pad: usize, store: S)
where
    S: Fn(usize, usize, &mut [f32]) + Sync,
{
    debug_assert!(d.k == 3 && d.ho + 2 == d.h + 2 * pad && d.wo + 2 == d.w + 2 * pad);
    debug_assert_eq!(u.len(), 16 * d.cout * d.cin);
    let (tiles_h, tiles_w) = (d.ho.div_ceil(2), d.wo.div_ceil(2));
    let units = d.n * tiles_h;
    let threads = rayon::current_num_threads();
    let per_chunk = chunk_units(d, tiles_w, units, threads);
    let chunk = |c: usize, s: &mut Scratch, par: Parallelism| {
        let first = c * per_chunk;
        let rows = first..(first + per_chunk).min(units);
        run_chunk(x, u, d, pad, rows, tiles_h, tiles_w, s, par, &store);
    };
    let chunks = units.div_ceil(per_chunk);
    if chunks >= threads || threads == 1 {
        (0..chunks)
            .into_par_iter()
            .for_each_init(Scratch::default, |s, c| chunk(c, s, Parallelism::None));
    } else {
        let mut s = Scratch::default();
        for c in 0..chunks {
            chunk(c, &mut s, Parallelism::Rayon(threads));
        }
    }
}

/// One chunk of tile rows (`units`, numbered image by image): transform, 16 products, inverse
/// transform and hand-over.
#[allow(clippy::too_many_arguments)]
fn run_chunk<S>(
    x: &[f32],
    u: &[f32],
    d: Dims,
    pad: usize,
    units: std::ops::Range<usize>,
    tiles_h: usize,
    tiles_w: usize,
    s: &mut Scratch,
    par: Parallelism,
    store: &S,
) where
    S: Fn(usize, usize, &mut [f32]) + Sync,
{
    let nt = units.len() * tiles_w;
    // Padded rows are kept split into even and odd columns, `half` of each: a tile's four
    // columns are then two neighbours in each half, and every loop below runs over contiguous
    // values.
    let half = tiles_w + 1;
    let Scratch {
        v,
        m,
        rows,
        line,
        seg,
    } = s;
    v.resize(16 * d.cin * nt, 0.0);
    m.resize(16 * d.cout * nt, 0.0);
    rows.resize(8 * half, 0.0);
    seg.resize(12 * tiles_w, 0.0);
    let plane_in = d.h * d.w;
    let stride_k = d.cin * nt;

    // V: B^T d B of every tile and input channel, V[k][ci][t].
    for (ui, unit) in units.clone().enumerate() {
        let (img, ty) = (unit / tiles_h, unit % tiles_h);
        for ci in 0..d.cin {
            let plane = &x[(img * d.cin + ci) * plane_in..][..plane_in];
            padded_rows(plane, d, pad, 2 * ty, half, rows, line);
            let (r0, rest) = rows.split_at_mut(2 * half);
            let (r1, rest) = rest.split_at_mut(2 * half);
            let (r2, r3) = rest.split_at_mut(2 * half);
            // B^T d: the four row combinations, in place.
            for (((a, b), e), f) in r0
                .iter_mut()
                .zip(r1.iter_mut())
                .zip(r2.iter_mut())
                .zip(r3.iter_mut())
            {
                let (va, vb, ve, vf) = (*a, *b, *e, *f);
                *a = va - ve;
                *b = vb + ve;
                *e = ve - vb;
                *f = vb - vf;
            }
            let t0 = ui * tiles_w;
            for (a, row) in [&*r0, &*r1, &*r2, &*r3].into_iter().enumerate() {
                // (B^T d) B: the four column combinations of each tile, whose columns are
                // (even[t], odd[t], even[t + 1], odd[t + 1]).
                let (even, odd) = row.split_at(half);
                let (e0, e1) = (&even[..tiles_w], &even[1..=tiles_w]);
                let (o0, o1) = (&odd[..tiles_w], &odd[1..=tiles_w]);
                let mut dst = v[4 * a * stride_k + ci * nt + t0..].chunks_mut(stride_k);
                let mut next = || &mut dst.next().expect("four runs of V")[..tiles_w];
                let (v0, v1, v2, v3) = (next(), next(), next(), next());
                for t in 0..tiles_w {
                    v0[t] = e0[t] - e1[t];
                    v1[t] = o0[t] + e1[t];
                    v2[t] = e1[t] - o0[t];
                    v3[t] = o0[t] - o1[t];
                }
            }
        }
    }

    // M_k = U_k V_k.
    let mu = as_uninit(m);
    for k in 0..16 {
        let dst = &mut mu[k * d.cout * nt..][..d.cout * nt];
        // SAFETY: dst is cout x nt, U_k cout x cin, V_k cin x nt, none overlapping.
        unsafe {
            gemm_into(
                dst,
                nt,
                0,
                nt,
                &u[k * d.cout * d.cin..][..d.cout * d.cin],
                d.cout,
                d.cin,
                &v[k * d.cin * nt..][..d.cin * nt],
                par,
            )
        };
    }

    // Y = A^T M A per tile, a row pair of one channel at a time.
    let wt = 2 * tiles_w;
    let (out, sums) = seg.split_at_mut(4 * tiles_w);
    for (ui, unit) in units.enumerate() {
        let (img, ty) = (unit / tiles_h, unit % tiles_h);
        let out_rows = (d.ho - 2 * ty).min(2);
        let t0 = ui * tiles_w;
        for co in 0..d.cout {
            let ms: [&[f32]; 16] =
                std::array::from_fn(|k| &m[(k * d.cout + co) * nt + t0..][..tiles_w]);
            // A^T M: two row combinations per column, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
            for (c, pair) in sums.chunks_exact_mut(2 * tiles_w).enumerate() {
                let (s0, s1) = pair.split_at_mut(tiles_w);
                let (a, b, e, f) = (ms[c], ms[4 + c], ms[8 + c], ms[12 + c]);
                for t in 0..tiles_w {
                    s0[t] = a[t] + b[t] + e[t];
                    s1[t] = b[t] - e[t] - f[t];
                }
            }
            // (A^T M) A: two column combinations per row, into the tiles' two output rows.
            let (top, bottom) = out.split_at_mut(wt);
            for (r, row) in [top, bottom].into_iter().enumerate() {
                let q = |c: usize| &sums[(2 * c + r) * tiles_w..][..tiles_w];
                let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
                for (t, pair) in row.chunks_exact_mut(2).enumerate() {
                    pair[0] = q0[t] + q1[t] + q2[t];
                    pair[1] = q1[t] - q2[t] - q3[t];
                }
            }
            // Drop the padding column of an odd width; rows to the plane's width.
            if wt != d.wo {
                out.copy_within(wt..wt + d.wo, d.wo);
            }
            store(
                img * d.cout + co,
                2 * ty * d.wo,
                &mut out[..out_rows * d.wo],
            );
        }
    }
}

/// The four input rows `top - pad ..` of one plane with `pad` zeros on the left and zeros past
/// the plane's edges, each as its even columns then its odd ones (`half` of each), into `rows`;
/// `line` is scratch for one padded row.
fn padded_rows(
    plane: &[f32],
    d: Dims,
    pad: usize,
    top: usize,
    half: usize,
    rows: &mut [f32],
    line: &mut Vec<f32>,
) {
    line.resize(2 * half, 0.0);
    for (r, dst) in rows.chunks_mut(2 * half).enumerate() {
        let Some(y) = (top + r).checked_sub(pad).filter(|&y| y < d.h) else {
            dst.fill(0.0);
            continue;
        };
        line.fill(0.0);
        line[pad..pad + d.w].copy_from_slice(&plane[y * d.w..][..d.w]);
        let (even, odd) = dst.split_at_mut(half);
        for ((e, o), pair) in even.iter_mut().zip(odd).zip(line.chunks_exact(2)) {
            *e = pair[0];
            *o = pair[1];
        }
    }
}

/// The products' buffer as gemm's destination.
fn as_uninit(m: &mut [f32]) -> &mut [Uninit] {
    // SAFETY: f32 and MaybeUninit<f32> share a layout, and only initialised values are written.
    unsafe { &mut *(m as *mut [f32] as *mut [Uninit]) }
}

/// A pointer to an output that several threads store disjoint segments into.
#[derive(Clone, Copy)]
pub(super) struct Shared(pub *mut f32);

// SAFETY: its users ([`conv`], and `mlp`'s blocks) hand every output segment over once, so
// writes through the pointer from different threads never touch the same value; they keep the
// buffer alive for the call.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Copies `values` to the buffer from `at` on (which may not be initialised yet).
    ///
    /// # Safety
    /// They land inside the buffer, and no reference to that part of it is live.
    pub(super) unsafe fn write(&self, at: usize, values: &[f32]) {
        // SAFETY: the caller's; `values` is another buffer (a thread's segment).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len()) }
    }

    /// The `len` values from `at` on, initialised.
    ///
    /// # Safety
    /// They lie inside the buffer, and no other reference to them is live.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        // SAFETY: the caller's.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::cpu_conv::tests::values;

    /// The direct convolution, in f64.
    fn direct(x: &[f32], w: &[f32], d: Dims, pad: usize) -> Vec<f64> {
        let mut y = vec![0f64; d.n * d.cout * d.ho * d.wo];
        for i in 0..d.n {
            for co in 0..d.cout {
                for oy in 0..d.ho {
                    for ox in 0..d.wo {
                        let mut acc = 0f64;
                        for ci in 0..d.cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < pad || ix < pad || iy - pad >= d.h || ix - pad >= d.w {
                                        continue;
                                    }
                                    let xv =
                                        x[((i * d.cin + ci) * d.h + iy - pad) * d.w + ix - pad];
                                    let wv = w[((co * d.cin + ci) * 3 + ky) * 3 + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((i * d.cout + co) * d.ho + oy) * d.wo + ox] = acc;
                    }
                }
            }
        }
        y
    }

    fn run(x: &[f32], u: &[f32], d: Dims, pad: usize) -> Vec<f32> {
        let mut y = vec![f32::NAN; d.n * d.cout * d.ho * d.wo];
        let out = Shared(y.as_mut_ptr());
        let p = d.ho * d.wo;
        let seen = std::sync::Mutex::new(vec![0u8; y.len()]);
        conv(x, u, d, pad, |plane, off, seg| {
            let mut seen = seen.lock().unwrap();
            for s in &mut seen[plane * p + off..][..seg.len()] {
                *s += 1;
            }
            // SAFETY: each segment is handed over once (counted above), inside y.
            unsafe { out.write(plane * p + off, seg) };
        });
        assert!(
            seen.into_inner().unwrap().iter().all(|&s| s == 1),
            "every value once"
        );
        y
    }

    fn dims(n: usize, cin: usize, cout: usize, h: usize, w: usize, pad: usize) -> Dims {
        Dims {
            n,
            cin,
            h,
            w,
            cout,
            k: 3,
            ho: h + 2 * pad - 2,
            wo: w + 2 * pad - 2,
        }
    }

    /// Largest difference over the reference's largest magnitude.
    fn error(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
        diff / scale
    }

    #[test]
    fn matches_the_direct_convolution_on_every_padding_and_odd_sizes() {
        // (n, cin, cout, h, w, pad): even and odd planes, a plane smaller than a tile row,
        // paddings 0-2, more images than threads and fewer.
        for (n, cin, cout, h, w, pad) in [
            (2, 5, 7, 8, 8, 1),
            (3, 4, 6, 7, 9, 1),
            (1, 3, 2, 5, 6, 0),
            (2, 6, 3, 3, 3, 2),
            (1, 8, 8, 1, 1, 1),
            (5, 16, 12, 7, 7, 1),
            (2, 9, 33, 14, 13, 2),
            // A deep sum, as the late layers' (512 channels): the error grows as the direct
            // sum's does.
            (1, 512, 4, 6, 5, 1),
        ] {
            let d = dims(n, cin, cout, h, w, pad);
            let x = values(n * cin * h * w, 1);
            let wt = values(cout * cin * 9, 2);
            let u = transform_weights(&wt, cout, cin, false);
            let got = run(&x, &u, d, pad);
            let e = error(&got, &direct(&x, &wt, d, pad));
            assert!(e < 1e-5, "{d:?} pad {pad}: error {e}");
        }
    }

    #[test]
    fn gradient_kernels_turn_and_transpose_the_forward_ones() {
        // The input gradient of y = conv(x, w, pad p) is conv(dy, w', pad 2 - p), w' the
        // forward's kernels turned by 180 degrees with input and output swapped: build w'
        // by hand and compare.
        let (cin, cout) = (5, 3);
        let w = values(cout * cin * 9, 3);
        let mut turned = vec![0f32; w.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for t in 0..9 {
                    turned[(ci * cout + co) * 9 + t] = w[(co * cin + ci) * 9 + 8 - t];
                }
            }
        }
        assert_eq!(
            transform_weights(&w, cin, cout, true),
            transform_weights(&turned, cin, cout, false)
        );
    }
}

//! Per-layer speed of the CPU convolution path (not a test): for the shape classes of ResNet-50,
//! MobileNetV2 and EfficientNet-B0 at 224 px, batch 32, the fused CPU path
//! (`ckpt::models::cpu_conv`) against candle's conv2d + shift + activation, same inputs, same
//! thread count, in one run. Prints GFLOP/s of each and the ratio.
//!
//!     cargo bench --bench cpu_conv [-- --batch 32 --reps 3]
//!     cargo bench --bench cpu_conv -- --peak    # only the machine's f32 peak, in GFLOP/s
//!     cargo bench --bench cpu_conv -- --backward
//!     cargo bench --bench cpu_conv -- --only 3x3 --no-candle   # some layers, ckpt only
//!     CKPT_WINOGRAD=0 cargo bench --bench cpu_conv    # 3x3 stride-1 layers on im2col + gemm
//!
//! `--backward` times the train kernels (`ckpt::models::cpu_conv::train`) instead, per layer:
//! the forward, the weight gradient and the input gradient, each in GFLOP/s of the forward's
//! multiply-adds, which each gradient repeats.
//!
//! The peak is measured, not looked up: every thread runs independent chains of 8-wide fused
//! multiply-adds (AVX2 + FMA) for about a second.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use ckpt::models::cpu_conv::{candle_conv2d, conv2d, train, Act, Geometry, Kernels};

/// As in the binary (see `ckpt::alloc`): without it every fresh 100 MB output is page-faulted in.
#[global_allocator]
static ALLOC: ckpt::alloc::CachingAllocator = ckpt::alloc::CachingAllocator::new();

struct Layer {
    name: &'static str,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    hw: usize,
}

const LAYERS: &[Layer] = &[
    Layer {
        name: "stem 7x7 s2 3->64",
        cin: 3,
        cout: 64,
        k: 7,
        stride: 2,
        groups: 1,
        hw: 224,
    },
    Layer {
        name: "3x3 64->64 @56",
        cin: 64,
        cout: 64,
        k: 3,
        stride: 1,
        groups: 1,
        hw: 56,
    },
    Layer {
        name: "3x3 32->32 @56",
        cin: 32,
        cout: 32,
        k: 3,
        stride: 1,
        groups: 1,
        hw: 56,
    },
    Layer {
        name: "3x3 128->32 @28 (densenet)",
        cin: 128,
        cout: 32,
        k: 3,
        stride: 1,
        groups: 1,
        hw: 28,
    },
    Layer {
        name: "1x1 256->64 @56",
        cin: 256,
        cout: 64,
        k: 1,
        stride: 1,
        groups: 1,
        hw: 56,
    },
    Layer {
        name: "1x1 64->256 @56",
        cin: 64,
        cout: 256,
        k: 1,
        stride: 1,
        groups: 1,
        hw: 56,
    },
    Layer {
        name: "3x3 s2 128->128 @56",
        cin: 128,
        cout: 128,
        k: 3,
        stride: 2,
        groups: 1,
        hw: 56,
    },
    Layer {
        name: "1x1 s2 256->512 @56",
        cin: 256,
        cout: 512,
        k: 1,
        stride: 2,
        groups: 1,
        hw: 56,
    },
    Layer {
        name: "3x3 128->128 @28",
        cin: 128,
        cout: 128,
        k: 3,
        stride: 1,
        groups: 1,
        hw: 28,
    },
    Layer {
        name: "3x3 256->256 @14",
        cin: 256,
        cout: 256,
        k: 3,
        stride: 1,
        groups: 1,
        hw: 14,
    },
    Layer {
        name: "1x1 2048->512 @7",
        cin: 2048,
        cout: 512,
        k: 1,
        stride: 1,
        groups: 1,
        hw: 7,
    },
    Layer {
        name: "3x3 512->512 @7",
        cin: 512,
        cout: 512,
        k: 3,
        stride: 1,
        groups: 1,
        hw: 7,
    },
    Layer {
        name: "grouped 3x3 g32 128 @56",
        cin: 128,
        cout: 128,
        k: 3,
        stride: 1,
        groups: 32,
        hw: 56,
    },
    Layer {
        name: "dw 3x3 96 @112 s2",
        cin: 96,
        cout: 96,
        k: 3,
        stride: 2,
        groups: 96,
        hw: 112,
    },
    Layer {
        name: "dw 3x3 144 @56",
        cin: 144,
        cout: 144,
        k: 3,
        stride: 1,
        groups: 144,
        hw: 56,
    },
    Layer {
        name: "dw 5x5 240 @28",
        cin: 240,
        cout: 240,
        k: 5,
        stride: 1,
        groups: 240,
        hw: 28,
    },
];

/// 12 independent accumulators of 8 f32 lanes, each step one FMA: 192 FLOP per iteration.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 12];
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..iters {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut out = [0f32; 8];
    let s = acc
        .iter()
        .fold(_mm256_set1_ps(0.0), |s, &r| _mm256_add_ps(s, r));
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

/// Measured f32 peak of all rayon threads together, GFLOP/s (best of three).
fn peak_gflops() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        use rayon::prelude::*;
        let threads = rayon::current_num_threads();
        let iters = 50_000_000;
        let mut best = 0f64;
        for _ in 0..3 {
            let t = Instant::now();
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let s: f32 = (0..threads)
                .into_par_iter()
                .map(|_| unsafe { fma_chains(iters) })
                .sum();
            std::hint::black_box(s);
            best = best.max(192.0 * (iters * threads) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        return best;
    }
    f64::NAN
}

fn main() -> Result<()> {
    let mut batch = 32;
    let mut reps = 3;
    let mut backward = false;
    let mut only = String::new();
    let mut no_candle = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batch" => batch = args.next().context("--batch N")?.parse()?,
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            "--backward" => backward = true,
            "--only" => only = args.next().context("--only SUBSTRING")?,
            "--no-candle" => no_candle = true,
            "--peak" => {
                println!("{:.1}", peak_gflops());
                return Ok(());
            }
            _ => {} // `--bench`, added by cargo
        }
    }
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    println!("batch {batch}, {threads} threads, best of {reps}");
    println!("machine f32 peak (measured): {:.1} GFLOP/s", peak_gflops());
    if backward {
        return backward_table(batch, reps, &only);
    }
    println!(
        "{:26} {:>12} {:>12} {:>7}",
        "layer", "ckpt GFLOP/s", "candle", "ratio"
    );
    let (mut fast_total, mut candle_total, mut flops_total) = (0.0, 0.0, 0.0);
    for l in LAYERS.iter().filter(|l| l.name.contains(&only)) {
        let x = Tensor::randn(0f32, 1.0, (batch, l.cin, l.hw, l.hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (l.cout, l.cin / l.groups, l.k, l.k), &dev)?;
        let shift = Tensor::randn(0f32, 0.1, l.cout, &dev)?;
        let sv = shift.to_vec1::<f32>()?;
        let g = Geometry {
            stride: l.stride,
            padding: (l.k - 1) / 2,
            groups: l.groups,
        };
        let ho = (l.hw + 2 * g.padding - l.k) / l.stride + 1;
        let flops = 2.0 * (batch * l.cout * ho * ho * (l.cin / l.groups) * l.k * l.k) as f64;
        let best = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let fast = best(&|| {
            Ok(conv2d(
                Kernels::Fast,
                &x,
                &w,
                g,
                Some((&sv, &shift)),
                None,
                Act::Relu,
            )?)
        })?;
        let slow = if no_candle {
            f64::NAN
        } else {
            best(&|| Ok(candle_conv2d(&x, &w, g, Some(&shift), None, Act::Relu)?))?
        };
        fast_total += fast;
        candle_total += slow;
        flops_total += flops;
        println!(
            "{:26} {:12.1} {:12.1} {:7.2}",
            l.name,
            flops / fast / 1e9,
            flops / slow / 1e9,
            slow / fast
        );
    }
    println!(
        "{:26} {:12.1} {:12.1} {:7.2}",
        "all layers",
        flops_total / fast_total / 1e9,
        flops_total / candle_total / 1e9,
        candle_total / fast_total
    );
    Ok(())
}

/// Best-of-`reps` seconds of `f`.
fn best_of(reps: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn backward_table(batch: usize, reps: usize, only: &str) -> Result<()> {
    let dev = Device::Cpu;
    println!(
        "{:26} {:>10} {:>10} {:>10}   (train kernels, GFLOP/s)",
        "layer", "forward", "weight", "input"
    );
    for l in LAYERS.iter().filter(|l| l.name.contains(only)) {
        let x = Tensor::randn(0f32, 1.0, (batch, l.cin, l.hw, l.hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (l.cout, l.cin / l.groups, l.k, l.k), &dev)?;
        let g = Geometry {
            stride: l.stride,
            padding: (l.k - 1) / 2,
            groups: l.groups,
        };
        let ho = (l.hw + 2 * g.padding - l.k) / l.stride + 1;
        let flops = 2.0 * (batch * l.cout * ho * ho * (l.cin / l.groups) * l.k * l.k) as f64;
        let dy = Tensor::randn(0f32, 1.0, (batch, l.cout, ho, ho), &dev)?;
        let fwd = best_of(reps, &|| {
            train::conv2d(&x, &w, g)?;
            Ok(())
        })?;
        let tw = best_of(reps, &|| {
            train::conv2d_weight_grad(&x, &w, &dy, g)?;
            Ok(())
        })?;
        let tx = best_of(reps, &|| {
            train::conv2d_input_grad(&x, &w, &dy, g)?;
            Ok(())
        })?;
        println!(
            "{:26} {:10.1} {:10.1} {:10.1}",
            l.name,
            flops / fwd / 1e9,
            flops / tw / 1e9,
            flops / tx / 1e9
        );
    }
    Ok(())
}

//! Element types as checkpoints store them, and the conversions the engines need.
//!
//! This is deliberately not candle's `DType`: checkpoints hold types candle cannot load (BOOL, I8,
//! U16, U64, the F8 formats), and every tensor a command does not change must still be copied
//! byte for byte. Values are little-endian, as safetensors and `torch.save` write them (and
//! as every platform ckpt builds for stores them, which the reinterpreting fast paths rely on).

use std::fmt;

/// An element type, named as safetensors names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F8E4M3,
    F8E5M2,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::U32,
        DType::I32,
        DType::U64,
        DType::I64,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// The safetensors header spelling (`"F32"`, `"BOOL"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::U16 => "U16",
            DType::I16 => "I16",
            DType::U32 => "U32",
            DType::I32 => "I32",
            DType::U64 => "U64",
            DType::I64 => "I64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Parses a user's spelling: `f32`, `float16`, `bf16`, ... (case-insensitive).
    pub fn parse_user(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f64" | "float64" | "double" => Some(DType::F64),
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            other => DType::from_name(&other.to_ascii_uppercase()),
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F8E4M3 | DType::F8E5M2 | DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
    }

    /// Whether the engines can read and write it as numbers (the F8 formats are copied only).
    pub fn is_arithmetic_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    pub fn is_integer(self) -> bool {
        !self.is_float() && self != DType::Bool
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Adds `weight * x` for each element of `src` (stored as `dtype`) to `acc`, and reports the
/// index of the first element that is NaN or infinite, if any.
///
/// `src` must hold exactly `acc.len()` elements of `dtype`, which must be arithmetic.
pub fn accumulate(acc: &mut [f64], src: &[u8], dtype: DType, weight: f64) -> Option<usize> {
    debug_assert_eq!(src.len(), acc.len() * dtype.size());
    // Summing a flag instead of branching keeps the hot loops free of early exits; the position
    // is searched only when there is something to report.
    let mut bad = false;
    match dtype {
        // Aligned slices (the usual case: safetensors and torch.save align tensor data) are
        // reinterpreted so that the loops vectorise; others are decoded bytewise.
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
            Ok(xs) => {
                for (a, &x) in acc.iter_mut().zip(xs) {
                    let x = x as f64;
                    bad |= !x.is_finite();
                    *a += weight * x;
                }
            }
            Err(_) => {
                for (a, b) in acc.iter_mut().zip(src.chunks_exact(4)) {
                    let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64;
                    bad |= !x.is_finite();
                    *a += weight * x;
                }
            }
        },
        DType::F64 => match bytemuck::try_cast_slice::<u8, f64>(src) {
            Ok(xs) => {
                for (a, &x) in acc.iter_mut().zip(xs) {
                    bad |= !x.is_finite();
                    *a += weight * x;
                }
            }
            Err(_) => {
                for (a, b) in acc.iter_mut().zip(src.chunks_exact(8)) {
                    let x = f64::from_le_bytes(b.try_into().unwrap());
                    bad |= !x.is_finite();
                    *a += weight * x;
                }
            }
        },
        DType::F16 => {
            for (a, b) in acc.iter_mut().zip(src.chunks_exact(2)) {
                let x = half::f16::from_le_bytes([b[0], b[1]]).to_f64();
                bad |= !x.is_finite();
                *a += weight * x;
            }
        }
        DType::BF16 => {
            for (a, b) in acc.iter_mut().zip(src.chunks_exact(2)) {
                let x = half::bf16::from_le_bytes([b[0], b[1]]).to_f64();
                bad |= !x.is_finite();
                *a += weight * x;
            }
        }
        other => unreachable!("accumulate called on {other}"),
    }
    if bad {
        first_nonfinite(src, dtype)
    } else {
        None
    }
}

/// The index of the first NaN or infinite element of `src`.
pub fn first_nonfinite(src: &[u8], dtype: DType) -> Option<usize> {
    let n = src.len() / dtype.size();
    (0..n).find(|&i| !read_f64(src, dtype, i).is_finite())
}

/// Reads element `i` of `src` as f64 (floating dtypes only).
pub fn read_f64(src: &[u8], dtype: DType, i: usize) -> f64 {
    let s = dtype.size();
    let b = &src[i * s..(i + 1) * s];
    match dtype {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::F64 => f64::from_le_bytes(b.try_into().unwrap()),
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        other => unreachable!("read_f64 called on {other}"),
    }
}

/// Every element of `src` as f32 (floating dtypes only): f32 data is copied as it is, f16 and
/// bf16 widen exactly, f64 rounds to nearest.
pub fn to_f32_vec(src: &[u8], dtype: DType) -> Vec<f32> {
    if dtype == DType::F32 {
        return src
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
    }
    (0..src.len() / dtype.size())
        .map(|i| read_f64(src, dtype, i) as f32)
        .collect()
}

/// Rounds each f64 once (to nearest, ties to even) into `dtype` and writes it to `dst`.
pub fn store(acc: &[f64], dtype: DType, dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), acc.len() * dtype.size());
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(dst) {
            Ok(out) => {
                for (a, d) in acc.iter().zip(out) {
                    *d = *a as f32;
                }
            }
            Err(_) => {
                for (a, d) in acc.iter().zip(dst.chunks_exact_mut(4)) {
                    d.copy_from_slice(&(*a as f32).to_le_bytes());
                }
            }
        },
        DType::F64 => {
            for (a, d) in acc.iter().zip(dst.chunks_exact_mut(8)) {
                d.copy_from_slice(&a.to_le_bytes());
            }
        }
        DType::F16 => {
            for (a, d) in acc.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&half::f16::from_f32(f32_round_to_odd(*a)).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (a, d) in acc.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&half::bf16::from_f32(f32_round_to_odd(*a)).to_le_bytes());
            }
        }
        other => unreachable!("store called on {other}"),
    }
}

/// f64 to f32 rounded to odd: truncated towards zero, with the last bit set when inexact.
///
/// `half`'s `from_f64` goes through a round-to-nearest f32 first, which rounds twice: the value
/// 1 + 2^-8 + 2^-30 becomes the tie 1 + 2^-8 in f32 and then 1.0 in bf16 instead of 1 + 2^-7.
/// Rounding to odd into a format with at least two more bits than the target makes the
/// following round-to-nearest-even exact (Boldo and Melquiond), so f64, then odd f32, then
/// f16 or bf16 rounds once.
fn f32_round_to_odd(x: f64) -> f32 {
    let t = x as f32;
    if !x.is_finite() || t.is_infinite() || t as f64 == x {
        return t;
    }
    let mut bits = t.to_bits();
    if (t as f64).abs() > x.abs() {
        // Rounded away from zero: step back towards zero by one unit.
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// Reads element `i` of an integer or bool tensor as i128 (wide enough for every stored type).
pub fn read_int(src: &[u8], dtype: DType, i: usize) -> i128 {
    let s = dtype.size();
    let b = &src[i * s..(i + 1) * s];
    match dtype {
        DType::Bool | DType::U8 => b[0] as i128,
        DType::I8 => b[0] as i8 as i128,
        DType::U16 => u16::from_le_bytes([b[0], b[1]]) as i128,
        DType::I16 => i16::from_le_bytes([b[0], b[1]]) as i128,
        DType::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::U64 => u64::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as i128,
        other => unreachable!("read_int called on {other}"),
    }
}

/// Writes `v` as element `i` of an integer tensor; `None` when it does not fit the type.
pub fn write_int(dst: &mut [u8], dtype: DType, i: usize, v: i128) -> Option<()> {
    let s = dtype.size();
    let d = &mut dst[i * s..(i + 1) * s];
    match dtype {
        DType::Bool => d[0] = u8::from(v != 0),
        DType::U8 => d[0] = u8::try_from(v).ok()?,
        DType::I8 => d[0] = i8::try_from(v).ok()? as u8,
        DType::U16 => d.copy_from_slice(&u16::try_from(v).ok()?.to_le_bytes()),
        DType::I16 => d.copy_from_slice(&i16::try_from(v).ok()?.to_le_bytes()),
        DType::U32 => d.copy_from_slice(&u32::try_from(v).ok()?.to_le_bytes()),
        DType::I32 => d.copy_from_slice(&i32::try_from(v).ok()?.to_le_bytes()),
        DType::U64 => d.copy_from_slice(&u64::try_from(v).ok()?.to_le_bytes()),
        DType::I64 => d.copy_from_slice(&i64::try_from(v).ok()?.to_le_bytes()),
        other => unreachable!("write_int called on {other}"),
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::parse_user("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse_user("F16"), Some(DType::F16));
    }

    #[test]
    fn store_rounds_once_to_nearest() {
        // bf16 steps by 2^-7 near 1: 1 + 2^-8 is a tie and goes to even (1.0), 1 + 3 * 2^-8
        // is a tie that goes up to 1 + 2^-6, and anything just above a tie goes up.
        let mut out = [0u8; 2];
        let bf = |x: f64, out: &mut [u8; 2]| {
            store(&[x], DType::BF16, out);
            half::bf16::from_le_bytes(*out).to_f64()
        };
        assert_eq!(bf(1.0 + 2f64.powi(-8), &mut out), 1.0);
        assert_eq!(bf(1.0 + 3.0 * 2f64.powi(-8), &mut out), 1.0 + 2f64.powi(-6));
        assert_eq!(
            bf(1.0 + 2f64.powi(-8) + 2f64.powi(-30), &mut out),
            1.0 + 2f64.powi(-7)
        );
        assert_eq!(
            bf(-(1.0 + 2f64.powi(-8) + 2f64.powi(-30)), &mut out),
            -(1.0 + 2f64.powi(-7))
        );
        assert_eq!(bf(1.0 + 2f64.powi(-8) - 2f64.powi(-30), &mut out), 1.0);
        let f16 = |x: f64, out: &mut [u8; 2]| {
            store(&[x], DType::F16, out);
            half::f16::from_le_bytes(*out).to_f64()
        };
        assert_eq!(f16(1.0 + 2f64.powi(-11), &mut out), 1.0);
        assert_eq!(
            f16(1.0 + 2f64.powi(-11) + 2f64.powi(-40), &mut out),
            1.0 + 2f64.powi(-10)
        );
        assert_eq!(f16(0.1, &mut out), half::f16::from_f32(0.1).to_f64());
    }

    /// Against exact rational rounding on many random values: compare with the two bf16
    /// neighbours and the f64 distance to each.
    #[test]
    fn bf16_rounding_is_correct_on_random_values() {
        let mut s = 0x2545F4914F6CDD1Du64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = f64::from_bits((s >> 12) | 0x3FF0_0000_0000_0000) - 1.5; // in [-0.5, 0.5)
            let mut out = [0u8; 2];
            store(&[x], DType::BF16, &mut out);
            let got = half::bf16::from_le_bytes(out);
            let g = got.to_f64();
            let up = half::bf16::from_bits(got.to_bits().wrapping_add(1)).to_f64();
            let down = half::bf16::from_bits(got.to_bits().wrapping_sub(1)).to_f64();
            let err = (g - x).abs();
            assert!(
                err <= (up - x).abs() && err <= (down - x).abs(),
                "{x}: got {g}"
            );
        }
    }

    #[test]
    fn accumulate_reports_nonfinite() {
        let mut src = Vec::new();
        for x in [1.0f32, f32::NAN, 2.0] {
            src.extend_from_slice(&x.to_le_bytes());
        }
        let mut acc = vec![0.0; 3];
        assert_eq!(accumulate(&mut acc, &src, DType::F32, 0.5), Some(1));
        assert_eq!(acc[0], 0.5);
    }
}

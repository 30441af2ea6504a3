//! Weights of the snapshots in an average.
//!
//! An EMA over saved snapshots is a weighted average with closed-form weights: unrolling
//! v_1 = x_1, v_t = d_t * v_{t-1} + (1 - d_t) * x_t gives v_n = sum_t w_t x_t with
//! w_t = (1 - d_t) * prod_{s > t} d_s (and d_1 taken as 0, since v_1 = x_1). So SWA and EMA share
//! one streaming engine, and several decays come from one pass over the inputs.

use anyhow::{bail, Result};

/// Uniform weights.
pub fn uniform(n: usize) -> Vec<f64> {
    vec![1.0 / n as f64; n]
}

/// User weights, normalised to sum 1.
pub fn normalised(w: &[f64], n: usize) -> Result<Vec<f64>> {
    if w.len() != n {
        bail!("--weights has {} values for {n} snapshots", w.len());
    }
    if let Some(x) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
        bail!("--weights: {x} is not a non-negative number");
    }
    let s: f64 = w.iter().sum();
    if s <= 0.0 {
        bail!("--weights sum to zero");
    }
    Ok(w.iter().map(|x| x / s).collect())
}

/// How the decay applies at each snapshot.
#[derive(Clone, Debug, Default)]
pub struct EmaSchedule {
    /// Step numbers of the snapshots: a gap of g steps decays by d^g (`--per-step`).
    pub steps: Option<Vec<u64>>,
    /// timm ModelEmaV3's warmup: d(step) = min(decay, 1 - (1 + (step - 1) / gamma)^-power).
    pub warmup: Option<Warmup>,
}

#[derive(Clone, Copy, Debug)]
pub struct Warmup {
    pub gamma: f64,
    pub power: f64,
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup {
            gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

/// timm's `ModelEmaV3.get_decay(step)` with `use_warmup=True`, `update_after_step=0`,
/// `min_decay=0`.
pub fn warmup_decay(decay: f64, step: u64, w: Warmup) -> f64 {
    let s = step.saturating_sub(1) as f64;
    if s <= 0.0 {
        return 0.0;
    }
    (1.0 - (1.0 + s / w.gamma).powf(-w.power)).clamp(0.0, decay)
}

/// The closed-form EMA weights of `n` snapshots (oldest first) for one decay.
pub fn ema(decay: f64, n: usize, sched: &EmaSchedule) -> Result<Vec<f64>> {
    if !(0.0..1.0).contains(&decay) {
        bail!("--decay {decay} must be in [0, 1)");
    }
    if let Some(steps) = &sched.steps {
        if steps.len() != n {
            bail!(
                "internal error: {} step numbers for {n} snapshots",
                steps.len()
            );
        }
        if let Some(w) = steps.windows(2).find(|w| w[1] <= w[0]) {
            bail!(
                "--per-step: step numbers must increase, but {} follows {}",
                w[1],
                w[0]
            );
        }
    }
    // d_t per snapshot, t >= 1 (0-based index); the first snapshot initialises the average.
    let step_of = |t: usize| -> u64 {
        match &sched.steps {
            Some(s) => s[t],
            None => t as u64 + 1,
        }
    };
    let mut d = vec![0.0; n];
    for (t, dt) in d.iter_mut().enumerate().skip(1) {
        let base = match sched.warmup {
            Some(w) => warmup_decay(decay, step_of(t), w),
            None => decay,
        };
        let gap = match &sched.steps {
            Some(s) => (s[t] - s[t - 1]) as f64,
            None => 1.0,
        };
        *dt = base.powf(gap);
    }
    let mut w = vec![0.0; n];
    let mut tail = 1.0;
    for t in (0..n).rev() {
        w[t] = (1.0 - d[t]) * tail;
        tail *= d[t];
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recursion, run directly on scalars, equals the closed form.
    #[test]
    fn closed_form_matches_recursion() {
        let xs = [1.0, 5.0, -2.0, 7.5, 3.25];
        for (sched, decays) in [
            (EmaSchedule::default(), vec![0.5, 0.9]),
            (
                EmaSchedule {
                    steps: Some(vec![10, 20, 25, 40, 41]),
                    warmup: None,
                },
                vec![0.9],
            ),
            (
                EmaSchedule {
                    steps: None,
                    warmup: Some(Warmup::default()),
                },
                vec![0.99],
            ),
        ] {
            for decay in decays {
                let w = ema(decay, xs.len(), &sched).unwrap();
                let mut v = xs[0];
                for t in 1..xs.len() {
                    let step = sched.steps.as_ref().map_or(t as u64 + 1, |s| s[t]);
                    let base = sched
                        .warmup
                        .map_or(decay, |wu| warmup_decay(decay, step, wu));
                    let gap = sched
                        .steps
                        .as_ref()
                        .map_or(1.0, |s| (s[t] - s[t - 1]) as f64);
                    let d = base.powf(gap);
                    v = d * v + (1.0 - d) * xs[t];
                }
                let closed: f64 = w.iter().zip(xs).map(|(w, x)| w * x).sum();
                assert!((closed - v).abs() < 1e-12, "{closed} vs {v}");
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn warmup_matches_timm() {
        // timm: step 1 -> 0 (no averaging yet); step 2 -> 1 - 2^(-2/3).
        assert_eq!(warmup_decay(0.999, 1, Warmup::default()), 0.0);
        assert!(
            (warmup_decay(0.999, 2, Warmup::default()) - (1.0 - 2f64.powf(-2.0 / 3.0))).abs()
                < 1e-15
        );
        assert_eq!(warmup_decay(0.9, 1_000_000, Warmup::default()), 0.9);
    }
}

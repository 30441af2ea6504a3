//! Optimisers and learning-rate schedules, written as PyTorch defines them so that a fine-tune
//! is held to `torch.optim` step for step.
//!
//! candle-nn's `SGD` has no momentum and no weight decay, so SGD is ours: for each parameter p
//! with gradient g, as `torch.optim.SGD` (its `_single_tensor_sgd`):
//!
//! ```text
//! d = g + weight_decay * p
//! buf = d                                   (first step)
//! buf = momentum * buf + (1 - dampening) * d (later steps)
//! d = d + momentum * buf   (nesterov)   or   d = buf
//! p = p - lr * d
//! ```
//!
//! A parameter without a gradient in a step is skipped, its buffer kept, as PyTorch skips a
//! parameter whose `.grad` is None.

use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// `torch.optim.SGD`'s hyper-parameters except the learning rate, which a [`Schedule`] gives
/// per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> SgdConfig {
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl SgdConfig {
    /// Refuses what PyTorch refuses.
    pub fn check(&self) -> Result<()> {
        let non_negative = |x: f64| x >= 0.0; // NaN is not
        if !non_negative(self.momentum) || !non_negative(self.weight_decay) {
            bail!("momentum and weight decay must be at least 0");
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            bail!("Nesterov momentum requires a momentum and zero dampening");
        }
        Ok(())
    }
}

/// SGD over a list of `Var`s, with one momentum buffer per parameter.
pub struct Sgd {
    params: Vec<(String, Var)>,
    buffers: Vec<Option<Tensor>>,
    cfg: SgdConfig,
}

impl Sgd {
    pub fn new(params: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Sgd> {
        cfg.check()?;
        let buffers = vec![None; params.len()];
        Ok(Sgd {
            params,
            buffers,
            cfg,
        })
    }

    /// The parameters, by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr` from `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = self.cfg;
        for ((_, var), buf) in self.params.iter().zip(&mut self.buffers) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_tensor();
            let mut d = g.detach();
            if c.weight_decay != 0.0 {
                d = (d + p.affine(c.weight_decay, 0.0)?.detach())?;
            }
            if c.momentum != 0.0 {
                let b = match buf.take() {
                    None => d.copy()?,
                    Some(b) => (b.affine(c.momentum, 0.0)? + d.affine(1.0 - c.dampening, 0.0)?)?,
                };
                d = if c.nesterov {
                    (d + b.affine(c.momentum, 0.0)?)?
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            let new = (p.detach() - d.affine(lr, 0.0)?)?;
            var.set(&new)?;
        }
        Ok(())
    }
}

/// How the learning rate moves over the steps of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub kind: ScheduleKind,
    /// Steps of linear warm-up from lr / warmup_steps to lr, before the schedule proper.
    pub warmup_steps: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    /// The same rate every step.
    #[default]
    Constant,
    /// Half a cosine from lr to 0 over the steps after warm-up (`CosineAnnealingLR` with
    /// `T_max` = those steps, stepped per batch).
    Cosine,
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Cosine => "cosine",
        })
    }
}

impl Schedule {
    pub fn constant(lr: f64) -> Schedule {
        Schedule {
            lr,
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
        }
    }

    /// The rate of step `step` (0-based) of `total`.
    pub fn at(&self, step: usize, total: usize) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            return self.lr * (step + 1) as f64 / w as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let span = total.saturating_sub(w).max(1) as f64;
                let t = (step - w) as f64;
                0.5 * self.lr * (1.0 + (std::f64::consts::PI * t / span).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three steps of SGD with momentum, weight decay and Nesterov on f(p) = sum(p^2) / 2
    /// (gradient p), against the update written out by hand in f64.
    #[test]
    fn sgd_is_torchs() {
        for nesterov in [false, true] {
            let cfg = SgdConfig {
                momentum: 0.9,
                dampening: 0.0,
                weight_decay: 0.1,
                nesterov,
            };
            let v = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
            let mut sgd = Sgd::new(vec![("p".into(), v.clone())], cfg).unwrap();
            let mut want = [1.0f64, -2.0];
            let mut buf: Option<[f64; 2]> = None;
            for _ in 0..3 {
                let loss = (v.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
                let grads = loss.backward().unwrap();
                sgd.step(&grads, 0.1).unwrap();
                let d: [f64; 2] = [want[0] * 1.1, want[1] * 1.1];
                let b = match buf {
                    None => d,
                    Some(b) => [0.9 * b[0] + d[0], 0.9 * b[1] + d[1]],
                };
                buf = Some(b);
                for i in 0..2 {
                    let step = if nesterov { d[i] + 0.9 * b[i] } else { b[i] };
                    want[i] -= 0.1 * step;
                }
            }
            let got: Vec<f32> = v.as_tensor().to_vec1().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] as f64 - want[i]).abs() < 1e-6,
                    "{got:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn schedules() {
        let s = Schedule {
            lr: 1.0,
            kind: ScheduleKind::Cosine,
            warmup_steps: 2,
        };
        assert_eq!(s.at(0, 12), 0.5);
        assert_eq!(s.at(1, 12), 1.0);
        assert_eq!(s.at(2, 12), 1.0);
        assert!((s.at(7, 12) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::constant(0.1).at(5, 6), 0.1);
    }
}

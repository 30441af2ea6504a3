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
//! AdamW is `torch.optim.AdamW` (its `_single_tensor_adamw`, amsgrad off): weight decay
//! decoupled from the gradient and scaled by the learning rate, bias correction of both
//! moments, and eps added to the bias-corrected root of the second moment:
//!
//! ```text
//! p = p * (1 - lr * weight_decay)
//! m = beta1 * m + (1 - beta1) * g
//! v = beta2 * v + (1 - beta2) * g * g
//! p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! A parameter without a gradient in a step is skipped, its buffers kept, as PyTorch skips a
//! parameter whose `.grad` is None (its AdamW step count does not advance either).
//!
//! The unit tests hold both, and the schedules, to numbers from torch made by
//! `fixtures/make_optim_fixtures.py` (`fixtures/optim/optim.json`).

use std::collections::HashMap;

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

/// `torch.optim.AdamW`'s hyper-parameters except the learning rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults.
    fn default() -> AdamWConfig {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// Refuses what PyTorch refuses.
    pub fn check(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("AdamW betas must be in [0, 1)");
        }
        let non_negative = |x: f64| x >= 0.0; // NaN is not
        if !non_negative(self.eps) || !non_negative(self.weight_decay) {
            bail!("AdamW eps and weight decay must be at least 0");
        }
        Ok(())
    }
}

/// AdamW over a list of `Var`s: per parameter, its step count and both moments.
pub struct AdamW {
    params: Vec<(String, Var)>,
    state: Vec<Option<(u64, Tensor, Tensor)>>,
    cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<AdamW> {
        cfg.check()?;
        let state = vec![None; params.len()];
        Ok(AdamW { params, state, cfg })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr` from `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = self.cfg;
        for ((_, var), state) in self.params.iter().zip(&mut self.state) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let (t, m, v) = match state.take() {
                None => (0, g.zeros_like()?, g.zeros_like()?),
                Some(s) => s,
            };
            let t = t + 1;
            let mut p = var.as_tensor().detach();
            if c.weight_decay != 0.0 {
                p = p.affine(1.0 - lr * c.weight_decay, 0.0)?;
            }
            let m = (m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
            let v = (v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let bc1 = 1.0 - c.beta1.powi(t as i32);
            let bc2 = 1.0 - c.beta2.powi(t as i32);
            let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), c.eps)?;
            let new = (p - (&m / denom)?.affine(lr / bc1, 0.0)?)?;
            var.set(&new)?;
            *state = Some((t, m, v));
        }
        Ok(())
    }
}

/// Which optimiser, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    Sgd(SgdConfig),
    AdamW(AdamWConfig),
}

impl OptimizerConfig {
    pub fn check(&self) -> Result<()> {
        match self {
            OptimizerConfig::Sgd(c) => c.check(),
            OptimizerConfig::AdamW(c) => c.check(),
        }
    }

    /// The same optimiser without weight decay (for biases and one-dimensional parameters).
    pub fn without_weight_decay(self) -> OptimizerConfig {
        match self {
            OptimizerConfig::Sgd(c) => OptimizerConfig::Sgd(SgdConfig {
                weight_decay: 0.0,
                ..c
            }),
            OptimizerConfig::AdamW(c) => OptimizerConfig::AdamW(AdamWConfig {
                weight_decay: 0.0,
                ..c
            }),
        }
    }

    /// `(name, value)` pairs describing it, for a checkpoint's metadata.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        match self {
            OptimizerConfig::Sgd(c) => vec![
                ("optimizer", "sgd".into()),
                ("momentum", c.momentum.to_string()),
                ("weight_decay", c.weight_decay.to_string()),
                ("nesterov", c.nesterov.to_string()),
            ],
            OptimizerConfig::AdamW(c) => vec![
                ("optimizer", "adamw".into()),
                ("betas", format!("{},{}", c.beta1, c.beta2)),
                ("eps", c.eps.to_string()),
                ("weight_decay", c.weight_decay.to_string()),
            ],
        }
    }
}

/// An optimiser over the trained parameters.
pub enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Optimizer {
    pub fn new(params: Vec<(String, Var)>, cfg: OptimizerConfig) -> Result<Optimizer> {
        Ok(match cfg {
            OptimizerConfig::Sgd(c) => Optimizer::Sgd(Sgd::new(params, c)?),
            OptimizerConfig::AdamW(c) => Optimizer::AdamW(AdamW::new(params, c)?),
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        match self {
            Optimizer::Sgd(o) => o.params(),
            Optimizer::AdamW(o) => o.params(),
        }
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        match self {
            Optimizer::Sgd(o) => o.step(grads, lr),
            Optimizer::AdamW(o) => o.step(grads, lr),
        }
    }

    /// The optimiser's state (not the parameters), as PyTorch names it in `state_dict()`:
    /// `{param}.momentum_buffer` (SGD), `{param}.exp_avg`, `{param}.exp_avg_sq` and
    /// `{param}.step` (AdamW), flattened to f32, for parameters that have any.
    pub fn state(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        let mut out = Vec::new();
        match self {
            Optimizer::Sgd(o) => {
                for ((name, _), buf) in o.params.iter().zip(&o.buffers) {
                    if let Some(b) = buf {
                        out.push((format!("{name}.momentum_buffer"), flat(b)?));
                    }
                }
            }
            Optimizer::AdamW(o) => {
                for ((name, _), st) in o.params.iter().zip(&o.state) {
                    if let Some((t, m, v)) = st {
                        out.push((format!("{name}.step"), vec![*t as f32]));
                        out.push((format!("{name}.exp_avg"), flat(m)?));
                        out.push((format!("{name}.exp_avg_sq"), flat(v)?));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Puts back this optimiser's part of a [`Optimizer::state`] (entries of other parameters
    /// are left for other optimisers): what follows is the run that state was taken from.
    /// Returns how many entries it took; a wrongly sized or incomplete entry is refused.
    pub fn restore(&mut self, state: &HashMap<String, Vec<f32>>) -> Result<usize> {
        let like = |var: &Var, name: &str, key: &str| -> Result<Option<Tensor>> {
            let Some(v) = state.get(&format!("{name}.{key}")) else {
                return Ok(None);
            };
            let p = var.as_tensor();
            if v.len() != p.elem_count() {
                bail!(
                    "optimiser state {name}.{key} has {} values for a parameter of {}",
                    v.len(),
                    p.elem_count()
                );
            }
            Ok(Some(
                Tensor::from_slice(v, p.shape(), p.device())?.to_dtype(p.dtype())?,
            ))
        };
        let mut used = 0;
        match self {
            Optimizer::Sgd(o) => {
                for ((name, var), buf) in o.params.iter().zip(&mut o.buffers) {
                    *buf = like(var, name, "momentum_buffer")?;
                    used += buf.is_some() as usize;
                }
            }
            Optimizer::AdamW(o) => {
                for ((name, var), st) in o.params.iter().zip(&mut o.state) {
                    let t = state.get(&format!("{name}.step"));
                    let (m, v) = (like(var, name, "exp_avg")?, like(var, name, "exp_avg_sq")?);
                    *st = match (t, m, v) {
                        (Some(t), Some(m), Some(v)) if t.len() == 1 => {
                            used += 3;
                            Some((t[0] as u64, m, v))
                        }
                        (None, None, None) => None,
                        _ => bail!("optimiser state of {name} is incomplete"),
                    };
                }
            }
        }
        Ok(used)
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

    fn torch_reference() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/optim/optim.json");
        let text = std::fs::read_to_string(path).expect("fixtures/optim/optim.json");
        serde_json::from_str(&text).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    /// torch.optim.AdamW and SGD, step by step, on seeded gradients set as `.grad`
    /// (`fixtures/make_optim_fixtures.py`). Tolerance: 1e-6 relative plus 1e-7, float32
    /// rounding of a few operations per step (both run in f32; torch's `lerp` and `addcdiv`
    /// round differently from our affine-then-add).
    #[test]
    fn optimizers_are_torchs() {
        let r = torch_reference();
        let cases = r["optimizers"].as_array().unwrap();
        assert!(cases.iter().any(|c| c["name"] == "adamw"));
        for case in cases {
            let cfg = match case["name"].as_str().unwrap() {
                "adamw" => {
                    let b = floats(&case["betas"]);
                    OptimizerConfig::AdamW(AdamWConfig {
                        beta1: b[0],
                        beta2: b[1],
                        eps: case["eps"].as_f64().unwrap(),
                        weight_decay: case["weight_decay"].as_f64().unwrap(),
                    })
                }
                "sgd" => OptimizerConfig::Sgd(SgdConfig {
                    momentum: case["momentum"].as_f64().unwrap(),
                    dampening: case["dampening"].as_f64().unwrap(),
                    weight_decay: case["weight_decay"].as_f64().unwrap(),
                    nesterov: case["nesterov"].as_bool().unwrap(),
                }),
                other => panic!("unknown optimizer {other}"),
            };
            let p0: Vec<f32> = floats(&case["params"]).iter().map(|&x| x as f32).collect();
            let n = p0.len();
            let v = Var::from_vec(p0, n, &Device::Cpu).unwrap();
            let mut opt = Optimizer::new(vec![("p".into(), v.clone())], cfg).unwrap();
            let lrs = floats(&case["lrs"]);
            for (s, g) in case["grads"].as_array().unwrap().iter().enumerate() {
                // d(sum(p * g))/dp = g: the step sees exactly torch's gradient.
                let g: Vec<f32> = floats(g).iter().map(|&x| x as f32).collect();
                let g = Tensor::from_vec(g, n, &Device::Cpu).unwrap();
                let loss = (v.as_tensor() * &g).unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap(), lrs[s]).unwrap();
                let got: Vec<f32> = v.as_tensor().to_vec1().unwrap();
                let want = floats(&case["after"][s]);
                for (a, b) in got.iter().zip(&want) {
                    let tol = 1e-6 * b.abs() + 1e-7;
                    assert!(
                        (*a as f64 - b).abs() <= tol,
                        "{} step {s}: {got:?} vs torch {want:?}",
                        case["name"]
                    );
                }
            }
        }
    }

    /// The learning rate of every step against torch's schedulers (ConstantLR,
    /// CosineAnnealingLR, LinearLR warm-up then either through SequentialLR).
    #[test]
    fn schedules_are_torchs() {
        let r = torch_reference();
        for s in r["schedules"].as_array().unwrap() {
            let kind = match s["kind"].as_str().unwrap() {
                "constant" => ScheduleKind::Constant,
                "cosine" => ScheduleKind::Cosine,
                k => panic!("unknown schedule {k}"),
            };
            let sched = Schedule {
                lr: s["lr"].as_f64().unwrap(),
                kind,
                warmup_steps: s["warmup_steps"].as_u64().unwrap() as usize,
            };
            let total = s["total"].as_u64().unwrap() as usize;
            for (step, want) in floats(&s["lrs"]).iter().enumerate() {
                let got = sched.at(step, total);
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1e-3),
                    "{kind} warm-up {}: step {step}: {got} vs torch {want}",
                    sched.warmup_steps
                );
            }
        }
    }
}

//! Model soups (Wortsman et al., 2022) for networks with BatchNorm: which average of the
//! candidate checkpoints does best on held-out images, with each candidate and each candidate
//! soup given precise BN statistics before it is judged.
//!
//! A weighting of the candidates is judged by averaging them in memory with the streaming
//! engine's f64 arithmetic ([`crate::average`], so the result written later is byte-identical to
//! `ckpt swa` of the same ingredients), building the network, re-estimating every BN layer's
//! running statistics over the recalibration images (the `recal-bn` engine; averaged running
//! statistics do not fit averaged weights, so a soup judged without this misleads), then one
//! eval pass over the validation images: top-1, top-5 and mean cross-entropy. Nothing is
//! written until the procedure ends.
//!
//! - [`Method::Greedy`], the paper's Algorithm 1: rank the candidates by their own score, start
//!   from the best, and keep each next candidate in rank order when the uniform soup with it
//!   scores at least as well (top-1 does not drop, or with [`Metric::Loss`] the loss does not
//!   rise).
//! - [`Method::Uniform`]: the plain average of every candidate, for comparison.
//! - [`Method::Best`]: the single best candidate (choosing an EMA decay or a snapshot).
//!
//! Ranking: higher top-1 first, ties broken by lower loss, then by the candidates' order (with
//! [`Metric::Loss`]: lower loss first, then order). The images come from
//! [`crate::data::Batches`], decoded once for the whole procedure when they fit in memory.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::average::{self, Config, OutputSpec, Plan, Target};
use crate::bn::{self, apply, Estimator};
use crate::checkpoint::Checkpoint;
use crate::data::{Batch, Batches};
use crate::eval;
use crate::models::{self, Kernels, Model};
use crate::report::Reporter;

/// How the ingredients are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Method {
    /// Greedy soup: add candidates in rank order while the soup does not get worse
    #[default]
    Greedy,
    /// The uniform average of every candidate
    Uniform,
    /// The single best candidate
    Best,
}

/// What ranks the candidates and decides whether a soup got worse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Metric {
    /// Top-1 accuracy (ties: lower loss)
    #[default]
    Top1,
    /// Mean cross-entropy
    Loss,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Greedy => "greedy",
            Method::Uniform => "uniform",
            Method::Best => "best",
        })
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Metric::Top1 => "top1",
            Metric::Loss => "loss",
        })
    }
}

/// A judged model's accuracy on the validation images.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Score {
    pub top1: f64,
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    pub images: u64,
}

impl Score {
    fn of(acc: &eval::Accuracy) -> Score {
        Score {
            top1: acc.top1(),
            top5: acc.top5(),
            loss: acc.loss(),
            images: acc.images,
        }
    }
}

impl Metric {
    /// Rank order of two scores: `Less` when `a` ranks before `b`.
    pub fn rank(self, a: &Score, b: &Score) -> Ordering {
        match self {
            Metric::Top1 => b.top1.total_cmp(&a.top1).then(a.loss.total_cmp(&b.loss)),
            Metric::Loss => a.loss.total_cmp(&b.loss),
        }
    }

    /// Whether a soup scoring `new` is kept over the current soup scoring `current`.
    pub fn keeps(self, new: &Score, current: &Score) -> bool {
        match self {
            Metric::Top1 => new.top1 >= current.top1,
            Metric::Loss => new.loss <= current.loss,
        }
    }
}

/// The number of models a method judges for `n` candidates (each candidate, plus the soups).
pub fn evaluations(method: Method, n: usize) -> usize {
    match method {
        Method::Greedy => 2 * n - 1,
        Method::Uniform => n + 1,
        Method::Best => n,
    }
}

/// One row of the procedure: a candidate in rank order, its own score, the soup's with it (for
/// greedy), and whether it is an ingredient.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    pub step: usize,
    /// Index of the candidate in the inputs.
    pub candidate: usize,
    pub own: Score,
    pub soup: Option<Score>,
    pub kept: bool,
}

/// A weighting of the candidates, judged: its score, its average (in memory, before
/// recalibration) and the new BN statistics with the metadata describing them.
pub struct Judged {
    pub score: Score,
    pub average: Checkpoint,
    pub recal: Option<(apply::Replacement, BTreeMap<String, String>)>,
}

/// Everything a judgement needs; see the module documentation.
pub struct Judge<'a> {
    pub inputs: &'a [Checkpoint],
    pub plan: &'a Plan,
    pub average: &'a Config,
    pub val: &'a Batches,
    /// Recalibration images and estimator, for BN models.
    pub recal: Option<(&'a Batches, Estimator)>,
    pub arch: Option<&'a str>,
    pub keep_prefix: bool,
    pub device: &'a candle_core::Device,
    pub kernels: Kernels,
}

impl Judge<'_> {
    /// Images one judgement runs through the network.
    pub fn images_per_judgement(&self) -> usize {
        self.val.images() + self.recal.map_or(0, |(r, _)| r.images())
    }

    /// Averages the inputs with `weights` in memory, recalibrates, evaluates; `bar` counts the
    /// images.
    pub fn judge(
        &self,
        weights: &[f64],
        label: &str,
        bar: &indicatif::ProgressBar,
    ) -> Result<Judged> {
        let out = OutputSpec {
            target: Target::Memory(PathBuf::from(label)),
            weights: weights.to_vec(),
            metadata: BTreeMap::new(),
        };
        let quiet = Reporter::new(true);
        let (_, mut memory) = average::run(self.inputs, self.plan, &[out], self.average, &quiet)?;
        let mut avg = memory
            .pop()
            .flatten()
            .context("internal error: no in-memory average")?;
        models::use_model_names(&mut avg, self.arch, self.keep_prefix)
            .with_context(|| label.to_string())?;
        let load = |ck: &Checkpoint| -> Result<Model> {
            Ok(Model::load(ck, self.arch, self.device)
                .with_context(|| label.to_string())?
                .with_kernels(self.kernels))
        };
        let counted = |b: Result<Batch>| {
            if let Ok(b) = &b {
                bar.inc(b.n as u64);
            }
            b
        };
        let mut model = load(&avg)?;
        let mut recal = None;
        if let Some((images, est)) = self.recal {
            let stats = bn::calibrate_batches(&model, images.pass()?.map(counted))
                .with_context(|| format!("{label}: BN recalibration"))?;
            let r =
                apply::replacements(&avg, &stats.layers, &stats.estimates(est)?, stats.batches)?;
            model = load(&avg.with_replaced(&r.tensors, label.as_ref())?)?;
            recal = Some((r, bn::estimate_metadata(&stats, est)));
        }
        let pass = eval::eval_batches(&model, self.val.pass()?.map(counted), false)
            .with_context(|| format!("{label}: evaluation"))?;
        let acc = pass
            .accuracy
            .context("the validation folder has no labels")?;
        Ok(Judged {
            score: Score::of(&acc),
            average: avg,
            recal,
        })
    }
}

/// What the procedure chose.
pub struct Outcome {
    pub method: Method,
    pub metric: Metric,
    /// Each candidate's own score, in input order.
    pub own: Vec<Score>,
    /// The rows, in rank order.
    pub steps: Vec<Step>,
    /// The ingredients, in input order.
    pub chosen: Vec<usize>,
    /// One weight per input (uniform over the ingredients, 0 elsewhere).
    pub weights: Vec<f64>,
    /// The result, judged.
    pub result: Judged,
}

fn uniform_over(chosen: &[usize], n: usize) -> Vec<f64> {
    let mut w = vec![0.0; n];
    for &i in chosen {
        w[i] = 1.0 / chosen.len() as f64;
    }
    w
}

/// Runs `method` over the candidates; `name(i)` names candidate `i` in progress lines.
pub fn run(
    judge: &Judge,
    method: Method,
    metric: Metric,
    name: &dyn Fn(usize) -> String,
    rep: &Reporter,
) -> Result<Outcome> {
    let n = judge.inputs.len();
    let total = evaluations(method, n) * judge.images_per_judgement();
    let bar = rep.images_bar(total as u64, "soup");
    let say = |msg: String| bar.suspend(|| rep.note(msg));

    // Every candidate on its own; only the best one's average is kept.
    let mut own: Vec<Score> = Vec::with_capacity(n);
    let mut best: Option<(usize, Judged)> = None;
    for i in 0..n {
        let j = judge.judge(&uniform_over(&[i], n), &name(i), &bar)?;
        say(format!(
            "candidate {}/{n} {}: top-1 {:.2} %, loss {:.4}",
            i + 1,
            name(i),
            j.score.top1,
            j.score.loss
        ));
        own.push(j.score.clone());
        // Strictly better only: ties keep the earlier candidate, as the stable ranking does.
        if best
            .as_ref()
            .is_none_or(|(_, b)| metric.rank(&j.score, &b.score) == Ordering::Less)
        {
            best = Some((i, j));
        }
    }
    let (first, best) = best.context("no candidates")?;
    let mut ranked: Vec<usize> = (0..n).collect();
    ranked.sort_by(|&a, &b| metric.rank(&own[a], &own[b])); // stable
    debug_assert_eq!(ranked[0], first);

    let row = |step: usize, i: usize, soup: Option<Score>, kept: bool| Step {
        step,
        candidate: i,
        own: own[i].clone(),
        soup,
        kept,
    };
    let mut steps = Vec::with_capacity(n);
    let (chosen, result) = match method {
        Method::Best => {
            for (k, &i) in ranked.iter().enumerate() {
                steps.push(row(k + 1, i, None, k == 0));
            }
            (vec![first], best)
        }
        Method::Uniform => {
            for (k, &i) in ranked.iter().enumerate() {
                steps.push(row(k + 1, i, None, true));
            }
            drop(best);
            let all: Vec<usize> = (0..n).collect();
            let j = judge.judge(&uniform_over(&all, n), "the uniform soup", &bar)?;
            say(format!(
                "uniform soup of {n}: top-1 {:.2} %, loss {:.4}",
                j.score.top1, j.score.loss
            ));
            (all, j)
        }
        Method::Greedy => {
            let mut chosen = vec![first];
            let mut current = best;
            steps.push(row(1, first, Some(current.score.clone()), true));
            for (k, &i) in ranked.iter().enumerate().skip(1) {
                let mut trial = chosen.clone();
                trial.push(i);
                trial.sort_unstable();
                let label = format!("the soup with {}", name(i));
                let j = judge.judge(&uniform_over(&trial, n), &label, &bar)?;
                let kept = metric.keeps(&j.score, &current.score);
                say(format!(
                    "step {}/{n}: + {}: soup top-1 {:.2} %, loss {:.4}: {}",
                    k + 1,
                    name(i),
                    j.score.top1,
                    j.score.loss,
                    if kept { "kept" } else { "left out" }
                ));
                steps.push(row(k + 1, i, Some(j.score.clone()), kept));
                if kept {
                    chosen = trial;
                    current = j;
                }
            }
            (chosen, current)
        }
    };
    bar.finish_and_clear();
    let mut chosen = chosen;
    chosen.sort_unstable();
    Ok(Outcome {
        method,
        metric,
        own,
        steps,
        weights: uniform_over(&chosen, n),
        chosen,
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(top1: f64, loss: f64) -> Score {
        Score {
            top1,
            top5: 100.0,
            loss,
            images: 200,
        }
    }

    #[test]
    fn ranking_and_keeping_follow_the_metric() {
        let scores = [s(90.0, 0.5), s(92.0, 0.6), s(92.0, 0.4), s(80.0, 0.1)];
        let mut r: Vec<usize> = (0..4).collect();
        r.sort_by(|&a, &b| Metric::Top1.rank(&scores[a], &scores[b]));
        assert_eq!(r, [2, 1, 0, 3], "top-1, ties by lower loss");
        r.sort_by(|&a, &b| Metric::Loss.rank(&scores[a], &scores[b]));
        assert_eq!(r, [3, 2, 0, 1]);
        assert!(Metric::Top1.keeps(&s(92.0, 9.0), &s(92.0, 0.1)), ">= keeps");
        assert!(!Metric::Top1.keeps(&s(91.5, 0.0), &s(92.0, 0.1)));
        assert!(Metric::Loss.keeps(&s(0.0, 0.1), &s(99.0, 0.1)), "<= keeps");
        assert!(!Metric::Loss.keeps(&s(99.0, 0.11), &s(0.0, 0.1)));
        assert_eq!(uniform_over(&[0, 2], 4), [0.5, 0.0, 0.5, 0.0]);
        assert_eq!(evaluations(Method::Greedy, 6), 11);
    }
}

//! `ckpt distill` against the PyTorch reference of fixtures/make_distill_fixtures.py: the weak
//! student (epoch 1) distilled from epoch 10 (and an ensemble with a fine-tune), the seed's
//! KLSoftLoss, SGD momentum 0.9 (or AdamW at lr 1e-3), weight decay 1e-4 on weights only, lr
//! 0.01, one epoch of 4 steps in folder order through the eval transform.
//!
//! Tolerances: every student tensor within 1e-4 relative of PyTorch's (plus 1e-6 of the
//! tensor's largest entry, for entries near zero: f32 arithmetic in a different order in both);
//! the KD loss of the first batch (before any update) within 1e-6 relative of KLSoftLoss.

use std::collections::HashMap;

use crate::util::*;

fn distill(d: &TestDir, teachers: &[&str], extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec!["distill".into(), p(&fixture("tiny/epoch_1.safetensors"))];
    for t in teachers {
        args.extend(["--teacher".into(), p(&fixture(t))]);
    }
    args.extend(
        [
            "--data",
            &p(&fixture("digits/train")),
            "--transform",
            "eval",
            "--no-shuffle",
            "--size",
            "32",
            "--crop-pct",
            "1",
            "--mean",
            "0.5",
            "--std",
            "0.5",
            "--schedule",
            "constant",
            "--batch-size",
            "64",
            "-o",
            "student.safetensors",
            "--json=distill.json",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    if !extra.contains(&"--lr") {
        args.extend(["--lr".into(), "0.01".into()]); // the reference's SGD rate
    }
    d.run(&args)
}

/// `floor`: an absolute error allowed on top of the relative one (see `adamw_is_torchs_adamw`).
pub(crate) fn assert_student_close(
    got: &HashMap<String, T>,
    want: &HashMap<String, T>,
    floor: f64,
) -> f64 {
    assert_student_close_with(got, want, |_| floor)
}

/// Every tensor of `got` within 1e-4 relative of `want`, plus 1e-6 of the tensor's largest
/// entry, plus `floor(key)`; BN batch counts equal. Returns the worst error, relative.
pub(crate) fn assert_student_close_with(
    got: &HashMap<String, T>,
    want: &HashMap<String, T>,
    floor: impl Fn(&str) -> f64,
) -> f64 {
    assert_eq!(sorted_keys(got), sorted_keys(want));
    let mut worst = 0f64;
    for (k, w) in want {
        let g = &got[k];
        if k.ends_with(".num_batches_tracked") {
            assert_eq!(as_i64(g), as_i64(w), "{k}");
            continue;
        }
        let (gv, wv) = (as_f64(g), as_f64(w));
        let scale = wv.iter().fold(0f64, |m, x| m.max(x.abs()));
        let floor = floor(k);
        for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
            let err = (a - b).abs();
            assert!(
                err <= 1e-4 * b.abs() + 1e-6 * scale + floor,
                "{k}[{i}]: {a} vs PyTorch's {b}"
            );
            worst = worst.max(err / (b.abs() + 1e-2 * scale));
        }
    }
    worst
}

/// Runs a case and holds every tensor, and the first batch's KD loss, to PyTorch's.
fn case(name: &str, teachers: &[&str], extra: &[&str]) -> (TestDir, Run) {
    case_within(name, teachers, extra, 0.0)
}

fn case_within(name: &str, teachers: &[&str], extra: &[&str], floor: f64) -> (TestDir, Run) {
    let d = TestDir::new();
    let run = distill(&d, teachers, extra).ok();
    let reference = fixture(&format!("distill/{name}.safetensors"));
    assert_student_close(
        &read_st(&d.path("student.safetensors")),
        &read_st(&reference),
        floor,
    );
    assert_losses_match(&d.path("distill.json"), &reference, name);
    (d, run)
}

/// The run's `--json` record against the reference's `losses` metadata: as many steps, the
/// first batch's KD loss within 1e-6 relative of KLSoftLoss's, every step's loss within 1e-4.
pub(crate) fn assert_losses_match(json: &std::path::Path, reference: &std::path::Path, what: &str) {
    let want: serde_json::Value =
        serde_json::from_str(&read_metadata(reference)["losses"]).unwrap();
    let want = want.as_array().unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let steps = got["steps"].as_array().unwrap();
    assert_eq!(steps.len(), want.len());
    let (g, w) = (
        steps[0]["kd"].as_f64().unwrap(),
        want[0]["kd"].as_f64().unwrap(),
    );
    assert!(
        (g - w).abs() <= 1e-6 * w.abs(),
        "{what}: first KD loss {g} vs KLSoftLoss {w}"
    );
    for (i, (gs, ws)) in steps.iter().zip(want).enumerate() {
        let (g, w) = (gs["loss"].as_f64().unwrap(), ws["loss"].as_f64().unwrap());
        assert!(
            (g - w).abs() <= 1e-4 * w.abs(),
            "{what}: step {i} loss {g} vs {w}"
        );
    }
}

#[test]
fn distillation_is_pytorchs_step_for_step() {
    let (d, _) = case("kd", &["tiny/epoch_10.safetensors"], &[]);
    let meta = read_metadata(&d.path("student.safetensors"));
    assert_eq!(meta["ckpt.distill.temperature"], "5");
    assert!(meta.contains_key("ckpt.inputs"), "{meta:?}");
}

#[test]
fn alpha_weighs_the_two_losses_as_pytorch() {
    case(
        "alpha_half",
        &["tiny/epoch_10.safetensors"],
        &["--alpha", "0.5"],
    );
}

#[test]
fn an_ensemble_teacher_averages_logits_as_pytorch() {
    case(
        "ensemble_t2",
        &["tiny/epoch_10.safetensors", "soup/finetune_b.safetensors"],
        &["--temperature", "2"],
    );
}

#[test]
fn adamw_is_torchs_adamw() {
    // AdamW moves a weight by about lr per step whatever the size of its gradient, so a weight
    // whose gradient is zero in one implementation and rounding noise in the other ends a
    // fraction of a step apart. Weight 16766 of layer4.0.conv1 (PyTorch's gradient exactly 0 in
    // three of the four steps) lands 0.6 or 1.7 times the relative tolerance away on candle's
    // ops, depending only on which kernels run the teacher, and 2.5 times on the train kernels
    // (2e-5); every other tensor stays under a tenth of it. Allowed on top: 5 % of one step.
    case_within(
        "adamw",
        &["tiny/epoch_10.safetensors"],
        &["--opt", "adamw", "--lr", "0.001"],
        5e-5,
    );
}

#[test]
fn bad_distillations_fail_in_one_line_and_write_nothing() {
    let d = TestDir::new();
    let student = p(&fixture("tiny/epoch_1.safetensors"));
    let train = p(&fixture("digits/train"));
    // A teacher with other classes.
    d.run(&[
        "-q",
        "distill",
        &student,
        "--teacher",
        &p(&fixture("zoo2/vgg_tiny.safetensors")),
        "--data",
        &train,
        "-o",
        "x.safetensors",
    ])
    .fails_with(&["classes"]);
    d.run(&[
        "-q",
        "distill",
        &student,
        "--teacher",
        &student,
        "--data",
        &train,
        "--alpha",
        "2",
        "-o",
        "x.safetensors",
    ])
    .fails_with(&["--alpha"]);
    d.run(&[
        "-q",
        "distill",
        &student,
        "--teacher",
        &student,
        "--data",
        &train,
        "--temperature",
        "0",
        "-o",
        "x.safetensors",
    ])
    .fails_with(&["--temperature"]);
    assert!(!d.path("x.safetensors").exists());
}

/// A three-epoch run with the train transform and a seeded shuffle, saved every epoch.
fn resumable_args(out: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "distill",
        &p(&fixture("tiny/epoch_1.safetensors")),
        "--teacher",
        &p(&fixture("tiny/epoch_10.safetensors")),
        "--data",
        &p(&fixture("digits/train")),
        "--size",
        "32",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--epochs",
        "3",
        "--save-every",
        "1",
        "-o",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_resumed_run_equals_the_uninterrupted_one() {
    for opt in ["sgd", "adamw"] {
        let d = TestDir::new();
        let json = |name: &str| format!("--json={name}");
        d.run(&resumable_args(
            "whole.safetensors",
            &["--opt", opt, &json("whole.json")],
        ))
        .ok();
        assert!(
            !d.path("whole.safetensors.resume").exists(),
            "state left behind"
        );

        // Killed while paused right after the save of epoch 1: the state is there, no output.
        let args = resumable_args("cut.safetensors", &["--opt", opt, &json("cut.json")]);
        d.run_paused_at("saved", &args, |child| child.kill().unwrap());
        assert!(!d.path("cut.safetensors").exists());
        assert!(d.path("cut.safetensors.resume").exists());

        // Without --resume the saved state is not overwritten by accident.
        d.run(&args)
            .fails_with(&["cut.safetensors.resume", "--resume"]);
        // Other settings are refused, naming the one that differs.
        let mut other = resumable_args("cut.safetensors", &["--opt", opt, "--resume"]);
        other.extend(["--lr".into(), "0.02".into()]);
        d.run(&other).fails_with(&["lr 0.02 now, 0.01 then"]);

        let mut resumed = args.clone();
        resumed.push("--resume".into());
        let run = d.run(&resumed).ok();
        assert!(
            run.stderr.contains("resuming after epoch 1 of 3"),
            "{}",
            run.dump()
        );
        assert!(!d.path("cut.safetensors.resume").exists());

        let (whole, cut) = (
            read_st(&d.path("whole.safetensors")),
            read_st(&d.path("cut.safetensors")),
        );
        assert_eq!(sorted_keys(&whole), sorted_keys(&cut));
        for (k, w) in &whole {
            assert!(w.data == cut[k].data, "{opt}: {k} differs after resuming");
        }
        let steps = |f: &str| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.path(f)).unwrap()).unwrap();
            v["steps"].clone()
        };
        assert_eq!(steps("whole.json"), steps("cut.json"), "{opt}");
        assert_eq!(steps("whole.json").as_array().unwrap().len(), 12);
    }
    // --resume with nothing saved.
    let d = TestDir::new();
    d.run(&resumable_args("none.safetensors", &["--resume"]))
        .fails_with(&["no saved state", "none.safetensors.resume"]);
}

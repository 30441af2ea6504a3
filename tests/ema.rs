//! `ckpt ema` against PyTorch's f64 recursion, and the schedule options on scalars.

use safetensors::Dtype;

use crate::util::*;

#[test]
fn several_decays_from_one_pass_match_pytorch() {
    let d = TestDir::new();
    let mut args = vec!["ema".to_string()];
    args.extend(snapshots().iter().map(|s| p(s)));
    args.extend(["--decay", "0.5,0.9", "-o", "ema_{decay}.safetensors"].map(String::from));
    let r = d.run(&args).ok();
    assert!(r.stdout.contains("ema_0.5.safetensors") && r.stdout.contains("ema_0.9.safetensors"));
    for decay in ["0.5", "0.9"] {
        let got = read_st(&d.path(&format!("ema_{decay}.safetensors")));
        assert_f32_within_one_ulp(
            &got,
            &read_st(&fixture(&format!("expected/ema_{decay}.safetensors"))),
        );
        assert_eq!(
            read_metadata(&d.path(&format!("ema_{decay}.safetensors")))["ckpt.decay"],
            decay
        );
    }
}

#[test]
fn several_decays_need_a_placeholder() {
    let d = TestDir::new();
    d.run(&[
        "-q",
        "ema",
        &p(&snapshots()[0]),
        "--decay",
        "0.5,0.9",
        "-o",
        "ema.safetensors",
    ])
    .fails_with(&["{decay}"]);
    d.run(&[
        "-q",
        "ema",
        &p(&snapshots()[0]),
        "--decay",
        "1.5",
        "-o",
        "ema.safetensors",
    ])
    .fails_with(&["--decay 1.5"]);
}

/// Snapshots holding one scalar whose value is the step, named by step.
fn scalar_snapshots(d: &TestDir, steps: &[u64]) -> Vec<String> {
    steps
        .iter()
        .map(|s| {
            let name = format!("step_{s}.safetensors");
            write_st(
                &d.path(&name),
                &[("w", Dtype::F64, vec![], (*s as f64).to_le_bytes().to_vec())],
            );
            name
        })
        .collect()
}

fn run_scalar(d: &TestDir, files: &[String], extra: &[&str]) -> f64 {
    let mut args = vec!["-q".to_string(), "ema".into()];
    args.extend(files.iter().cloned());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-o".into(), "out.safetensors".into(), "--force".into()]);
    d.run(&args).ok();
    as_f64(&read_st(&d.path("out.safetensors"))["w"])[0]
}

#[test]
fn per_step_decays_by_the_gap() {
    let d = TestDir::new();
    let steps = [100u64, 200, 250, 400];
    let files = scalar_snapshots(&d, &steps);
    let b: f64 = 0.99;
    let mut v = steps[0] as f64;
    for w in steps.windows(2) {
        let dd = b.powf((w[1] - w[0]) as f64);
        v = dd * v + (1.0 - dd) * w[1] as f64;
    }
    let got = run_scalar(&d, &files, &["--decay", "0.99", "--per-step"]);
    assert!((got - v).abs() < 1e-9 * v, "{got} vs {v}");
    // Without --per-step every snapshot is one update.
    let mut v = steps[0] as f64;
    for s in &steps[1..] {
        v = b * v + (1.0 - b) * *s as f64;
    }
    let got = run_scalar(&d, &files, &["--decay", "0.99"]);
    assert!((got - v).abs() < 1e-9 * v, "{got} vs {v}");
}

#[test]
fn warmup_follows_timm_model_ema_v3() {
    let d = TestDir::new();
    let steps = [1u64, 2, 3, 10];
    let files = scalar_snapshots(&d, &steps);
    // timm: decay(step) = min(B, 1 - (1 + (step - 1))^(-2/3)), 0 at step 1.
    let decay_at = |s: u64| -> f64 {
        let t = (s - 1) as f64;
        if t <= 0.0 {
            0.0
        } else {
            (1.0 - (1.0 + t).powf(-2.0 / 3.0)).min(0.999)
        }
    };
    let mut v = steps[0] as f64;
    for (i, s) in steps.iter().enumerate().skip(1) {
        let dd = decay_at(i as u64 + 1);
        v = dd * v + (1.0 - dd) * *s as f64;
    }
    let got = run_scalar(&d, &files, &["--decay", "0.999", "--warmup"]);
    assert!((got - v).abs() < 1e-9 * v, "{got} vs {v}");
}

#[test]
fn per_step_needs_numbers() {
    let d = TestDir::new();
    write_st(
        &d.path("final.safetensors"),
        &[("w", Dtype::F64, vec![], 1f64.to_le_bytes().to_vec())],
    );
    d.run(&[
        "-q",
        "ema",
        "final.safetensors",
        "--decay",
        "0.9",
        "--per-step",
        "-o",
        "o.safetensors",
    ])
    .fails_with(&["final.safetensors", "step number"]);
}

/// Issue 14: `ema --recal-bn DIR` in one command writes the tensors that `ema` followed by
/// `recal-bn` over DIR writes (the average judged in memory is the average written), and no
/// intermediate file.
#[test]
fn ema_with_recal_bn_equals_ema_then_recal_bn_issue_14() {
    let d = TestDir::new();
    let train = p(&fixture("digits/train"));
    let digits: Vec<String> = crate::eval::DIGITS.iter().map(|s| s.to_string()).collect();
    let mut one = vec!["-q".to_string(), "ema".into()];
    one.extend(snapshots().iter().map(|s| p(s)));
    one.extend(
        [
            "--decay",
            "0.5",
            "-o",
            "one.safetensors",
            "--recal-bn",
            &train,
        ]
        .map(String::from),
    );
    one.extend(digits.iter().cloned());
    d.run(&one).ok();
    let mut plain = vec!["-q".to_string(), "ema".into()];
    plain.extend(snapshots().iter().map(|s| p(s)));
    plain.extend(["--decay", "0.5", "-o", "plain.safetensors"].map(String::from));
    d.run(&plain).ok();
    let mut recal = vec![
        "-q".to_string(),
        "recal-bn".into(),
        "plain.safetensors".into(),
    ];
    recal.extend(["--data", &train, "-o", "two.safetensors"].map(String::from));
    recal.extend(digits.iter().cloned());
    d.run(&recal).ok();
    assert_eq!(
        d.listing(),
        ["one.safetensors", "plain.safetensors", "two.safetensors"],
        "no intermediate file left"
    );
    let (a, b) = (
        read_st(&d.path("one.safetensors")),
        read_st(&d.path("two.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    let mut recalibrated = 0;
    for (k, t) in &a {
        assert_eq!(t, &b[k], "{k}");
        recalibrated += usize::from(k.ends_with("running_var"));
    }
    assert!(recalibrated > 0);
    // The statistics did change: they are not the averaged ones.
    let plain = read_st(&d.path("plain.safetensors"));
    assert_ne!(plain["bn1.running_var"], a["bn1.running_var"]);
    let m = read_metadata(&d.path("one.safetensors"));
    assert_eq!(m["ckpt.method"], "ema");
    assert_eq!(m["ckpt.recal.estimator"], "population");
}

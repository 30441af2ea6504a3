//! `ckpt fixres` against the seed's PyTorch loop, run by fixtures/make_fixres_fixtures.py on
//! the tiny ResNet over digits/train at 48 (trained at 32), in folder order: every tensor the
//! fine-tune changes, and the loss of every step.
//!
//! Tolerance: |ckpt - torch| <= 1e-4 |torch| + 1e-6, and at most 1e-4 of the largest change
//! the fine-tune made to that tensor (so the update itself is matched, not only the weights it
//! started from). Both run f32 on the CPU with different summation orders (convolutions,
//! batch statistics, the gradient's sums), about 1e-7 relative per step; measured over 8-21
//! steps: at most 4.3e-5 relative on an entry near zero, 4.2e-6 of the update, losses within
//! 1e-6.

use crate::util::*;

const SIZE_48: [&str; 10] = [
    "--size",
    "48",
    "--crop-pct",
    "1",
    "--mean",
    "0.5",
    "--std",
    "0.5",
    "--data",
    "",
];

fn fixres(d: &TestDir, model: &str, out: &str, extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec!["fixres".into(), model.into(), "-o".into(), out.into()];
    let train = p(&fixture("digits/train"));
    args.extend(SIZE_48.iter().map(|s| {
        if s.is_empty() {
            train.clone()
        } else {
            s.to_string()
        }
    }));
    args.extend(extra.iter().map(|s| s.to_string()));
    d.run(&args)
}

fn tiny() -> String {
    p(&fixture("tiny/epoch_10.safetensors"))
}

/// Compares ckpt's output with a reference case; returns the worst relative difference.
fn assert_matches_reference(d: &TestDir, out: &str, case: &str, run: &Run) -> f64 {
    let reference = fixture(&format!("fixres/{case}.safetensors"));
    let want = read_st(&reference);
    let got = read_st(&d.path(out));
    let input = read_st(&fixture("tiny/epoch_10.safetensors"));
    let mut worst: f64 = 0.0;
    for (k, w) in &want {
        let g = &got[k];
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{k}");
        if w.dtype == safetensors::Dtype::I64 {
            assert_eq!(as_i64(g), as_i64(w), "{k}");
            continue;
        }
        let (gv, wv, iv) = (as_f64(g), as_f64(w), as_f64(&input[k]));
        let update = wv
            .iter()
            .zip(&iv)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(update > 0.0, "{k}: the reference did not change it");
        for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
            let diff = (a - b).abs();
            assert!(diff <= 1e-4 * b.abs() + 1e-6, "{k}[{i}]: {a} vs torch {b}");
            assert!(
                diff <= 1e-4 * update,
                "{k}[{i}]: {a} vs torch {b} (update {update})"
            );
            worst = worst.max(diff / b.abs().max(1e-6));
        }
    }
    for (k, t) in &input {
        if !want.contains_key(k) {
            assert_eq!(&got[k], t, "{k} must be copied byte for byte");
        }
    }
    assert_eq!(got.len(), input.len());
    let meta = read_metadata(&reference);
    let losses: Vec<f64> = serde_json::from_str(&meta["losses"]).unwrap();
    let mine: Vec<f64> = run.json()["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(mine.len(), losses.len(), "steps");
    for (i, (a, b)) in mine.iter().zip(&losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "loss of step {i}: {a} vs torch {b}"
        );
    }
    worst
}

#[test]
fn fixres_matches_the_seeds_pytorch_loop_issue_18() {
    let d = TestDir::new();
    let r = fixres(
        &d,
        &tiny(),
        "out.safetensors",
        &["--epochs", "2", "--no-shuffle", "--json"],
    )
    .ok();
    assert_matches_reference(&d, "out.safetensors", "seed_48", &r);
    let meta = read_metadata(&d.path("out.safetensors"));
    for (k, v) in [
        ("ckpt.fixres.size", "48"),
        ("ckpt.fixres.crop_pct", "1"),
        ("ckpt.fixres.epochs", "2"),
        ("ckpt.fixres.steps", "8"),
        ("ckpt.fixres.lr", "0.001"),
        ("ckpt.fixres.momentum", "0.9"),
        ("ckpt.fixres.shuffle", "none"),
        ("ckpt.fixres.classifier", "fc"),
        ("ckpt.fixres.last_bn", "layer4.0.bn2"),
    ] {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(meta["ckpt.fixres.data"].ends_with("train"));
    assert!(meta["ckpt.inputs"].contains("epoch_10.safetensors"));
}

/// candle's ops for every layer (the path CUDA takes) train to the same tensors as the fast CPU
/// kernels, whose frozen layers build no autograd graph.
#[test]
fn fixres_on_candle_ops_matches_pytorch_too_issue_18() {
    let d = TestDir::new();
    let mut args: Vec<String> = vec![
        "fixres".into(),
        tiny(),
        "-o".into(),
        "out.safetensors".into(),
    ];
    let train = p(&fixture("digits/train"));
    args.extend(SIZE_48.iter().map(|s| {
        if s.is_empty() {
            train.clone()
        } else {
            s.to_string()
        }
    }));
    args.extend(["--epochs", "2", "--no-shuffle", "--json"].map(String::from));
    let r = d.run_env(&args, &[("CKPT_CPU_CONV", "candle")]).ok();
    assert_matches_reference(&d, "out.safetensors", "seed_48", &r);
}

#[test]
fn fixres_train_bn_affine_nesterov_weight_decay_match_pytorch_issue_18() {
    let d = TestDir::new();
    let extra = [
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--weight-decay",
        "1e-3",
        "--nesterov",
        "--train-bn-affine",
        "--bn-momentum",
        "0.3",
        "--no-shuffle",
        "--json",
    ];
    let r = fixres(&d, &tiny(), "out.safetensors", &extra).ok();
    assert_matches_reference(&d, "out.safetensors", "affine_48", &r);
}

#[test]
fn fixres_recal_bn_matches_update_bn_then_the_loop_issue_18() {
    let d = TestDir::new();
    let train = p(&fixture("digits/train"));
    let extra = [
        "--epochs",
        "2",
        "--no-shuffle",
        "--recal-bn",
        &train,
        "--estimator",
        "torch",
        "--json",
    ];
    let r = fixres(&d, &tiny(), "out.safetensors", &extra).ok();
    assert_matches_reference(&d, "out.safetensors", "recal_48", &r);
    let meta = read_metadata(&d.path("out.safetensors"));
    assert_eq!(meta["ckpt.recal.estimator"], "torch");
}

#[test]
fn fixres_shuffle_is_seeded_and_val_reports_each_stage_issue_18() {
    let d = TestDir::new();
    let val = p(&fixture("digits/val"));
    let train = p(&fixture("digits/train"));
    let common = [
        "--max-images",
        "64",
        "--batch-size",
        "16",
        "--recal-bn",
        &train,
        "--val",
        &val,
    ];
    let run = |out: &str, seed: &str| {
        let mut a = common.to_vec();
        a.extend(["--seed", seed, "--json"]);
        fixres(&d, &tiny(), out, &a).ok()
    };
    let a = run("a.safetensors", "1");
    run("b.safetensors", "1");
    run("c.safetensors", "2");
    let (ta, tb) = (
        read_st(&d.path("a.safetensors")),
        read_st(&d.path("b.safetensors")),
    );
    assert_eq!(ta, tb, "the same seed, the same result");
    let tc = read_st(&d.path("c.safetensors"));
    assert_ne!(
        ta["fc.weight"], tc["fc.weight"],
        "another seed, another order"
    );
    let stages: Vec<String> = a.json()["accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        stages,
        ["before", "after recal-bn", "after recal-bn + fixres"]
    );
}

#[test]
fn fixres_other_families_train_their_own_head_issue_18() {
    // The zoo's tiny MobileNetV2 and EfficientNet have 7 and 5 classes: digits 0-4, 4 images each.
    let data = TestDir::new();
    for c in 0..5 {
        let dir = data.path(&format!("train/{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixture(&format!("digits/train/{c}"));
        let mut files: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(4) {
            std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    for (model, classifier, bn) in [
        (
            "zoo/mobilenet_v2_tiny.safetensors",
            "classifier.1",
            "features.18.1",
        ),
        (
            "zoo/efficientnet_tiny.safetensors",
            "classifier.1",
            "features.8.1",
        ),
    ] {
        let d = TestDir::new();
        let input = read_st(&fixture(model));
        let args = [
            "fixres",
            &p(&fixture(model)),
            "-o",
            "out.safetensors",
            "--size",
            "40",
            "--data",
            &p(&data.path("train")),
            "--batch-size",
            "8",
            "--json",
        ];
        let r = d.run(&args).ok();
        assert_eq!(r.json()["last_bn"], bn);
        let got = read_st(&d.path("out.safetensors"));
        let changed: Vec<String> = sorted_keys(&got)
            .into_iter()
            .filter(|k| got[k] != input[k])
            .collect();
        let mut want = vec![
            format!("{bn}.num_batches_tracked"),
            format!("{bn}.running_mean"),
            format!("{bn}.running_var"),
            format!("{classifier}.bias"),
            format!("{classifier}.weight"),
        ];
        want.sort();
        assert_eq!(changed, want, "{model}");
    }
}

#[test]
fn fixres_bad_inputs_fail_cleanly_issue_18() {
    let d = TestDir::new();
    // A flat (unlabelled) folder.
    let flat = d.path("flat");
    std::fs::create_dir(&flat).unwrap();
    std::fs::copy(fixture("digits/train/0/digit_0000.png"), flat.join("a.png")).unwrap();
    let mut args: Vec<String> = vec![
        "fixres".into(),
        tiny(),
        "-o".into(),
        "out.safetensors".into(),
    ];
    args.extend(["--data".into(), p(&flat), "--size".into(), "32".into()]);
    d.run(&args).fails_with(&["flat", "labelled"]);
    // Writing over the input, the train transform, zero epochs.
    let copy = d.copy_in(&[fixture("tiny/epoch_10.safetensors")]).remove(0);
    let before = sha256(&copy);
    fixres(&d, &p(&copy), &p(&copy), &["--force"]).fails_with(&["epoch_10.safetensors"]);
    assert_eq!(sha256(&copy), before);
    fixres(&d, &tiny(), "out.safetensors", &["--transform", "train"])
        .fails_with(&["--transform train"]);
    fixres(&d, &tiny(), "out.safetensors", &["--epochs", "0"]).fails_with(&["--epochs"]);
    fixres(&d, &tiny(), "out.safetensors", &["--momentum=-1"]).fails_with(&["momentum"]);
    fixres(&d, &tiny(), "out.safetensors", &["--lr=0"]).fails_with(&["--lr"]);
    fixres(&d, &tiny(), "out.safetensors", &["--bn-momentum=2"]).fails_with(&["--bn-momentum"]);
    assert!(
        !d.path("out.safetensors").exists(),
        "no output after a failure"
    );
}

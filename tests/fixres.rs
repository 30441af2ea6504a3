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

/// The tensors of two outputs, compared byte for byte (metadata aside).
fn assert_same_tensors(a: &std::path::Path, b: &std::path::Path) {
    let (ta, tb) = (read_st(a), read_st(b));
    assert_eq!(sorted_keys(&ta), sorted_keys(&tb));
    for (k, t) in &ta {
        assert_eq!(
            t,
            &tb[k],
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Epochs after the first run from the backbone's output kept in memory; with --cache-mb 0 it
/// is recomputed every epoch (and said once). Both give the same tensors and losses, bit for
/// bit, in folder order and shuffled, with a short last batch (200 images, batch 64).
#[test]
fn fixres_cached_and_recomputed_epochs_are_identical_issue_18() {
    let d = TestDir::new();
    for (case, order) in [("ordered", "--no-shuffle"), ("shuffled", "--seed=7")] {
        let run = |out: &str, cache: &str| {
            let r = fixres(
                &d,
                &tiny(),
                out,
                &[
                    "--epochs",
                    "3",
                    "--batch-size",
                    "64",
                    order,
                    "--cache-mb",
                    cache,
                    "--json=-",
                ],
            )
            .ok();
            (r.json(), r.stderr.clone())
        };
        let (cached, cached_err) = run(&format!("{case}_cached.safetensors"), "64");
        let (fresh, fresh_err) = run(&format!("{case}_fresh.safetensors"), "0");
        assert!(
            cached_err.contains("keeping the backbone's output in memory"),
            "{cached_err}"
        );
        assert!(
            !cached_err.contains("recomputed every epoch"),
            "{cached_err}"
        );
        assert_eq!(
            fresh_err.matches("recomputed every epoch").count(),
            1,
            "said once: {fresh_err}"
        );
        assert_eq!(cached["losses"], fresh["losses"], "{case}: losses");
        assert_eq!(cached["losses"].as_array().unwrap().len(), 12);
        assert_same_tensors(
            &d.path(&format!("{case}_cached.safetensors")),
            &d.path(&format!("{case}_fresh.safetensors")),
        );
    }
}

/// `sweep-res --fixres TRAIN` fine-tunes at every size as `fixres --size` does: at the same
/// size, with the same options, the best checkpoint it saves has the same tensors, with and
/// without --recal-bn; its rows say they were fine-tuned.
#[test]
fn sweep_res_fixres_is_fixres_at_each_size_issue_18() {
    let d = TestDir::new();
    let train = p(&fixture("digits/train"));
    let val = p(&fixture("digits/val"));
    let common = [
        "--crop-pct",
        "1",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--train-bn-affine",
    ];
    for recal in [false, true] {
        let tag = if recal { "recal" } else { "plain" };
        let mut extra: Vec<&str> = common.to_vec();
        if recal {
            extra.extend(["--recal-bn", &train]);
        }
        let single = format!("{tag}_fixres.safetensors");
        let mut a: Vec<String> = vec!["fixres".into(), tiny(), "-o".into(), single.clone()];
        a.extend(["--data", &train, "--size", "48"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        d.run(&a).ok();

        let best = format!("{tag}_best.safetensors");
        let mut a: Vec<String> = vec!["sweep-res".into(), tiny()];
        a.extend(
            [
                "--data",
                &val,
                "--train-size",
                "32",
                "--sizes",
                "48",
                "--fixres",
                &train,
            ]
            .map(String::from),
        );
        a.extend(["--save-best".to_string(), best.clone(), "--json".into()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        let r = d.run(&a).ok();
        let rows = r.json();
        let row = &rows.as_array().unwrap()[0];
        assert_eq!(row["fixres"], true);
        assert_eq!(row["recal_bn"], recal);
        assert_same_tensors(&d.path(&single), &d.path(&best));
        let meta = read_metadata(&d.path(&best));
        assert_eq!(meta["ckpt.fixres.size"], "48");
        assert_eq!(meta.contains_key("ckpt.recal.estimator"), recal);
    }

    // Two sizes: each fine-tuned at its own size; the fine-tune lifts top-1 at 48 well above
    // the 11.0 % before it (measured: 52.5 % after 6 epochs).
    let mut a: Vec<String> = vec!["sweep-res".into(), tiny()];
    a.extend(
        [
            "--data",
            &val,
            "--train-size",
            "32",
            "--sizes",
            "40,48",
            "--fixres",
            &train,
            "--crop-pct",
            "1",
            "--mean",
            "0.5",
            "--std",
            "0.5",
            "--epochs",
            "6",
            "--batch-size",
            "64",
            "--lr",
            "0.05",
            "--train-bn-affine",
            "--json",
        ]
        .map(String::from),
    );
    let rows = d.run(&a).ok().json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let top1_48 = rows[1]["top1"].as_f64().unwrap();
    assert!(top1_48 > 30.0, "fine-tuned at 48: top-1 {top1_48}");

    d.run(&[
        "sweep-res",
        &tiny(),
        "--data",
        &val,
        "--save-best",
        "x.safetensors",
    ])
    .fails_with(&["--save-best", "--recal-bn or --fixres"]);
}

/// `--opt adamw` trains with torch.optim.AdamW (its numbers are held to torch in the optimiser's
/// unit tests): a different result from SGD, recorded in the metadata; SGD's --nesterov is
/// refused with it.
#[test]
fn fixres_adamw_issue_18() {
    let d = TestDir::new();
    fixres(
        &d,
        &tiny(),
        "sgd.safetensors",
        &["--epochs", "1", "--no-shuffle"],
    )
    .ok();
    fixres(
        &d,
        &tiny(),
        "adamw.safetensors",
        &[
            "--epochs",
            "1",
            "--no-shuffle",
            "--opt",
            "adamw",
            "--weight-decay",
            "0.01",
        ],
    )
    .ok();
    let meta = read_metadata(&d.path("adamw.safetensors"));
    assert_eq!(meta["ckpt.fixres.optimizer"], "adamw");
    assert_eq!(meta["ckpt.fixres.weight_decay"], "0.01");
    assert_ne!(
        read_st(&d.path("sgd.safetensors"))["fc.weight"],
        read_st(&d.path("adamw.safetensors"))["fc.weight"]
    );
    fixres(
        &d,
        &tiny(),
        "x.safetensors",
        &["--opt", "adamw", "--nesterov"],
    )
    .fails_with(&["--nesterov"]);
}

/// Every family with a head BN runs as trunk + head exactly as its forward pass runs, when the
/// head BN is the only one in train mode (what a fine-tune does, cached or not), on both
/// kernels; the families without one refuse.
#[test]
fn trunk_then_head_is_the_forward_pass_for_every_family_issue_18() {
    use ckpt::checkpoint::Checkpoint;
    use ckpt::models::{BnMode, Ctx, Kernels, Model};
    let cases = [
        ("tiny/epoch_10", "zoo/tiny_resnet_io"),
        ("zoo/resnext_tiny", "zoo/resnext_tiny_io"),
        ("zoo/mobilenet_v2_tiny", "zoo/mobilenet_v2_tiny_io"),
        ("zoo/efficientnet_tiny", "zoo/efficientnet_tiny_io"),
        ("zoo2/densenet_tiny", "zoo2/densenet_tiny_io"),
        ("zoo2/efficientnet_v2_tiny", "zoo2/efficientnet_v2_tiny_io"),
        (
            "zoo2/mobilenet_v3_large_tiny",
            "zoo2/mobilenet_v3_large_tiny_io",
        ),
        (
            "zoo2/mobilenet_v3_small_tiny",
            "zoo2/mobilenet_v3_small_tiny_io",
        ),
        ("zoo2/regnet_x_tiny", "zoo2/regnet_x_tiny_io"),
        ("zoo2/regnet_y_tiny", "zoo2/regnet_y_tiny_io"),
        ("zoo2/vgg_bn_tiny", "zoo2/vgg_bn_tiny_io"),
        ("zoo2/vgg_tiny", "zoo2/vgg_tiny_io"),
        ("zoo2/convnext_tiny_tiny", "zoo2/convnext_tiny_tiny_io"),
        ("zoo2/shufflenet_v2_tiny", "zoo2/shufflenet_v2_tiny_io"),
        ("zoo2/mnasnet_tiny", "zoo2/mnasnet_tiny_io"),
        // timm's names and layouts (issue 16): SE-ResNeXt's squeeze-excite in the head.
        ("timm/seresnext_tiny", "timm/seresnext_tiny_io"),
        ("timm/resnet_d_tiny", "timm/resnet_d_tiny_io"),
        ("timm/mobilenetv3_tiny", "timm/mobilenetv3_tiny_io"),
        ("timm/efficientnetv2_tiny", "timm/efficientnetv2_tiny_io"),
        ("timm/regnety_tiny", "timm/regnety_tiny_io"),
        ("timm/mobilenetv2_tiny", "timm/mobilenetv2_tiny_io"),
        ("timm/convnext_tiny", "timm/convnext_tiny_io"),
    ];
    let mut split = 0;
    for (model, io) in cases {
        let ck = Checkpoint::open(
            fixture(&format!("{model}.safetensors")),
            &Default::default(),
        )
        .unwrap();
        let io_ck =
            Checkpoint::open(fixture(&format!("{io}.safetensors")), &Default::default()).unwrap();
        for kernels in [Kernels::Fast, Kernels::Candle] {
            let m = Model::load(&ck, None, &candle_core::Device::Cpu)
                .unwrap()
                .with_kernels(kernels);
            let x = ckpt::eval::read_input_batch(&io_ck, "input", &m).unwrap();
            let Ok((_, i)) = m.head() else {
                let mut ctx = Ctx::eval();
                assert!(m.forward_trunk(&x, &mut ctx).is_err(), "{model}");
                continue;
            };
            let mut modes = vec![BnMode::Eval; m.bn.len()];
            modes[i] = BnMode::Train;
            let ctx = || Ctx {
                layer_modes: Some(&modes),
                ..Ctx::default()
            };
            let whole = m.forward(&x, &mut ctx()).unwrap();
            let input = m.forward_trunk(&x, &mut ctx()).unwrap();
            let halves = m.forward_head(&input, &mut ctx()).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                whole.flatten_all().unwrap().to_vec1().unwrap(),
                halves.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "{model} {kernels:?}");
            // The batch statistics moved the running ones: twice, once per pass.
            assert_eq!(m.bn[i].running().batches, 2, "{model}");
            split += 1;
        }
    }
    assert_eq!(split, 2 * 19);
}

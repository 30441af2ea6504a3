//! Issue 16, timm's checkpoints: each family in timm's naming (and timm's structural variants
//! on the same layouts) against timm itself on a small instance (fixtures/timm, made by
//! fixtures/make_timm_fixtures.py with timm 1.0: random weights, randomised BN affine, BN
//! statistics estimated on real images), and detection by timm's names on the key/shape lists
//! of real-size timm models (fixtures/expected/timm_shapes.json.gz, meta device).

use ckpt::models::{detect, Model, ShapeOnlyBackend};

use crate::util::*;

/// As in zoo2.rs: the references are f32 from the same f16-rounded weights and inputs, so what
/// is left is summation order; a wrong padding, projection or squeeze-excite is off by orders of
/// magnitude more, since the logits depend on the input.
const TOLERANCE: f64 = 1e-4;

/// (fixture name, `--arch` or none, words `logits` must report about the architecture)
const FIXTURES: &[(&str, Option<&str>, &[&str])] = &[
    (
        "resnet_d_tiny",
        None,
        &[
            "resnet (Bottleneck [1, 2, 1, 1], widths [8, 16, 24, 32], groups 1, deep stem [8, 8, 16], average-pool projection)",
            "5 classes",
        ],
    ),
    (
        "resnet18d_tiny",
        None,
        &["BasicBlock [1, 1, 2, 1]", "deep stem", "4 classes"],
    ),
    (
        "seresnext_tiny",
        None,
        &["groups 4, SE [8, 8, 8, 8])", "6 classes"],
    ),
    (
        "efficientnet_tiny",
        None,
        &["efficientnet (stem 8", "5 classes", "timm naming"],
    ),
    (
        "tf_efficientnet_tiny",
        Some("tf_efficientnet"),
        &["tf_efficientnet (stem 8", "5 classes", "timm naming"],
    ),
    (
        "mobilenetv3_tiny",
        None,
        &["mobilenetv3_large (stem 16", "5 classes", "timm naming"],
    ),
    (
        "tf_mobilenetv3_tiny",
        Some("tf_mobilenetv3"),
        &["tf_mobilenetv3_small (stem 16", "4 classes", "timm naming"],
    ),
    (
        "efficientnetv2_tiny",
        None,
        &["efficientnetv2 (depths [1, 2, 2, 2, 3, 5]", "5 classes", "timm naming"],
    ),
    (
        "tf_efficientnetv2_tiny",
        Some("tf_efficientnetv2"),
        &["tf_efficientnetv2 (depths", "4 classes", "timm naming"],
    ),
    ("regnety_tiny", None, &["regnety (depths", "5 classes", "timm naming"]),
    ("regnetx_tiny", None, &["regnetx (depths", "4 classes", "timm naming"]),
    (
        "convnext_tiny",
        None,
        &["convnext (depths [1, 1, 2, 1]", "5 classes", "timm naming"],
    ),
    (
        "convnext_atto_tiny",
        None,
        &["convnext (depths [1, 2, 1, 1]", "4 classes", "timm naming"],
    ),
    (
        "mobilenetv2_tiny",
        None,
        &["mobilenetv2 (stem 8", "5 classes", "timm naming"],
    ),
];

/// The `tf_` ports of this issue: (fixture, `--arch` family name).
const TF_PORTS: &[(&str, &str)] = &[
    ("tf_efficientnet_tiny", "tf_efficientnet"),
    ("tf_mobilenetv3_tiny", "tf_mobilenetv3"),
    ("tf_efficientnetv2_tiny", "tf_efficientnetv2"),
];

/// A `tf_` port needs its TensorFlow "same" padding (and eps): run as the plain variant, as
/// without a name, its logits are far from timm's (the fixture script checks the padding alone
/// moves them by more than 1e-2), and the command says which variant it ran.
#[test]
fn tf_ports_need_same_padding_issue_16() {
    for (name, arch) in TF_PORTS {
        let model = fixture(&format!("timm/{name}.safetensors"));
        let io = fixture(&format!("timm/{name}_io.safetensors"));
        let hint = format!("--arch {arch}");
        let plain = crate::util::logits_difference_arch(
            &model,
            &io,
            None,
            &[],
            &["running the plain variant", &hint],
        );
        let tf = crate::util::logits_difference_arch(&model, &io, Some(arch), &[], &[]);
        eprintln!("{name}: plain {plain:e}, tf {tf:e}");
        assert!(plain > 1e-2, "{name}: {plain:e}");
        assert!(tf < TOLERANCE, "{name}: {tf:e}");
    }
}

fn logits_difference(name: &str, arch: Option<&str>, env: &[(&str, &str)], words: &[&str]) -> f64 {
    let model = fixture(&format!("timm/{name}.safetensors"));
    let io = fixture(&format!("timm/{name}_io.safetensors"));
    crate::util::logits_difference_arch(&model, &io, arch, env, words)
}

#[test]
fn timm_models_match_timm_on_both_kernels_issue_16() {
    for (name, arch, words) in FIXTURES {
        // The logits depend on the input (BN statistics from real images), so matching them is
        // a test of the whole forward pass.
        let io = read_st(&fixture(&format!("timm/{name}_io.safetensors")));
        let want = as_f64(&io["logits"]);
        let classes = io["logits"].shape[1];
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        let rows: Vec<&[f64]> = want.chunks(classes).collect();
        for (i, a) in rows.iter().enumerate() {
            for b in &rows[..i] {
                let d = a
                    .iter()
                    .zip(*b)
                    .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                assert!(d > 0.05 * scale, "{name}: images' logits differ by {d:e}");
            }
        }
        for env in [&[][..], &[("CKPT_CPU_CONV", "candle")][..]] {
            let worst = logits_difference(name, *arch, env, words);
            eprintln!("{name} {env:?}: max relative logits difference {worst:e}");
            assert!(worst < TOLERANCE, "{name} {env:?}: {worst:e}");
        }
    }
}

/// BN layers report in timm's forward order, under timm's keys, with timm's train-mode moments.
#[test]
fn timm_models_calibrate_like_pytorch_train_mode_issue_16() {
    for (name, arch, _) in FIXTURES {
        if arch.is_some() {
            continue;
        }
        check_calibrate(
            &fixture(&format!("timm/{name}.safetensors")),
            &fixture(&format!("timm/{name}_io.safetensors")),
            TOLERANCE,
        );
    }
}

/// The real-size families supported so far (the shape list holds them all).
const SUPPORTED: &[&str] = &[
    "resnet",
    "resnext",
    "seresne",
    "efficientnet_b",
    "tf_efficientnet_b",
    "mobilenetv3",
    "tf_mobilenetv3",
    "efficientnetv2",
    "tf_efficientnetv2",
    "regnetx",
    "regnety",
    "convnext",
    "mobilenetv2",
];

/// timm models of these families whose layout torchvision's structures do not have (more
/// blocks, other norms or activations, another stem or head): refused by detection or by the
/// build, not run wrong.
const REFUSED: &[&str] = &[
    "mobilenetv2_120d",
    "mobilenetv3_large_150d",
    "tf_mobilenetv3_large_minimal_100",
    "mobilenetv3_rw",
    "convnext_atto_ols",
    "convnext_atto_rms",
    "convnext_tiny_hnf",
    "convnext_large_mlp",
    "regnety_040_sgn",
];

/// timm's real-size models are recognised by timm's names, and build against their shapes with
/// every BN layer listed.
#[test]
fn real_size_timm_models_are_detected_by_name_issue_16() {
    let all = real_size_shapes("timm_shapes.json.gz");
    assert!(all.len() >= 8);
    for (name, shapes) in &all {
        if REFUSED.contains(&name.as_str()) {
            let built = detect(shapes, None).and_then(|c| {
                let backend = Box::new(ShapeOnlyBackend {
                    shapes: shapes.clone(),
                });
                Model::build(c, backend, &candle_core::Device::Cpu)
            });
            match built {
                Ok(m) => panic!("{name}: runs as {}", m.config),
                Err(e) => eprintln!("{name}: refused: {e:#}"),
            }
            continue;
        }
        if !SUPPORTED.iter().any(|f| name.starts_with(f)) {
            continue;
        }
        // A tf_ port is the plain variant until its name is given.
        let plain = name.strip_prefix("tf_").unwrap_or(name.as_str());
        let c = detect(shapes, None).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(c.name(), plain, "{name}");
        assert_eq!(c.num_classes(), 1000, "{name}");
        let c = detect(shapes, Some(name)).unwrap();
        assert_eq!(c.name(), *name);
        c.naming
            .check(shapes.keys().map(String::as_str))
            .unwrap_or_else(|e| panic!("{name}: naming not one-to-one: {e}"));
        let m = Model::build(
            c.clone(),
            Box::new(ShapeOnlyBackend {
                shapes: shapes.clone(),
            }),
            &candle_core::Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let want = shapes
            .keys()
            .filter(|k| k.ends_with(".running_mean"))
            .count();
        assert_eq!(m.bn_layers.len(), want, "{name}");
        // ConvNeXt has no BN before its pooling, for a head fine-tune to train.
        if want > 0 {
            let (head, _) = m.head().unwrap();
            assert!(shapes.contains_key(&format!("{}.weight", head.classifier)));
            assert!(shapes.contains_key(&format!("{}.running_mean", head.last_bn)));
        }
    }
}

/// timm's key list of each fixture (keys.json, written by the fixture script from the timm
/// model's `state_dict()`): what `load_state_dict(strict=True)` into the timm model requires.
fn timm_keys(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture("timm/keys.json")).unwrap();
    let all: std::collections::HashMap<String, Vec<String>> = serde_json::from_str(&text).unwrap();
    let mut keys = all[name].clone();
    keys.sort();
    keys
}

/// `swa` and `ema` of timm-named snapshots, with BN recomputed through the timm naming, write
/// exactly timm's keys (so the output loads strictly into the timm model), and the recomputed
/// statistics land under timm's names.
#[test]
fn swa_and_ema_of_timm_snapshots_keep_timm_names_issue_16() {
    let snaps = [
        p(&fixture("timm/efficientnet_tiny.safetensors")),
        p(&fixture("timm/tf_efficientnet_tiny.safetensors")),
    ];
    let want = timm_keys("efficientnet_tiny");
    assert_eq!(want, timm_keys("tf_efficientnet_tiny"));
    let data = p(&fixture("digits/train"));
    for cmd in [&["swa"][..], &["ema", "--decay", "0.9"][..]] {
        let d = TestDir::new();
        let mut args: Vec<&str> = cmd.to_vec();
        args.extend(snaps.iter().map(String::as_str));
        d.run(&[&args[..], &["-o", "plain.safetensors"]].concat())
            .ok();
        args.extend(["-o", "out.safetensors", "--recal-bn", &data]);
        args.extend(crate::eval::DIGITS);
        let r = d.run(&args).ok();
        assert!(r.stderr.contains("recomputed over"), "{}", r.stderr);
        let got = read_st(&d.path("out.safetensors"));
        assert_eq!(sorted_keys(&got), want, "{cmd:?}");
        assert_eq!(sorted_keys(&read_st(&d.path("plain.safetensors"))), want);
        // The statistics written back are the recomputed ones, under timm's key.
        let key = "blocks.1.0.bn2.running_var";
        let a = as_f64(&read_st(&d.path("plain.safetensors"))[key]);
        let g = as_f64(&got[key]);
        assert!(
            g.iter()
                .zip(&a)
                .any(|(x, y)| (x - y).abs() > 1e-3 * y.abs()),
            "{cmd:?}: {key} not recomputed"
        );
    }
}

/// The families of this issue with BN: `swa` of two snapshots with `--recal-bn` writes exactly
/// timm's keys with timm's shapes (`conv_head.weight` stays a [O, I, 1, 1] convolution, which
/// `load_state_dict(strict=True)` needs), and the recomputed statistics land under timm's names;
/// ConvNeXt (no BN) averages under its own keys and shapes (`gamma` stays [C]).
#[test]
fn swa_keeps_timm_keys_and_shapes_of_every_family_issue_16() {
    let data = p(&fixture("digits/train"));
    // (fixture, --arch, a BN statistic to see recomputed)
    let cases: &[(&str, Option<&str>, Option<&str>)] = &[
        ("mobilenetv3_tiny", None, Some("blocks.3.1.bn2.running_var")),
        (
            "tf_mobilenetv3_tiny",
            Some("tf_mobilenetv3"),
            Some("blocks.0.0.bn1.running_var"),
        ),
        (
            "efficientnetv2_tiny",
            None,
            Some("blocks.1.0.bn1.running_var"),
        ),
        (
            "regnety_tiny",
            None,
            Some("s2.b1.downsample.bn.running_var"),
        ),
        ("regnetx_tiny", None, Some("s1.b1.conv2.bn.running_var")),
        ("mobilenetv2_tiny", None, Some("blocks.2.1.bn3.running_var")),
        ("convnext_tiny", None, None),
        ("convnext_atto_tiny", None, None),
    ];
    for (name, arch, key) in cases {
        let d = TestDir::new();
        let model = fixture(&format!("timm/{name}.safetensors"));
        // Two snapshots (the same weights under two paths).
        std::fs::copy(&model, d.path("b.safetensors")).unwrap();
        let model = p(&model);
        let mut args = vec!["swa", &model, "b.safetensors", "-o", "out.safetensors"];
        if let Some(a) = arch {
            args.extend(["--arch", a]);
        }
        if key.is_some() {
            args.extend(["--recal-bn", &data]);
            args.extend(crate::eval::DIGITS);
        }
        let r = d.run(&args).ok();
        let got = read_st(&d.path("out.safetensors"));
        let input = read_st(&fixture(&format!("timm/{name}.safetensors")));
        assert_eq!(sorted_keys(&got), timm_keys(name), "{name}");
        for (k, t) in &input {
            assert_eq!(got[k].shape, t.shape, "{name}: {k}");
        }
        if let Some(key) = key {
            assert!(r.stderr.contains("recomputed over"), "{name}: {}", r.stderr);
            let (a, g) = (as_f64(&input[*key]), as_f64(&got[*key]));
            assert!(
                g.iter()
                    .zip(&a)
                    .any(|(x, y)| (x - y).abs() > 1e-3 * y.abs()),
                "{name}: {key} not recomputed"
            );
        }
    }
}

/// `fixres` on timm models: SE-ResNeXt (its squeeze-excite between the head BN and the sum is
/// part of the trained head) and MobileNetV3 (`conv_head` a 1x1 convolution) write exactly
/// timm's keys and shapes, with the head retrained.
#[test]
fn fixres_of_timm_models_keeps_timm_names_issue_16() {
    // (fixture, classes, trained tensors)
    let cases = [
        (
            "seresnext_tiny",
            6,
            ["fc.weight", "layer4.0.bn3.running_var"],
        ),
        (
            "mobilenetv3_tiny",
            5,
            ["classifier.weight", "blocks.6.0.bn1.running_var"],
        ),
    ];
    for (name, classes, trained) in cases {
        let d = TestDir::new();
        // The first `classes` digit folders, for a model with that many classes.
        for c in 0..classes {
            let from = fixture(&format!("digits/train/{c}"));
            let to = d.path(&format!("data/{c}"));
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        }
        let model = fixture(&format!("timm/{name}.safetensors"));
        let model_arg = p(&model);
        let mut args = vec![
            "fixres",
            &model_arg,
            "--data",
            "data",
            "-o",
            "out.safetensors",
        ];
        args.extend(["--size", "48", "--crop-pct", "1", "--epochs", "1"]);
        args.extend(["--mean", "0.5", "--std", "0.5"]);
        d.run(&args).ok();
        let got = read_st(&d.path("out.safetensors"));
        let input = read_st(&model);
        assert_eq!(sorted_keys(&got), timm_keys(name), "{name}");
        for (k, t) in &input {
            assert_eq!(got[k].shape, t.shape, "{name}: {k}");
        }
        for k in trained {
            assert_ne!(got[k].data, input[k].data, "{name}: {k} not trained");
        }
    }
}

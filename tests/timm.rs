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
];

/// The `tf_` port needs its TensorFlow "same" padding (and eps): run as the plain variant, as
/// without a name, its logits are far from timm's (the fixture script checks the padding alone
/// moves them by more than 1e-2), and the command says which variant it ran.
#[test]
fn tf_efficientnet_needs_same_padding_issue_16() {
    let model = fixture("timm/tf_efficientnet_tiny.safetensors");
    let io = fixture("timm/tf_efficientnet_tiny_io.safetensors");
    let plain = crate::util::logits_difference_arch(
        &model,
        &io,
        None,
        &[],
        &["running the plain variant", "--arch tf_efficientnet"],
    );
    let tf = crate::util::logits_difference_arch(&model, &io, Some("tf_efficientnet"), &[], &[]);
    eprintln!("tf_efficientnet_tiny: plain {plain:e}, tf {tf:e}");
    assert!(plain > 1e-2, "{plain:e}");
    assert!(tf < TOLERANCE, "{tf:e}");
}

fn logits_difference(name: &str, arch: Option<&str>, env: &[(&str, &str)], words: &[&str]) -> f64 {
    let model = fixture(&format!("timm/{name}.safetensors"));
    let io = fixture(&format!("timm/{name}_io.safetensors"));
    crate::util::logits_difference_arch(&model, &io, arch, env, words)
}

#[test]
fn timm_models_match_timm_on_both_kernels_issue_16() {
    for (name, arch, words) in FIXTURES {
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
];

/// timm's real-size models are recognised by timm's names, and build against their shapes with
/// every BN layer listed.
#[test]
fn real_size_timm_models_are_detected_by_name_issue_16() {
    let all = real_size_shapes("timm_shapes.json.gz");
    assert!(all.len() >= 8);
    for (name, shapes) in &all {
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
        let (head, _) = m.head().unwrap();
        assert!(shapes.contains_key(&format!("{}.weight", head.classifier)));
        assert!(shapes.contains_key(&format!("{}.running_mean", head.last_bn)));
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

//! Checkpoints as training code leaves them (issue 22): AveragedModel state dicts, torchvision's
//! references checkpoint, PyTorch Lightning (OmegaConf and pathlib objects inside) and DeepSpeed,
//! made by fixtures/make_trainer_fixtures.py around the tiny torchvision ResNet. Every command
//! reads each with no option beyond the path; outputs use the plain names, or with
//! `--keep-prefix` the wrapper's. Logits tolerance: 1e-4 of the largest logit, as in logits.rs
//! (measured: at most 3.5e-7).
//!
//! Strict loading of the swa outputs in PyTorch is checked by `make_trainer_fixtures.py
//! --check-ckpt`; here the outputs' names are compared with the state-dict keys PyTorch lists for
//! the plain model and for each wrapper (fixtures/trainer/expected.json).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::eval::{accuracy_reference, eval_json, DIGITS};
use crate::util::*;

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("trainer/expected.json")).unwrap())
        .unwrap()
}

fn key_set(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

fn layout(name: &str) -> PathBuf {
    fixture(&format!(
        "trainer/{}",
        expected()["layouts"][name].as_str().unwrap()
    ))
}

fn averaged_snapshots() -> Vec<String> {
    [2, 5, 10]
        .iter()
        .map(|e| p(&fixture(&format!("trainer/swa_model_epoch_{e}.pth"))))
        .collect()
}

fn lightning_snapshots() -> Vec<String> {
    expected()["lightning_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            p(&fixture(&format!(
                "trainer/lightning/{}",
                f.as_str().unwrap()
            )))
        })
        .collect()
}

fn worst_logit_difference(got: &T, want: &T) -> f64 {
    assert_eq!(got.shape, want.shape);
    let (g, w) = (as_f64(got), as_f64(want));
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
    g.iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// `logits` with no flags equals torchvision's logits of the model inside, for every layout,
/// and says how it found the weights.
#[test]
fn logits_of_each_trainer_layout_equal_torchvision_issue_22() {
    let refs = read_st(&fixture("trainer/expected_logits.safetensors"));
    let notes: [(&str, &[&str]); 4] = [
        (
            "swa_model_epoch_10",
            &[
                "removed the prefix 'module.'",
                "AveragedModel",
                "n_averaged = 4",
            ],
        ),
        (
            "tv_references_checkpoint",
            &["key 'model_ema'", "also present: model", "AveragedModel"],
        ),
        (
            "lightning",
            &[
                "PyTorch Lightning",
                "'model.'",
                "LightningModule's attribute",
            ],
        ),
        ("deepspeed", &["DeepSpeed", "key 'module'"]),
    ];
    for (name, words) in notes {
        let d = TestDir::new();
        let r = d
            .run(&[
                "logits",
                &p(&layout(name)),
                "--input",
                &p(&fixture("trainer/expected_logits.safetensors")),
                "-o",
                "out.safetensors",
            ])
            .ok();
        for w in words {
            assert!(
                r.stderr.contains(w),
                "{name}: expected {w:?} in\n{}",
                r.stderr
            );
        }
        let got = read_st(&d.path("out.safetensors"));
        let worst = worst_logit_difference(&got["logits"], &refs[&format!("logits.{name}")]);
        assert!(worst < 1e-4, "{name}: relative difference {worst:e}");
    }
}

/// The other forward commands read the same files: `eval` of the Lightning checkpoint (epoch 10's
/// weights) gives torchvision's accuracy of epoch 10, `sweep-res` reads DeepSpeed's file, and
/// `recal-bn` of torchvision's references checkpoint writes its EMA under the plain names.
#[test]
fn eval_sweep_res_and_recal_bn_read_trainer_layouts_issue_22() {
    let d = TestDir::new();
    let j = eval_json(&d, &p(&layout("lightning")));
    assert_eq!(j["top1"], accuracy_reference()["epoch_10"]["top1"]);

    let args = vec![
        "-q".to_string(),
        "sweep-res".into(),
        p(&layout("deepspeed")),
        "--data".into(),
        p(&fixture("digits/val")),
        "--sizes".into(),
        "32".into(),
        "--train-size".into(),
        "32".into(),
        "--crop-pct".into(),
        "1".into(),
        "--mean".into(),
        "0.5".into(),
        "--std".into(),
        "0.5".into(),
        "--json=sweep.json".into(),
    ];
    d.run(&args).ok();
    let sweep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path("sweep.json")).unwrap()).unwrap();
    assert_eq!(
        sweep[0]["top1"].as_f64().unwrap(),
        accuracy_reference()["epoch_10"]["top1"].as_f64().unwrap()
    );

    let mut args = vec![
        "-q".to_string(),
        "recal-bn".into(),
        p(&layout("tv_references_checkpoint")),
        "--data".into(),
        p(&fixture("digits/train")),
        "-o".into(),
        "recal.safetensors".into(),
    ];
    args.extend(DIGITS.iter().map(|s| s.to_string()));
    d.run(&args).ok();
    let out = read_st(&d.path("recal.safetensors"));
    assert_eq!(sorted_keys(&out), key_set(&expected()["plain_keys"]));
    let meta = read_metadata(&d.path("recal.safetensors"));
    assert_eq!(
        meta["ckpt.n_averaged"],
        r#"[{"file":"tv_references_checkpoint.pth","n_averaged":4}]"#
    );
}

/// The tensors of two outputs, matched by name once `prefix` is removed from `wrapped`'s names
/// (`n_averaged` aside), are byte-identical.
fn assert_same_but_prefix(plain: &HashMap<String, T>, wrapped: &HashMap<String, T>, prefix: &str) {
    let unwrapped: HashMap<String, T> = wrapped
        .iter()
        .filter(|(k, _)| k.as_str() != "n_averaged")
        .map(|(k, v)| (k.strip_prefix(prefix).unwrap().to_string(), v.clone()))
        .collect();
    assert_eq!(sorted_keys(&unwrapped), sorted_keys(plain));
    for (k, v) in plain {
        assert_eq!(&unwrapped[k], v, "{k}");
    }
}

/// `swa` over three AveragedModel snapshots writes torchvision's names, n_averaged of each input
/// in the metadata; with `--keep-prefix`, AveragedModel's names with `n_averaged` (the newest, as
/// `--int last` takes it), the same values.
#[test]
fn swa_of_averaged_model_snapshots_issue_22() {
    let d = TestDir::new();
    let mut args = vec!["swa".to_string()];
    args.extend(averaged_snapshots());
    let r = d
        .run(&[&args[..], &["-o".into(), "plain.safetensors".into()]].concat())
        .ok();
    assert!(r.stderr.contains("AveragedModel"), "{}", r.stderr);
    let plain = read_st(&d.path("plain.safetensors"));
    assert_eq!(sorted_keys(&plain), key_set(&expected()["plain_keys"]));
    assert_eq!(
        read_metadata(&d.path("plain.safetensors"))["ckpt.n_averaged"],
        r#"[{"file":"swa_model_epoch_2.pth","n_averaged":2},{"file":"swa_model_epoch_5.pth","n_averaged":3},{"file":"swa_model_epoch_10.pth","n_averaged":4}]"#
    );

    let keep = [
        &args[..],
        &[
            "-o".into(),
            "keep.safetensors".into(),
            "--keep-prefix".into(),
        ],
    ]
    .concat();
    d.run(&keep).ok();
    let wrapped = read_st(&d.path("keep.safetensors"));
    assert_eq!(
        sorted_keys(&wrapped),
        key_set(&expected()["averaged_model_keys"])
    );
    assert_eq!(as_i64(&wrapped["n_averaged"]), vec![4]);
    assert!(wrapped["n_averaged"].shape.is_empty());
    assert_same_but_prefix(&plain, &wrapped, "module.");
}

/// `swa` over three Lightning checkpoints writes exactly what it writes for the same epochs'
/// plain safetensors; with `--keep-prefix`, the LightningModule's names.
#[test]
fn swa_of_lightning_checkpoints_issue_22() {
    let d = TestDir::new();
    let mut args = vec!["swa".to_string()];
    args.extend(lightning_snapshots());
    let r = d
        .run(&[&args[..], &["-o".into(), "plain.safetensors".into()]].concat())
        .ok();
    assert!(
        r.stderr.contains("LightningModule's attribute"),
        "{}",
        r.stderr
    );
    let plain = read_st(&d.path("plain.safetensors"));
    assert_eq!(sorted_keys(&plain), key_set(&expected()["plain_keys"]));

    let mut same = vec!["swa".to_string()];
    same.extend([2, 5, 10].map(|e| p(&fixture(&format!("tiny/epoch_{e}.safetensors")))));
    same.extend(["-o".to_string(), "same.safetensors".into()]);
    d.run(&same).ok();
    assert_eq!(plain, read_st(&d.path("same.safetensors")));

    let keep = [
        &args[..],
        &[
            "-o".into(),
            "keep.safetensors".into(),
            "--keep-prefix".into(),
        ],
    ]
    .concat();
    d.run(&keep).ok();
    let wrapped = read_st(&d.path("keep.safetensors"));
    assert_eq!(
        sorted_keys(&wrapped),
        key_set(&expected()["lightning_keys"])
    );
    assert_same_but_prefix(&plain, &wrapped, "model.");
}

/// `inspect` says what it found: the trainer, the key, the prefix and why, n_averaged, and the
/// classes left unread.
#[test]
fn inspect_reports_trainer_layouts_issue_22() {
    let d = TestDir::new();
    let inspect = |path: PathBuf, extra: &[&str]| {
        let mut args = vec!["inspect".to_string(), "--json".into(), p(&path)];
        args.extend(extra.iter().map(|s| s.to_string()));
        d.run(&args).ok().json()
    };
    let j = inspect(layout("swa_model_epoch_10"), &[]);
    assert_eq!(j["n_averaged"], 4);
    assert_eq!(j["stripped_prefix"], "module.");
    assert_eq!(j["prefix_reasons"], serde_json::json!(["AveragedModel"]));
    assert_eq!(j["num_tensors"], 74);
    let j = inspect(layout("swa_model_epoch_10"), &["--keep-prefix"]);
    assert_eq!(j["n_averaged"], 4);
    assert_eq!(j["num_tensors"], 75);
    assert_eq!(j["arch_prefix"], "module.");

    let j = inspect(layout("tv_references_checkpoint"), &[]);
    assert_eq!(j["key"], "model_ema");
    assert_eq!(j["n_averaged"], 4);

    let j = inspect(layout("lightning"), &[]);
    assert_eq!(j["trainer"], "PyTorch Lightning 2.5.1");
    assert_eq!(j["key"], "state_dict");
    assert_eq!(j["stripped_prefix"], "model.");
    let placeholders: Vec<&str> = j["placeholders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for c in ["omegaconf.dictconfig.DictConfig", "pathlib.PosixPath"] {
        assert!(placeholders.contains(&c), "{placeholders:?}");
    }

    let j = inspect(layout("deepspeed"), &[]);
    assert_eq!(j["trainer"], "DeepSpeed 0.16.4");
    assert_eq!(j["key"], "module");
    assert_eq!(j["stripped_prefix"], serde_json::Value::Null);
}

/// A class whose construction would write a file (torch.load(weights_only=False) writes it; see
/// the fixture script) sits beside the state dict: it stays a placeholder, the weights load and
/// no file appears. Inside the state dict it is an error naming the entry and the class.
#[test]
fn placeholder_is_never_called_issue_22() {
    let e = expected();
    let written = e["side_effect_file"].as_str().unwrap();
    let class = e["side_effect_class"].as_str().unwrap();
    let d = TestDir::new();
    let j = d
        .run(&[
            "inspect",
            "--json",
            "--tensors",
            &p(&fixture("trainer/side_effect.pth")),
        ])
        .ok()
        .json();
    assert_eq!(j["placeholders"], serde_json::json!([class]));
    assert_eq!(j["tensors"][0]["name"], "fc.weight");
    assert_eq!(j["tensors"][0]["shape"], serde_json::json!([10, 64]));
    d.run(&[
        "inspect",
        "-q",
        &p(&fixture("trainer/side_effect_in_state_dict.pth")),
    ])
    .fails_with(&[
        "side_effect_in_state_dict.pth",
        "tensor fc.hook",
        class,
        "never constructed",
    ]);
    assert!(!d.path(written).exists());
    assert!(d.listing().is_empty(), "{:?}", d.listing());
}

/// A state dict saved from a wrapper module (`self.backbone = resnet`) as safetensors: forward
/// commands remove the shared `backbone.` because only without it do the names fit a family, say
/// so, and write plain names; with `--keep-prefix` the error names the prefix.
#[test]
fn forward_commands_remove_a_wrapper_prefix_that_makes_the_names_fit_issue_22() {
    let d = TestDir::new();
    let src = read_st(&fixture("tiny/epoch_10.safetensors"));
    let wrapped: Vec<(String, T)> = src
        .iter()
        .map(|(k, v)| (format!("backbone.{k}"), v.clone()))
        .collect();
    let tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = wrapped
        .iter()
        .map(|(k, v)| (k.as_str(), v.dtype, v.shape.clone(), v.data.clone()))
        .collect();
    write_st(&d.path("wrapped.safetensors"), &tensors);

    let io = fixture("zoo/tiny_resnet_io.safetensors");
    let r = d
        .run(&[
            "logits",
            "wrapped.safetensors",
            "--input",
            &p(&io),
            "-o",
            "logits.safetensors",
        ])
        .ok();
    assert!(
        r.stderr.contains(
            "removed the prefix 'backbone.' from every key (the names fit resnet without it)"
        ),
        "{}",
        r.stderr
    );
    let worst = worst_logit_difference(
        &read_st(&d.path("logits.safetensors"))["logits"],
        &read_st(&io)["logits"],
    );
    assert!(worst < 1e-4, "relative difference {worst:e}");

    let mut args = vec![
        "-q".to_string(),
        "recal-bn".into(),
        "wrapped.safetensors".into(),
        "--data".into(),
        p(&fixture("digits/train")),
        "-o".into(),
        "recal.safetensors".into(),
    ];
    args.extend(DIGITS.iter().map(|s| s.to_string()));
    d.run(&args).ok();
    assert_eq!(
        sorted_keys(&read_st(&d.path("recal.safetensors"))),
        sorted_keys(&src)
    );

    // Averaging keeps names it cannot tell to be a wrapper's.
    d.run(&["swa", "wrapped.safetensors", "-o", "swa.safetensors"])
        .ok();
    assert!(read_st(&d.path("swa.safetensors")).contains_key("backbone.conv1.weight"));

    d.run(&[
        "-q",
        "logits",
        "wrapped.safetensors",
        "--input",
        &p(&io),
        "-o",
        "kept.safetensors",
        "--keep-prefix",
    ])
    .fails_with(&[
        "wrapped.safetensors",
        "not a supported architecture",
        "without the prefix 'backbone.' the names fit resnet",
        "leave out --keep-prefix",
    ]);
}

/// A LightningModule with a weighted loss: `criterion.weight` beside `model.*`. No prefix is
/// shared, and the error says which one holds a model and what lies outside it.
#[test]
fn unsupported_architecture_error_names_the_prefix_that_would_fit_issue_22() {
    let d = TestDir::new();
    let src = read_st(&fixture("tiny/epoch_10.safetensors"));
    let mut named: Vec<(String, T)> = src
        .iter()
        .map(|(k, v)| (format!("model.{k}"), v.clone()))
        .collect();
    named.push(("criterion.weight".into(), src["fc.bias"].clone()));
    let tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(k, v)| (k.as_str(), v.dtype, v.shape.clone(), v.data.clone()))
        .collect();
    write_st(&d.path("lit.safetensors"), &tensors);
    d.run(&[
        "-q",
        "logits",
        "lit.safetensors",
        "--input",
        &p(&fixture("zoo/tiny_resnet_io.safetensors")),
        "-o",
        "out.safetensors",
    ])
    .fails_with(&[
        "lit.safetensors",
        "not a supported architecture",
        "the 74 tensors under 'model.' fit resnet",
        "1 are not under it (criterion.weight)",
    ]);
}

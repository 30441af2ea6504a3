//! Issue 16, Hugging Face / timm model folders: fixtures/hf (made by fixtures/make_hf_fixtures.py
//! with timm 1.0.31: a small timm `resnet18` trained on the digits, saved with `save_for_hf`, and
//! timm `train.py --model-ema` checkpoints of it). ckpt must take the folder's config.json as timm
//! does: its architecture and classes, and its `pretrained_cfg` as the data options no flag
//! gives.

use crate::util::*;

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("hf/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn folder(name: &str) -> String {
    p(&fixture(&format!("hf/{name}")))
}

fn val() -> String {
    p(&fixture("digits/val"))
}

/// timm's `state_dict()` of the folder's model: (key, shape), sorted by key.
fn timm_state_dict() -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = expected()["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let shape = e[1].as_array().unwrap();
            (
                e[0].as_str().unwrap().to_string(),
                shape.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect();
    v.sort();
    v
}

fn key_shapes(path: &std::path::Path) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = read_st(path)
        .into_iter()
        .map(|(k, t)| (k, t.shape))
        .collect();
    v.sort();
    v
}

/// `ckpt eval DIR` with no data flags evaluates as timm's `resolve_data_config({}, model)` +
/// `create_transform` does (input_size 40, bicubic, crop_pct 0.9, mean 0.5, std 0.25): the same
/// top-1 and top-5 within one image of 200 (PIL's and ckpt's bicubic differ by a level or two on
/// a few pixels). ckpt's own defaults (224, bilinear, ImageNet's mean) give something else. The
/// same for the folder saved as pytorch_model.bin, and explicit flags win.
#[test]
fn eval_of_a_model_folder_equals_timm_issue_16() {
    let want = &expected()["accuracy"];
    let one_image = 100.0 / want["images"].as_f64().unwrap() + 1e-9;
    for name in ["resnet18_digits", "resnet18_digits_bin"] {
        let d = TestDir::new();
        let r = d
            .run(&["eval", &folder(name), "--data", &val(), "--json"])
            .ok();
        assert!(
            r.stderr
                .contains("data options from pretrained_cfg: size 40 (input_size), crop_pct 0.9, interpolation bicubic"),
            "{}",
            r.stderr
        );
        assert_eq!(
            r.stderr.matches("pretrained_cfg").count(),
            1,
            "{}",
            r.stderr
        );
        let got = r.json();
        for k in ["top1", "top5"] {
            let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!((g - w).abs() <= one_image, "{name}: {k} {g}, timm {w}");
        }
        assert_eq!(got["size"], 40);
    }
    // Flags win, and say so: at timm's test size and crop the test numbers come out.
    let test = &expected()["test_accuracy"];
    let d = TestDir::new();
    let r = d
        .run(&[
            "eval",
            &folder("resnet18_digits"),
            "--data",
            &val(),
            "--size",
            "48",
            "--crop-pct",
            "1",
            "--json",
        ])
        .ok();
    assert!(
        r.stderr.contains("the flags given win: --size, --crop-pct"),
        "{}",
        r.stderr
    );
    let got = r.json();
    for k in ["top1", "top5"] {
        let (g, w) = (got[k].as_f64().unwrap(), test[k].as_f64().unwrap());
        assert!((g - w).abs() <= one_image, "test size: {k} {g}, timm {w}");
    }
}

/// `sweep-res DIR` sweeps around the folder's input_size (40) and includes its
/// test_input_size (48), with deltas against 40.
#[test]
fn sweep_res_of_a_model_folder_defaults_to_its_sizes_issue_16() {
    let d = TestDir::new();
    let r = d
        .run(&[
            "sweep-res",
            &folder("resnet18_digits"),
            "--data",
            &val(),
            "--json",
        ])
        .ok();
    let rows = r.json();
    let sizes: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["img_size"].as_u64().unwrap())
        .collect();
    assert!(sizes.contains(&40) && sizes.contains(&48), "{sizes:?}");
    assert!(sizes.iter().all(|&s| (30..=60).contains(&s)), "{sizes:?}");
    let at_40 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["img_size"] == 40)
        .unwrap();
    assert_eq!(at_40["delta_top1"], 0.0);
    assert_eq!(at_40["interpolation"], "bicubic");
    assert_eq!(at_40["top1"], expected()["accuracy"]["top1"]);
}

/// `swa` and `ema` of timm `train.py --model-ema` checkpoints (their `state_dict_ema`, picked by
/// default) and of model folders keep timm's names: the output's keys and shapes are exactly
/// those of the timm model's `state_dict()`, what `load_state_dict(strict=True)` requires.
/// (Averages of timm-named safetensors snapshots are tests/timm.rs's.)
#[test]
fn swa_and_ema_of_timm_training_checkpoints_and_folders_keep_timm_names_issue_16() {
    let want = timm_state_dict();
    let ckpts = [
        folder("train/checkpoint-1.pth.tar"),
        folder("train/checkpoint-2.pth.tar"),
    ];
    let folders = [folder("resnet18_digits"), folder("resnet18_digits_bin")];
    for inputs in [&ckpts, &folders] {
        for cmd in [&["swa"][..], &["ema", "--decay", "0.9"][..]] {
            let d = TestDir::new();
            let mut args: Vec<&str> = cmd.to_vec();
            args.extend(inputs.iter().map(String::as_str));
            args.extend(["-o", "out.safetensors"]);
            let r = d.run(&args).ok();
            if inputs == &ckpts {
                assert!(r.stderr.contains("state_dict_ema"), "{}", r.stderr);
            }
            assert_eq!(
                key_shapes(&d.path("out.safetensors")),
                want,
                "{cmd:?} {inputs:?}"
            );
        }
    }
    // With --recal-bn over the digits, the folder's preprocessing is used for the pass.
    let d = TestDir::new();
    let r = d
        .run(&[
            "swa",
            &folders[0],
            &folders[1],
            "-o",
            "out.safetensors",
            "--recal-bn",
            &p(&fixture("digits/train")),
        ])
        .ok();
    assert!(
        r.stderr
            .contains("data options from pretrained_cfg: size 40"),
        "{}",
        r.stderr
    );
    assert_eq!(key_shapes(&d.path("out.safetensors")), want);
}

/// `inspect DIR` shows the config beside what the weights say.
#[test]
fn inspect_shows_a_model_folder_config_issue_16() {
    let d = TestDir::new();
    let r = d.run(&["inspect", &folder("resnet18_digits")]).ok();
    assert!(
        r.stdout
            .contains("architecture resnet18, 10 classes, input_size 40x40, test_input_size 48x48"),
        "{}",
        r.stdout
    );
    let j = d
        .run(&["inspect", &folder("resnet18_digits"), "--json"])
        .ok()
        .json();
    assert_eq!(j["config"]["pretrained_cfg"]["interpolation"], "bicubic");
}

/// Copies the fixture folder's files into `dir` under `d`, with `config` as config.json.
fn folder_with(d: &TestDir, dir: &str, config: Option<&str>, weights: bool) -> String {
    let out = d.path(dir);
    std::fs::create_dir(&out).unwrap();
    if weights {
        std::fs::copy(
            fixture("hf/resnet18_digits/model.safetensors"),
            out.join("model.safetensors"),
        )
        .unwrap();
    }
    if let Some(c) = config {
        std::fs::write(out.join("config.json"), c).unwrap();
    }
    p(&out)
}

/// A bad config.json, a folder without weights, a config whose classes or architecture are not
/// the weights': one line naming the file.
#[test]
fn bad_model_folders_are_refused_by_name_issue_16() {
    let d = TestDir::new();
    let config = std::fs::read_to_string(fixture("hf/resnet18_digits/config.json")).unwrap();
    let eval = |dir: &str| d.run(&["eval", dir, "--data", &val()]);
    eval(&folder_with(
        &d,
        "broken",
        Some("{\"architecture\": "),
        true,
    ))
    .fails_with(&["broken", "config.json", "not valid JSON"]);
    eval(&folder_with(&d, "empty", Some(&config), false)).fails_with(&[
        "empty",
        "no weights",
        "pytorch_model.bin",
    ]);
    let classes = config.replace("\"num_classes\": 10", "\"num_classes\": 7");
    eval(&folder_with(&d, "classes", Some(&classes), true)).fails_with(&[
        "classes/config.json",
        "num_classes is 7",
        "10 classes",
    ]);
    let arch = config.replace(
        "\"architecture\": \"resnet18\"",
        "\"architecture\": \"vit_small_patch16_224\"",
    );
    eval(&folder_with(&d, "vit", Some(&arch), true)).fails_with(&[
        "vit/config.json",
        "vit_small_patch16_224",
        "not one ckpt runs",
    ]);
    let effnet = config.replace(
        "\"architecture\": \"resnet18\"",
        "\"architecture\": \"efficientnet_b0\"",
    );
    eval(&folder_with(&d, "effnet", Some(&effnet), true))
        .fails_with(&["effnet/config.json", "efficientnet_b0"]);
    let border = config.replace("\"crop_mode\": \"center\"", "\"crop_mode\": \"border\"");
    let dir = folder_with(&d, "border", Some(&border), true);
    eval(&dir).fails_with(&["border/config.json", "crop_mode \"border\"", "--crop-mode"]);
    d.run(&["eval", &dir, "--data", &val(), "--crop-mode", "center"])
        .ok();
    // An explicit --arch wins over the config's architecture.
    d.run(&[
        "eval",
        &folder_with(&d, "vit2", Some(&arch), true),
        "--data",
        &val(),
        "--arch",
        "resnet",
    ])
    .ok();
}

/// `-o DIR/` writes a model folder: the weights as model.safetensors (timm's keys and shapes)
/// and the input folder's config.json, byte for byte, so that the result is a model folder
/// again (ckpt evaluates it with the same preprocessing; timm loads it with `local-dir:`). A
/// write that fails leaves no folder behind.
#[test]
fn outputs_written_as_model_folders_carry_the_config_issue_16() {
    let config = std::fs::read(fixture("hf/resnet18_digits/config.json")).unwrap();
    let folders = [folder("resnet18_digits"), folder("resnet18_digits_bin")];
    let train = p(&fixture("digits/train"));
    let d = TestDir::new();
    d.run(&["swa", &folders[0], &folders[1], "-o", "swa/"]).ok();
    d.run(&[
        "ema",
        &folders[0],
        &folders[1],
        "--decay",
        "0.5",
        "-o",
        "ema/",
    ])
    .ok();
    d.run(&["recal-bn", &folders[0], "--data", &train, "-o", "recal/"])
        .ok();
    let (size, few) = (["--size", "40"], ["--max-images", "32"]);
    d.run(
        &[
            &["fixres", &folders[0], "--data", &train, "-o", "fixres/"][..],
            &size,
            &few,
        ]
        .concat(),
    )
    .ok();
    let distill = [
        "distill",
        &folders[0],
        "--teacher",
        &folders[1],
        "--data",
        &train,
        "-o",
        "distill/",
    ];
    d.run(&[&distill[..], &size, &few].concat()).ok();
    for out in ["swa", "ema", "recal", "fixres", "distill"] {
        assert_eq!(
            std::fs::read(d.path(out).join("config.json")).unwrap(),
            config,
            "{out}"
        );
        assert_eq!(
            key_shapes(&d.path(out).join("model.safetensors")),
            timm_state_dict()
        );
    }
    let r = d
        .run(&["eval", &p(&d.path("recal")), "--data", &val()])
        .ok();
    assert!(r.stderr.contains("size 40 (input_size)"), "{}", r.stderr);
    // An existing folder takes the files; existing files need --force.
    d.run(&["swa", &folders[0], &folders[1], "-o", "swa"])
        .fails_with(&["exists already", "--force"]);
    d.run(&["swa", &folders[0], &folders[1], "-o", "swa", "--force"])
        .ok();
    d.run_env(
        &["swa", &folders[0], &folders[1], "-o", "failed/"],
        &[("CKPT_TEST_FAIL_WRITE_AFTER", "2000")],
    )
    .fails_with(&["No space left"]);
    assert!(!d.path("failed").exists());
}

/// `soup` of model folders evaluates its candidates with the first one's preprocessing: the
/// same accuracy as timm's for a soup of one model saved twice.
#[test]
fn soup_of_model_folders_uses_their_preprocessing_issue_16() {
    let d = TestDir::new();
    let r = d
        .run(&[
            "soup",
            &folder("resnet18_digits"),
            &folder("resnet18_digits_bin"),
            "--data",
            &val(),
            "-o",
            "soup.safetensors",
        ])
        .ok();
    assert!(r.stderr.contains("size 40 (input_size)"), "{}", r.stderr);
    // As a model folder, with the first candidate's config.
    d.run(&[
        "soup",
        &folder("resnet18_digits"),
        &folder("resnet18_digits_bin"),
        "--data",
        &val(),
        "-o",
        "soup/",
    ])
    .ok();
    assert_eq!(
        std::fs::read(d.path("soup/config.json")).unwrap(),
        std::fs::read(fixture("hf/resnet18_digits/config.json")).unwrap()
    );
    assert_eq!(
        key_shapes(&d.path("soup/model.safetensors")),
        timm_state_dict()
    );
    assert!(r.stdout.contains("top-1 82.50 %"), "{}", r.stdout);
    d.run(&[
        "soup",
        &folder("resnet18_digits"),
        "--data",
        &val(),
        "-o",
        "soup/",
    ])
    // Written again into the same folder: its files need --force.
    .fails_with(&["soup/config.json", "exists already", "--force"]);
}

//! `ckpt eval` against torchvision's accuracy on the digits ImageFolder (same transform, made by
//! fixtures/make_fixtures.py).

use crate::util::*;

/// How the digits were fed to the model in training: 32 x 32, no crop, mean = std = 0.5.
pub const DIGITS: [&str; 8] = [
    "--size",
    "32",
    "--crop-pct",
    "1",
    "--mean",
    "0.5",
    "--std",
    "0.5",
];

pub fn accuracy_reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("expected/digits_accuracy.json")).unwrap(),
    )
    .unwrap()
}

pub fn eval_json(d: &TestDir, model: &str) -> serde_json::Value {
    let mut args = vec![
        "-q".to_string(),
        "eval".into(),
        model.to_string(),
        "--data".into(),
        p(&fixture("digits/val")),
        "--json".into(),
    ];
    args.extend(DIGITS.iter().map(|s| s.to_string()));
    d.run(&args).ok().json()
}

#[test]
fn top1_and_top5_equal_torchvision() {
    let d = TestDir::new();
    let want = accuracy_reference();
    for (model, key) in [
        ("tiny/epoch_10.safetensors", "epoch_10"),
        ("expected/swa_all.safetensors", "swa_before_recal"),
    ] {
        let j = eval_json(&d, &p(&fixture(model)));
        assert_eq!(j["images"], want[key]["images"], "{model}");
        assert_eq!(j["top1"], want[key]["top1"], "{model}");
        assert_eq!(j["top5"], want[key]["top5"], "{model}");
    }
}

#[test]
fn flat_folder_has_no_labels() {
    let d = TestDir::new();
    std::fs::create_dir(d.path("flat")).unwrap();
    let any = std::fs::read_dir(fixture("digits/val/3"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(any, d.path("flat/a.png")).unwrap();
    let mut args = vec!["-q", "eval"];
    let m = p(&fixture("tiny/epoch_10.safetensors"));
    args.extend([m.as_str(), "--data", "flat"]);
    args.extend(DIGITS);
    d.run(&args).fails_with(&["flat", "no labels"]);
}

/// A folder holding two of the digits model's ten classes under other names, as a user's subset
/// would: `digit_5/`, `digit_7/` (copies of digits/val/5 and 7), and the timm class map naming
/// all ten (`digit_0` .. `digit_9`, line = class).
fn two_class_subset(d: &TestDir) {
    for c in [5, 7] {
        let to = d.path(&format!("sub/digit_{c}"));
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(fixture(&format!("digits/val/{c}"))).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let map: Vec<String> = (0..10).map(|i| format!("digit_{i}")).collect();
    std::fs::write(d.path("map.txt"), map.join("\n") + "\n").unwrap();
}

fn run_with_digits(d: &TestDir, args: &[&str]) -> Run {
    let mut a: Vec<&str> = args.to_vec();
    a.extend(DIGITS);
    d.run(&a)
}

/// Logits rows (and labels) of a `ckpt logits --data` output by image path, the path's first
/// component (the class folder) given as `rename` maps it.
fn rows_by_image(
    path: &std::path::Path,
    rename: impl Fn(&str) -> String,
) -> std::collections::HashMap<String, (Vec<f64>, i64)> {
    let t = read_st(path);
    let meta = read_metadata(path);
    let images: Vec<String> = serde_json::from_str(&meta["ckpt.images"]).unwrap();
    let logits = as_f64(&t["logits"]);
    let labels = as_i64(&t["labels"]);
    let classes = t["logits"].shape[1];
    images
        .iter()
        .enumerate()
        .map(|(i, im)| {
            let (folder, file) = im.split_once('/').unwrap();
            (
                format!("{}/{file}", rename(folder)),
                (logits[i * classes..(i + 1) * classes].to_vec(), labels[i]),
            )
        })
        .collect()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

#[test]
fn class_map_subset_gives_the_full_folder_predictions_issue_23() {
    let d = TestDir::new();
    two_class_subset(&d);
    let m = p(&fixture("tiny/epoch_10.safetensors"));
    let val = p(&fixture("digits/val"));
    run_with_digits(
        &d,
        &["-q", "logits", &m, "--data", &val, "-o", "full.safetensors"],
    )
    .ok();
    let r = run_with_digits(
        &d,
        &[
            "logits",
            &m,
            "--data",
            "sub",
            "--class-map",
            "map.txt",
            "-o",
            "sub.safetensors",
        ],
    )
    .ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let full = rows_by_image(&d.path("full.safetensors"), str::to_string);
    let sub = rows_by_image(&d.path("sub.safetensors"), |f| {
        f.trim_start_matches("digit_").to_string()
    });
    assert_eq!(sub.len(), 40);
    // The full-folder run restricted to the subset's images: same labels (the model's 5 and 7),
    // same logits, same predictions.
    let (mut top1, mut top5) = (0, 0);
    for (image, (logits, label)) in &sub {
        let (want, want_label) = &full[image];
        assert_eq!(label, want_label, "{image}");
        assert_eq!(argmax(logits), argmax(want), "{image}");
        for (a, b) in logits.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{image}: {a} vs {b}"
            );
        }
        let rank = want.iter().filter(|&&x| x > want[*label as usize]).count();
        top1 += usize::from(rank < 1);
        top5 += usize::from(rank < 5);
    }
    // eval on the subset with the map: the accuracy of those images in the full-folder run.
    let r = run_with_digits(
        &d,
        &[
            "eval",
            &m,
            "--data",
            "sub",
            "--class-map",
            "map.txt",
            "--json",
        ],
    )
    .ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert!(
        r.stderr.contains("labels: --class-map map.txt"),
        "{}",
        r.stderr
    );
    let j = r.json();
    assert_eq!(j["images"], 40);
    assert_eq!(j["top1"].as_f64().unwrap(), 100.0 * top1 as f64 / 40.0);
    assert_eq!(j["top5"].as_f64().unwrap(), 100.0 * top5 as f64 / 40.0);
    assert_eq!(j["labelling"]["kind"], "class-map");
    assert_eq!(j["labelling"]["class_map"], "map.txt");
    assert!(j["top1"].as_f64().unwrap() > 90.0);
}

#[test]
fn subset_without_a_map_warns_before_any_work_issue_23() {
    let d = TestDir::new();
    two_class_subset(&d);
    let m = p(&fixture("tiny/epoch_10.safetensors"));
    // Even with -q: the results that follow are probably wrong.
    let r = run_with_digits(&d, &["-q", "eval", &m, "--data", "sub", "--json"]).ok();
    let warning = r.stderr.lines().next().unwrap_or("");
    assert!(
        warning.starts_with("warning: sub has 2 class folders (digit_5, digit_7)")
            && warning.contains("outputs 10 classes")
            && warning.contains("--class-map FILE"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert_eq!(r.json()["labelling"]["kind"], "folder-order");
    assert!(r.json()["labelling"]["warning"].is_string());
    run_with_digits(&d, &["-q", "eval", &m, "--data", "sub", "--strict-labels"]).fails_with(&[
        "--strict-labels",
        "sub has 2 class folders",
        "--class-map",
    ]);
    // The full folder, whose classes are the model's: no warning.
    let r = run_with_digits(&d, &["eval", &m, "--data", &p(&fixture("digits/val"))]).ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("labels: 10 class folders in sorted order"),
        "{}",
        r.stderr
    );
}

#[test]
fn class_map_errors_name_the_map_or_the_folders_issue_23() {
    let d = TestDir::new();
    two_class_subset(&d);
    let m = p(&fixture("tiny/epoch_10.safetensors"));
    let eval =
        |map: &str| run_with_digits(&d, &["-q", "eval", &m, "--data", "sub", "--class-map", map]);
    eval("nope.txt").fails_with(&["--class-map nope.txt", "cannot read"]);
    std::fs::write(d.path("other.txt"), "cat\ndog\n").unwrap();
    eval("other.txt").fails_with(&["sub", "none of its 2 class folders", "digit_5, digit_7"]);
    std::fs::write(d.path("twice.txt"), "digit_5\ndigit_7\ndigit_5\n").unwrap();
    eval("twice.txt").fails_with(&["twice.txt", "line 3", "digit_5", "line 1"]);
    let eleven: Vec<String> = (0..11).map(|i| format!("digit_{i}")).collect();
    std::fs::write(d.path("eleven.txt"), eleven.join("\n")).unwrap();
    eval("eleven.txt").fails_with(&["eleven.txt", "11 classes", "outputs 10"]);
    // A folder the map does not name: left out, with a warning naming it; an error if strict.
    std::fs::write(d.path("five.txt"), "\n\n\n\n\ndigit_5\n").unwrap();
    let r = eval("five.txt").ok();
    assert!(
        r.stderr.contains("1 of 2 class folders not in --class-map five.txt (digit_7): their 20 images are left out"),
        "{}",
        r.stderr
    );
    run_with_digits(
        &d,
        &[
            "-q",
            "eval",
            &m,
            "--data",
            "sub",
            "--class-map",
            "five.txt",
            "--strict-labels",
            "--json",
        ],
    )
    .fails_with(&["--strict-labels", "digit_7"]);
}

#[test]
fn synset_folders_take_the_imagenet_order_issue_23() {
    // fixtures/synsets: a 1000-class model (the digits model, digit k as Imagenette's k-th
    // synset) and three synset-named folders of digits; timm with class_map=imagenet_synsets.txt
    // measured the accuracy (fixtures/make_synset_fixtures.py).
    let d = TestDir::new();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("synsets/expected.json")).unwrap())
            .unwrap();
    let m = p(&fixture("synsets/resnet_in1k.safetensors"));
    let r = run_with_digits(
        &d,
        &["eval", &m, "--data", &p(&fixture("synsets/val")), "--json"],
    )
    .ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("labels: ImageNet-1k synset order").count(),
        1,
        "said once: {}",
        r.stderr
    );
    let j = r.json();
    let w = &want["resnet_in1k_on_val"];
    assert_eq!(
        (&j["images"], &j["top1"], &j["top5"]),
        (&w["images"], &w["top1"], &w["top5"])
    );
    assert_eq!(j["labelling"]["kind"], "imagenet-1k-synsets");
    // The folder order would have been wrong: a class map giving it says so.
    std::fs::write(
        d.path("folder_order.txt"),
        "n02102040\nn03425413\nn03888605\n",
    )
    .unwrap();
    let r = run_with_digits(
        &d,
        &[
            "-q",
            "eval",
            &m,
            "--data",
            &p(&fixture("synsets/val")),
            "--class-map",
            "folder_order.txt",
            "--json",
        ],
    )
    .ok();
    assert!(r.json()["top1"].as_f64().unwrap() < 10.0, "{}", r.stdout);
}

#[test]
fn a_wrong_synset_name_is_named_issue_23() {
    let d = TestDir::new();
    let m = p(&fixture("synsets/resnet_in1k.safetensors"));
    for (from, to) in [
        ("n02102040", "n02102040"),
        ("n03425413", "n03425413"),
        ("n03888605", "n03888615"),
    ] {
        let dir = d.path(&format!("val/{to}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(fixture(&format!("synsets/val/{from}"))).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    run_with_digits(&d, &["-q", "eval", &m, "--data", "val", "--strict-labels"]).fails_with(&[
        "--strict-labels",
        "n03888615",
        "not in the ImageNet-1k synsets",
    ]);
    let r = run_with_digits(&d, &["-q", "eval", &m, "--data", "val", "--json"]).ok();
    assert!(
        r.stderr.starts_with(
            "warning: val: 1 of 3 class folders not in the ImageNet-1k synsets (n03888615)"
        ),
        "{}",
        r.stderr
    );
    assert_eq!(r.json()["images"], 40);
    assert_eq!(r.json()["labelling"]["unmapped_folders"][0], "n03888615");
}

/// `eval --teacher`: the KD loss and top-1 agreement equal what the two models' `ckpt logits`
/// over the same folder give (KLSoftLoss written out here, in f64); a model against itself
/// agrees everywhere with a KD loss of 0.
#[test]
fn eval_against_a_teacher_reports_kd_loss_and_agreement_issue_19() {
    let d = TestDir::new();
    let val = p(&fixture("digits/val"));
    let (student, teacher) = (
        p(&fixture("tiny/epoch_1.safetensors")),
        p(&fixture("tiny/epoch_10.safetensors")),
    );
    let eval = |t: &str| -> serde_json::Value {
        let mut args = vec!["eval", &student, "--data", &val, "--teacher", t, "--json"];
        args.extend(DIGITS);
        d.run(&args).ok().json()
    };
    let logits = |m: &str, out: &str| -> Vec<f64> {
        let mut args = vec!["-q", "logits", m, "--data", &val, "-o", out];
        args.extend(DIGITS);
        d.run(&args).ok();
        as_f64(&read_st(&d.path(out))["logits"])
    };
    let (s, t) = (
        logits(&student, "s.safetensors"),
        logits(&teacher, "t.safetensors"),
    );
    let classes = 10;
    let temp = 5.0;
    let log_softmax = |r: &[f64]| {
        let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        // log softmax(r / T) = (r - m) / T - log(sum(exp((r - m) / T)))
        let lse = r.iter().map(|x| ((x - m) / temp).exp()).sum::<f64>().ln();
        r.iter().map(|x| (x - m) / temp - lse).collect::<Vec<_>>()
    };
    let (mut kl, mut agree) = (0.0, 0usize);
    let argmax = |r: &[f64]| (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b });
    for (rs, rt) in s.chunks(classes).zip(t.chunks(classes)) {
        let (ls, lt) = (log_softmax(rs), log_softmax(rt));
        kl += lt
            .iter()
            .zip(&ls)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        agree += (argmax(rs) == argmax(rt)) as usize;
    }
    let n = (s.len() / classes) as f64;
    let (want_kd, want_agree) = (kl / n * temp * temp, 100.0 * agree as f64 / n);
    let got = eval(&teacher);
    let kd = got["kd_loss"].as_f64().unwrap();
    assert!(kd > 0.01, "{got}");
    assert!(
        (kd - want_kd).abs() <= 1e-5 * want_kd,
        "KD {kd} vs {want_kd}"
    );
    assert_eq!(got["teacher_agreement"].as_f64().unwrap(), want_agree);
    assert!(want_agree < 100.0);
    let itself = eval(&student);
    assert!(itself["kd_loss"].as_f64().unwrap().abs() < 1e-9, "{itself}");
    assert_eq!(itself["teacher_agreement"].as_f64().unwrap(), 100.0);
    // A teacher of other classes is refused in one line.
    let mut args = vec!["eval", &student, "--data", &val, "--teacher"];
    let vgg = p(&fixture("zoo2/vgg_tiny.safetensors"));
    args.push(&vgg);
    args.extend(DIGITS);
    d.run(&args)
        .fails_with(&["vgg_tiny.safetensors", "classes"]);
}

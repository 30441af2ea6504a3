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

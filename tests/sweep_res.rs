//! `ckpt sweep-res` against torchvision's accuracy at several test sizes and crop fractions
//! (fixtures/expected/digits_sweep.json), and its outputs.

use crate::util::*;

const NORM: [&str; 4] = ["--mean", "0.5", "--std", "0.5"];

fn sweep(d: &TestDir, models: &[&str], extra: &[&str]) -> Run {
    let mut args = vec!["sweep-res".to_string()];
    args.extend(models.iter().map(|m| p(&fixture(m))));
    args.extend(["--data", &p(&fixture("digits/val")), "--train-size", "32"].map(String::from));
    args.extend(NORM.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    d.run(&args)
}

#[test]
fn accuracy_at_each_size_equals_torchvision_within_one_image() {
    let d = TestDir::new();
    sweep(
        &d,
        &["tiny/epoch_10.safetensors", "expected/swa_all.safetensors"],
        &[
            "--sizes",
            "24,32,40,48",
            "--crop-pct",
            "1.0,0.875",
            "--json=r.json",
        ],
    )
    .ok();
    let got: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.path("r.json")).unwrap()).unwrap();
    let want: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture("expected/digits_sweep.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(got.len(), want.len());
    let mut differing = 0;
    for w in &want {
        let g = got
            .iter()
            .find(|g| {
                g["model"] == w["model"]
                    && g["img_size"] == w["img_size"]
                    && g["crop_pct"] == w["crop_pct"]
            })
            .unwrap_or_else(|| panic!("no row for {w}"));
        assert_eq!(g["resize"], w["resize"], "{w}");
        assert_eq!(g["images"], w["images"]);
        // One image of 200 is 0.5 points; upscaling resamples differ from PIL's by a level
        // here and there, which can tip a borderline image.
        for k in ["top1", "top5"] {
            let diff = (g[k].as_f64().unwrap() - w[k].as_f64().unwrap()).abs();
            assert!(diff <= 0.5 + 1e-9, "{k} {g} vs {w}");
            differing += usize::from(diff > 0.0);
        }
    }
    assert!(differing <= 4, "{differing} points differ by one image");
    // The best size per model is marked, and it is the training size for this model.
    let best: Vec<&serde_json::Value> = got.iter().filter(|g| g["best"] == true).collect();
    assert_eq!(best.len(), 2);
    assert!(best.iter().all(|b| b["img_size"] == 32));
}

#[test]
fn csv_json_and_plot_outputs() {
    let d = TestDir::new();
    let r = sweep(
        &d,
        &["tiny/epoch_10.safetensors"],
        &[
            "--sizes",
            "24,32,40",
            "--csv",
            "r.csv",
            "--plot",
            "r.png",
            "--json=r.json",
        ],
    )
    .ok();
    assert!(r.stdout.contains("* best"), "{}", r.stdout);
    let csv = std::fs::read_to_string(d.path("r.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "model,img_size,top1,top1_err,top5,top5_err,param_count,crop_pct,interpolation"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        assert_eq!(row.len(), 9);
        let (top1, err): (f64, f64) = (row[2].parse().unwrap(), row[3].parse().unwrap());
        assert!((top1 + err - 100.0).abs() < 1e-6);
        assert_eq!(row[8], "bilinear");
    }
    let img = image::open(d.path("r.png")).unwrap();
    assert_eq!((img.width(), img.height()), (800, 500));
    // A real plot: several colours of line on white.
    let rgb = img.to_rgb8();
    let coloured = rgb
        .pixels()
        .filter(|p| p[0] != p[1] || p[1] != p[2])
        .count();
    assert!(coloured > 500, "{coloured} coloured pixels");
    sweep(
        &d,
        &["tiny/epoch_10.safetensors"],
        &["-q", "--sizes", "32", "--plot", "r.svg"],
    )
    .ok();
    assert!(std::fs::read_to_string(d.path("r.svg"))
        .unwrap()
        .contains("<svg"));
    // Existing outputs are not replaced without --force.
    sweep(
        &d,
        &["tiny/epoch_10.safetensors"],
        &["-q", "--sizes", "32", "--csv", "r.csv"],
    )
    .fails_with(&["r.csv", "exists already"]);
}

#[test]
fn recal_at_a_size_equals_recal_bn_at_that_size() {
    let d = TestDir::new();
    let train = p(&fixture("digits/train"));
    let r = sweep(
        &d,
        &["expected/swa_all.safetensors"],
        &[
            "--sizes",
            "32,40",
            "--crop-pct",
            "1",
            "--recal-bn",
            &train,
            "--save-best",
            "best.safetensors",
            "--json=r.json",
        ],
    )
    .ok();
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(d.path("r.json")).unwrap()).unwrap();
    let best = rows.iter().find(|r| r["best"] == true).unwrap();
    let size = best["img_size"].to_string();
    assert!(rows.iter().all(|r| r["recal_bn"] == true), "{}", r.stdout);
    let mut args = vec![
        "-q".to_string(),
        "recal-bn".into(),
        p(&fixture("expected/swa_all.safetensors")),
        "--data".into(),
        train.clone(),
        "--size".into(),
        size,
        "--crop-pct".into(),
        "1".into(),
        "-o".into(),
        "direct.safetensors".into(),
    ];
    args.extend(NORM.iter().map(|s| s.to_string()));
    d.run(&args).ok();
    let (a, b) = (
        read_st(&d.path("best.safetensors")),
        read_st(&d.path("direct.safetensors")),
    );
    assert_eq!(sorted_keys(&a), sorted_keys(&b));
    for (k, t) in &a {
        assert_eq!(
            t, &b[k],
            "{k}: the sweep's statistics at the best size are recal-bn's"
        );
    }
}

#[test]
fn class_map_labels_a_subset_as_eval_does_issue_23() {
    let d = TestDir::new();
    let to = d.path("sub/digit_7");
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(fixture("digits/val/7")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(d.path("map.txt"), "\n\n\n\n\n\n\ndigit_7\n").unwrap();
    let m = p(&fixture("tiny/epoch_10.safetensors"));
    let common = ["--data", "sub", "--class-map", "map.txt", "--crop-pct", "1"];
    let mut args = vec![
        "sweep-res",
        &m,
        "--train-size",
        "32",
        "--sizes",
        "32",
        "--json=r.json",
    ];
    args.extend(common);
    args.extend(NORM);
    let r = d.run(&args).ok();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let rows: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path("r.json")).unwrap()).unwrap();
    let mut args = vec!["-q", "eval", &m, "--size", "32", "--json"];
    args.extend(common);
    args.extend(NORM);
    let e = d.run(&args).ok().json();
    assert_eq!(rows[0]["top1"], e["top1"]);
    assert_eq!(rows[0]["images"], 20);
    assert_eq!(rows[0]["labelling"], "class-map");
    assert!(e["top1"].as_f64().unwrap() > 90.0);
}

/// Issue 14: `--json` is a flag (JSON on stdout) or `--json=FILE` for every command; the old
/// `sweep-res --json FILE` spelling gets a pointer to the new one instead of a bare "cannot open".
#[test]
fn json_file_needs_an_equals_sign_issue_14() {
    let d = TestDir::new();
    sweep(
        &d,
        &["tiny/epoch_10.safetensors"],
        &["--sizes", "32", "--json", "r.json"],
    )
    .fails_with(&["r.json: no such checkpoint", "--json=r.json"]);
    let r = sweep(
        &d,
        &["tiny/epoch_10.safetensors"],
        &["--sizes", "32", "--json"],
    )
    .ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!d.path("r.json").exists());
}

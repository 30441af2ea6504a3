//! `ckpt soup` against the PyTorch reference of fixtures/make_soup_fixtures.py: six candidates
//! (the four snapshots and two fine-tunes of the last one), each candidate and each soup given
//! `update_bn` statistics over digits/train, judged on digits/val, everything at 28 px.
//!
//! Tolerances: the written weights are the f64 average rounded once to f32 in both, so within
//! 1e-6 relative (measured: identical); BN statistics as in tests/recal_bn.rs (1e-4 relative
//! plus 1e-6 of the tensor's largest entry: f32 batch statistics in both); top-1 within one
//! image (0.5 %) of PyTorch's, and the same choices.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::util::*;

/// The evaluation and recalibration transform of the reference (see make_soup_fixtures.py).
const AT_28: [&str; 8] = [
    "--size",
    "28",
    "--crop-pct",
    "1",
    "--mean",
    "0.5",
    "--std",
    "0.5",
];

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("soup/reference.json")).unwrap()).unwrap()
}

fn candidates() -> Vec<PathBuf> {
    reference()["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| fixture(c.as_str().unwrap()))
        .collect()
}

/// `ckpt soup` of the six candidates in the reference's order, recalibrated as update_bn does,
/// with the JSON record in `json`.
fn soup(d: &TestDir, out: &str, extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec!["soup".into()];
    args.extend(candidates().iter().map(|c| p(c)));
    args.extend(
        [
            "--no-sort",
            "--data",
            &p(&fixture("digits/val")),
            "--recal-bn",
            &p(&fixture("digits/train")),
            "--estimator",
            "torch",
            "-o",
            out,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(AT_28.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    d.run(&args)
}

fn record(d: &TestDir, json: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(d.path(json)).unwrap()).unwrap()
}

/// Candidate paths of the reference's indices.
fn names(indices: &serde_json::Value) -> Vec<String> {
    let c = candidates();
    indices
        .as_array()
        .unwrap()
        .iter()
        .map(|i| p(&c[i.as_u64().unwrap() as usize]))
        .collect()
}

fn assert_top1_close(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    let (g, w) = (
        got["top1"].as_f64().unwrap(),
        want["top1"].as_f64().unwrap(),
    );
    assert!(
        (g - w).abs() <= 0.5 + 1e-9,
        "{what}: top-1 {g} vs PyTorch's {w}"
    );
    let (g, w) = (
        got["loss"].as_f64().unwrap(),
        want["loss"].as_f64().unwrap(),
    );
    assert!(
        (g - w).abs() <= 1e-3 * w.abs().max(1e-3),
        "{what}: loss {g} vs PyTorch's {w}"
    );
}

/// The written soup against PyTorch's: weights within 1e-6 relative, BN statistics within
/// 1e-4, num_batches_tracked as update_bn leaves it (4 batches of 64 over 200 images).
fn assert_state_close(got: &HashMap<String, T>, want: &HashMap<String, T>) {
    assert_eq!(sorted_keys(got), sorted_keys(want));
    for (k, w) in want {
        let g = &got[k];
        if k.ends_with(".num_batches_tracked") {
            assert_eq!(as_i64(g), vec![4], "{k}");
            continue;
        }
        let (gv, wv) = (as_f64(g), as_f64(w));
        let scale = wv.iter().fold(0f64, |m, x| m.max(x.abs()));
        let stat = k.ends_with(".running_mean") || k.ends_with(".running_var");
        for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
            let tol = if stat {
                1e-4 * b.abs() + 1e-6 * scale
            } else {
                1e-6 * b.abs()
            };
            assert!((a - b).abs() <= tol, "{k}[{i}]: {a} vs PyTorch's {b}");
        }
    }
}

/// Runs one method and holds it to the reference: same choices, step by step; scores within
/// one image; the written tensors.
fn held_to_reference(method: &str, reference_name: &str, extra: &[&str]) -> (TestDir, Run) {
    let d = TestDir::new();
    let mut args = vec!["--method", method, "--json=soup.json"];
    args.extend_from_slice(extra);
    let run = soup(&d, "soup.safetensors", &args).ok();
    let got = record(&d, "soup.json");
    let want = &reference()["methods"][reference_name];
    assert_eq!(
        got["chosen"].as_array().unwrap().len(),
        want["chosen"].as_array().unwrap().len()
    );
    let chosen: Vec<String> = got["chosen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(chosen, names(&want["chosen"]), "{method}: the ingredients");
    let steps = got["steps"].as_array().unwrap();
    let want_steps = want["steps"].as_array().unwrap();
    assert_eq!(steps.len(), want_steps.len());
    let c = candidates();
    for (g, w) in steps.iter().zip(want_steps) {
        let cand = p(&c[w["candidate"].as_u64().unwrap() as usize]);
        let what = format!("{method} step {}", w["step"]);
        assert_eq!(g["candidate"].as_str().unwrap(), cand, "{what}: rank order");
        assert_eq!(g["kept"], w["kept"], "{what}: kept");
        assert_top1_close(&g["own"], &w["own"], &format!("{what}: {cand} alone"));
        match (&g["soup"], &w["soup"]) {
            (serde_json::Value::Null, serde_json::Value::Null) => {}
            (gs, ws) => assert_top1_close(gs, ws, &format!("{what}: the soup")),
        }
    }
    assert_top1_close(
        &got["result"],
        &want["result"],
        &format!("{method}: result"),
    );
    let written = read_st(&d.path("soup.safetensors"));
    let reference = read_st(&fixture(&format!("soup/{reference_name}.safetensors")));
    assert_state_close(&written, &reference);
    let meta = read_metadata(&d.path("soup.safetensors"));
    assert_eq!(meta["ckpt.method"], format!("soup-{method}"));
    let meta_chosen: Vec<String> = serde_json::from_str(&meta["ckpt.soup.chosen"]).unwrap();
    assert_eq!(meta_chosen, chosen);
    assert_eq!(meta["ckpt.recal.estimator"], "torch");
    assert!(
        meta.contains_key("ckpt.weights") && meta.contains_key("ckpt.inputs"),
        "{meta:?}"
    );
    (d, run)
}

#[test]
fn greedy_soup_chooses_as_pytorch() {
    let (d, run) = held_to_reference("greedy", "greedy", &[]);
    // The table: one row per candidate in rank order, kept or not.
    assert!(run.stdout.contains("soup top-1"), "{}", run.dump());
    assert_eq!(
        run.stdout.lines().filter(|l| l.ends_with(" no")).count(),
        3,
        "{}",
        run.dump()
    );
    // Each image was decoded once for the 11 evaluations: 200 of val, 200 of train.
    let rec = record(&d, "soup.json");
    assert_eq!(rec["evaluations"], 11);
    assert_eq!(rec["decoded_images"], 400, "{rec}");
    assert_eq!(rec["cached"]["val"], true);
}

#[test]
fn greedy_soup_by_loss_chooses_as_pytorch() {
    held_to_reference("greedy", "greedy_loss", &["--metric", "loss"]);
}

#[test]
fn best_candidate_as_pytorch() {
    held_to_reference("best", "best", &[]);
}

#[test]
fn uniform_soup_as_pytorch() {
    let (_, run) = held_to_reference("uniform", "uniform", &[]);
    assert!(
        run.stdout.contains("uniform soup of all 6"),
        "{}",
        run.dump()
    );
}

/// Without room to hold the images, every evaluation decodes them again, says so, and gives
/// the same soup.
#[test]
fn without_the_cache_images_are_decoded_per_evaluation_with_the_same_result() {
    let d = TestDir::new();
    soup(
        &d,
        "held.safetensors",
        &["--method", "best", "--json=held.json"],
    )
    .ok();
    let r = soup(
        &d,
        "streamed.safetensors",
        &[
            "--method",
            "best",
            "--cache-mb",
            "0",
            "--json=streamed.json",
        ],
    )
    .ok();
    assert!(
        r.stderr
            .contains("decoding them again for each of 6 evaluations"),
        "{}",
        r.dump()
    );
    let (held, streamed) = (record(&d, "held.json"), record(&d, "streamed.json"));
    assert_eq!(held["decoded_images"], 400);
    assert_eq!(streamed["decoded_images"], 6 * 400, "{streamed}");
    assert_eq!(streamed["cached"]["val"], false);
    assert_eq!(held["steps"], streamed["steps"]);
    let (a, b) = (
        read_st(&d.path("held.safetensors")),
        read_st(&d.path("streamed.safetensors")),
    );
    assert_eq!(sorted_keys(&a), sorted_keys(&b));
    for (k, t) in &a {
        assert_eq!(t, &b[k], "{k}");
    }
}

/// The written soup is `swa` of its ingredients, byte for byte, before recalibration.
#[test]
fn soup_without_recalibration_is_the_swa_of_its_ingredients_and_warns() {
    let d = TestDir::new();
    let c = candidates();
    let mut args: Vec<String> = vec!["soup".into(), "--method".into(), "uniform".into()];
    args.extend(c[2..].iter().map(|x| p(x)));
    args.extend([
        "--data".into(),
        p(&fixture("digits/val")),
        "-o".into(),
        "soup.safetensors".into(),
    ]);
    args.extend(AT_28.iter().map(|s| s.to_string()));
    let r = d.run(&args).ok();
    assert!(
        r.stderr
            .contains("warning: the model has BatchNorm layers and no --recal-bn"),
        "{}",
        r.dump()
    );
    let mut swa: Vec<String> = vec!["swa".into(), "--no-sort".into()];
    swa.extend(c[2..].iter().map(|x| p(x)));
    swa.extend(["-o".into(), "swa.safetensors".into()]);
    d.run(&swa).ok();
    let (a, b) = (
        read_st(&d.path("soup.safetensors")),
        read_st(&d.path("swa.safetensors")),
    );
    assert_eq!(sorted_keys(&a), sorted_keys(&b));
    for (k, t) in &a {
        assert_eq!(t, &b[k], "{k}");
    }
}

#[test]
fn bad_soups_fail_in_one_line_and_write_nothing() {
    let d = TestDir::new();
    let c = candidates();
    let val = p(&fixture("digits/val"));
    // Candidates of different architectures.
    let other = p(&fixture("zoo2/vgg_tiny.safetensors"));
    d.run(&[
        "-q",
        "soup",
        &p(&c[0]),
        &other,
        "--data",
        &val,
        "-o",
        "x.safetensors",
    ])
    .fails_with(&["vgg_tiny.safetensors"]);
    // A flat folder has no labels.
    let flat = d.path("flat");
    std::fs::create_dir(&flat).unwrap();
    std::fs::copy(
        fixture("digits/val/0")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        flat.join("a.png"),
    )
    .unwrap();
    d.run(&[
        "-q",
        "soup",
        &p(&c[0]),
        &p(&c[1]),
        "--data",
        &p(&flat),
        "-o",
        "x.safetensors",
    ])
    .fails_with(&["flat folder has no labels"]);
    // A model without BatchNorm has nothing to recalibrate.
    let conv = fixture("zoo2/convnext_tiny_tiny.safetensors");
    let copies = d.copy_in(std::slice::from_ref(&conv));
    let second = d.path("convnext_b.safetensors");
    std::fs::copy(&conv, &second).unwrap();
    d.run(&[
        "-q",
        "soup",
        &p(&copies[0]),
        &p(&second),
        "--data",
        &val,
        "--recal-bn",
        &val,
        "-o",
        "x.safetensors",
    ])
    .fails_with(&["no BatchNorm layers", "--recal-bn"]);
    // The output may not replace a candidate.
    let mine = d.copy_in(&c[..2]);
    d.run(&[
        "-q",
        "soup",
        &p(&mine[0]),
        &p(&mine[1]),
        "--data",
        &val,
        "-o",
        &p(&mine[1]),
    ])
    .fails_with(&["epoch_2.safetensors"]);
    assert!(!d.path("x.safetensors").exists());
}

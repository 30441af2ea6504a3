//! `ckpt recal-bn` against torch.optim.swa_utils.update_bn and fvcore-style population
//! statistics, computed by fixtures/make_fixtures.py for the SWA of the four snapshots over
//! digits/train (eval transform, batch 64, no shuffle, whole folder).
//!
//! Tolerance: |ckpt - torch| <= 1e-4 |torch| + 1e-6 max|torch tensor|. Batch statistics are f32
//! in both (PyTorch's BN kernel and ours), so a channel mean a thousand times smaller than the
//! tensor's largest entry carries f32 rounding of the channel's scale; measured: 1.6e-7 of the
//! tensor's largest entry, 1.5e-4 relative on the entries near zero.

use crate::eval::{accuracy_reference, eval_json, DIGITS};
use crate::util::*;

fn recal(d: &TestDir, model: &str, out: &str, extra: &[&str]) -> Run {
    recal_env(d, model, out, extra, &[])
}

fn recal_env(d: &TestDir, model: &str, out: &str, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = vec![
        "recal-bn".to_string(),
        model.to_string(),
        "--data".into(),
        p(&fixture("digits/train")),
        "-o".into(),
        out.into(),
    ];
    args.extend(DIGITS.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    d.run_env(&args, env)
}

fn assert_bn_close(
    got: &std::collections::HashMap<String, T>,
    want: &std::collections::HashMap<String, T>,
    input: &std::collections::HashMap<String, T>,
) {
    assert_eq!(sorted_keys(got), sorted_keys(want));
    for (k, w) in want {
        let g = &got[k];
        if k.ends_with(".running_mean") || k.ends_with(".running_var") {
            let (gv, wv) = (as_f64(g), as_f64(w));
            let scale = wv.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs() + 1e-6 * scale,
                    "{k}[{i}]: {a} vs {b}"
                );
            }
        } else if k.ends_with(".num_batches_tracked") {
            assert_eq!(
                as_i64(g),
                vec![4],
                "{k}: batches seen, as update_bn leaves it"
            );
            assert_eq!(g.dtype, safetensors::Dtype::I64);
        } else {
            assert_eq!(g, &input[k], "{k} must be copied byte for byte");
        }
    }
}

/// Also with `CKPT_CPU_CONV=candle`: the candle ops (batch moments over a transposed copy in f32)
/// that CUDA runs, on the CPU.
#[test]
fn torch_estimator_matches_update_bn() {
    for env in [&[][..], &[("CKPT_CPU_CONV", "candle")][..]] {
        let d = TestDir::new();
        let swa = fixture("expected/swa_all.safetensors");
        recal_env(
            &d,
            &p(&swa),
            "t.safetensors",
            &["--estimator", "torch", "--batch-size", "64"],
            env,
        )
        .ok();
        assert_bn_close(
            &read_st(&d.path("t.safetensors")),
            &read_st(&fixture("expected/recal_torch.safetensors")),
            &read_st(&swa),
        );
    }
}

#[test]
fn population_estimator_matches_fvcore() {
    let d = TestDir::new();
    let swa = fixture("expected/swa_all.safetensors");
    let r = recal(&d, &p(&swa), "p.safetensors", &[]).ok();
    assert!(
        r.stdout.contains(
            "12 BN layers recalibrated (population estimator) over 200 images in 4 batches"
        ),
        "{}",
        r.stdout
    );
    assert_bn_close(
        &read_st(&d.path("p.safetensors")),
        &read_st(&fixture("expected/recal_population.safetensors")),
        &read_st(&swa),
    );
    let meta = read_metadata(&d.path("p.safetensors"));
    assert_eq!(meta["ckpt.recal.estimator"], "population");
    assert_eq!(meta["ckpt.recal.images"], "200");
    assert!(meta["ckpt.recal.data"].ends_with("digits/train"));
    assert!(meta["ckpt.recal.transform"].contains("size: 32"));
}

#[test]
fn recalibration_recovers_accuracy_of_the_average() {
    // The SWA average with averaged BN statistics: 98.5 %; after recal-bn: 99.5 % (PyTorch gets
    // the same numbers: fixtures/expected/digits_accuracy.json). The last snapshot alone: 97 %.
    let d = TestDir::new();
    let want = accuracy_reference();
    recal(
        &d,
        &p(&fixture("expected/swa_all.safetensors")),
        "r.safetensors",
        &[],
    )
    .ok();
    let after = eval_json(&d, "r.safetensors");
    assert_eq!(after["top1"], want["swa_after_recal_population"]["top1"]);
    assert!(after["top1"].as_f64() > want["swa_before_recal"]["top1"].as_f64());
}

#[test]
fn shards_merge_to_the_single_pass() {
    let d = TestDir::new();
    let swa = p(&fixture("expected/swa_all.safetensors"));
    // Batches of 32: 7 batches; shard 0/2 takes batches 0, 2, 4, 6, shard 1/2 the others.
    for est in ["population", "torch"] {
        let single = format!("single_{est}.safetensors");
        recal(
            &d,
            &swa,
            &single,
            &["--batch-size", "32", "--estimator", est],
        )
        .ok();
        for i in 0..2 {
            let mut args = vec![
                "-q".to_string(),
                "recal-bn".into(),
                swa.clone(),
                "--data".into(),
                p(&fixture("digits/train")),
            ];
            args.extend(DIGITS.iter().map(|s| s.to_string()));
            args.extend(
                [
                    "--batch-size",
                    "32",
                    "--estimator",
                    est,
                    "--shard",
                    &format!("{i}/2"),
                    "--stats-out",
                    &format!("part{i}.safetensors"),
                    "--force",
                ]
                .map(String::from),
            );
            d.run(&args).ok();
        }
        let merged = format!("merged_{est}.safetensors");
        d.run(&[
            "-q",
            "recal-bn",
            &swa,
            "--merge",
            "part0.safetensors",
            "part1.safetensors",
            "--estimator",
            est,
            "-o",
            &merged,
        ])
        .ok();
        let (a, b) = (read_st(&d.path(&single)), read_st(&d.path(&merged)));
        for (k, t) in &a {
            if t.dtype == safetensors::Dtype::F32 {
                // Equal in f64 to summation order, so at most one f32 rounding step apart.
                for (x, y) in as_f64(t).iter().zip(as_f64(&b[k])) {
                    let ulp = (*x as f32).abs() * f32::EPSILON;
                    assert!((x - y).abs() as f32 <= ulp, "{est} {k}: {x} vs {y}");
                }
            } else {
                assert_eq!(t, &b[k], "{est} {k}");
            }
        }
    }
}

#[test]
fn swa_with_recal_bn_in_one_command() {
    let d = TestDir::new();
    let mut args = vec!["swa".to_string()];
    args.extend(snapshots().iter().map(|s| p(s)));
    args.extend(
        [
            "-o",
            "swa.safetensors",
            "--recal-bn",
            &p(&fixture("digits/train")),
        ]
        .map(String::from),
    );
    args.extend(DIGITS.iter().map(|s| s.to_string()));
    let r = d.run(&args).ok();
    assert!(r.stderr.contains("recomputed over"), "{}", r.stderr);
    assert_eq!(
        d.listing(),
        ["swa.safetensors"],
        "no intermediate file left"
    );
    let got = read_st(&d.path("swa.safetensors"));
    let want = read_st(&fixture("expected/recal_population.safetensors"));
    for k in want.keys().filter(|k| k.ends_with("running_var")) {
        let (g, w) = (as_f64(&got[k]), as_f64(&want[k]));
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (a, b) in g.iter().zip(&w) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs() + 1e-5 * scale,
                "{k}: {a} vs {b}"
            );
        }
    }
    assert_eq!(eval_json(&d, "swa.safetensors")["top1"], 99.5);
}

#[test]
fn bad_recal_inputs() {
    let d = TestDir::new();
    std::fs::create_dir(d.path("empty")).unwrap();
    d.run(&[
        "-q",
        "recal-bn",
        &p(&fixture("tiny/epoch_10.safetensors")),
        "--data",
        "empty",
        "-o",
        "o.safetensors",
    ])
    .fails_with(&["empty"]);
    d.run(&[
        "-q",
        "recal-bn",
        &p(&fixture("tiny/epoch_10.safetensors")),
        "--merge",
        &p(&fixture("tiny/epoch_1.safetensors")),
        "-o",
        "o.safetensors",
    ])
    .fails_with(&["epoch_1.safetensors", "not a --stats-out file"]);
    assert!(!d.path("o.safetensors").exists());
}

/// Writes stats part `name`: shard `shard` of a recal-bn pass of `model` over digits/train at
/// the digits' options with batches of 32 (7 batches), `extra` options last.
fn stats_part(d: &TestDir, model: &str, shard: &str, name: &str, extra: &[&str]) {
    let mut args = vec![
        "-q".to_string(),
        "recal-bn".into(),
        p(&fixture(model)),
        "--data".into(),
        p(&fixture("digits/train")),
        "--mean".into(),
        "0.5".into(),
        "--std".into(),
        "0.5".into(),
        "--crop-pct".into(),
        "1".into(),
        "--batch-size".into(),
        "32".into(),
        "--shard".into(),
        shard.into(),
        "--stats-out".into(),
        name.into(),
    ];
    if !extra.contains(&"--size") {
        args.extend(["--size".to_string(), "32".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    d.run(&args).ok();
}

const SWA: &str = "expected/swa_all.safetensors";

/// `recal-bn MODEL --merge PARTS -o out.safetensors`, which must fail and write nothing.
fn merge_refused(d: &TestDir, model: &str, parts: &[&str], extra: &[&str], needles: &[&str]) {
    let m = p(&fixture(model));
    let mut args = vec!["-q", "recal-bn", &m, "--merge"];
    args.extend(parts);
    args.extend(["-o", "out.safetensors"]);
    args.extend(extra);
    let before: Vec<String> = parts.iter().map(|f| sha256(&d.path(f))).collect();
    d.run(&args).fails_with(needles);
    assert!(!d.path("out.safetensors").exists(), "nothing written");
    let after: Vec<String> = parts.iter().map(|f| sha256(&d.path(f))).collect();
    assert_eq!(before, after, "parts unchanged");
}

#[test]
fn merge_refuses_parts_at_another_size_issue_24() {
    let d = TestDir::new();
    stats_part(&d, SWA, "0/2", "part_0.safetensors", &[]);
    stats_part(&d, SWA, "1/2", "part_1.safetensors", &["--size", "40"]);
    merge_refused(
        &d,
        SWA,
        &["part_0.safetensors", "part_1.safetensors"],
        &[],
        &["part_1.safetensors: size is 40, but part_0.safetensors has 32"],
    );
    // Other data options alike: the seed of --max-images' subset.
    stats_part(
        &d,
        SWA,
        "1/2",
        "seed_1.safetensors",
        &["--seed", "1", "--max-images", "150"],
    );
    stats_part(
        &d,
        SWA,
        "0/2",
        "seed_0.safetensors",
        &["--max-images", "150"],
    );
    merge_refused(
        &d,
        SWA,
        &["seed_0.safetensors", "seed_1.safetensors"],
        &[],
        &["seed_1.safetensors: seed is 1, but seed_0.safetensors has 0"],
    );
}

#[test]
fn merge_refuses_a_repeated_part_issue_24() {
    // A glob over a folder where shard 1's job failed and shard 0's was retried.
    let d = TestDir::new();
    stats_part(&d, SWA, "0/2", "part_0.safetensors", &[]);
    std::fs::copy(
        d.path("part_0.safetensors"),
        d.path("part_0_retry.safetensors"),
    )
    .unwrap();
    merge_refused(
        &d,
        SWA,
        &["part_0.safetensors", "part_0_retry.safetensors"],
        &[],
        &[
            "part_0_retry.safetensors: shard 0/2 again (also part_0.safetensors)",
            "shard 1/2 is missing",
        ],
    );
    merge_refused(
        &d,
        SWA,
        &["part_0.safetensors", "part_0.safetensors"],
        &[],
        &["part_0.safetensors: shard 0/2 again"],
    );
}

#[test]
fn merge_refuses_a_missing_part_issue_24() {
    let d = TestDir::new();
    stats_part(&d, SWA, "0/3", "part_0.safetensors", &[]);
    stats_part(&d, SWA, "2/3", "part_2.safetensors", &[]);
    merge_refused(
        &d,
        SWA,
        &["part_0.safetensors", "part_2.safetensors"],
        &[],
        &["shard 1/3 is missing", "2 of 3 parts given"],
    );
    // A part of a 2-way split among those of a 3-way one.
    stats_part(&d, SWA, "1/2", "half_1.safetensors", &[]);
    merge_refused(
        &d,
        SWA,
        &[
            "part_0.safetensors",
            "half_1.safetensors",
            "part_2.safetensors",
        ],
        &[],
        &["half_1.safetensors: shard count is 2, but part_0.safetensors has 3"],
    );
}

#[test]
fn merge_refuses_another_model_issue_24() {
    let d = TestDir::new();
    stats_part(&d, SWA, "0/2", "part_0.safetensors", &[]);
    stats_part(&d, SWA, "1/2", "part_1.safetensors", &[]);
    // Statistics of the SWA weights written into epoch 1: same layers, other weights.
    merge_refused(
        &d,
        "tiny/epoch_1.safetensors",
        &["part_0.safetensors", "part_1.safetensors"],
        &[],
        &[
            "part_0.safetensors: model: measured on weights",
            "epoch_1.safetensors has weights",
        ],
    );
    // One part measured on other weights than the others.
    stats_part(
        &d,
        "tiny/epoch_10.safetensors",
        "1/2",
        "other_1.safetensors",
        &[],
    );
    merge_refused(
        &d,
        SWA,
        &["part_0.safetensors", "other_1.safetensors"],
        &[],
        &["other_1.safetensors: model: measured on weights"],
    );
    // The same weights in another file form (a DDP training checkpoint of epoch 10, keys
    // prefixed with module.) are the same model: parts of the safetensors file merge onto it.
    stats_part(
        &d,
        "tiny/epoch_10.safetensors",
        "0/2",
        "other_0.safetensors",
        &[],
    );
    d.run(&[
        "-q",
        "recal-bn",
        &p(&fixture("tiny/train_epoch_10.pth.tar")),
        "--merge",
        "other_0.safetensors",
        "other_1.safetensors",
        "-o",
        "ok.safetensors",
    ])
    .ok();
}

#[test]
fn merge_refuses_another_estimator_issue_24() {
    let d = TestDir::new();
    stats_part(&d, SWA, "0/2", "part_0.safetensors", &[]);
    stats_part(
        &d,
        SWA,
        "1/2",
        "part_1.safetensors",
        &["--estimator", "torch"],
    );
    merge_refused(
        &d,
        SWA,
        &["part_0.safetensors", "part_1.safetensors"],
        &[],
        &["part_1.safetensors: estimator is torch, but part_0.safetensors has population"],
    );
    stats_part(&d, SWA, "1/2", "pop_1.safetensors", &[]);
    merge_refused(
        &d,
        SWA,
        &["part_0.safetensors", "pop_1.safetensors"],
        &["--estimator", "torch"],
        &["--estimator torch, but the parts were run for estimator population"],
    );
    // Without --estimator the merge takes the parts'.
    let r = d
        .run(&[
            "recal-bn",
            &p(&fixture(SWA)),
            "--merge",
            "part_0.safetensors",
            "pop_1.safetensors",
            "-o",
            "ok.safetensors",
        ])
        .ok();
    assert!(
        r.stdout
            .contains("(population estimator) over 200 images in 7 batches"),
        "{}",
        r.stdout
    );
    let meta = read_metadata(&d.path("ok.safetensors"));
    assert_eq!(meta["ckpt.recal.merged"], "2");
    assert_eq!(meta["ckpt.recal.size"], "32");
}

#[test]
fn inspect_shows_a_parts_record_issue_24() {
    let d = TestDir::new();
    stats_part(
        &d,
        SWA,
        "1/2",
        "part_1.safetensors",
        &["--estimator", "torch"],
    );
    let r = d.run(&["inspect", "part_1.safetensors"]).ok();
    for line in [
        "stats part  shard 1/2 of a recal-bn pass",
        "  size            32",
        "  batch_size      32",
        "  estimator       torch",
        "  shard           1/2",
    ] {
        assert!(r.stdout.contains(line), "{line:?} in\n{}", r.stdout);
    }
    let j = d
        .run(&["inspect", "--json", "part_1.safetensors"])
        .ok()
        .json();
    assert_eq!(j["part"]["shard"], "1/2");
    assert_eq!(j["part"]["crop_pct"], "1");
    assert!(j["part"]["data"]
        .as_str()
        .unwrap()
        .ends_with("digits/train"));
    assert_eq!(j["part"]["model"].as_str().unwrap().len(), 64);
}

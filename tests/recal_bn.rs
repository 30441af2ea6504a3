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

//! `ckpt swa` against PyTorch's f64 averages of the fixture snapshots.

use safetensors::Dtype;

use crate::util::*;

fn swa(d: &TestDir, inputs: &[String], extra: &[&str]) -> crate::util::Run {
    let mut args = vec!["swa".to_string()];
    args.extend(inputs.iter().cloned());
    args.extend(extra.iter().map(|s| s.to_string()));
    d.run(&args)
}

fn paths(v: &[std::path::PathBuf]) -> Vec<String> {
    v.iter().map(|x| p(x)).collect()
}

#[test]
fn uniform_average_matches_pytorch_f64() {
    let d = TestDir::new();
    swa(&d, &paths(&snapshots()), &["-o", "swa.safetensors"]).ok();
    let got = read_st(&d.path("swa.safetensors"));
    // Integer tensors (num_batches_tracked) come from the newest snapshot (--int last).
    assert_f32_within_one_ulp(&got, &read_st(&fixture("expected/swa_all.safetensors")));
}

#[test]
fn natural_sort_orders_snapshots_whatever_the_argument_order() {
    let d = TestDir::new();
    let mut shuffled = paths(&snapshots());
    shuffled.reverse();
    shuffled.swap(0, 2);
    // Lexically epoch_10 < epoch_2; the weights 1,1,2,4 only match the reference if the files are
    // taken in training order.
    let r = swa(
        &d,
        &shuffled,
        &["--weights", "1,1,2,4", "-o", "w.safetensors"],
    )
    .ok();
    let listed: Vec<&str> = r.stderr.lines().filter(|l| l.contains("epoch_")).collect();
    assert!(
        listed[0].ends_with("epoch_1.safetensors") && listed[3].ends_with("epoch_10.safetensors"),
        "{}",
        r.stderr
    );
    assert_f32_within_one_ulp(
        &read_st(&d.path("w.safetensors")),
        &read_st(&fixture("expected/swa_weighted_1_1_2_4.safetensors")),
    );
}

#[test]
fn no_sort_keeps_the_given_order() {
    let d = TestDir::new();
    let mut rev = paths(&snapshots());
    rev.reverse();
    swa(
        &d,
        &rev,
        &[
            "--no-sort",
            "--weights",
            "4,2,1,1",
            "--int",
            "first",
            "-o",
            "w.safetensors",
        ],
    )
    .ok();
    // Reversed order with reversed weights is the same weighted average; --int first now takes
    // the newest snapshot's counters, as the reference does.
    assert_f32_within_one_ulp(
        &read_st(&d.path("w.safetensors")),
        &read_st(&fixture("expected/swa_weighted_1_1_2_4.safetensors")),
    );
}

#[test]
fn last_keeps_the_newest() {
    let d = TestDir::new();
    swa(
        &d,
        &paths(&snapshots()),
        &["--last", "2", "-o", "l.safetensors"],
    )
    .ok();
    assert_f32_within_one_ulp(
        &read_st(&d.path("l.safetensors")),
        &read_st(&fixture("expected/swa_last2.safetensors")),
    );
}

#[test]
fn every_counts_back_from_the_newest() {
    let d = TestDir::new();
    // Of epochs 1, 2, 5, 10, every 2nd counted from the newest is 2 and 10.
    let r = swa(
        &d,
        &paths(&snapshots()),
        &["--every", "2", "-o", "e.safetensors"],
    )
    .ok();
    let listed: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(listed.len(), 2, "{}", r.stderr);
    assert!(
        listed[0].ends_with("epoch_2.safetensors") && listed[1].ends_with("epoch_10.safetensors")
    );
}

#[test]
fn glob_patterns_are_expanded() {
    let d = TestDir::new();
    let pattern = format!("{}/epoch_*.safetensors", p(&fixture("tiny")));
    swa(&d, &[pattern], &["-o", "g.safetensors"]).ok();
    assert_f32_within_one_ulp(
        &read_st(&d.path("g.safetensors")),
        &read_st(&fixture("expected/swa_all.safetensors")),
    );
    swa(
        &d,
        &[format!("{}/nothing_*.safetensors", p(&fixture("tiny")))],
        &["-q", "-o", "n.safetensors"],
    )
    .fails_with(&["nothing_*", "no file matches"]);
}

#[test]
fn integer_policies() {
    let d = TestDir::new();
    let key = "layer1.0.bn1.num_batches_tracked";
    let counts: Vec<i64> = snapshots()
        .iter()
        .map(|s| as_i64(&read_st(s)[key])[0])
        .collect();
    for (policy, want) in [
        ("first", counts[0]),
        ("last", counts[3]),
        ("max", *counts.iter().max().unwrap()),
        ("sum", counts.iter().sum()),
    ] {
        let out = format!("{policy}.safetensors");
        swa(&d, &paths(&snapshots()), &["--int", policy, "-o", &out]).ok();
        let t = &read_st(&d.path(&out))[key];
        assert_eq!(t.dtype, Dtype::I64, "--int {policy} keeps the dtype");
        assert_eq!(as_i64(t), vec![want], "--int {policy}");
    }
    swa(
        &d,
        &paths(&snapshots()),
        &["-q", "--int", "error", "-o", "x.safetensors"],
    )
    .fails_with(&["num_batches_tracked", "integer tensor"]);
}

#[test]
fn bf16_stays_bf16_within_one_rounding() {
    let d = TestDir::new();
    let inputs = vec![
        p(&fixture("tiny/bf16/epoch_5.safetensors")),
        p(&fixture("tiny/bf16/epoch_10.safetensors")),
    ];
    swa(&d, &inputs, &["-o", "b.safetensors"]).ok();
    let got = read_st(&d.path("b.safetensors"));
    let want = read_st(&fixture("expected/swa_bf16.safetensors"));
    for (k, w) in &want {
        let g = &got[k];
        if w.dtype != Dtype::F32 {
            continue;
        }
        assert_eq!(g.dtype, Dtype::BF16, "{k}");
        for (a, b) in as_f64(g).iter().zip(as_f64(w)) {
            // Correct rounding is within half a bf16 step (2^-8 relative) of the exact value,
            // which the f32 reference holds to 2^-24.
            assert!(
                (a - b).abs() <= b.abs() * (2f64.powi(-8) + 2f64.powi(-23)) + 1e-30,
                "{k}: {a} vs {b}"
            );
        }
    }
    swa(&d, &inputs, &["--dtype", "f32", "-o", "f.safetensors"]).ok();
    assert_eq!(
        read_st(&d.path("f.safetensors"))["fc.weight"].dtype,
        Dtype::F32
    );
}

#[test]
fn torch_save_and_ddp_inputs() {
    let d = TestDir::new();
    // The same weights as a state dict and inside a DDP training checkpoint: their average is
    // exactly the weights.
    let inputs = vec![
        p(&fixture("tiny/epoch_10.pth")),
        p(&fixture("tiny/train_epoch_10.pth.tar")),
    ];
    let r = swa(&d, &inputs, &["-o", "same.safetensors"]).ok();
    assert!(
        r.stderr.contains("key 'state_dict'") && r.stderr.contains("'module.'"),
        "{}",
        r.stderr
    );
    assert_eq!(
        read_st(&d.path("same.safetensors")),
        read_st(&fixture("tiny/epoch_10.safetensors"))
    );
}

#[test]
fn sharded_input_gives_sharded_output() {
    let d = TestDir::new();
    let inputs = vec![
        p(&fixture("tiny/sharded_epoch_5")),
        p(&fixture("tiny/epoch_10.pth")),
    ];
    swa(
        &d,
        &inputs,
        &["-o", "out.safetensors", "--shard-size", "150kB"],
    )
    .ok();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path("out.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() >= 2, "{index}");
    let mut merged = std::collections::HashMap::new();
    for s in shards {
        merged.extend(read_st(&d.path(s)));
    }
    assert_f32_within_one_ulp(
        &merged,
        &read_st(&fixture("expected/swa_last2.safetensors")),
    );
    // ckpt reads its own sharded output back.
    let j = d
        .run(&["inspect", "--json", "out.safetensors.index.json"])
        .ok()
        .json();
    assert_eq!(j["num_tensors"], 74);
}

#[test]
fn mismatched_snapshots_are_refused_naming_both_files() {
    let d = TestDir::new();
    let good = p(&fixture("tiny/epoch_5.safetensors"));
    write_st(
        &d.path("other_shape.safetensors"),
        &[("fc.bias", Dtype::F32, vec![3], f32_bytes(&[1.0, 2.0, 3.0]))],
    );
    write_st(
        &d.path("fc_only.safetensors"),
        &[("fc.bias", Dtype::F32, vec![10], f32_bytes(&[0.0; 10]))],
    );
    // Keys: fc_only lacks everything but fc.bias.
    swa(
        &d,
        &[good.clone(), p(&d.path("fc_only.safetensors"))],
        &["-q", "-o", "x.safetensors"],
    )
    .fails_with(&[
        "num_batches_tracked is in",
        "epoch_5.safetensors",
        "but not in",
        "fc_only.safetensors",
        "--allow-missing",
    ]);
    // Shapes.
    write_st(
        &d.path("a.safetensors"),
        &[("fc.bias", Dtype::F32, vec![10], f32_bytes(&[0.0; 10]))],
    );
    swa(
        &d,
        &["a.safetensors".into(), "other_shape.safetensors".into()],
        &["-q", "-o", "x.safetensors"],
    )
    .fails_with(&[
        "fc.bias",
        "[3]",
        "[10]",
        "a.safetensors",
        "other_shape.safetensors",
    ]);
    // Dtypes.
    swa(
        &d,
        &[good, p(&fixture("tiny/bf16/epoch_10.safetensors"))],
        &["-q", "-o", "x.safetensors"],
    )
    .fails_with(&["BF16", "F32", "epoch_5.safetensors", "epoch_10.safetensors"]);
    assert!(!d.path("x.safetensors").exists());
}

#[test]
fn allow_missing_averages_over_the_holders() {
    let d = TestDir::new();
    write_st(
        &d.path("s1.safetensors"),
        &[
            ("a", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
            ("b", Dtype::F32, vec![1], f32_bytes(&[10.0])),
        ],
    );
    write_st(
        &d.path("s2.safetensors"),
        &[("a", Dtype::F32, vec![2], f32_bytes(&[3.0, 4.0]))],
    );
    write_st(
        &d.path("s3.safetensors"),
        &[
            ("a", Dtype::F32, vec![2], f32_bytes(&[5.0, 6.0])),
            ("b", Dtype::F32, vec![1], f32_bytes(&[20.0])),
        ],
    );
    let r = d
        .run(&[
            "swa",
            "s1.safetensors",
            "s2.safetensors",
            "s3.safetensors",
            "--allow-missing",
            "-o",
            "m.safetensors",
        ])
        .ok();
    assert!(
        r.stderr.contains("--allow-missing: 1 tensor(s)") && r.stderr.contains(": b"),
        "{}",
        r.stderr
    );
    let got = read_st(&d.path("m.safetensors"));
    assert_eq!(as_f64(&got["a"]), vec![3.0, 4.0]);
    assert_eq!(as_f64(&got["b"]), vec![15.0]);
}

#[test]
fn nonfinite_values_are_refused_unless_allowed() {
    let d = TestDir::new();
    write_st(
        &d.path("ok.safetensors"),
        &[("w", Dtype::F32, vec![3], f32_bytes(&[1.0, 2.0, 3.0]))],
    );
    write_st(
        &d.path("nan.safetensors"),
        &[("w", Dtype::F32, vec![3], f32_bytes(&[1.0, f32::NAN, 3.0]))],
    );
    d.run(&[
        "-q",
        "swa",
        "ok.safetensors",
        "nan.safetensors",
        "-o",
        "x.safetensors",
    ])
    .fails_with(&[
        "nan.safetensors",
        "tensor w",
        "NaN",
        "element 1",
        "--allow-nonfinite",
    ]);
    assert!(!d.path("x.safetensors").exists());
    d.run(&[
        "-q",
        "swa",
        "ok.safetensors",
        "nan.safetensors",
        "--allow-nonfinite",
        "-o",
        "x.safetensors",
    ])
    .ok();
    assert!(as_f64(&read_st(&d.path("x.safetensors"))["w"])[1].is_nan());
}

#[test]
fn bad_weights_are_refused() {
    let d = TestDir::new();
    swa(
        &d,
        &paths(&snapshots()),
        &["-q", "--weights", "1,2", "-o", "x.safetensors"],
    )
    .fails_with(&["2 values for 4 snapshots"]);
    swa(
        &d,
        &paths(&snapshots()),
        &["-q", "--weights", "1,-1,1,1", "-o", "x.safetensors"],
    )
    .fails_with(&["-1"]);
}

#[test]
fn inputs_are_never_modified_and_provenance_is_recorded() {
    let d = TestDir::new();
    let inputs = d.copy_in(&snapshots());
    let before: Vec<String> = inputs.iter().map(|f| sha256(f)).collect();
    swa(&d, &paths(&inputs), &["-o", "swa.safetensors"]).ok();
    let after: Vec<String> = inputs.iter().map(|f| sha256(f)).collect();
    assert_eq!(before, after);
    let meta = read_metadata(&d.path("swa.safetensors"));
    assert_eq!(meta["ckpt.version"], env!("CARGO_PKG_VERSION"));
    assert!(meta["ckpt.command"].starts_with("ckpt swa "), "{meta:?}");
    assert_eq!(meta["format"], "pt");
    let listed: serde_json::Value = serde_json::from_str(&meta["ckpt.inputs"]).unwrap();
    for (entry, (path, hash)) in listed
        .as_array()
        .unwrap()
        .iter()
        .zip(inputs.iter().zip(&before))
    {
        assert_eq!(
            entry["file"],
            path.file_name().unwrap().to_string_lossy().as_ref()
        );
        assert_eq!(&entry["sha256"], hash);
    }
}

#[test]
fn output_has_exactly_the_models_state_dict_keys() {
    // make_fixtures.py --check-ckpt loads ckpt's outputs with load_state_dict(strict=True); here
    // the key set is held against the one PyTorch listed for the model.
    let d = TestDir::new();
    swa(&d, &paths(&snapshots()), &["-o", "swa.safetensors"]).ok();
    let facts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("expected/tiny_resnet.json")).unwrap(),
    )
    .unwrap();
    let mut want: Vec<String> = facts["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(sorted_keys(&read_st(&d.path("swa.safetensors"))), want);
}

#[test]
fn cached_digests_are_used_only_for_unchanged_files() {
    let d = TestDir::new();
    let inputs = d.copy_in(&snapshots()[2..]);
    swa(&d, &paths(&inputs), &["-o", "first.safetensors"]).ok();
    let cache = std::fs::read_to_string(d.path(".cache/sha256-v1.tsv")).unwrap();
    assert_eq!(cache.lines().count(), 2, "{cache}");
    // Rewrite one input in place with other content: it must be hashed again, not taken from
    // the cache.
    let other = std::fs::read(&snapshots()[0]).unwrap();
    std::fs::write(&inputs[0], &other).unwrap();
    swa(&d, &paths(&inputs), &["-o", "second.safetensors"]).ok();
    let meta = read_metadata(&d.path("second.safetensors"));
    let listed: serde_json::Value = serde_json::from_str(&meta["ckpt.inputs"]).unwrap();
    assert_eq!(listed[0]["sha256"], sha256(&inputs[0]).as_str());
    assert_eq!(listed[1]["sha256"], sha256(&inputs[1]).as_str());
}

/// The average streams its inputs: each tensor's pages of an input's mapped file leave resident
/// memory once every output has read it (as each hashed piece does when the inputs are hashed
/// for the provenance), so peak memory is not the sum of the inputs. Four 32 MB inputs of 32
/// tensors, 2 threads (what is in flight at once: two 8 MiB hash pieces, two tensors of each
/// input): 23 MB peak in the debug build, against the inputs' 128 MB and more before; four 102
/// MB ResNet-50 files in a release build: 55-82 MB, against 409 MB.
#[test]
fn inputs_pages_do_not_pile_up() {
    let d = TestDir::new();
    let (tensors, n) = (32usize, 1usize << 18);
    let value = |k: u32, j: usize, i: usize| ((i as u32 ^ k ^ j as u32) % 1000) as f32 * 1e-3;
    let mut inputs = Vec::new();
    for k in 0..4u32 {
        let bytes: Vec<Vec<u8>> = (0..tensors)
            .map(|j| f32_bytes(&(0..n).map(|i| value(k, j, i)).collect::<Vec<_>>()))
            .collect();
        let names: Vec<String> = (0..tensors).map(|j| format!("layer{j}.weight")).collect();
        let list: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = names
            .iter()
            .zip(bytes)
            .map(|(name, b)| (name.as_str(), Dtype::F32, vec![n / 4, 4], b))
            .collect();
        let path = d.path(&format!("step_{k}.safetensors"));
        write_st(&path, &list);
        inputs.push(p(&path));
    }
    let total = (4 * tensors * n * 4) as u64;
    let out = d.path("swa.safetensors");
    let mut args = vec!["--threads".to_string(), "2".to_string(), "swa".to_string()];
    args.extend(inputs.iter().cloned());
    args.extend(["-o".to_string(), p(&out)]);
    let (run, peak) = d.run_measured(&args);
    run.ok();
    let got = read_st(&out);
    for j in [0, tensors - 1] {
        let a = as_f64(&got[&format!("layer{j}.weight")]);
        for i in [0, 1, 999, n - 1] {
            let want = (0..4u32).map(|k| value(k, j, i) as f64).sum::<f64>() / 4.0;
            assert!((a[i] - want).abs() < 1e-6, "layer{j}[{i}] = {}", a[i]);
        }
    }
    assert!(
        (peak as f64) < 0.5 * total as f64,
        "peak {} MB for {} MB of inputs",
        peak >> 20,
        total >> 20
    );
}

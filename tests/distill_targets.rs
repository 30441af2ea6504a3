//! `ckpt distill --targets`: the offline teacher (issue 19), logits stored by `ckpt logits --data`
//! in place of a teacher run on every batch.
//!
//! Dense logits go through the same KD as a live teacher's, so the student is the one
//! `--teacher` gives, tensor for tensor, bit for bit, when the stored logits are the f32 numbers
//! the teacher computes during the run: `ckpt logits` with the same batch size (the fast kernels'
//! per-image results depend on the batch at the last bit: batch 7 against 64 moved a logit by
//! 1.9e-6), and through tests/distill.rs's reference, PyTorch's within 1e-4 relative. Top-k logits
//! are held to fixtures/make_distill_targets_fixtures.py (the same loop, the teacher's top 3
//! renormalised) at tests/distill.rs's tolerances.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::distill::assert_student_close;
use crate::util::*;

/// The data options of tests/distill.rs's reference (eval transform at 32 px, mean and std 0.5),
/// with `crop_pct` (the reference's is 1).
fn data_options_at(crop_pct: &str) -> Vec<String> {
    [
        "--data",
        &p(&fixture("digits/train")),
        "--size",
        "32",
        "--crop-pct",
        crop_pct,
        "--mean",
        "0.5",
        "--std",
        "0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn data_options() -> Vec<String> {
    data_options_at("1")
}

/// `ckpt logits` of the reference's teacher over the training folder, batch 64 as distill's.
fn stored_logits(d: &TestDir, out: &str, extra: &[&str]) {
    stored_logits_at(d, out, "1", extra)
}

fn stored_logits_at(d: &TestDir, out: &str, crop_pct: &str, extra: &[&str]) {
    let mut args = vec![
        "-q".to_string(),
        "logits".into(),
        p(&fixture("tiny/epoch_10.safetensors")),
        "--batch-size".into(),
        "64".into(),
        "-o".into(),
        out.into(),
    ];
    args.extend(data_options_at(crop_pct));
    args.extend(extra.iter().map(|s| s.to_string()));
    d.run(&args).ok();
}

/// tests/distill.rs's reference run (folder order, constant lr 0.01) with `teacher` (the
/// `--teacher` or `--targets` flag and its file) and `extra`.
fn distill_args(teacher: &[&str], out: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["distill".into(), p(&fixture("tiny/epoch_1.safetensors"))];
    args.extend(teacher.iter().map(|s| s.to_string()));
    args.extend(data_options());
    if !extra.contains(&"--transform") {
        args.extend(["--transform".into(), "eval".into()]);
    }
    args.extend(
        [
            "--no-shuffle",
            "--schedule",
            "constant",
            "--batch-size",
            "64",
            "--lr",
            "0.01",
            "-o",
            out,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn assert_same_student(a: &Path, b: &Path) {
    let (a_st, b_st) = (read_st(a), read_st(b));
    assert_eq!(sorted_keys(&a_st), sorted_keys(&b_st));
    for (k, t) in &a_st {
        assert!(
            t.data == b_st[k].data,
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Copies the logits file `src` to `dst` through `edit`, which may change its tensors (name ->
/// dtype, shape, bytes) and metadata.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, &mut HashMap<String, String>),
) {
    let bytes = std::fs::read(src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    let mut meta = read_metadata(src);
    edit(&mut tensors, &mut meta);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(meta), dst).unwrap();
}

/// The rows of every tensor and the image list in the order `order` (new row i = old row
/// order[i]).
fn permute(
    tensors: &mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    meta: &mut HashMap<String, String>,
    order: &[usize],
) {
    for (_, shape, data) in tensors.values_mut() {
        let row = data.len() / shape[0];
        *data = order
            .iter()
            .flat_map(|&r| data[r * row..(r + 1) * row].to_vec())
            .collect();
    }
    let images: Vec<String> = serde_json::from_str(&meta["ckpt.images"]).unwrap();
    let images: Vec<&String> = order.iter().map(|&r| &images[r]).collect();
    meta.insert(
        "ckpt.images".into(),
        serde_json::to_string(&images).unwrap(),
    );
}

/// A fixed permutation of 0..n that moves every batch's images into other batches.
fn scrambled(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 37 + 11) % n).collect()
}

#[test]
fn stored_logits_give_the_live_teachers_student_exactly_issue19() {
    let d = TestDir::new();
    stored_logits(&d, "logits.safetensors", &[]);
    d.run(&distill_args(
        &["--teacher", &p(&fixture("tiny/epoch_10.safetensors"))],
        "live.safetensors",
        &["--json=live.json"],
    ))
    .ok();
    let run = d
        .run(&distill_args(
            &["--targets", "logits.safetensors"],
            "offline.safetensors",
            &["--json=offline.json"],
        ))
        .ok();
    assert!(!run.stderr.contains("teacher "), "{}", run.dump());
    assert_same_student(&d.path("live.safetensors"), &d.path("offline.safetensors"));
    let json = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.path(f)).unwrap()).unwrap()
    };
    let (live, offline) = (json("live.json"), json("offline.json"));
    assert_eq!(live["steps"], offline["steps"]);
    assert_eq!(offline["teachers"], serde_json::json!([]));
    assert_eq!(offline["targets"]["file"], "logits.safetensors");
    assert_eq!(offline["targets"]["stored"], "logits");
    assert_eq!(live["targets"], serde_json::Value::Null);
    let meta = read_metadata(&d.path("offline.safetensors"));
    assert!(
        meta["ckpt.distill.teachers"].starts_with("offline: logits of resnet"),
        "{meta:?}"
    );
    assert_eq!(meta["ckpt.distill.targets_file"], "logits.safetensors");
    // And so PyTorch's student, as tests/distill.rs holds --teacher to it.
    assert_student_close(
        &read_st(&d.path("offline.safetensors")),
        &read_st(&fixture("distill/kd.safetensors")),
        0.0,
    );
}

#[test]
fn top_k_targets_are_pytorchs_renormalised_top_k_issue19() {
    let d = TestDir::new();
    stored_logits(&d, "top3.safetensors", &["--top-k", "3"]);
    let run = d
        .run(&distill_args(
            &["--targets", "top3.safetensors"],
            "student.safetensors",
            &["--json=distill.json"],
        ))
        .ok();
    assert!(
        run.stderr.contains("the top-3 logits of top3.safetensors"),
        "{}",
        run.dump()
    );
    let reference = fixture("distill_targets/topk3.safetensors");
    assert_student_close(
        &read_st(&d.path("student.safetensors")),
        &read_st(&reference),
        0.0,
    );
    crate::distill::assert_losses_match(&d.path("distill.json"), &reference, "top-3 targets");
}

#[test]
fn targets_are_found_by_image_path_not_row_order_issue19() {
    let d = TestDir::new();
    stored_logits(&d, "logits.safetensors", &[]);
    stored_logits(&d, "top3.safetensors", &["--top-k", "3"]);
    for name in ["logits", "top3"] {
        let src = d.path(&format!("{name}.safetensors"));
        let moved = d.path(&format!("{name}_permuted.safetensors"));
        rewrite(&src, &moved, |t, m| permute(t, m, &scrambled(200)));
        d.run(&distill_args(
            &["--targets", &p(&src)],
            &format!("{name}_a.safetensors"),
            &[],
        ))
        .ok();
        d.run(&distill_args(
            &["--targets", &p(&moved)],
            &format!("{name}_b.safetensors"),
            &[],
        ))
        .ok();
        assert_same_student(
            &d.path(&format!("{name}_a.safetensors")),
            &d.path(&format!("{name}_b.safetensors")),
        );
    }
    // Extra rows are fine (said once); a subset of the folder finds its rows among them.
    let run = d
        .run(&distill_args(
            &["--targets", "logits.safetensors"],
            "subset.safetensors",
            &["--max-images", "50"],
        ))
        .ok();
    assert_eq!(
        run.stderr
            .matches("150 of its 200 rows are not images of this run (unused)")
            .count(),
        1,
        "{}",
        run.dump()
    );
}

#[test]
fn a_file_without_a_transform_record_is_used_with_a_warning_issue19() {
    let d = TestDir::new();
    stored_logits(&d, "logits.safetensors", &[]);
    rewrite(
        &d.path("logits.safetensors"),
        &d.path("old.safetensors"),
        |_, m| {
            m.remove("ckpt.transform");
        },
    );
    let run = d
        .run(&distill_args(
            &["--targets", "old.safetensors"],
            "student.safetensors",
            &[],
        ))
        .ok();
    assert!(
        run.stderr.contains("old.safetensors: records no transform"),
        "{}",
        run.dump()
    );
}

#[test]
fn bad_offline_targets_fail_in_one_line_and_write_nothing_issue19() {
    let d = TestDir::new();
    stored_logits(&d, "logits.safetensors", &[]);
    stored_logits(&d, "half.safetensors", &["--max-images", "100"]);
    stored_logits_at(&d, "cropped.safetensors", "0.875", &[]);
    rewrite(
        &d.path("logits.safetensors"),
        &d.path("five.safetensors"),
        |t, _| {
            let (_, shape, data) = t.get_mut("logits").unwrap();
            *data = data
                .chunks_exact(40)
                .flat_map(|row| row[..20].to_vec())
                .collect();
            shape[1] = 5;
        },
    );
    let teacher = p(&fixture("tiny/epoch_10.safetensors"));
    let fails = |teacher: &[&str], extra: &[&str], needles: &[&str]| {
        let mut args = vec!["-q".to_string()];
        args.extend(distill_args(teacher, "x.safetensors", extra));
        // The one-line check wants -q in the command line (see Run::fails_with).
        d.run(&args).fails_with(needles);
        assert!(!d.path("x.safetensors").exists());
        assert!(!d.path("x.safetensors.resume").exists());
    };
    // A training image the file has no row for.
    fails(
        &["--targets", "half.safetensors"],
        &[],
        &[
            "half.safetensors: no row for image",
            "nor for 99 other image(s)",
        ],
    );
    // A random transform: the student would see other pixels than the stored logits did.
    fails(
        &["--targets", "logits.safetensors"],
        &["--transform", "train"],
        &["--targets logits.safetensors", "--transform train"],
    );
    // Both kinds of teacher, or neither.
    fails(
        &["--targets", "logits.safetensors", "--teacher", &teacher],
        &[],
        &["--targets logits.safetensors", "not both"],
    );
    fails(&[], &[], &["no teacher", "--targets"]);
    // Other classes than the student's.
    fails(
        &["--targets", "five.safetensors"],
        &[],
        &["five.safetensors", "5 classes", "10"],
    );
    // Not a logits file.
    fails(
        &["--targets", &teacher],
        &[],
        &["epoch_10.safetensors", "not a logits file"],
    );
    // Logits of other pixels.
    fails(
        &["--targets", "cropped.safetensors"],
        &[],
        &["cropped.safetensors", "crop_pct 1 here, 0.875 in the file"],
    );
    // Logits of a tensor input: no image paths.
    d.run(&[
        "-q",
        "logits",
        &teacher,
        "--input",
        &p(&fixture("zoo/tiny_resnet_io.safetensors")),
        "-o",
        "input.safetensors",
    ])
    .ok();
    fails(
        &["--targets", "input.safetensors"],
        &[],
        &["input.safetensors", "ckpt.images"],
    );
}

/// A two-epoch run (seeded shuffle) from stored logits, saved after each epoch.
fn resumable(targets: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "distill".into(),
        p(&fixture("tiny/epoch_1.safetensors")),
        "--targets".into(),
        targets.into(),
    ];
    args.extend(data_options());
    args.extend(
        ["--epochs", "2", "--save-every", "1", "-o", out]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_run_on_stored_logits_resumes_and_refuses_another_file_issue19() {
    let d = TestDir::new();
    stored_logits(&d, "a.safetensors", &[]);
    std::fs::copy(d.path("a.safetensors"), d.path("b.safetensors")).unwrap();
    // The transform defaults to eval with --targets (distill's default is train).
    d.run(&resumable("a.safetensors", "whole.safetensors", &[]))
        .ok();
    let args = resumable("a.safetensors", "cut.safetensors", &[]);
    d.run_paused_at("saved", &args, |child| child.kill().unwrap());
    assert!(d.path("cut.safetensors.resume").exists());
    d.run(&resumable(
        "b.safetensors",
        "cut.safetensors",
        &["--resume"],
    ))
    .fails_with(&["other settings", "b.safetensors now", "a.safetensors then"]);
    let mut resumed = args.clone();
    resumed.push("--resume".into());
    let run = d.run(&resumed).ok();
    assert!(
        run.stderr.contains("resuming after epoch 1 of 2"),
        "{}",
        run.dump()
    );
    assert_same_student(&d.path("whole.safetensors"), &d.path("cut.safetensors"));
}

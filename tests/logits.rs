//! `ckpt logits --input` against torchvision's eval-mode logits for one small model per family
//! (made by fixtures/make_fixtures.py). Tolerance: [`LOGITS_TOLERANCE`] of the largest logit; f32
//! convolutions summed in another order differ by a few 1e-7, which is what is measured. Each family runs
//! twice: on the CPU kernels, and with `CKPT_CPU_CONV=candle` on the candle ops that every other
//! device (CUDA) runs, so that path stays checked without a GPU.

use safetensors::Dtype;

use crate::util::*;

/// Largest difference from torchvision's logits, relative to the largest logit. Measured: at
/// most 5e-7 on both paths (f32 sums in another order); 4e-6 leaves room for other CPUs' FMA and
/// thread counts and still fails a wrong padding, activation or BN epsilon by orders of
/// magnitude.
const LOGITS_TOLERANCE: f64 = 4e-6;

fn check_family(model: &str, io: &str, arch_words: &[&str]) {
    for env in [&[][..], &[("CKPT_CPU_CONV", "candle")][..]] {
        check_family_with(model, io, arch_words, env);
    }
}

fn check_family_with(model: &str, io: &str, arch_words: &[&str], env: &[(&str, &str)]) {
    let worst = logits_difference(&fixture(model), &fixture(io), env, arch_words);
    assert!(
        worst < LOGITS_TOLERANCE,
        "{model} {env:?}: relative difference {worst:e}"
    );
}

#[test]
fn basic_block_resnet_matches_torchvision() {
    check_family(
        "tiny/epoch_10.safetensors",
        "zoo/tiny_resnet_io.safetensors",
        &["BasicBlock [1, 1, 1, 1]", "10 classes"],
    );
}

#[test]
fn grouped_bottleneck_resnet_matches_torchvision() {
    check_family(
        "zoo/resnext_tiny.safetensors",
        "zoo/resnext_tiny_io.safetensors",
        &["Bottleneck [1, 2, 1, 1]", "groups 4"],
    );
}

#[test]
fn mobilenet_v2_matches_torchvision() {
    check_family(
        "zoo/mobilenet_v2_tiny.safetensors",
        "zoo/mobilenet_v2_tiny_io.safetensors",
        &["mobilenet_v2", "7 classes"],
    );
}

#[test]
fn efficientnet_matches_torchvision() {
    check_family(
        "zoo/efficientnet_tiny.safetensors",
        "zoo/efficientnet_tiny_io.safetensors",
        &["efficientnet", "depths [1, 1, 1, 2, 2, 2, 1]"],
    );
}

#[test]
fn ddp_training_checkpoint_runs_too() {
    check_family(
        "tiny/train_epoch_10.pth.tar",
        "zoo/tiny_resnet_io.safetensors",
        &["resnet"],
    );
}

#[test]
fn top_k_keeps_the_largest() {
    let d = TestDir::new();
    let io = fixture("zoo/tiny_resnet_io.safetensors");
    d.run(&[
        "-q",
        "logits",
        &p(&fixture("tiny/epoch_10.safetensors")),
        "--input",
        &p(&io),
        "--top-k",
        "3",
        "-o",
        "k.safetensors",
    ])
    .ok();
    let got = read_st(&d.path("k.safetensors"));
    assert_eq!(got["topk_indices"].dtype, Dtype::I64);
    assert_eq!(got["topk_values"].shape, vec![4, 3]);
    let want = as_f64(&read_st(&io)["logits"]);
    let idx: Vec<i64> = got["topk_indices"]
        .data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let vals = as_f64(&got["topk_values"]);
    for row in 0..4 {
        let r = &want[row * 10..row * 10 + 10];
        let mut order: Vec<usize> = (0..10).collect();
        order.sort_by(|&a, &b| r[b].total_cmp(&r[a]));
        assert_eq!(
            idx[row * 3..row * 3 + 3],
            order[..3].iter().map(|&i| i as i64).collect::<Vec<_>>()[..]
        );
        assert!((vals[row * 3] - r[order[0]]).abs() < 1e-4 * r[order[0]].abs().max(1.0));
    }
}

#[test]
fn bad_model_or_input_is_a_clear_error() {
    let d = TestDir::new();
    let io = p(&fixture("zoo/tiny_resnet_io.safetensors"));
    // A checkpoint that is no known architecture.
    write_st(
        &d.path("odd.safetensors"),
        &[(
            "encoder.weight",
            Dtype::F32,
            vec![2, 2],
            f32_bytes(&[0.0; 4]),
        )],
    );
    d.run(&[
        "-q",
        "logits",
        "odd.safetensors",
        "--input",
        &io,
        "-o",
        "o.safetensors",
    ])
    .fails_with(&[
        "odd.safetensors",
        "not a supported architecture",
        "tried resnet, mobilenet_v2, efficientnet",
    ]);
    // An input without the tensor, and one of the wrong shape.
    d.run(&[
        "-q",
        "logits",
        &p(&fixture("tiny/epoch_10.safetensors")),
        "--input",
        &p(&fixture("tiny/epoch_1.safetensors")),
        "-o",
        "o.safetensors",
    ])
    .fails_with(&["epoch_1.safetensors", "no tensor \"input\""]);
    write_st(
        &d.path("flat.safetensors"),
        &[("input", Dtype::F32, vec![2, 4], f32_bytes(&[0.0; 8]))],
    );
    d.run(&[
        "-q",
        "logits",
        &p(&fixture("tiny/epoch_10.safetensors")),
        "--input",
        "flat.safetensors",
        "-o",
        "o.safetensors",
    ])
    .fails_with(&["flat.safetensors", "[N, 3, H, W]"]);
    // An empty batch.
    write_st(
        &d.path("empty.safetensors"),
        &[("input", Dtype::F32, vec![0, 3, 28, 28], Vec::new())],
    );
    d.run(&[
        "-q",
        "logits",
        &p(&fixture("tiny/epoch_10.safetensors")),
        "--input",
        "empty.safetensors",
        "-o",
        "o.safetensors",
    ])
    .fails_with(&["empty.safetensors", "[0, 3, 28, 28]", "no images"]);
    // A cuda device on a build without the feature.
    if !cfg!(feature = "cuda") {
        d.run(&[
            "-q",
            "logits",
            &p(&fixture("tiny/epoch_10.safetensors")),
            "--input",
            &io,
            "-o",
            "o.safetensors",
            "--device",
            "cuda",
        ])
        .fails_with(&["--device cuda:0", "without the cuda feature"]);
    }
    assert!(!d.path("o.safetensors").exists());
}

/// Issue 14: `logits --data` over a labelled folder writes every image's logits and label in
/// folder order, with the image paths in the metadata; top-1 computed from them is PyTorch's
/// (fixtures/expected/digits_accuracy.json, the same 200 digits), and --top-k keeps each row's
/// largest logits.
#[test]
fn logits_over_a_folder_give_pytorchs_accuracy_issue_14() {
    let d = TestDir::new();
    let model = p(&fixture("tiny/epoch_10.safetensors"));
    let data = p(&fixture("digits/val"));
    let mut args: Vec<String> = [
        "-q",
        "logits",
        &model,
        "--data",
        &data,
        "-o",
        "all.safetensors",
    ]
    .map(String::from)
    .to_vec();
    args.extend(crate::eval::DIGITS.iter().map(|s| s.to_string()));
    d.run(&args).ok();
    let got = read_st(&d.path("all.safetensors"));
    assert_eq!(got["logits"].shape, vec![200, 10]);
    assert_eq!(got["labels"].shape, vec![200]);
    let logits = as_f64(&got["logits"]);
    let labels: Vec<i64> = got["labels"]
        .data
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let argmax = |row: &[f64]| (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
    let correct = logits
        .chunks(10)
        .zip(&labels)
        .filter(|(row, &l)| argmax(row) as i64 == l)
        .count();
    let want = crate::eval::accuracy_reference()["epoch_10"]["top1"]
        .as_f64()
        .unwrap();
    assert!(
        (100.0 * correct as f64 / 200.0 - want).abs() <= 0.5,
        "top-1 from the logits {correct}/200, PyTorch {want} %"
    );
    let meta = read_metadata(&d.path("all.safetensors"));
    let images: Vec<String> = serde_json::from_str(&meta["ckpt.images"]).unwrap();
    assert_eq!(images.len(), 200);
    let mut sorted = images.clone();
    sorted.sort();
    assert_eq!(images, sorted, "folder order");
    // Labels follow the class folders.
    for (img, l) in images.iter().zip(&labels) {
        assert!(img.starts_with(&format!("{l}/")), "{img} has label {l}");
    }
    args[6] = "top.safetensors".into();
    args.extend(["--top-k".to_string(), "3".into()]);
    d.run(&args).ok();
    let top = read_st(&d.path("top.safetensors"));
    let idx: Vec<i64> = top["topk_indices"]
        .data
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (row, first) in logits.chunks(10).zip(idx.chunks(3)) {
        assert_eq!(first[0], argmax(row) as i64);
    }
}

/// `--input` reads the batch tensor a batch at a time from the mapped file and lets each batch's
/// pages of the map go once they are read, as hashing the file for the output's provenance does
/// with each piece it hashed: peak memory is about one batch, neither a full f32 copy of the
/// input nor the file's pages. Measured on 64 images of 3 x 384 x 384 in f32 (113 MB) through
/// the tiny fixture ResNet, 4 a batch (release build, a file not hashed before): 39 MB peak;
/// 142 MB when the mapped pages stayed resident (or when only the batches let theirs go: the
/// hash then read the whole file back in), 245 MB when the whole input was converted first. The
/// bound, half the file, fails all three.
#[test]
fn input_batches_are_read_as_they_are_needed() {
    let d = TestDir::new();
    let (n, s) = (64usize, 384usize);
    let mut state = 0x2545_f491_u32;
    let pixels: Vec<f32> = (0..n * 3 * s * s)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    let input = d.path("input.safetensors");
    write_st(
        &input,
        &[("input", Dtype::F32, vec![n, 3, s, s], f32_bytes(&pixels))],
    );
    drop(pixels);
    let file = std::fs::metadata(&input).unwrap().len();
    let model = fixture("tiny/epoch_1.safetensors");
    let out = d.path("logits.safetensors");
    let (run, peak) = d.run_measured(&[
        "logits".as_ref(),
        model.as_os_str(),
        "--input".as_ref(),
        input.as_os_str(),
        "--batch-size".as_ref(),
        "4".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    run.ok();
    assert_eq!(read_st(&out)["logits"].shape, vec![n, 10]);
    assert!(
        (peak as f64) < 0.5 * file as f64,
        "peak {} MB for a {} MB input",
        peak >> 20,
        file >> 20
    );
}

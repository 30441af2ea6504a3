//! Guarantees every command keeps: inputs are byte-identical afterwards, and reading a huge
//! checkpoint does not read it into memory.

use crate::util::*;

#[test]
fn inputs_are_byte_identical_after_every_command() {
    let d = TestDir::new();
    let inputs = d.copy_in(&[
        fixture("tiny/epoch_5.safetensors"),
        fixture("tiny/epoch_10.safetensors"),
        fixture("tiny/train_epoch_10.pth.tar"),
        fixture("zoo/tiny_resnet_io.safetensors"),
    ]);
    let before: Vec<String> = inputs.iter().map(|f| sha256(f)).collect();
    let digits = p(&fixture("digits/val"));
    let norm = crate::eval::DIGITS;
    let runs: Vec<Vec<String>> = vec![
        vec!["inspect", "--tensors", "train_epoch_10.pth.tar"],
        vec![
            "swa",
            "epoch_5.safetensors",
            "epoch_10.safetensors",
            "train_epoch_10.pth.tar",
            "-o",
            "a.safetensors",
        ],
        vec![
            "ema",
            "epoch_5.safetensors",
            "epoch_10.safetensors",
            "--decay",
            "0.9",
            "-o",
            "b.safetensors",
        ],
        vec![
            "logits",
            "epoch_10.safetensors",
            "--input",
            "tiny_resnet_io.safetensors",
            "-o",
            "c.safetensors",
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .chain([
        ["eval", "train_epoch_10.pth.tar", "--data", &digits]
            .iter()
            .chain(&norm)
            .map(|s| s.to_string())
            .collect(),
        [
            "recal-bn",
            "epoch_10.safetensors",
            "--data",
            &digits,
            "-o",
            "e.safetensors",
        ]
        .iter()
        .chain(&norm)
        .map(|s| s.to_string())
        .collect(),
        [
            "sweep-res",
            "epoch_10.safetensors",
            "--data",
            &digits,
            "--sizes",
            "32",
            "--mean",
            "0.5",
            "--std",
            "0.5",
            "--crop-pct",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ])
    .collect();
    for args in &runs {
        let mut a = vec!["-q".to_string()];
        a.extend(args.iter().cloned());
        d.run(&a).ok();
        let after: Vec<String> = inputs.iter().map(|f| sha256(f)).collect();
        assert_eq!(before, after, "after ckpt {}", args.join(" "));
    }
}

/// `inspect` of a 10 GB (sparse) checkpoint maps it and reads only the header.
#[test]
fn inspect_of_a_10_gb_checkpoint_stays_small() {
    let d = TestDir::new();
    let n: u64 = 10_000_000_000;
    let header = format!(r#"{{"huge":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let path = d.path("huge.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(bytes.len() as u64 + n)
        .unwrap();
    let (run, bytes) = d.run_measured(&[
        std::ffi::OsStr::new("inspect"),
        "--json".as_ref(),
        path.as_os_str(),
    ]);
    let kb = bytes / 1024;
    let j: serde_json::Value = serde_json::from_str(&run.ok().stdout).unwrap();
    assert_eq!(j["total_bytes"], n);
    assert!(
        kb > 0 && kb < 64 * 1024,
        "inspect used {kb} kB of resident memory"
    );
}

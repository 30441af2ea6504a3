//! Malformed checkpoints: each one is a non-zero exit with one line that names the file and
//! what is wrong, never a panic.

use std::path::PathBuf;

use crate::util::*;

/// A safetensors file from a raw header and `data` bytes of payload.
fn raw_st(d: &TestDir, name: &str, header: &str, data: usize) -> PathBuf {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + data, 0);
    let path = d.path(name);
    std::fs::write(&path, v).unwrap();
    path
}

fn inspect_fails(d: &TestDir, path: &std::path::Path, needles: &[&str]) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut all = vec![name.as_str()];
    all.extend_from_slice(needles);
    d.run(&["-q", "inspect", &p(path)]).fails_with(&all);
}

const ONE: &str = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;

#[test]
fn empty_file() {
    let d = TestDir::new();
    std::fs::write(d.path("empty.safetensors"), b"").unwrap();
    inspect_fails(&d, &d.path("empty.safetensors"), &["truncated"]);
}

#[test]
fn truncated_in_header() {
    let d = TestDir::new();
    let f = raw_st(&d, "t.safetensors", ONE, 8);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..20]).unwrap();
    inspect_fails(&d, &f, &["truncated in the header"]);
}

#[test]
fn truncated_in_data() {
    let d = TestDir::new();
    let f = raw_st(&d, "t.safetensors", ONE, 4);
    inspect_fails(&d, &f, &["tensor a", "out of range", "truncated"]);
}

#[test]
fn truncated_real_checkpoint() {
    let d = TestDir::new();
    let bytes = std::fs::read(fixture("tiny/epoch_10.safetensors")).unwrap();
    std::fs::write(d.path("cut.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    inspect_fails(&d, &d.path("cut.safetensors"), &["out of range"]);
}

#[test]
fn header_longer_than_file() {
    let d = TestDir::new();
    let mut v = 5000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    std::fs::write(d.path("h.safetensors"), v).unwrap();
    inspect_fails(&d, &d.path("h.safetensors"), &["header length 5000"]);
}

#[test]
fn header_of_absurd_size_is_refused_before_reading() {
    let d = TestDir::new();
    let mut v = 200_000_000u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    std::fs::write(d.path("huge.safetensors"), v).unwrap();
    inspect_fails(
        &d,
        &d.path("huge.safetensors"),
        &["over the 100000000-byte limit"],
    );
}

#[test]
fn invalid_json() {
    let d = TestDir::new();
    let f = raw_st(&d, "j.safetensors", r#"{"a":{"dtype":"F32","#, 0);
    inspect_fails(&d, &f, &["not valid JSON"]);
}

#[test]
fn overlapping_offsets() {
    let d = TestDir::new();
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    inspect_fails(&d, &raw_st(&d, "o.safetensors", h, 12), &["overlaps"]);
}

#[test]
fn offsets_out_of_range() {
    let d = TestDir::new();
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[100,108]}}"#;
    inspect_fails(
        &d,
        &raw_st(&d, "r.safetensors", h, 8),
        &["tensor a", "out of range"],
    );
}

#[test]
fn offsets_not_covering_the_data() {
    let d = TestDir::new();
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    inspect_fails(
        &d,
        &raw_st(&d, "hole.safetensors", h, 16),
        &["tensor a", "hole"],
    );
    inspect_fails(
        &d,
        &raw_st(&d, "tail.safetensors", ONE, 12),
        &["4 bytes after the last tensor"],
    );
}

#[test]
fn offsets_disagree_with_shape() {
    let d = TestDir::new();
    let h = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    inspect_fails(
        &d,
        &raw_st(&d, "s.safetensors", h, 8),
        &["tensor a", "needs 12"],
    );
}

#[test]
fn unknown_dtype() {
    let d = TestDir::new();
    let h = r#"{"a":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}"#;
    inspect_fails(
        &d,
        &raw_st(&d, "u.safetensors", h, 8),
        &["tensor a", "unknown dtype F7"],
    );
}

#[test]
fn shape_whose_element_count_overflows() {
    let d = TestDir::new();
    let h = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}"#;
    inspect_fails(
        &d,
        &raw_st(&d, "big.safetensors", h, 8),
        &["tensor a", "more elements than can be addressed"],
    );
}

#[test]
fn duplicate_keys() {
    let d = TestDir::new();
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    inspect_fails(
        &d,
        &raw_st(&d, "dup.safetensors", h, 16),
        &["tensor a twice"],
    );
}

#[test]
fn non_tensor_entry() {
    let d = TestDir::new();
    inspect_fails(
        &d,
        &raw_st(&d, "n.safetensors", r#"{"a":[1,2,3]}"#, 0),
        &["tensor a", "not a JSON object"],
    );
}

#[test]
fn sharded_index_with_missing_shard() {
    let d = TestDir::new();
    std::fs::write(
        d.path("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"gone.safetensors"}}"#,
    )
    .unwrap();
    inspect_fails(
        &d,
        &d.path("model.safetensors.index.json"),
        &["gone.safetensors", "missing"],
    );
}

#[test]
fn sharded_index_pointing_outside_its_folder() {
    let d = TestDir::new();
    std::fs::create_dir(d.path("ck")).unwrap();
    raw_st(&d, "outside.safetensors", ONE, 8);
    std::fs::write(
        d.path("ck/model.safetensors.index.json"),
        r#"{"weight_map":{"a":"../outside.safetensors"}}"#,
    )
    .unwrap();
    inspect_fails(
        &d,
        &d.path("ck/model.safetensors.index.json"),
        &["outside the index's folder"],
    );
}

#[test]
fn sharded_index_naming_a_tensor_its_shard_lacks() {
    let d = TestDir::new();
    raw_st(&d, "s1.safetensors", ONE, 8);
    std::fs::write(
        d.path("x.safetensors.index.json"),
        r#"{"weight_map":{"a":"s1.safetensors","b":"s1.safetensors"}}"#,
    )
    .unwrap();
    inspect_fails(
        &d,
        &d.path("x.safetensors.index.json"),
        &["tensor b", "does not hold it"],
    );
}

#[test]
fn json_that_is_not_a_sharded_index() {
    let d = TestDir::new();
    std::fs::write(d.path("config.json"), r#"{"hidden_size": 3}"#).unwrap();
    inspect_fails(&d, &d.path("config.json"), &["not a sharded index"]);
}

#[test]
fn pickle_calling_os_system_is_refused() {
    let d = TestDir::new();
    inspect_fails(
        &d,
        &fixture("bad/os_system.pth"),
        &["system", "never runs code"],
    );
}

#[test]
fn torch_save_with_missing_record() {
    let d = TestDir::new();
    inspect_fails(
        &d,
        &fixture("bad/missing_record.pth"),
        &["storage record", "missing from the archive"],
    );
}

#[test]
fn non_tensor_in_state_dict() {
    let d = TestDir::new();
    inspect_fails(
        &d,
        &fixture("bad/non_tensor.pth"),
        &["tensor step", "expected a tensor, found an integer"],
    );
}

#[test]
fn truncated_torch_save() {
    let d = TestDir::new();
    let bytes = std::fs::read(fixture("tiny/epoch_10.pth")).unwrap();
    std::fs::write(d.path("cut.pth"), &bytes[..bytes.len() / 2]).unwrap();
    inspect_fails(&d, &d.path("cut.pth"), &["not a readable zip archive"]);
}

#[test]
fn legacy_torch_save() {
    let d = TestDir::new();
    // What torch.save(..., _use_new_zipfile_serialization=False) starts with: the magic number.
    std::fs::write(
        d.path("old.pth"),
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
    )
    .unwrap();
    inspect_fails(&d, &d.path("old.pth"), &["legacy"]);
}

#[test]
fn missing_file() {
    let d = TestDir::new();
    inspect_fails(&d, &d.path("nope.safetensors"), &["cannot open"]);
}

#[test]
fn folder_without_a_checkpoint() {
    let d = TestDir::new();
    std::fs::create_dir(d.path("empty")).unwrap();
    inspect_fails(&d, &d.path("empty"), &["no *.safetensors.index.json"]);
}

/// Found by benches/forward_bench.py: a valid safetensors file whose header length's low byte
/// is 0x80 was taken for a legacy pickle.
#[test]
fn regression_safetensors_header_length_ending_in_0x80_is_not_a_pickle() {
    let d = TestDir::new();
    let mut h = ONE.to_string();
    while h.len() < 0x180 {
        h.push(' ');
    }
    let f = raw_st(&d, "pad.safetensors", &h, 8);
    assert_eq!(std::fs::read(&f).unwrap()[0], 0x80);
    let j = d.run(&["inspect", "--json", &p(&f)]).ok().json();
    assert_eq!(j["num_tensors"], 1);
}

/// A torch.save archive whose data.pkl nests lists thousands deep (a pickle bomb): refused with
/// an error, no stack overflow.
#[test]
fn pickle_bomb_is_refused() {
    use std::io::Write;
    let d = TestDir::new();
    let mut pkl = vec![0x80, 2];
    pkl.extend(std::iter::repeat_n(b']', 100_000));
    pkl.extend(std::iter::repeat_n(b'a', 99_999));
    pkl.push(b'.');
    let f = std::fs::File::create(d.path("bomb.pth")).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("bomb/data.pkl", opts).unwrap();
    z.write_all(&pkl).unwrap();
    z.start_file("bomb/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    z.finish().unwrap();
    inspect_fails(
        &d,
        &d.path("bomb.pth"),
        &["nests containers more than 1000 deep"],
    );
}

#[test]
fn nan_weights_are_refused_by_forward_passes() {
    let d = TestDir::new();
    let mut st = read_st(&fixture("tiny/epoch_10.safetensors"));
    let w = st.get_mut("fc.weight").unwrap();
    w.data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .map(|(k, t)| (k.as_str(), t.dtype, t.shape.clone(), t.data.clone()))
        .collect();
    write_st(&d.path("nan.safetensors"), &tensors);
    d.run(&[
        "-q",
        "logits",
        "nan.safetensors",
        "--input",
        &p(&fixture("zoo/tiny_resnet_io.safetensors")),
        "-o",
        "o.safetensors",
    ])
    .fails_with(&["nan.safetensors", "tensor fc.weight", "NaN at element 2"]);
    assert!(!d.path("o.safetensors").exists());
}

/// Classes 0 and 1 of the digits (3 images each) in `val/`, and `classes.txt`, the class map
/// that says they are the model's 0 and 1 (two of ten classes would otherwise be warned about).
fn digits_copy(d: &TestDir) -> std::path::PathBuf {
    let root = d.path("val");
    std::fs::write(d.path("classes.txt"), "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n").unwrap();
    for class in ["0", "1"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for e in std::fs::read_dir(fixture(&format!("digits/val/{class}")))
            .unwrap()
            .take(3)
        {
            let e = e.unwrap();
            std::fs::copy(e.path(), root.join(class).join(e.file_name())).unwrap();
        }
    }
    root
}

#[test]
fn image_folder_with_a_corrupt_jpeg_or_an_empty_png() {
    let d = TestDir::new();
    let root = digits_copy(&d);
    let model = p(&fixture("tiny/epoch_10.safetensors"));
    let run = |d: &TestDir, extra: &[&str]| {
        let mut a = vec![
            "-q",
            "eval",
            model.as_str(),
            "--data",
            "val",
            "--size",
            "32",
            "--crop-pct",
            "1",
            "--class-map",
            "classes.txt",
        ];
        a.extend_from_slice(extra);
        d.run(&a)
    };
    let bytes = std::fs::read(fixture("images/colour/astronaut.jpg")).unwrap();
    std::fs::write(root.join("0/broken.jpg"), &bytes[..bytes.len() / 3]).unwrap();
    run(&d, &[]).fails_with(&["broken.jpg"]);
    std::fs::remove_file(root.join("0/broken.jpg")).unwrap();
    std::fs::write(root.join("1/empty.png"), b"").unwrap();
    run(&d, &[]).fails_with(&["empty.png"]);
    // --skip-bad reads the others and says which were skipped.
    let r = d
        .run(&[
            "eval",
            &model,
            "--data",
            "val",
            "--size",
            "32",
            "--crop-pct",
            "1",
            "--skip-bad",
            "--json",
            "--class-map",
            "classes.txt",
        ])
        .ok();
    assert_eq!(r.json()["images"], 6);
    assert_eq!(r.json()["skipped"], 1);
    assert!(r.stderr.contains("empty.png"), "{}", r.stderr);
}

#[test]
fn output_folder_that_is_a_file() {
    let d = TestDir::new();
    std::fs::write(d.path("file"), b"x").unwrap();
    d.run(&[
        "-q",
        "swa",
        &p(&snapshots()[0]),
        &p(&snapshots()[1]),
        "-o",
        "file/out.safetensors",
    ])
    .fails_with(&["file/out.safetensors", "does not exist"]);
}

/// A tensor the architecture needs with the wrong shape: one line, even with RUST_BACKTRACE=1
/// (candle then appends a backtrace to its errors).
#[test]
fn misshapen_tensor_is_one_line_even_with_backtraces_on() {
    let d = TestDir::new();
    let st = read_st(&fixture("tiny/epoch_10.safetensors"));
    let mut tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .map(|(k, t)| (k.as_str(), t.dtype, t.shape.clone(), t.data.clone()))
        .collect();
    for t in &mut tensors {
        if t.0 == "fc.bias" {
            t.2 = vec![11];
            t.3 = f32_bytes(&[0.0; 11]);
        }
    }
    write_st(&d.path("odd_fc.safetensors"), &tensors);
    let args = [
        "-q",
        "logits",
        "odd_fc.safetensors",
        "--input",
        &p(&fixture("zoo/tiny_resnet_io.safetensors")),
        "-o",
        "o.safetensors",
    ];
    d.run_env(&args, &[("RUST_BACKTRACE", "1")]).fails_with(&[
        "odd_fc.safetensors",
        "tensor fc.bias has shape [11], expected [10]",
    ]);
}

/// A torch.save archive `name` (prefix `a/`) holding `pkl` as data.pkl and the given storage
/// records, all stored uncompressed.
fn torch_zip(d: &TestDir, name: &str, pkl: &[u8], records: &[(&str, &[u8])]) -> PathBuf {
    use std::io::Write;
    let path = d.path(name);
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("a/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("a/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    for (key, bytes) in records {
        z.start_file(format!("a/data/{key}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    path
}

/// Found while fuzzing the pth reader: a tensor whose offset and stride reach the last
/// addressable element made the bounds check's `last + 1` overflow (a panic in a debug build, and
/// in a release build a wrapped size of 0 that passed the check).
#[test]
fn regression_fuzz_pth_tensor_reaching_the_last_addressable_element() {
    let d = TestDir::new();
    let long = |v: u64| {
        let mut b = vec![0x8a, 8];
        b.extend_from_slice(&v.to_le_bytes());
        b
    };
    // {"w": _rebuild_tensor_v2(storage, offset=2**63-1, size=(2**62+1,), stride=(2,))}
    let mut pkl = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    pkl.extend_from_slice(
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ",
    );
    pkl.extend(long(i64::MAX as u64));
    pkl.extend(long((1 << 62) + 1));
    pkl.extend_from_slice(b"\x85K\x02\x85tRu.");
    let f = torch_zip(&d, "overflow.pth", &pkl, &[("0", &[0; 4])]);
    inspect_fails(&d, &f, &["tensor w", "too large"]);
}

/// Found while fuzzing the pickle reader: `set(x)` called 1,600 times on one memoised list of
/// 10,000 items, a 20 KB data.pkl that copied 16 million values (seconds and hundreds of MB; a
/// larger file, without bound).
#[test]
fn regression_fuzz_pickle_copying_a_memoised_list_again_and_again() {
    let d = TestDir::new();
    let mut pkl = b"\x80\x02c__builtin__\nset\nq\x00](".to_vec();
    pkl.extend(std::iter::repeat_n(b'N', 10_000));
    pkl.extend_from_slice(b"eq\x01");
    for _ in 0..1600 {
        pkl.extend_from_slice(b"h\x00h\x01\x85R0");
    }
    pkl.push(b'.');
    let f = torch_zip(&d, "copies.pth", &pkl, &[]);
    inspect_fails(&d, &f, &["pickle copies more than", "pickle bomb"]);
}

/// Found while fuzzing the pickle reader: a dict of 50,000 distinct keys took minutes, since
/// each new key was compared with every earlier one. Now linear; the file is then refused for
/// holding no tensors.
#[test]
fn regression_fuzz_pickle_dict_with_many_keys() {
    let d = TestDir::new();
    let mut pkl = b"\x80\x02}(".to_vec();
    for i in 0..50_000 {
        let k = format!("{i:05}");
        pkl.extend_from_slice(&[0x8c, k.len() as u8]);
        pkl.extend_from_slice(k.as_bytes());
        pkl.push(b'N');
    }
    pkl.extend_from_slice(b"u.");
    let f = torch_zip(&d, "keys.pth", &pkl, &[]);
    // Tests never assert on time; before the fix this case ran for minutes (quadratic in the
    // number of keys), which CI's time limit would expose.
    inspect_fails(&d, &f, &["no state dict found"]);
}

/// A deflated data.pkl of 257 MiB in a 260 kB file is refused by its size, before inflating it.
#[test]
fn oversized_pickle_is_refused_before_inflating() {
    use std::io::Write;
    let d = TestDir::new();
    let path = d.path("big_pickle.pth");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    z.start_file("a/data.pkl", opts).unwrap();
    let block = vec![b'N'; 1 << 20];
    for _ in 0..257 {
        z.write_all(&block).unwrap();
    }
    z.finish().unwrap();
    inspect_fails(&d, &path, &["data.pkl", "limit"]);
}

/// `torch.save(model)` of a whole module: its class is a placeholder (never imported), and the
/// error says what to save instead (issue 22).
#[test]
fn whole_module_saved_with_torch_save_issue_22() {
    let d = TestDir::new();
    // ResNet.__new__(ResNet) with the state {"training": 1} (NEWOBJ, BUILD), as pickle writes it.
    let pkl =
        b"\x80\x02ctorchvision.models.resnet\nResNet\n)\x81}X\x08\x00\x00\x00trainingK\x01sb.";
    let f = torch_zip(&d, "whole.pth", pkl, &[]);
    inspect_fails(
        &d,
        &f,
        &[
            "whole.pth",
            "torchvision.models.resnet.ResNet object",
            "save model.state_dict()",
        ],
    );
}

// Issue 20: inputs that another process changes while ckpt reads them (a training run that
// rewrites `last.pth` in place, as torch.save does, every epoch), and decompression bombs. Each
// change happens while ckpt is stopped by its test hook (`TestDir::run_paused`): every input is
// open and mapped, the first output's temporary file exists, and what is left to read is not
// read yet.

const CHANGED: &str = "changed while being read: another process is writing it?";

/// Truncates `path` to `len` bytes, as `torch.save` does when it starts rewriting a file.
fn truncate(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Gives `path` a modification time an hour old, so that a rewrite is told apart from its
/// creation whatever the file system's timestamp granularity.
fn age(path: &std::path::Path) {
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
}

/// Rewrites the second half of `path` in place with other bytes, keeping its size.
fn rewrite_in_place(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n / 2..] {
        *b ^= 0x5a;
    }
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&bytes[n / 2..], (n / 2) as u64).unwrap();
    assert_eq!(f.metadata().unwrap().len(), n as u64);
}

fn swa_of(inputs: &[PathBuf]) -> Vec<String> {
    let mut a = vec!["-q".to_string(), "swa".into()];
    a.extend(inputs.iter().map(|s| p(s)));
    a.extend(["-o".into(), "out.safetensors".into()]);
    a
}

/// Asserts that the folder holds exactly `inputs`: no output, no temporary file.
fn only_inputs_left(d: &TestDir, inputs: &[PathBuf]) {
    let mut want: Vec<String> = inputs
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    want.sort();
    assert_eq!(d.listing(), want, "an output or temporary file was left");
}

/// Before: SIGBUS ("Bus error", exit 135) and the temporary output left behind.
#[test]
fn regression_20_snapshot_truncated_while_averaged() {
    let d = TestDir::new();
    let inputs = d.copy_in(&snapshots());
    let victim = inputs[2].clone();
    let len = std::fs::metadata(&victim).unwrap().len();
    d.run_paused(&swa_of(&inputs), || truncate(&victim, len / 2))
        .fails_with(&["epoch_5.safetensors", CHANGED]);
    only_inputs_left(&d, &inputs);
}

/// Before: an average of old and new weights, written without a word.
#[test]
fn regression_20_snapshot_rewritten_in_place_with_the_same_size() {
    let d = TestDir::new();
    let inputs = d.copy_in(&snapshots());
    let victim = inputs[1].clone();
    age(&victim);
    d.run_paused(&swa_of(&inputs), || rewrite_in_place(&victim))
        .fails_with(&[
            "epoch_2.safetensors",
            CHANGED,
            "modified, keeping its size",
            "the output was discarded",
        ]);
    only_inputs_left(&d, &inputs);
}

#[test]
fn regression_20_torch_save_input_truncated_or_rewritten_while_averaged() {
    let d = TestDir::new();
    let a = d.path("a.pth");
    let b = d.path("b.pth");
    std::fs::copy(fixture("tiny/epoch_10.pth"), &a).unwrap();
    std::fs::copy(fixture("tiny/epoch_10.pth"), &b).unwrap();
    let inputs = [a.clone(), b.clone()];
    d.run_paused(&swa_of(&inputs), || truncate(&b, 0))
        .fails_with(&["b.pth", CHANGED]);
    only_inputs_left(&d, &inputs);

    std::fs::copy(fixture("tiny/epoch_10.pth"), &b).unwrap();
    age(&b);
    d.run_paused(&swa_of(&inputs), || rewrite_in_place(&b))
        .fails_with(&["b.pth", CHANGED, "the output was discarded"]);
    only_inputs_left(&d, &inputs);
}

#[test]
fn regression_20_recal_bn_model_truncated_or_rewritten_while_read() {
    let d = TestDir::new();
    let model = d.copy_in(&[fixture("tiny/epoch_10.safetensors")]);
    let args = || {
        let mut a = vec![
            "-q".to_string(),
            "recal-bn".into(),
            p(&model[0]),
            "--data".into(),
            p(&fixture("digits/train")),
            "--max-images".into(),
            "64".into(),
            "-o".into(),
            "out.safetensors".into(),
        ];
        a.extend(crate::eval::DIGITS.iter().map(|s| s.to_string()));
        a
    };
    let len = std::fs::metadata(&model[0]).unwrap().len();
    d.run_paused(&args(), || truncate(&model[0], len / 3))
        .fails_with(&["epoch_10.safetensors", CHANGED]);
    only_inputs_left(&d, &model);

    std::fs::copy(fixture("tiny/epoch_10.safetensors"), &model[0]).unwrap();
    age(&model[0]);
    d.run_paused(&args(), || rewrite_in_place(&model[0]))
        .fails_with(&["epoch_10.safetensors", CHANGED, "the output was discarded"]);
    only_inputs_left(&d, &model);
}

/// A trainer that saves by writing a new file and renaming it over the old name (rename-on-save)
/// does not disturb a reader, which keeps the file it opened: no error, and the provenance
/// records the digest of the bytes that were averaged; a later run reads and digests the new file.
#[test]
fn regression_20_snapshot_replaced_by_rename_is_read_as_opened() {
    let d = TestDir::new();
    let inputs = d.copy_in(&snapshots());
    let victim = inputs[3].clone();
    let read_sha = sha256(&victim);
    let digest_of = |out: &str| -> String {
        let meta = read_metadata(&d.path(out));
        let list: Vec<serde_json::Value> = serde_json::from_str(&meta["ckpt.inputs"]).unwrap();
        let e = list
            .iter()
            .find(|e| e["file"] == "epoch_10.safetensors")
            .unwrap();
        e["sha256"].as_str().unwrap().to_string()
    };
    d.run_paused(&swa_of(&inputs), || {
        let tmp = d.path(".epoch_10.safetensors.tmp");
        std::fs::copy(&inputs[0], &tmp).unwrap();
        std::fs::rename(&tmp, &victim).unwrap();
    })
    .ok();
    assert_eq!(digest_of("out.safetensors"), read_sha);
    let mut again = swa_of(&inputs);
    *again.last_mut().unwrap() = "again.safetensors".into();
    d.run(&again).ok();
    assert_eq!(digest_of("again.safetensors"), sha256(&victim));
    assert_ne!(read_sha, sha256(&victim));
}

/// The hook itself: with nothing changed, the paused run writes its output as usual (so the
/// tests above fail because of the change, not because of the pause).
#[test]
fn regression_20_paused_run_with_nothing_changed_succeeds() {
    let d = TestDir::new();
    let inputs = d.copy_in(&snapshots());
    d.run_paused(&swa_of(&inputs), || {}).ok();
    assert_eq!(read_st(&d.path("out.safetensors")).len(), 74);
}

/// A PNG, a WebP, a BMP and a JPEG of a few hundred bytes whose headers claim more pixels than
/// PIL accepts (fixtures/make_bomb_fixtures.py, which checks that PIL refuses each). Before: the
/// PNG alone took 41 s and 10.6 GB in `ckpt eval`.
#[test]
fn regression_20_decompression_bombs_are_refused_from_their_headers() {
    const MAX_PEAK: u64 = 100 << 20;
    let d = TestDir::new();
    let root = digits_copy(&d);
    let model = p(&fixture("tiny/epoch_10.safetensors"));
    let eval = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            model.as_str(),
            "--data",
            "val",
            "--size",
            "32",
            "--crop-pct",
            "1",
            "--class-map",
            "classes.txt",
        ];
        a.extend_from_slice(extra);
        d.run_measured(&a)
    };
    let bombs = ["bomb.png", "bomb.webp", "bomb.bmp", "bomb.jpg"];
    for name in bombs {
        let to = root.join("1").join(name);
        std::fs::copy(fixture(&format!("bad/bombs/{name}")), &to).unwrap();
        let (run, peak) = eval(&["-q"]);
        let run = run.fails_with(&[name, "pixels", "over the limit of 178956970 pixels"]);
        assert!(
            peak < MAX_PEAK,
            "{name}: peak memory {peak} bytes\n{}",
            run.dump()
        );
        std::fs::remove_file(&to).unwrap();
    }
    // --skip-bad skips and counts them like any unreadable image.
    for name in bombs {
        std::fs::copy(
            fixture(&format!("bad/bombs/{name}")),
            root.join("0").join(name),
        )
        .unwrap();
    }
    let (run, peak) = eval(&["--skip-bad", "--json"]);
    let run = run.ok();
    assert_eq!(run.json()["images"], 6, "{}", run.dump());
    assert_eq!(run.json()["skipped"], 4, "{}", run.dump());
    for name in bombs {
        assert!(run.stderr.contains(name), "{}", run.dump());
    }
    assert!(peak < MAX_PEAK, "peak memory {peak} bytes\n{}", run.dump());
}

/// `--max-image-pixels` is the one limit of every format: the 32 x 32 digits pass at 1024 and
/// are refused at 1023.
#[test]
fn regression_20_max_image_pixels_sets_the_limit() {
    let d = TestDir::new();
    digits_copy(&d);
    let model = p(&fixture("tiny/epoch_10.safetensors"));
    let args = |limit: &str| {
        vec![
            "-q".to_string(),
            "eval".into(),
            model.clone(),
            "--data".into(),
            "val".into(),
            "--size".into(),
            "32".into(),
            "--crop-pct".into(),
            "1".into(),
            "--max-image-pixels".into(),
            limit.into(),
            "--class-map".into(),
            "classes.txt".into(),
        ]
    };
    d.run(&args("1024")).ok();
    d.run(&args("1023")).fails_with(&[
        "digit_",
        "32x32 pixels (1024) is over the limit of 1023 pixels",
    ]);
}

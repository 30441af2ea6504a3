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

//! `ckpt inspect`: every checkpoint form reports what PyTorch says about the model.

use crate::util::*;

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected/tiny_resnet.json")).unwrap())
        .unwrap()
}

fn check_form(path: &str, extra: &[&str]) -> serde_json::Value {
    let d = TestDir::new();
    let mut args = vec!["inspect".to_string(), "--json".into(), p(&fixture(path))];
    args.extend(extra.iter().map(|s| s.to_string()));
    let j = d.run(&args).ok().json();
    let want = expected();
    assert_eq!(
        j["num_params"], want["num_params"],
        "{path}: parameter count (PyTorch's)"
    );
    assert_eq!(j["num_tensors"], want["num_tensors"], "{path}");
    assert_eq!(
        j["bn_layers"], want["bn_layers"],
        "{path}: BN layers in state-dict order"
    );
    j
}

#[test]
fn safetensors_file() {
    let j = check_form("tiny/epoch_10.safetensors", &[]);
    assert_eq!(j["format"], "safetensors");
    assert_eq!(j["dtypes"]["F32"], 62);
    assert_eq!(j["dtypes"]["I64"], 12);
    assert_eq!(j["total_bytes"], expected()["total_bytes_f32"]);
    assert_eq!(j["metadata"]["format"], "pt");
    assert_eq!(
        j["arch"],
        "resnet (BasicBlock [1, 1, 1, 1], widths [8, 16, 32, 64], groups 1) (10 classes)"
    );
}

#[test]
fn sharded_folder_and_index() {
    let j = check_form("tiny/sharded_epoch_5", &[]);
    assert_eq!(j["format"], "safetensors-sharded");
    assert_eq!(j["files"].as_array().unwrap().len(), 4);
    let j = check_form("tiny/sharded_epoch_5/model.safetensors.index.json", &[]);
    assert_eq!(j["format"], "safetensors-sharded");
}

#[test]
fn torch_save_state_dict() {
    let j = check_form("tiny/epoch_10.pth", &[]);
    assert_eq!(j["format"], "torch-save");
    assert_eq!(j["key"], serde_json::Value::Null);
    assert_eq!(j["stripped_prefix"], serde_json::Value::Null);
}

#[test]
fn ddp_training_checkpoint_strips_module_prefix() {
    let j = check_form("tiny/train_epoch_10.pth.tar", &[]);
    assert_eq!(j["key"], "state_dict");
    assert_eq!(j["key_picked"], true);
    assert_eq!(j["stripped_prefix"], "module.");
    // The same with the key named explicitly.
    let j = check_form("tiny/train_epoch_10.pth.tar", &["--key", "state_dict"]);
    assert_eq!(j["key_picked"], false);
}

#[test]
fn bf16_checkpoint() {
    let j = check_form("tiny/bf16/epoch_5.safetensors", &[]);
    assert_eq!(j["dtypes"]["BF16"], 62);
}

#[test]
fn keep_prefix_keeps_module() {
    let d = TestDir::new();
    let j = d
        .run(&[
            "inspect",
            "--json",
            "--keep-prefix",
            "--tensors",
            &p(&fixture("tiny/train_epoch_10.pth.tar")),
        ])
        .ok()
        .json();
    assert_eq!(j["stripped_prefix"], serde_json::Value::Null);
    assert_eq!(j["tensors"][0]["name"], "module.conv1.weight");
    assert_eq!(j["bn_layers"][0], "module.bn1");
}

#[test]
fn strip_prefix_must_fit_every_key() {
    let d = TestDir::new();
    d.run(&[
        "inspect",
        "-q",
        "--strip-prefix",
        "layer1.",
        &p(&fixture("tiny/epoch_10.pth")),
    ])
    .fails_with(&["epoch_10.pth", "--strip-prefix layer1.", "conv1.weight"]);
}

#[test]
fn key_errors_name_what_is_there() {
    let d = TestDir::new();
    let f = p(&fixture("tiny/train_epoch_10.pth.tar"));
    d.run(&["inspect", "-q", "--key", "nope", &f]).fails_with(&[
        "train_epoch_10.pth.tar",
        "--key nope",
        "state_dict",
        "optimizer",
    ]);
    // The optimizer's state dict is a dict, but of per-parameter dicts, not tensors.
    d.run(&["inspect", "-q", "--key", "optimizer", &f])
        .fails_with(&["train_epoch_10.pth.tar", "expected a tensor"]);
}

#[test]
fn text_output_lists_tensors() {
    let d = TestDir::new();
    let r = d
        .run(&[
            "inspect",
            "--tensors",
            &p(&fixture("tiny/train_epoch_10.pth.tar")),
        ])
        .ok();
    assert!(
        r.stdout
            .contains("key         state_dict (picked automatically"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("prefix      module."), "{}", r.stdout);
    assert!(r.stdout.contains("parameters  78,962"), "{}", r.stdout);
    assert!(
        r.stdout.contains("layer4.0.downsample.1.running_var"),
        "{}",
        r.stdout
    );
}

/// What labels a class folder gets for the model: inspect has no folder, so it records the
/// model's class count and the labellings that count gets without --class-map.
#[test]
fn class_count_and_default_labelling_issue_23() {
    let d = TestDir::new();
    let j = d
        .run(&[
            "inspect",
            "--json",
            &p(&fixture("tiny/epoch_10.safetensors")),
        ])
        .ok()
        .json();
    assert_eq!(j["num_classes"], 10);
    assert_eq!(j["labelling"], serde_json::json!(["folder-order"]));
    let r = d
        .run(&["inspect", &p(&fixture("synsets/resnet_in1k.safetensors"))])
        .ok();
    assert!(
        r.stdout
            .contains("classes     1000 (labels: ImageNet-1k synset order"),
        "{}",
        r.stdout
    );
    let j = d
        .run(&[
            "inspect",
            "--json",
            &p(&fixture("synsets/resnet_in1k.safetensors")),
        ])
        .ok()
        .json();
    assert_eq!(j["num_classes"], 1000);
    assert_eq!(
        j["labelling"],
        serde_json::json!(["imagenet-1k-synsets", "folder-order"])
    );
}

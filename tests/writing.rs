//! Writing guarantees: no overwrite without --force, never over an input, and no file left
//! behind by a failed write.

use crate::util::*;

fn swa_args(out: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["-q".to_string(), "swa".into()];
    a.extend(snapshots()[2..].iter().map(|s| p(s)));
    a.extend(["-o".to_string(), out.to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn existing_output_needs_force() {
    let d = TestDir::new();
    std::fs::write(d.path("out.safetensors"), b"precious").unwrap();
    d.run(&swa_args("out.safetensors", &[])).fails_with(&[
        "out.safetensors",
        "exists already",
        "--force",
    ]);
    assert_eq!(
        std::fs::read(d.path("out.safetensors")).unwrap(),
        b"precious"
    );
    d.run(&swa_args("out.safetensors", &["--force"])).ok();
    assert_eq!(read_st(&d.path("out.safetensors")).len(), 74);
    assert_eq!(d.listing(), ["out.safetensors"], "no temporary file left");
}

#[test]
fn an_input_is_never_the_output() {
    let d = TestDir::new();
    let inputs = d.copy_in(&snapshots()[2..]);
    let before = sha256(&inputs[0]);
    // Even spelled differently, and even with --force.
    std::fs::create_dir(d.path("sub")).unwrap();
    let args = vec![
        "-q".to_string(),
        "swa".into(),
        p(&inputs[0]),
        p(&inputs[1]),
        "-o".into(),
        "sub/../epoch_5.safetensors".into(),
        "--force".into(),
    ];
    d.run(&args)
        .fails_with(&["output is the input", "epoch_5.safetensors"]);
    assert_eq!(sha256(&inputs[0]), before);
}

#[test]
fn failed_write_leaves_no_file() {
    let d = TestDir::new();
    // Injected "disk full" after 100 kB of the ~320 kB output.
    d.run_env(
        &swa_args("out.safetensors", &[]),
        &[("CKPT_TEST_FAIL_WRITE_AFTER", "100000")],
    )
    .fails_with(&["out.safetensors", "No space left on device"]);
    assert!(d.listing().is_empty(), "left behind: {:?}", d.listing());
}

#[test]
fn failed_forced_replacement_keeps_the_old_file() {
    let d = TestDir::new();
    std::fs::write(d.path("out.safetensors"), b"old").unwrap();
    d.run_env(
        &swa_args("out.safetensors", &["--force"]),
        &[("CKPT_TEST_FAIL_WRITE_AFTER", "1000")],
    )
    .fails_with(&["No space left on device"]);
    assert_eq!(std::fs::read(d.path("out.safetensors")).unwrap(), b"old");
    assert_eq!(d.listing(), ["out.safetensors"]);
}

#[test]
fn output_folder_must_exist() {
    let d = TestDir::new();
    d.run(&swa_args("missing/out.safetensors", &[]))
        .fails_with(&["missing/out.safetensors", "does not exist"]);
}

#[test]
fn interrupted_write_leaves_no_file() {
    use std::process::{Command, Stdio};
    let d = TestDir::new();
    // Big enough inputs that the pass is still running when the signal arrives.
    let n = 8_000_000usize;
    for name in ["a", "b"] {
        let bytes = vec![0u8; n * 4];
        write_st(
            &d.path(&format!("{name}.safetensors")),
            &[("w", safetensors::Dtype::F32, vec![n], bytes)],
        );
    }
    let child = Command::new(env!("CARGO_BIN_EXE_ckpt"))
        .args([
            "-q",
            "--threads",
            "1",
            "swa",
            "a.safetensors",
            "b.safetensors",
            "-o",
            "out.safetensors",
        ])
        .current_dir(d.dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary output exists, then interrupt.
    let t0 = std::time::Instant::now();
    while !d.listing().iter().any(|f| f.ends_with(".tmp")) && t0.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    unsafe { libc_kill(child.id() as i32, 2) };
    let out = child.wait_with_output().unwrap();
    let listing = d.listing();
    if out.status.success() {
        // The pass won the race; then the output must be complete.
        assert_eq!(read_st(&d.path("out.safetensors")).len(), 1);
    } else {
        assert!(!listing.contains(&"out.safetensors".to_string()));
        assert!(
            !listing.iter().any(|f| f.ends_with(".tmp")),
            "left behind: {listing:?}"
        );
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

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

/// Runs `ckpt args` stopped at `point` (see `report::test_pause`), interrupts it there with
/// SIGINT and waits for it to end before letting it go on: the signal arrives mid-pass, never
/// after.
fn interrupted_at(d: &TestDir, point: &str, args: &[String]) -> Run {
    d.run_paused_at(point, args, |child| {
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let t0 = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(t0.elapsed().as_secs() < 60, "ckpt ignored SIGINT");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    })
}

#[test]
fn interrupted_write_leaves_no_file() {
    let d = TestDir::new();
    for name in ["a", "b"] {
        write_st(
            &d.path(&format!("{name}.safetensors")),
            &[("w", safetensors::Dtype::F32, vec![1000], vec![0u8; 4000])],
        );
    }
    let args: Vec<String> = [
        "-q",
        "swa",
        "a.safetensors",
        "b.safetensors",
        "-o",
        "out.safetensors",
    ]
    .map(String::from)
    .to_vec();
    let out = interrupted_at(&d, "average", &args);
    assert_ne!(out.code, Some(0), "the interrupted pass must fail");
    let listing = d.listing();
    assert_eq!(
        listing,
        ["a.safetensors", "b.safetensors"],
        "left behind: {listing:?}"
    );
}

/// Issue 14: a Ctrl-C while `swa --recal-bn` recalibrates the average (the signal arrives while
/// the calibration pass is paused) leaves no file behind: the average lives in memory until the
/// recalibrated output is written.
#[test]
fn interrupted_recalibration_leaves_no_file_issue_14() {
    let d = TestDir::new();
    d.copy_in(&[
        fixture("tiny/epoch_5.safetensors"),
        fixture("tiny/epoch_10.safetensors"),
    ]);
    let mut args: Vec<String> = [
        "-q",
        "swa",
        "epoch_5.safetensors",
        "epoch_10.safetensors",
        "-o",
        "out.safetensors",
        "--recal-bn",
    ]
    .map(String::from)
    .to_vec();
    args.push(p(&fixture("digits/train")));
    args.extend(crate::eval::DIGITS.iter().map(|s| s.to_string()));
    let out = interrupted_at(&d, "calibrate", &args);
    assert_ne!(out.code, Some(0), "the interrupted pass must fail");
    let listing = d.listing();
    assert_eq!(
        listing,
        ["epoch_10.safetensors", "epoch_5.safetensors"],
        "left behind: {listing:?}"
    );
}

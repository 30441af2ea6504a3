//! The shell completion scripts in completions/ are generated from the clap definitions, as the
//! man pages are; this test fails when they are stale and rewrites them when CKPT_UPDATE_MAN=1.

#[test]
fn completion_scripts_are_up_to_date() {
    crate::util::check_generated("completions", ckpt::cli::completion_files());
}

/// `ckpt completions SHELL` prints the same script that completions/ holds.
#[test]
fn completions_command_prints_the_script() {
    let d = crate::util::TestDir::new();
    for (shell, file) in [
        ("bash", "ckpt.bash"),
        ("zsh", "_ckpt"),
        ("fish", "ckpt.fish"),
    ] {
        let out = d.run(&["completions", shell]).ok();
        let want = ckpt::cli::completion_files()
            .into_iter()
            .find(|(n, _)| n == file)
            .unwrap()
            .1;
        assert_eq!(out.stdout.as_bytes(), want.as_slice(), "{shell}");
        assert!(out.stdout.contains("sweep-res"), "{shell}");
    }
    let r = d.run(&["completions", "tcsh"]);
    assert_eq!(r.code, Some(2), "a usage error");
    assert!(r.stderr.contains("invalid value 'tcsh'"), "{}", r.stderr);
}

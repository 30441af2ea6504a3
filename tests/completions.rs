//! The shell completion scripts in completions/ are generated from the clap definitions, as the
//! man pages are; this test fails when they are stale and rewrites them when CKPT_UPDATE_MAN=1.

use std::path::Path;

#[test]
fn completion_scripts_are_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("completions");
    let update = std::env::var_os("CKPT_UPDATE_MAN").is_some();
    let mut stale = Vec::new();
    for (name, content) in ckpt::cli::completion_files() {
        let path = dir.join(&name);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &content).unwrap();
        } else if std::fs::read(&path).ok().as_deref() != Some(content.as_slice()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "completion scripts changed, please run `CKPT_UPDATE_MAN=1 cargo test --test tests completions man`: {}",
        stale.join(", ")
    );
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

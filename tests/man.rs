//! The man pages in man/ are generated from the clap definitions; this test fails when they are
//! stale and rewrites them when CKPT_UPDATE_MAN=1.

use std::path::Path;

#[test]
fn man_pages_are_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    let update = std::env::var_os("CKPT_UPDATE_MAN").is_some();
    let mut stale = Vec::new();
    for (name, content) in ckpt::cli::man_pages() {
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
        "man pages changed, please run `CKPT_UPDATE_MAN=1 cargo test --test tests man`: {}",
        stale.join(", ")
    );
}

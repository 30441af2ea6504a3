//! The man pages in man/ are generated from the clap definitions; this test fails when they are
//! stale and rewrites them when CKPT_UPDATE_MAN=1.

#[test]
fn man_pages_are_up_to_date() {
    crate::util::check_generated("man", ckpt::cli::man_pages());
}

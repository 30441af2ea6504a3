//! ckpt's integration tests: one binary, a module per subcommand, a shared harness in `util`.

mod util;

mod backward;
mod bad_inputs;
mod completions;
mod data;
mod distill;
mod distill_cross;
mod distill_targets;
mod ema;
mod eval;
mod fixres;
mod guarantees;
mod hf_folder;
mod inspect;
mod logits;
mod man;
mod models;
mod recal_bn;
mod soup;
mod swa;
mod sweep_res;
mod timm;
mod trainers;
mod writing;
mod zoo2;

//! ckpt's integration tests: one binary, a module per subcommand, a shared harness in `util`.

mod util;

mod bad_inputs;
mod data;
mod ema;
mod inspect;
mod man;
mod swa;
mod writing;

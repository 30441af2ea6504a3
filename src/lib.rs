//! ckpt: make a trained image classifier better from its saved checkpoints alone.
//!
//! Data flows one way: [`cli`] (the one definition of the command line) <- [`commands`] (one
//! thin file per subcommand: arguments to engine configurations, then all printing) -> the
//! engines ([`average`], [`bn`], [`eval`], [`models`], [`data`], [`train`], [`soup`]) -> [`checkpoint`] (I/O, which
//! knows no architecture). Engines never import the CLI or a command and never print; progress
//! goes through the small [`report::Reporter`] a command hands them. No command imports another.

pub mod alloc;
pub mod average;
pub mod bn;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod data;
pub mod device;
pub mod eval;
pub mod models;
pub mod plot;
pub mod report;
pub mod soup;
pub mod train;

#[cfg(not(target_endian = "little"))]
compile_error!("ckpt reads tensor data in place and supports little-endian targets only");

//! ckpt: make a trained image classifier better from its saved checkpoints alone.
//!
//! Data flows one way: [`commands`] (argument handling and all printing) call the engines
//! ([`average`]), which read and write through [`checkpoint`]. Engines never print; progress goes
//! through the small [`report::Reporter`] a command hands them.

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

#[cfg(not(target_endian = "little"))]
compile_error!("ckpt reads tensor data in place and supports little-endian targets only");

//! recap: URL + alt-text lists in, complete, reconciled Parquet shards out, in one streaming
//! pass. See `../README.md` for the tour and `DESIGN.md` (in the project's shared notes) for the
//! data flow. Modules are named for where they sit in that flow.

pub mod augment;
pub mod config;
pub mod dedup;
pub mod engine;
pub mod error;
pub mod export;
pub mod fetch;
pub mod imaging;
pub mod models;
pub mod outcome;
pub mod panics;
pub mod reinforce;
pub mod report;
pub mod sink;
pub mod storage;
pub mod source;


pub mod cli;
#[cfg(feature = "query")]
pub mod query;
pub mod synth;
pub mod train;
pub use error::{Error, Result};

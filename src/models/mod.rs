//! Models in the stream, run by ONNX Runtime: a captioner (encoder + decoder with past key
//! values) and CLIP teachers, loaded from directories in the layouts Hugging Face / optimum
//! exports write.

pub mod captioner;
pub mod clip;
pub mod hf;
pub mod runtime;

pub use captioner::{Captioner, Decoding, EarlyStopping, GenerateOptions};
pub use clip::Clip;
pub use runtime::{Device, SessionOptions};

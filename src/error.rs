//! One error type for the whole crate. Bad *records* are never errors (they become a row's
//! `status` and `reason`); these are the failures that stop a command: a pipeline that does not
//! validate, an input that cannot be read, a disk that refuses a write.

use std::fmt;

/// Where a problem in a pipeline file sits, and what was wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// YAML path such as `download.concurrency` or `input.passthrough[1]`; empty for the root.
    pub path: String,
    /// What was found and what was expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "(root): {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A list of problems, printed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file is invalid; every problem found is listed.
    #[error("{file}: {} problem{} found:\n{problems}", problems.0.len(), if problems.0.len() == 1 { "" } else { "s" })]
    Config { file: String, problems: Problems },

    /// The input (URL list) cannot be read.
    #[error("input {path}: {message}")]
    Input { path: String, message: String },

    /// A file or directory could not be read or written.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// Writing or reading Parquet/Arrow data failed.
    #[error("{context}")]
    Data {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A model directory cannot be used: a file is missing or unreadable, ONNX Runtime refuses
    /// it, or its inputs and outputs are not what the stage needs.
    #[error("model {path}: {message}")]
    Model { path: String, message: String },

    /// A SQL statement failed to plan or run (DataFusion's message, said once).
    #[error("SQL: {0}")]
    Sql(String),

    /// A command-line argument or environment variable is wrong.
    #[error("{0}")]
    Usage(String),

    /// A bug: something the code assumed did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn io(action: &'static str, path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.as_ref().display().to_string(), source }
    }

    pub fn data(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Data { context: context.into(), source: Box::new(source) }
    }

    pub fn model(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        Error::Model { path: path.as_ref().display().to_string(), message: message.into() }
    }

    pub fn input(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        Error::Input { path: path.as_ref().display().to_string(), message: message.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources as one line, `outer: inner: innermost` (a source whose text the
/// outer one already holds is left out).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out = format!("{out}: {t}");
        }
        src = s.source();
    }
    out
}

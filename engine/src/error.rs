//! One error type for the whole engine, grouped by who is at fault.
//!
//! - [`Error::Invalid`]: the user's spec, rule files or flags (exit status 2). It
//!   carries every problem found, each with its `file:line:col`.
//! - [`Error::External`]: a system the engine talks to (exit status 3).
//! - [`Error::Internal`]: a bug in the engine; the message asks for a report.
//!
//! Context (file, position, node id) is data on [`Diagnostic`], not text glued
//! into strings, so callers and tests can look at it.

use std::fmt;
use std::path::{Path, PathBuf};

/// A position in a source file, 1-based like editors show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub fn new(line: usize, column: usize) -> Self {
        Self { line, column }
    }
}

/// Whether a diagnostic stops the pipeline or only informs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
}

/// One problem found in a user's file, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    pub level: Level,
    pub message: String,
}

impl Diagnostic {
    pub fn error(file: &Path, pos: Pos, message: impl Into<String>) -> Self {
        Self { file: file.to_path_buf(), pos, level: Level::Error, message: message.into() }
    }

    pub fn warning(file: &Path, pos: Pos, message: impl Into<String>) -> Self {
        Self { file: file.to_path_buf(), pos, level: Level::Warning, message: message.into() }
    }

    pub fn is_error(&self) -> bool {
        self.level == Level::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.level {
            Level::Error => "",
            Level::Warning => "warning: ",
        };
        write!(f, "{}:{}:{}: {prefix}{}", self.file.display(), self.pos.line, self.pos.column, self.message)
    }
}

/// Every problem found in one pass over the user's files, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }

    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| !d.is_error())
    }

    /// Sorts by file and position so the output reads top to bottom.
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
        self.0.dedup();
    }

    /// Turns the collected errors into `Err`, keeping warnings out of it.
    pub fn into_result(mut self) -> Result<Diagnostics> {
        self.sort();
        if self.has_errors() {
            Err(Error::Invalid(self))
        } else {
            Ok(self)
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors: Vec<_> = self.errors().collect();
        for d in &errors {
            writeln!(f, "{d}")?;
        }
        let n = errors.len();
        write!(f, "{n} error{}", if n == 1 { "" } else { "s" })
    }
}

/// The engine's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user's files are invalid; every problem is listed.
    #[error("{0}")]
    Invalid(Diagnostics),

    /// A command-line flag or argument is wrong.
    #[error("{0}")]
    Usage(String),

    /// A file named by the user could not be read or written.
    #[error("'{}': {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A system the engine talks to failed; retrying may help.
    #[error("{system}: {message}")]
    External { system: String, message: String },

    /// A bug in the engine.
    #[error("internal error: {0}; this is a bug in the engine, please report it")]
    Internal(String),
}

impl Error {
    /// The documented exit status for this error (see `engine --help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid(_) | Error::Usage(_) | Error::Io { .. } => 2,
            Error::External { .. } | Error::Internal(_) => 3,
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

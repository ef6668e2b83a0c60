//! A declarative data pipeline engine.
//!
//! A pipeline is a YAML file (see `docs/reference.md`): named connections,
//! sources, SQL and rules transforms, data-quality checks and sinks. The
//! modules are layers, each using only those below it (a test in
//! `tests/it/layering.rs` holds them to it), bottom to top:
//!
//! 1. [`error`]: one error enum, grouped by who is at fault, each mapped to a
//!    documented exit status.
//! 2. [`spec`]: the YAML read into structs that mirror the language, with the
//!    position of everything later stages may complain about; templates
//!    rendered, durations and rates parsed, rule files read. Which kinds of
//!    connection, source and sink exist comes from a catalog the loader is
//!    given ([`spec::connector`]).
//! 3. [`plan`]: the spec compiled into a validated DAG (petgraph); every
//!    problem of a file is reported at once, each with its `file:line:col`.
//!    What SQL and rules mean it asks of an [`plan::Analyzer`].
//! 4. [`transform`]: SQL on Apache DataFusion, the one session builder and
//!    the engine's functions; [`rules`]: what rules mean, for streams and for
//!    tables, and the analyzer `plan` asks.
//! 5. [`connectors`]: one folder per system (settings, checks, runtime) and
//!    the registry that lists them; codecs between Arrow and bytes.
//! 6. [`run`] (batch: each node materialized once, checks before any sink)
//!    and [`stream`] (micro-batches through transforms compiled once,
//!    acknowledged at the source after every sink committed them).
//! 7. [`cli`]: the `engine` command.

pub mod cli;
pub mod connectors;
pub mod error;
pub mod plan;
pub mod rules;
pub mod run;
pub mod spec;
pub mod stream;
pub mod transform;

pub use error::{Error, Result};

//! A declarative data pipeline engine.
//!
//! A pipeline is a YAML file (see `docs/reference.md`): named connections,
//! sources, SQL and rules transforms, data-quality checks and sinks. The engine
//! works in three stages, each with its own module:
//!
//! 1. [`spec`]: the YAML read into plain structs that mirror the language, with
//!    the position of everything later stages may complain about. Templates
//!    (`{{ env.X }}`, `{{ vars.y }}`) are rendered here.
//! 2. [`plan`]: the spec compiled into a validated DAG (petgraph) of source,
//!    transform, check and sink nodes. SQL transforms find their inputs in their
//!    own SQL; every problem of a file is reported at once, each with its
//!    `file:line:col`.
//! 3. Executors over the plan, exchanging Arrow record batches between nodes:
//!    [`run`] for batch pipelines (each node materialized once), [`stream`]
//!    for stream pipelines (micro-batches through transforms compiled once,
//!    acknowledged at the source after every sink committed them).
//!
//! [`rules`] reads rule files (one rule per file, reloadable), [`transform`]
//! holds SQL on Apache DataFusion and the engine's SQL functions, and [`cli`]
//! is the `engine` command. Errors are one enum, [`error::Error`], grouped by
//! who is at fault, each mapped to a documented exit status.

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

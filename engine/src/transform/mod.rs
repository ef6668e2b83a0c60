//! Transforms: SQL on DataFusion ([`sql`]) and the engine's own SQL functions.

pub mod generate;
pub mod rules;
pub mod sql;

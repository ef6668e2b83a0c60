//! Transforms: SQL on DataFusion ([`sql`], the one session builder and the
//! engine's own SQL functions), queries planned once for micro-batches
//! ([`prepared`]), lookup tables and their joins in streams ([`lookup`]),
//! and the seeded functions of generated rows ([`generate`]).

pub mod generate;
pub mod lookup;
pub mod prepared;
pub mod sql;

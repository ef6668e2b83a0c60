//! The language's extension point for connectors.
//!
//! The spec layer does not know which systems exist. Each connector (one
//! folder under `connectors/`) owns the settings struct of its connections,
//! sources and sinks, and implements the traits here for it; the registry
//! (`connectors::registry`) lists every connector once, as a [`Catalog`]
//! that the loader reads `type:` against. Everything that depends on the
//! system (its keys, its checks, its graph label) goes through these traits,
//! so a new connector adds no match arm outside its folder and the registry.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use indexmap::IndexMap;
use marked_yaml::Node;
use serde::de::DeserializeOwned;

use super::model::{ColumnSpec, Incremental, Mode, WriteMode};
use super::yaml::{Reader, Sp};
use super::Spec;
use crate::error::Pos;

/// Settings of a connector, as read from the spec.
pub trait Settings: fmt::Debug + Send + Sync + Any {
    /// For the connector's own code, which knows the concrete type.
    fn as_any(&self) -> &dyn Any;
}

/// A named endpoint's settings.
pub trait ConnectionSettings: Settings {
    /// The URL; it may hold a password, which is never printed.
    fn url(&self) -> &str;
    /// Problems of the settings found without connecting.
    fn check(&self, _cx: &mut Context) {}
}

/// A source node's settings.
pub trait SourceSettings: Settings {
    /// The connection it reads through; `None` for sources without one.
    fn connection(&self) -> Option<&Sp<String>>;
    /// Columns declared in the spec (`schema:`), when the source has them.
    fn declared_schema(&self) -> Option<&IndexMap<String, ColumnSpec>> {
        None
    }
    /// Reading only rows above a stored watermark, when configured.
    fn incremental(&self) -> Option<&Incremental> {
        None
    }
    /// For sources computed by SQL (generate): a query whose output has the
    /// source's columns, planned offline. `Err` when it cannot be written
    /// (the settings checks report why).
    fn schema_query(&self) -> Option<Result<String, String>> {
        None
    }
    /// A one-line description for graphs: `oltp.customers`.
    fn detail(&self) -> String;
    /// For a source read by shards (a stream in a consumer group): how
    /// many partitions it has, and the column that picks an event's one.
    fn partitions(&self) -> Option<(u32, Option<&str>)> {
        None
    }
    /// Problems of the settings found without connecting.
    fn check(&self, cx: &mut Context);
}

/// A sink node's settings.
pub trait SinkSettings: Settings {
    /// The upstream node it writes.
    fn input(&self) -> &Sp<String>;
    /// The connection it writes through; `None` for sinks without one.
    fn connection(&self) -> Option<&Sp<String>>;
    /// A one-line description for graphs: `dwh.fact_transactions (upsert)`.
    fn detail(&self) -> String;
    /// Problems of the settings found without connecting.
    fn check(&self, cx: &mut Context);
}

/// Where a kind of node can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    pub batch: bool,
    pub stream: bool,
}

impl Modes {
    pub const BOTH: Modes = Modes { batch: true, stream: true };
}

/// Reads a node's settings (the YAML without `type` and `checks`).
pub type ReadFn<T> = fn(&Node, &mut Reader, &str) -> Option<Arc<T>>;

/// One kind of connection, source or sink: the `type:` name that selects it.
pub struct Kind<T: ?Sized + 'static> {
    pub name: &'static str,
    /// The type of connection it goes through (`postgres`); `None`: it needs none.
    pub connection: Option<&'static str>,
    /// Where it can run.
    pub modes: Modes,
    pub read: ReadFn<T>,
    /// The JSON Schema of its settings, for editors (`engine schema`).
    pub json_schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

macro_rules! constructor {
    ($fn:ident, $read:ident, $trait:ident) => {
        impl Kind<dyn $trait> {
            /// A kind whose settings are `S`, read with serde.
            pub fn $fn<S>(name: &'static str, connection: Option<&'static str>, modes: Modes) -> Self
            where
                S: $trait + DeserializeOwned + schemars::JsonSchema,
            {
                Kind { name, connection, modes, read: $read::<S>, json_schema: |g| g.subschema_for::<S>() }
            }
        }

        fn $read<S: $trait + DeserializeOwned>(
            node: &Node,
            r: &mut Reader,
            what: &str,
        ) -> Option<Arc<dyn $trait>> {
            r.read::<S>(node, what).map(|s| Arc::new(s) as Arc<dyn $trait>)
        }
    };
}

constructor!(connection, read_connection, ConnectionSettings);
constructor!(source, read_source, SourceSettings);
constructor!(sink, read_sink, SinkSettings);

/// Every kind the engine knows, in the order messages list them.
pub struct Catalog {
    pub connections: Vec<Kind<dyn ConnectionSettings>>,
    pub sources: Vec<Kind<dyn SourceSettings>>,
    pub sinks: Vec<Kind<dyn SinkSettings>>,
}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |k: &[&'static str]| k.join(", ");
        f.debug_struct("Catalog")
            .field("connections", &names(&self.connections.iter().map(|k| k.name).collect::<Vec<_>>()))
            .field("sources", &names(&self.sources.iter().map(|k| k.name).collect::<Vec<_>>()))
            .field("sinks", &names(&self.sinks.iter().map(|k| k.name).collect::<Vec<_>>()))
            .finish()
    }
}

impl Catalog {
    pub fn source(&self, name: &str) -> Option<&Kind<dyn SourceSettings>> {
        self.sources.iter().find(|k| k.name == name)
    }

    pub fn sink(&self, name: &str) -> Option<&Kind<dyn SinkSettings>> {
        self.sinks.iter().find(|k| k.name == name)
    }

    pub fn connection(&self, name: &str) -> Option<&Kind<dyn ConnectionSettings>> {
        self.connections.iter().find(|k| k.name == name)
    }
}

/// What a connector's checks see, and where they put what they find.
pub struct Context<'a> {
    pub spec: &'a Spec,
    /// `source 'x'`, `sink 'y'`, `connection 'z'`: how messages name it.
    pub what: String,
    /// Where it was declared; messages without a better place point here.
    pub at: Pos,
    pub errors: Vec<(Pos, String)>,
}

impl<'a> Context<'a> {
    pub fn new(spec: &'a Spec, what: String, at: Pos) -> Self {
        Self { spec, what, at, errors: vec![] }
    }

    pub fn mode(&self) -> Mode {
        self.spec.pipeline.mode
    }

    /// An error about the node, at `pos`.
    pub fn error(&mut self, pos: Pos, message: impl fmt::Display) {
        self.errors.push((pos, format!("{}: {message}", self.what)));
    }

    /// An error about the node, where it was declared.
    pub fn error_here(&mut self, message: impl fmt::Display) {
        let at = self.at;
        self.error(at, message);
    }

    /// `upsert` needs key columns, and only `upsert` takes them.
    pub fn write_mode(&mut self, mode: WriteMode, key: Option<&[String]>) {
        let has_key = key.is_some_and(|k| !k.is_empty());
        match (mode, has_key) {
            (WriteMode::Upsert, false) => self.error_here("'mode: upsert' needs 'key' (the key columns)"),
            (WriteMode::Append | WriteMode::Replace, true) => {
                self.error_here("'key' applies only to 'mode: upsert'")
            }
            _ => {}
        }
    }

    /// `name` must be a connection of type `want` (`what` names who asks).
    pub fn connection_of(&mut self, what: &str, name: &Sp<String>, want: &str) {
        let message = match self.spec.pipeline.connections.get(name.value()) {
            Some(c) if c.kind == want => return,
            Some(c) => format!(
                "{what}: connection '{}' is of type '{}', but a '{want}' connection is needed",
                name.value(),
                c.kind
            ),
            None => {
                let names = self.spec.pipeline.connections.keys().map(String::as_str);
                format!(
                    "{what}: unknown connection '{}'{}",
                    name.value(),
                    super::suggest::hint(name.value(), names)
                )
            }
        };
        self.errors.push((name.pos(), message));
    }
}

/// Implements [`Settings`] for settings structs.
macro_rules! settings {
    ($($t:ty),+ $(,)?) => {$(
        impl $crate::spec::connector::Settings for $t {
            fn as_any(&self) -> &dyn ::std::any::Any {
                self
            }
        }
    )+};
}

pub(crate) use settings;

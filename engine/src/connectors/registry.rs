//! The one list of connectors. Each entry names a kind (`type:`), the
//! connection type it goes through, its settings type, and what it can do:
//! run in batch, in a stream, be probed, share a transaction. The spec
//! layer's [`Catalog`] (what `type:` may say, where each kind runs, the JSON
//! Schema of its settings) is made from the same list, so a kind cannot be
//! readable without being runnable.
//!
//! Adding a connector: its folder, then one entry in [`connections`],
//! [`sources`] or [`sinks`] here.

use std::sync::LazyLock;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use super::{
    file, generate, http, mongodb, postgres, redis, stdout, BatchSink, BatchSource, OpenStream,
    OpenStreamSink, Probe, Transaction,
};
use crate::spec::connector::{Catalog, ConnectionSettings, Kind, Modes, SinkSettings, SourceSettings};

/// Every kind of connection.
fn connections() -> Vec<ConnectionEntry> {
    vec![
        ConnectionEntry::of::<postgres::config::PostgresConnection>("postgres")
            .probe(as_probe::<postgres::config::PostgresConnection, _>)
            .transaction(as_transaction::<postgres::config::PostgresConnection>),
        ConnectionEntry::of::<mongodb::config::MongoConnection>("mongodb")
            .probe(as_probe::<mongodb::config::MongoConnection, _>),
        ConnectionEntry::of::<redis::config::RedisConnection>("redis")
            .probe(as_probe::<redis::config::RedisConnection, _>),
    ]
}

/// Every kind of source, in the order messages list them.
fn sources() -> Vec<SourceEntry> {
    vec![
        SourceEntry::of::<postgres::config::PostgresSource>("postgres", Some("postgres"))
            .batch(as_batch_source::<postgres::config::PostgresSource>)
            .probe(as_probe::<postgres::config::PostgresSource, _>),
        SourceEntry::of::<mongodb::config::MongoSource>("mongodb", Some("mongodb"))
            .batch(as_batch_source::<mongodb::config::MongoSource>),
        SourceEntry::of::<redis::config::RedisSource>("redis", Some("redis"))
            .stream(as_stream_source::<redis::config::RedisSource>)
            .probe(as_probe::<redis::config::RedisSource, _>),
        SourceEntry::of::<file::config::FileSource>("file", None)
            .batch(as_batch_source::<file::config::FileSource>),
        SourceEntry::of::<generate::config::GenerateSource>("generate", None)
            .batch(as_batch_source::<generate::config::GenerateSource>)
            .stream(as_stream_source::<generate::config::GenerateSource>),
    ]
}

/// Every kind of sink, in the order messages list them.
fn sinks() -> Vec<SinkEntry> {
    vec![
        SinkEntry::of::<postgres::config::PostgresSink>("postgres", Some("postgres"))
            .batch(as_batch_sink::<postgres::config::PostgresSink>)
            .stream(as_stream_sink::<postgres::config::PostgresSink>)
            .probe(as_probe::<postgres::config::PostgresSink, _>),
        SinkEntry::of::<mongodb::config::MongoSink>("mongodb", Some("mongodb"))
            .batch(as_batch_sink::<mongodb::config::MongoSink>),
        SinkEntry::of::<redis::config::RedisSink>("redis", Some("redis"))
            .stream(as_stream_sink::<redis::config::RedisSink>),
        SinkEntry::of::<file::config::FileSink>("file", None).batch(as_batch_sink::<file::config::FileSink>),
        SinkEntry::of::<stdout::config::StdoutSink>("stdout", None)
            .batch(as_batch_sink::<stdout::config::StdoutSink>)
            .stream(as_stream_sink::<stdout::config::StdoutSink>),
        SinkEntry::of::<http::config::HttpSink>("http", None)
            .batch(as_batch_sink::<http::config::HttpSink>)
            .stream(as_stream_sink::<http::config::HttpSink>),
    ]
}

// ------------------------------------------------------------------ lookups

static REGISTRY: LazyLock<Registry> =
    LazyLock::new(|| Registry { connections: connections(), sources: sources(), sinks: sinks() });

static CATALOG: LazyLock<Catalog> = LazyLock::new(|| Catalog {
    connections: REGISTRY.connections.iter().map(|e| e.kind()).collect(),
    sources: REGISTRY.sources.iter().map(|e| e.kind()).collect(),
    sinks: REGISTRY.sinks.iter().map(|e| e.kind()).collect(),
});

struct Registry {
    connections: Vec<ConnectionEntry>,
    sources: Vec<SourceEntry>,
    sinks: Vec<SinkEntry>,
}

/// What the spec layer reads `type:` against.
pub fn catalog() -> &'static Catalog {
    &CATALOG
}

fn find<'a, E>(list: &'a [E], name: &str, of: impl Fn(&E) -> &'static str) -> Option<&'a E> {
    list.iter().find(|e| of(e) == name)
}

/// A source's batch runtime, if its kind runs in batch.
pub fn batch_source<'a>(
    kind: &str,
    s: &'a (dyn SourceSettings + 'static),
) -> Option<&'a (dyn BatchSource + 'static)> {
    find(&REGISTRY.sources, kind, |e| e.read.name).and_then(|e| e.batch).and_then(|f| f(s))
}

/// A source's stream runtime, if its kind runs in a stream.
pub fn stream_source<'a>(
    kind: &str,
    s: &'a (dyn SourceSettings + 'static),
) -> Option<&'a (dyn OpenStream + 'static)> {
    find(&REGISTRY.sources, kind, |e| e.read.name).and_then(|e| e.stream).and_then(|f| f(s))
}

pub fn batch_sink<'a>(
    kind: &str,
    s: &'a (dyn SinkSettings + 'static),
) -> Option<&'a (dyn BatchSink + 'static)> {
    find(&REGISTRY.sinks, kind, |e| e.read.name).and_then(|e| e.batch).and_then(|f| f(s))
}

pub fn stream_sink<'a>(
    kind: &str,
    s: &'a (dyn SinkSettings + 'static),
) -> Option<&'a (dyn OpenStreamSink + 'static)> {
    find(&REGISTRY.sinks, kind, |e| e.read.name).and_then(|e| e.stream).and_then(|f| f(s))
}

/// A connection's transaction across sinks, if its system has them.
pub fn transaction<'a>(
    kind: &str,
    c: &'a (dyn ConnectionSettings + 'static),
) -> Option<&'a (dyn Transaction + 'static)> {
    find(&REGISTRY.connections, kind, |e| e.read.name).and_then(|e| e.transaction).and_then(|f| f(c))
}

pub fn probe_connection<'a>(
    kind: &str,
    c: &'a (dyn ConnectionSettings + 'static),
) -> Option<&'a (dyn Probe + 'static)> {
    find(&REGISTRY.connections, kind, |e| e.read.name).and_then(|e| e.probe).and_then(|f| f(c))
}

pub fn probe_source<'a>(
    kind: &str,
    s: &'a (dyn SourceSettings + 'static),
) -> Option<&'a (dyn Probe + 'static)> {
    find(&REGISTRY.sources, kind, |e| e.read.name).and_then(|e| e.probe).and_then(|f| f(s))
}

pub fn probe_sink<'a>(kind: &str, s: &'a (dyn SinkSettings + 'static)) -> Option<&'a (dyn Probe + 'static)> {
    find(&REGISTRY.sinks, kind, |e| e.read.name).and_then(|e| e.probe).and_then(|f| f(s))
}

// ------------------------------------------------------------------ entries

/// From a kind's settings (a trait object) to one of its runtime traits:
/// the entry knows the concrete type, so the downcast cannot miss.
type As<S, R> = for<'a> fn(&'a S) -> Option<&'a R>;

fn as_batch_source<'a, T: BatchSource + 'static>(
    s: &'a (dyn SourceSettings + 'static),
) -> Option<&'a (dyn BatchSource + 'static)> {
    s.as_any().downcast_ref::<T>().map(|t| t as &(dyn BatchSource + 'static))
}

fn as_stream_source<'a, T: OpenStream + 'static>(
    s: &'a (dyn SourceSettings + 'static),
) -> Option<&'a (dyn OpenStream + 'static)> {
    s.as_any().downcast_ref::<T>().map(|t| t as &(dyn OpenStream + 'static))
}

fn as_batch_sink<'a, T: BatchSink + 'static>(
    s: &'a (dyn SinkSettings + 'static),
) -> Option<&'a (dyn BatchSink + 'static)> {
    s.as_any().downcast_ref::<T>().map(|t| t as &(dyn BatchSink + 'static))
}

fn as_stream_sink<'a, T: OpenStreamSink + 'static>(
    s: &'a (dyn SinkSettings + 'static),
) -> Option<&'a (dyn OpenStreamSink + 'static)> {
    s.as_any().downcast_ref::<T>().map(|t| t as &(dyn OpenStreamSink + 'static))
}

fn as_transaction<'a, T: Transaction + 'static>(
    c: &'a (dyn ConnectionSettings + 'static),
) -> Option<&'a (dyn Transaction + 'static)> {
    c.as_any().downcast_ref::<T>().map(|t| t as &(dyn Transaction + 'static))
}

fn as_probe<T: Probe + 'static, S: crate::spec::connector::Settings + ?Sized>(
    s: &S,
) -> Option<&(dyn Probe + 'static)> {
    s.as_any().downcast_ref::<T>().map(|t| t as &(dyn Probe + 'static))
}

struct ConnectionEntry {
    read: Kind<dyn ConnectionSettings>,
    probe: Option<As<dyn ConnectionSettings, dyn Probe>>,
    transaction: Option<As<dyn ConnectionSettings, dyn Transaction>>,
}

impl ConnectionEntry {
    fn of<T: ConnectionSettings + DeserializeOwned + JsonSchema>(name: &'static str) -> Self {
        Self { read: Kind::connection::<T>(name, None, Modes::BOTH), probe: None, transaction: None }
    }

    fn probe(mut self, f: As<dyn ConnectionSettings, dyn Probe>) -> Self {
        self.probe = Some(f);
        self
    }

    fn transaction(mut self, f: As<dyn ConnectionSettings, dyn Transaction>) -> Self {
        self.transaction = Some(f);
        self
    }

    fn kind(&self) -> Kind<dyn ConnectionSettings> {
        Kind { ..self.read }
    }
}

struct SourceEntry {
    read: Kind<dyn SourceSettings>,
    batch: Option<As<dyn SourceSettings, dyn BatchSource>>,
    stream: Option<As<dyn SourceSettings, dyn OpenStream>>,
    probe: Option<As<dyn SourceSettings, dyn Probe>>,
}

impl SourceEntry {
    fn of<T: SourceSettings + DeserializeOwned + JsonSchema>(
        name: &'static str,
        connection: Option<&'static str>,
    ) -> Self {
        let read = Kind::source::<T>(name, connection, Modes { batch: false, stream: false });
        Self { read, batch: None, stream: None, probe: None }
    }

    fn batch(mut self, f: As<dyn SourceSettings, dyn BatchSource>) -> Self {
        self.batch = Some(f);
        self
    }

    fn stream(mut self, f: As<dyn SourceSettings, dyn OpenStream>) -> Self {
        self.stream = Some(f);
        self
    }

    fn probe(mut self, f: As<dyn SourceSettings, dyn Probe>) -> Self {
        self.probe = Some(f);
        self
    }

    fn kind(&self) -> Kind<dyn SourceSettings> {
        Kind { modes: Modes { batch: self.batch.is_some(), stream: self.stream.is_some() }, ..self.read }
    }
}

struct SinkEntry {
    read: Kind<dyn SinkSettings>,
    batch: Option<As<dyn SinkSettings, dyn BatchSink>>,
    stream: Option<As<dyn SinkSettings, dyn OpenStreamSink>>,
    probe: Option<As<dyn SinkSettings, dyn Probe>>,
}

impl SinkEntry {
    fn of<T: SinkSettings + DeserializeOwned + JsonSchema>(
        name: &'static str,
        connection: Option<&'static str>,
    ) -> Self {
        let read = Kind::sink::<T>(name, connection, Modes { batch: false, stream: false });
        Self { read, batch: None, stream: None, probe: None }
    }

    fn batch(mut self, f: As<dyn SinkSettings, dyn BatchSink>) -> Self {
        self.batch = Some(f);
        self
    }

    fn stream(mut self, f: As<dyn SinkSettings, dyn OpenStreamSink>) -> Self {
        self.stream = Some(f);
        self
    }

    fn probe(mut self, f: As<dyn SinkSettings, dyn Probe>) -> Self {
        self.probe = Some(f);
        self
    }

    fn kind(&self) -> Kind<dyn SinkSettings> {
        Kind { modes: Modes { batch: self.batch.is_some(), stream: self.stream.is_some() }, ..self.read }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_runs_somewhere_and_names_are_unique() {
        let c = catalog();
        for k in &c.sources {
            assert!(k.modes.batch || k.modes.stream, "source kind '{}' runs nowhere", k.name);
        }
        for k in &c.sinks {
            assert!(k.modes.batch || k.modes.stream, "sink kind '{}' runs nowhere", k.name);
        }
        for names in [
            c.sources.iter().map(|k| k.name).collect::<Vec<_>>(),
            c.sinks.iter().map(|k| k.name).collect(),
            c.connections.iter().map(|k| k.name).collect(),
        ] {
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), names.len(), "a name twice in {names:?}");
        }
        let through = c
            .sources
            .iter()
            .map(|k| (k.name, k.connection))
            .chain(c.sinks.iter().map(|k| (k.name, k.connection)));
        for (name, conn) in through {
            if let Some(conn) = conn {
                assert!(
                    c.connection(conn).is_some(),
                    "'{name}' goes through unknown connection type '{conn}'"
                );
            }
        }
    }
}

//! `engine validate --connect`: every connection reachable, every postgres
//! source readable, every postgres sink's table present (or `create: true`)
//! and able to take the input, where the input's schema is known offline.

use crate::error::Error;
use crate::plan::Plan;
use crate::spec::model::{Connection, Sink, Source};

use super::postgres;

/// Problems found, one line each; empty when all is well.
pub async fn check(plan: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    let pl = &plan.spec.pipeline;
    for (name, c) in &pl.connections {
        let result = match c {
            Connection::Postgres(p) => postgres::connect(name, &p.url).await.map(|_| ()),
            Connection::Mongodb(m) => mongo_ping(name, &m.url, &m.database).await,
            // Checked when the stream executor connects.
            Connection::Redis(_) => Ok(()),
        };
        if let Err(e) = result {
            problems.push(plan.spec.secrets.scrub(&e.to_string()));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    for (id, s) in &pl.sources {
        if let Source::Postgres(p) = s {
            let url =
                pl.connections.get(p.connection.value()).map(|c| c.url().to_string()).unwrap_or_default();
            if let Err(e) = postgres::source::describe_source(p.connection.value(), &url, p).await {
                problems.push(format!("source '{id}': {}", plan.spec.secrets.scrub(&e.to_string())));
            }
        }
    }
    for (id, s) in &pl.sinks {
        if let Sink::Postgres(p) = s {
            let url =
                pl.connections.get(p.connection.value()).map(|c| c.url().to_string()).unwrap_or_default();
            let schema = plan.schemas.get(p.input.value()).cloned();
            if let Err(e) = postgres::sink::check_table(p.connection.value(), &url, id, p, schema).await {
                problems.push(plan.spec.secrets.scrub(&e.to_string()));
            }
        }
    }
    problems
}

async fn mongo_ping(name: &str, url: &str, database: &str) -> Result<(), Error> {
    use futures::TryStreamExt;
    let ext = |e: mongodb::error::Error| Error::External {
        system: format!("mongodb connection '{name}' ({})", crate::spec::redact::redact_url(url)),
        message: e.to_string(),
    };
    let client = mongodb::Client::with_uri_str(url).await.map_err(ext)?;
    let coll = client.database(database).collection::<mongodb::bson::Document>("engine_connect_check");
    let mut cursor = coll.find(mongodb::bson::Document::new()).limit(1).await.map_err(ext)?;
    cursor.try_next().await.map_err(ext)?;
    Ok(())
}

//! `engine schema`: the JSON Schema of pipeline files (or rule files), derived
//! from the same structs the engine reads, so it cannot drift from the code.
//! Connections, sources and sinks are the union of their kinds in the
//! registry: each kind's settings with its `type`.

use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

use crate::connectors::registry;
use crate::error::{Error, Result};
use crate::spec::connector::Kind;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The schema of rule files instead of pipeline files.
    #[arg(long)]
    rules: bool,
}

pub fn run(args: Args) -> Result<i32> {
    let schema = if args.rules {
        serde_json::to_value(schemars::schema_for!(crate::spec::rules::RuleFile))
    } else {
        serde_json::to_value(pipeline_schema())
    }
    .map_err(|e| Error::Internal(e.to_string()))?;
    let text = serde_json::to_string_pretty(&schema).map_err(|e| Error::Internal(e.to_string()))?;
    out!("{text}\n");
    Ok(0)
}

/// The pipeline schema with the registry's kinds filled in.
pub fn pipeline_schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let root = generator.root_schema_for::<crate::spec::model::Pipeline>();
    let catalog = registry::catalog();
    let checks = generator.subschema_for::<Vec<crate::spec::model::Check>>().to_value();
    let batch = generator.subschema_for::<crate::spec::model::BatchSpec>().to_value();
    let mut refresh = generator.subschema_for::<crate::spec::values::Duration>().to_value();
    if let Some(obj) = refresh.as_object_mut() {
        obj.insert(
            "description".into(),
            json!("A lookup table of a stream pipeline is read again this often (`5m`); without it, once."),
        );
    }
    let refs = [
        ("Connection", refs(&mut generator, &catalog.connections, |_| true)),
        ("Source", refs(&mut generator, &catalog.sources, |k| k.is_none())),
        ("Sink", refs(&mut generator, &catalog.sinks, |k| k.is_none())),
    ];
    let mut root = root.to_value();
    let mut defs = generator.take_definitions(true);
    for (role, kinds) in refs {
        let mut options = Vec::new();
        for (name, reference, type_required) in kinds {
            let Some(mut def) = reference.rsplit('/').next().and_then(|d| defs.get(d)).cloned() else {
                continue;
            };
            if let Some(props) = def.get_mut("properties").and_then(Value::as_object_mut) {
                props.insert("type".into(), json!({ "const": name, "description": format!("`{name}`") }));
                if role != "Connection" {
                    props.insert(
                        "description".into(),
                        json!({ "type": "string", "description": "What this node does, for people." }),
                    );
                }
                if role == "Source" {
                    props.insert("checks".into(), checks.clone());
                    props.insert("batch".into(), batch.clone());
                    props.insert("refresh".into(), refresh.clone());
                }
            }
            if type_required {
                let required = def.as_object_mut().map(|d| d.entry("required").or_insert_with(|| json!([])));
                if let Some(Value::Array(r)) = required {
                    r.push(json!("type"));
                }
            }
            let key = format!("{role}_{name}");
            options.push(json!({ "$ref": format!("#/$defs/{key}") }));
            defs.insert(key, def);
        }
        let doc = defs.get(role).and_then(|d| d.get("description")).cloned().unwrap_or(Value::Null);
        defs.insert(role.into(), json!({ "description": doc, "anyOf": options }));
    }
    // The short forms of checks the loader reads: `not_null: [a, b]`, `unique: id`.
    for check in ["NotNullCheck", "UniqueCheck"] {
        if let Some(def) = defs.get_mut(check) {
            let long = def.take();
            let doc = long.get("description").cloned().unwrap_or(Value::Null);
            *def = json!({ "description": doc, "anyOf": [{ "$ref": "#/$defs/Columns" }, long] });
        }
    }
    if let Some(obj) = root.as_object_mut() {
        obj.insert("$defs".into(), Value::Object(defs));
    }
    templated(&mut root);
    root
}

/// Values are rendered as templates after parsing, so a number or a
/// boolean may be written as a template (`rows: "{{ vars.n }}"`): every
/// schema of such a type also takes a string holding `{{`.
fn templated(schema: &mut Value) {
    match schema {
        Value::Object(obj) => {
            for v in obj.values_mut() {
                templated(v);
            }
            let typed = |t: &Value| matches!(t.as_str(), Some("integer" | "number" | "boolean"));
            let takes_value = match obj.get("type") {
                Some(t @ Value::String(_)) => typed(t),
                Some(Value::Array(ts)) => ts.iter().any(typed),
                _ => false,
            };
            if takes_value {
                let original = Value::Object(std::mem::take(obj));
                let doc = original.get("description").cloned();
                obj.insert("anyOf".into(), json!([original, { "type": "string", "pattern": "\\{\\{" }]));
                if let Some(doc) = doc {
                    obj.insert("description".into(), doc);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(templated),
        _ => {}
    }
}

/// Each kind's name, the reference to its settings' definition, and whether
/// `type` is required (no connection implies it).
fn refs<T: ?Sized>(
    generator: &mut schemars::SchemaGenerator,
    kinds: &[Kind<T>],
    type_required: impl Fn(Option<&'static str>) -> bool,
) -> Vec<(&'static str, String, bool)> {
    kinds
        .iter()
        .map(|k| {
            let schema = (k.json_schema)(generator).to_value();
            let reference = schema.get("$ref").and_then(Value::as_str).unwrap_or_default().to_string();
            (k.name, reference, type_required(k.connection))
        })
        .collect()
}

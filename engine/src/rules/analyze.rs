//! The engine's answer to what compiling a pipeline asks of SQL and rules
//! ([`crate::plan::Analyzer`]): DataFusion plans queries over empty tables
//! with the engine's functions, and rule sets compile as a stream runs them.

use datafusion::arrow::datatypes::SchemaRef;

use crate::error::Diagnostics;
use crate::spec::rules::LoadedRule;
use crate::transform::sql::Planner;

/// Plans with DataFusion; holds nothing between calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Analyzer;

#[async_trait::async_trait]
impl crate::plan::Analyzer for Analyzer {
    async fn sql_schema(&self, inputs: &[(String, SchemaRef)], sql: &str) -> Result<SchemaRef, String> {
        let planner = Planner::new();
        for (name, s) in inputs {
            planner.register_empty(name, s.clone())?;
        }
        planner.output_schema(sql).await
    }

    async fn check_rules(&self, rules: &[LoadedRule], input: SchemaRef, key: &str) -> Diagnostics {
        super::compile::check_against(rules, input, key).await
    }

    fn alert_schema(&self, input: &SchemaRef) -> SchemaRef {
        super::alert_schema(input)
    }
}

/// Compiles a spec into a plan with the engine's analyzer.
pub async fn compile(spec: crate::spec::Spec) -> crate::error::Result<crate::plan::Plan> {
    crate::plan::compile(spec, &Analyzer).await
}

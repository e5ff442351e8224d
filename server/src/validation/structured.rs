//! Structured outputs: the request's `response_format` / `guided_*` fields read into one
//! [`GrammarSpec`] and compiled against the served vocabulary (on the blocking pool: a large
//! schema takes milliseconds), so a bad schema or regex is a 400 before anything is queued.

use std::sync::Arc;

use model::constraint::{Constraint, GrammarSpec};

use crate::backend::PromptProcessor;
use crate::error::ApiError;
use crate::openai::structured::ResponseFormat;
use crate::openai::ChatCompletionRequest;

/// The constraint a request asks for (`None`: free text), with the request field it came from.
/// vLLM allows one kind of guided decoding per request; so do we, `response_format` included.
pub fn grammar_spec(
    request: &ChatCompletionRequest,
) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    let mut specs: Vec<(GrammarSpec, &'static str)> = Vec::new();
    match &request.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            specs.push((GrammarSpec::JsonObject, "response_format"));
        }
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            check_schema_name(&json_schema.name)?;
            let schema = json_schema
                .schema
                .clone()
                .unwrap_or_else(|| serde_json::json!({}));
            specs.push((
                GrammarSpec::JsonSchema(schema_object(schema, "response_format")?),
                "response_format",
            ));
        }
    }
    if let Some(schema) = &request.guided_json {
        let schema = match schema {
            // vLLM takes the schema as a JSON string too.
            serde_json::Value::String(text) => serde_json::from_str(text).map_err(|e| {
                ApiError::invalid("guided_json", format!("guided_json is not JSON: {e}"))
            })?,
            other => other.clone(),
        };
        specs.push((
            GrammarSpec::JsonSchema(schema_object(schema, "guided_json")?),
            "guided_json",
        ));
    }
    if let Some(regex) = &request.guided_regex {
        specs.push((GrammarSpec::Regex(regex.clone()), "guided_regex"));
    }
    if let Some(choices) = &request.guided_choice {
        specs.push((GrammarSpec::Choice(choices.clone()), "guided_choice"));
    }
    if specs.len() > 1 {
        let names: Vec<&str> = specs.iter().map(|s| s.1).collect();
        return Err(ApiError::invalid(
            specs[1].1,
            format!(
                "only one kind of structured output per request (response_format, guided_json, \
                 guided_regex or guided_choice), got {}",
                names.join(" and ")
            ),
        ));
    }
    Ok(specs.pop())
}

/// OpenAI's rule for `json_schema.name`: a-z, A-Z, 0-9, `_` and `-`, at most 64 characters.
fn check_schema_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "response_format",
            format!(
                "response_format.json_schema.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {name:?}"
            ),
        ))
    }
}

/// A JSON Schema is an object (or `true`, which admits anything).
fn schema_object(schema: serde_json::Value, param: &str) -> Result<serde_json::Value, ApiError> {
    match schema {
        serde_json::Value::Object(_) => Ok(schema),
        serde_json::Value::Bool(true) => Ok(serde_json::json!({})),
        other => Err(ApiError::invalid(
            param,
            format!("{param}: a JSON Schema must be an object, got {other}"),
        )),
    }
}

/// Compiles the request's grammar; a schema or regex llguidance refuses is a 400 naming the
/// field it came from.
pub async fn compile(
    processor: &Arc<dyn PromptProcessor>,
    spec: GrammarSpec,
    param: &'static str,
) -> Result<Constraint, ApiError> {
    if processor.constraints().is_none() {
        return Err(ApiError::invalid(
            param,
            "the served model's tokenizer does not support structured outputs",
        ));
    }
    let processor = processor.clone();
    tokio::task::spawn_blocking(move || {
        let compiler = processor
            .constraints()
            .expect("checked above: the processor compiles constraints");
        compiler.compile(&spec)
    })
    .await
    .map_err(|err| ApiError::internal(format!("grammar compilation failed: {err}")))?
    .map_err(|err| ApiError::invalid(param, format!("invalid {param}: {err}")))
}

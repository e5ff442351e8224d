//! Structured outputs on the wire: OpenAI's `response_format` and vLLM's `guided_json`,
//! `guided_regex`, `guided_choice` (vLLM's `protocol.py`, `ChatCompletionRequest`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `response_format`: `text` (the default), any JSON object, or JSON valid against a schema.
/// Output is constrained by grammar-constrained decoding: it parses (and validates against the
/// schema) unless cut by `max_tokens` (`finish_reason: "length"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema` (OpenAI's shape).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct JsonSchemaFormat {
    /// The schema's name (letters, digits, `_` and `-`, at most 64), as OpenAI requires.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema; omitted, any JSON value. `$ref` to `#/$defs/...` (Pydantic's nested
    /// models) is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<serde_json::Value>,
    /// Accepted for OpenAI compatibility; the schema is enforced either way (vLLM's behaviour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

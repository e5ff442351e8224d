//! Documented OpenAI fields whose effect this server cannot give (SERVING.md: a 400 naming the
//! field, never a silent 200): tools and their deprecated `functions` form (the served chat
//! templates have no tool support) and audio output. Their neutral forms are accepted.

use serde_json::Value;

use crate::error::ApiError;
use crate::openai::ChatCompletionRequest;

/// Refuses every field of `request` that asks for something the server cannot do.
pub(super) fn refuse_unsupported(request: &ChatCompletionRequest) -> Result<(), ApiError> {
    refuse_tools(
        request.tools.as_deref(),
        request.tool_choice.as_ref(),
        ("tools", "tool_choice"),
    )?;
    refuse_tools(
        request.functions.as_deref(),
        request.function_call.as_ref(),
        ("functions", "function_call"),
    )?;
    if let Some(other) = request
        .modalities
        .iter()
        .flatten()
        .find(|modality| modality.as_str() != "text")
    {
        return Err(ApiError::invalid(
            "modalities",
            format!("only text output is supported; the modality `{other}` is not"),
        ));
    }
    if request.audio.as_ref().is_some_and(|audio| !audio.is_null()) {
        return Err(ApiError::invalid(
            "audio",
            "audio output is not supported: this server generates text only",
        ));
    }
    Ok(())
}

/// OpenAI's rule: with tools present the choice defaults to `auto`. Only `none` lets the request
/// through (the model then answers in text, as it would without tools); without tools, `auto`
/// and `none` mean the same as no choice, and anything else is refused.
fn refuse_tools(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
    (tools_param, choice_param): (&str, &str),
) -> Result<(), ApiError> {
    let has_tools = tools.is_some_and(|tools| !tools.is_empty());
    let choice_text = choice.and_then(Value::as_str);
    let none = choice_text == Some("none");
    let neutral_without_tools =
        choice.is_none_or(Value::is_null) || none || choice_text == Some("auto");
    if has_tools && !none {
        let param = if choice.is_some_and(|c| !c.is_null()) {
            choice_param
        } else {
            tools_param
        };
        return Err(ApiError::invalid(
            param,
            format!(
                "{tools_param} are not supported: the served model's chat template has no tool \
                 support (send {choice_param}: \"none\", or no {tools_param})"
            ),
        ));
    }
    if !has_tools && !neutral_without_tools {
        return Err(ApiError::invalid(
            choice_param,
            format!("{choice_param} needs {tools_param}, which this server does not support"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(fields: Value) -> Result<(), Option<String>> {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        refuse_unsupported(&request).map_err(|err| err.param)
    }

    #[test]
    fn tools_pass_only_with_tool_choice_none() {
        let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        assert_eq!(check(json!({"tools": tool})), Err(Some("tools".into())));
        assert_eq!(
            check(json!({"tools": tool, "tool_choice": "auto"})),
            Err(Some("tool_choice".into()))
        );
        assert_eq!(
            check(
                json!({"tools": tool, "tool_choice": {"type": "function", "function": {"name": "f"}}})
            ),
            Err(Some("tool_choice".into()))
        );
        assert_eq!(check(json!({"tools": tool, "tool_choice": "none"})), Ok(()));
        assert_eq!(check(json!({"tools": [], "tool_choice": "auto"})), Ok(()));
        assert_eq!(check(json!({"tool_choice": "none"})), Ok(()));
        assert_eq!(
            check(json!({"tool_choice": "required"})),
            Err(Some("tool_choice".into()))
        );
        assert_eq!(check(json!({"tools": null, "tool_choice": null})), Ok(()));
    }

    #[test]
    fn legacy_functions_follow_the_same_rule() {
        let functions = json!([{"name": "f", "parameters": {}}]);
        assert_eq!(
            check(json!({"functions": functions})),
            Err(Some("functions".into()))
        );
        assert_eq!(
            check(json!({"functions": functions, "function_call": {"name": "f"}})),
            Err(Some("function_call".into()))
        );
        assert_eq!(
            check(json!({"functions": functions, "function_call": "none"})),
            Ok(())
        );
    }

    #[test]
    fn audio_output_is_refused() {
        assert_eq!(
            check(json!({"modalities": ["text", "audio"]})),
            Err(Some("modalities".into()))
        );
        assert_eq!(check(json!({"modalities": ["text"]})), Ok(()));
        assert_eq!(
            check(json!({"audio": {"voice": "alloy", "format": "wav"}})),
            Err(Some("audio".into()))
        );
        assert_eq!(check(json!({"audio": null})), Ok(()));
    }
}

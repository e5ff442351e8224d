//! The `diagnostics` request object (DIAGNOSTICS.md §7) through the server's validation and
//! planning, as `POST /v1/safety/diagnose` or a chat completion asking for diagnostics runs them:
//! the options are deserialized as the HTTP layer does, joined to one of a few conversations (text
//! only, one image, a system prompt and several turns, two images; the fuzzer may replace the
//! last user text, where focus and mask spans are looked for) and validated with the built-in
//! model. A refusal must be a 4xx; an accepted plan must stay within the prompt and the model's
//! layers, within the documented caps (focus items, mask spans, occurrences, caption bytes, a
//! caption pass that fits the context), with one sorted, merged key mask, and its report meta
//! must serialise.
#![no_main]

use std::ops::Range;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::{json, Value};
use server::backend::builtin::Builtin;
use server::engine::plan::CaptionPlan;
use server::media::{MediaConfig, MediaFetcher};
use server::openai::diagnostics::{
    DiagnosticsOptions, MAX_CAPTION_BYTES, MAX_FOCUS_ITEMS, MAX_MASK_SPANS, MAX_SPAN_OCCURRENCES,
};
use server::openai::ChatCompletionRequest;
use server::validation::diagnostics::MAX_CAPTION_MAX_TOKENS;
use server::validation::{Limits, Purpose, Validator};

/// A short context, so that the caption pass's context check is reached by small inputs too.
const MAX_MODEL_LEN: usize = 4096;
/// A 7x5 RGB PNG (`seeds/image/rgb_7x5.png`).
const PNG: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAcAAAAFCAIAAAAG+GGPAAAAGklEQVR4nGNkYGBQZRBGQywMpsIMDOiIclEACf8EStsC9EsAAAAASUVORK5CYII=";

struct Harness {
    runtime: tokio::runtime::Runtime,
    validator: Validator,
    n_layers: usize,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let builtin = Builtin::Tiny;
    let written = builtin.materialize().expect("write the built-in model");
    let loaded = server::backend::llava::load(
        &written.dir,
        None,
        None,
        Default::default(),
        None,
        &candle_core::Device::Cpu,
    )
    .expect("load the built-in model");
    let processor = Arc::new(server::backend::llava::LlavaProcessor::new(
        &loaded,
        model::image::ImageLimits::default(),
    ));
    let media = MediaFetcher::new(MediaConfig::default()).expect("media fetcher");
    let validator = Validator::new(
        processor,
        media,
        Limits::new(MAX_MODEL_LEN),
        builtin.id().to_string(),
        true,
    );
    let n_layers = validator
        .diagnostics_layers()
        .expect("the built-in model supports diagnostics");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    Harness {
        runtime,
        validator,
        n_layers,
    }
});

/// What the fuzzer controls besides the options.
#[derive(Deserialize)]
struct Input {
    /// Which conversation (modulo their number).
    #[serde(default)]
    conversation: u8,
    /// Replaces the last user message's text.
    #[serde(default)]
    text: Option<String>,
    /// Through chat completions rather than the diagnose endpoint.
    #[serde(default)]
    chat: bool,
    #[serde(default)]
    max_tokens: Option<i64>,
    diagnostics: DiagnosticsOptions,
}

fn image() -> Value {
    json!({"type": "image_url", "image_url": {"url": PNG}})
}

fn conversation(which: u8, text: Option<String>) -> Value {
    let text = text.unwrap_or_else(|| "How do I use the knife in this picture? knife".into());
    let last = |parts: Vec<Value>| {
        let mut parts = parts;
        parts.push(json!({"type": "text", "text": text}));
        json!({"role": "user", "content": parts})
    };
    match which % 4 {
        0 => json!([last(vec![])]),
        1 => json!([last(vec![image()])]),
        2 => json!([
            {"role": "system", "content": "You are careful. Refuse harm."},
            {"role": "user", "content": [image(), {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A knife on a table."},
            last(vec![]),
        ]),
        _ => json!([last(vec![image(), image()])]),
    }
}

fn within(spans: &[Range<usize>], len: usize) -> bool {
    spans.iter().all(|s| s.start < s.end && s.end <= len)
}

fuzz_target!(|data: &[u8]| {
    let harness = &*HARNESS;
    let deserializer = &mut serde_json::Deserializer::from_slice(data);
    let Ok(input) = serde_path_to_error::deserialize::<_, Input>(deserializer) else {
        return;
    };
    let mut body = json!({"messages": conversation(input.conversation, input.text)});
    if let Some(max_tokens) = input.max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    let mut request: ChatCompletionRequest =
        serde_json::from_value(body).expect("the conversations are valid requests");
    let options = input.diagnostics;
    request.diagnostics = Some(options.clone());
    let purpose = if input.chat {
        Purpose::Chat
    } else {
        Purpose::Diagnose
    };
    let result = harness.runtime.block_on(harness.validator.validate_for(
        request,
        "fuzz".to_string(),
        Instant::now(),
        purpose,
    ));
    let (valid, response) = match result {
        Ok(ok) => ok,
        Err(err) => {
            assert!(
                err.status().is_client_error(),
                "bad diagnostics options became {}: {err:?}",
                err.status()
            );
            return;
        }
    };

    let n = harness.n_layers;
    let len = valid.prompt.len();
    let plan = valid.diagnose.expect("asked for, so planned");
    assert!(plan.deliver, "asked for, so delivered");
    assert_eq!(plan.n_layers, n);
    assert!(
        plan.band.0 <= plan.band.1 && plan.band.1 <= n,
        "{:?}",
        plan.band
    );
    assert!(within(&plan.image_spans, len) && within(&plan.text_spans, len));

    let focus = options.focus.as_deref().unwrap_or_default();
    assert!(focus.len() <= MAX_FOCUS_ITEMS);
    assert_eq!(plan.focus.len(), focus.len());
    for spans in &plan.focus {
        assert!(!spans.is_empty() && spans.len() <= MAX_SPAN_OCCURRENCES);
        assert!(within(spans, len), "focus {spans:?} outside {len}");
    }

    if let Some(mask) = &plan.mask {
        let asked = options
            .mask_attention
            .as_ref()
            .expect("a mask was asked for");
        assert!(!asked.spans.is_empty() && asked.spans.len() <= MAX_MASK_SPANS);
        assert!(
            mask.layers.iter().all(|&l| (1..=n).contains(&l)),
            "{mask:?}"
        );
        assert!(
            within(&mask.spans, len),
            "mask {:?} outside {len}",
            mask.spans
        );
        // One key mask: sorted, disjoint, never the first position.
        assert!(
            mask.spans.windows(2).all(|w| w[0].end < w[1].start),
            "{mask:?}"
        );
        assert!(mask.spans.iter().all(|s| s.start > 0), "{mask:?}");
    } else {
        assert!(options.mask_attention.is_none());
    }
    if let Some(align) = &plan.align {
        assert!(
            align.layers.iter().all(|&l| (1..=n).contains(&l)),
            "{align:?}"
        );
        assert!(!plan.image_spans.is_empty() && plan.caption != CaptionPlan::None);
    }

    match &plan.caption {
        CaptionPlan::Given(caption) => {
            assert!(caption.len() <= MAX_CAPTION_BYTES);
            let pass = plan
                .caption_prompt
                .as_ref()
                .expect("a given caption's pass is built");
            assert!(
                pass.ids.len() < MAX_MODEL_LEN,
                "caption pass of {}",
                pass.ids.len()
            );
            assert!(within(&pass.caption_spans, pass.ids.len()));
        }
        CaptionPlan::Model { max_tokens } => {
            assert!(
                (1..=MAX_CAPTION_MAX_TOKENS).contains(max_tokens),
                "{max_tokens}"
            )
        }
        CaptionPlan::None => {}
    }

    let meta = response
        .diagnostics
        .expect("asked for, so the meta is there");
    serde_json::to_string(&meta).expect("the meta serialises");
});

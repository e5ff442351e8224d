//! Request bodies through the server's validation, as `POST /v1/chat/completions` runs it: JSON
//! → `ChatCompletionRequest` (the HTTP layer's serde_path_to_error deserializer) → the full
//! `Validator::validate` with the built-in model (data-URI images decoded and preprocessed, chat
//! template, tokenizer, context check). SERVING.md: a bad input is a 4xx, never a 500 and never a
//! panic. Requests naming http(s) image URLs are skipped: validating them would use the network.
#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use server::backend::builtin::Builtin;
use server::media::{MediaConfig, MediaFetcher};
use server::openai::{ChatCompletionRequest, ContentPart, MessageContent};
use server::validation::{Limits, Purpose, Validator};

struct Harness {
    runtime: tokio::runtime::Runtime,
    validator: Validator,
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
    // A short context, so that the context-length checks are reached by small inputs too.
    let limits = Limits::new(4096);
    let validator = Validator::new(processor, media, limits, builtin.id().to_string(), true);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    Harness { runtime, validator }
});

fn uses_the_network(request: &ChatCompletionRequest) -> bool {
    request.messages.iter().any(|m| match &m.content {
        MessageContent::Text(_) => false,
        MessageContent::Parts(parts) => parts.iter().any(|p| match p {
            ContentPart::ImageUrl { image_url } => !image_url.url.starts_with("data:"),
            ContentPart::Text { .. } => false,
        }),
    })
}

fuzz_target!(|data: &[u8]| {
    let harness = &*HARNESS;
    let deserializer = &mut serde_json::Deserializer::from_slice(data);
    let Ok(request) = serde_path_to_error::deserialize::<_, ChatCompletionRequest>(deserializer)
    else {
        return;
    };
    if uses_the_network(&request) {
        return;
    }
    let result = harness.runtime.block_on(harness.validator.validate_for(
        request,
        "fuzz".to_string(),
        Instant::now(),
        Purpose::Chat,
    ));
    if let Err(err) = result {
        assert!(
            err.status().is_client_error(),
            "a bad request became {}: {err:?}",
            err.status()
        );
    }
});

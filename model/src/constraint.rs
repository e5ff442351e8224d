//! Structured outputs: grammar-constrained decoding with llguidance (the engine behind vLLM's
//! `guidance` backend, llama.cpp's `%llguidance` grammars and mistral.rs).
//!
//! A [`ConstraintCompiler`] is built once per served tokenizer: it holds llguidance's token
//! trie over the vocabulary's byte strings and its `ParserFactory`. Each request's
//! [`GrammarSpec`] compiles into a [`Constraint`] (its own llguidance `Matcher`), which gives the
//! sequence's sampler a mask of the tokens that keep the output a prefix of the grammar's
//! language, and is told each token drawn. When the grammar admits nothing but its end, only the
//! end-of-sequence tokens are allowed; when it admits no continuation at all
//! ([`Constraint::is_finished`]) the sequence can stop at once.
//!
//! What the grammar sees is what the client gets: the token bytes llguidance reads are those of
//! `tokenizer.json` (`token_bytes_from_tokenizer_json`: a byte-fallback piece `<0x41>` is its one
//! byte, `▁` a space, special tokens are marked and never allowed), and the server's text is
//! transformers' `decode` of the generated ids. The two differ in one place: a SentencePiece
//! (Llama, Mistral) decoder strips the space of the *first* generated token (`▁{` decodes to
//! `{`). So when the tokenizer does that, the first token is drawn among those whose bytes do
//! not start with a space (unless the grammar allows nothing else), and the decoded text is then
//! byte for byte what the matcher accepted.

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// What a request constrains its output to (OpenAI's `response_format`, vLLM's `guided_*`).
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this JSON Schema (`json_schema`, `guided_json`).
    JsonSchema(Value),
    /// Text matching this regular expression in full (Rust `regex` syntax; `guided_regex`).
    Regex(String),
    /// Exactly one of these strings (`guided_choice`).
    Choice(Vec<String>),
}

impl GrammarSpec {
    /// llguidance's grammar for it. JSON between tokens allows llama.cpp's whitespace
    /// ([`JSON_WHITESPACE`]), so pretty-printed JSON is possible but whitespace cannot run on
    /// forever (llguidance's default, unbounded runs, lets a model emit newlines until
    /// `max_tokens`). A schema may set other llguidance options with its own `x-guidance` key
    /// (e.g. `{"whitespace_flexible": false}` for compact JSON). `additionalProperties` follows
    /// the schema (JSON Schema's default: allowed).
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Self::JsonObject => TopLevelGrammar::from_json_schema(with_json_options(
                serde_json::json!({"type": "object"}),
            )),
            Self::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_json_options(schema.clone()))
            }
            Self::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Self::Choice(choices) => {
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
        }
    }
}

/// llama.cpp's JSON whitespace (`json-schema-to-grammar`'s `space ::= | " " | "\n" [ \t]{0,20}`:
/// one space, or a newline and up to 20 spaces or tabs of indentation), as llguidance's skipped
/// lexeme between two JSON tokens.
pub const JSON_WHITESPACE: &str = r"[ ]|\n[ \t]{0,20}";

/// `schema` with [`JSON_WHITESPACE`] unless it sets its own llguidance options.
fn with_json_options(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// A grammar llguidance refused (bad schema, bad regex, over its limits): the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidGrammar(pub String);

/// Compiles requests' grammars against the served vocabulary. Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
    /// Tokens allowed as the first generated one: those whose bytes do not start with a space,
    /// when the decoder strips that space (module docs); `None` when it does not.
    first_token_filter: Option<Arc<SimpleVob>>,
}

impl fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConstraintCompiler")
            .field("vocab_size", &self.vocab_size)
            .field("strips_first_space", &self.first_token_filter.is_some())
            .finish()
    }
}

impl ConstraintCompiler {
    /// The trie of `tokenizer`'s vocabulary; `end_ids` are the tokens that end generation (EOS
    /// and end-of-turn), the only ones allowed once the grammar is complete.
    pub fn new(tokenizer: &Tokenizer, end_ids: &[u32]) -> Result<Self> {
        let err = |e: anyhow::Error| ModelError::Tokenizer(format!("structured outputs: {e}"));
        let json: Value = serde_json::from_str(
            &tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?,
        )
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(err)?;
        let vocab_size = tokenizer.vocab_size().max(words.len());
        words.resize(vocab_size, Vec::new());
        let Some(&eos) = end_ids.first() else {
            return Err(ModelError::Tokenizer(
                "structured outputs need an end-of-sequence token".into(),
            ));
        };
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(end_ids);
        let first_token_filter = strips_first_space(tokenizer, &words).then(|| {
            let mut allowed = trie.alloc_token_set();
            for (id, word) in words.iter().enumerate() {
                if word.first() != Some(&b' ') {
                    allowed.allow_token(id as u32);
                }
            }
            Arc::new(allowed)
        });
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(err)?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            vocab_size,
            first_token_filter,
        })
    }

    /// One request's constraint; an invalid schema or regex is an [`InvalidGrammar`].
    pub fn compile(&self, spec: &GrammarSpec) -> std::result::Result<Constraint, InvalidGrammar> {
        if let GrammarSpec::Choice(choices) = spec {
            if choices.is_empty() {
                return Err(InvalidGrammar("the list of choices is empty".into()));
            }
        }
        let parser = self
            .factory
            .create_parser(spec.grammar())
            .map_err(|e| InvalidGrammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(InvalidGrammar(e));
        }
        Ok(Constraint {
            matcher,
            vocab_size: self.vocab_size,
            first_token_filter: self.first_token_filter.clone(),
            started: false,
        })
    }
}

/// Whether `decode` drops the leading space of a sequence's first token (SentencePiece's
/// `Strip` decoder / dummy prefix): checked on the first ordinary piece that starts with one.
fn strips_first_space(tokenizer: &Tokenizer, words: &[Vec<u8>]) -> bool {
    words
        .iter()
        .enumerate()
        .find(|(id, w)| {
            w.len() > 1 && w[0] == b' ' && w[1] != b' ' && !tokenizer.is_special(*id as u32)
        })
        .and_then(|(id, _)| tokenizer.decode(&[id as u32], true).ok())
        .is_some_and(|text| !text.starts_with(' '))
}

/// One sequence's grammar state: masks its logits, follows its tokens.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
    first_token_filter: Option<Arc<SimpleVob>>,
    started: bool,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("started", &self.started)
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// The tokens allowed next (bit `id` set): llguidance's mask, only the end tokens once the
    /// grammar is complete.
    pub fn allowed_tokens(&mut self) -> Result<SimpleVob> {
        let mut mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ModelError::Sampling(format!("grammar mask: {e}")))?;
        if !self.started {
            if let Some(filter) = &self.first_token_filter {
                let mut filtered = mask.clone();
                filtered.and(filter);
                if !filtered.is_zero() {
                    mask = filtered;
                }
            }
        }
        Ok(mask)
    }

    /// Sets every logit the grammar does not allow next to −inf (logits past the tokenizer's
    /// vocabulary, the model's padding rows, included).
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask = self.allowed_tokens()?;
        let known = self.vocab_size.min(logits.len());
        mask.iter_unset_entries(|id| {
            if id < known {
                logits[id] = f32::NEG_INFINITY;
            }
        });
        logits[known..].fill(f32::NEG_INFINITY);
        Ok(())
    }

    /// Advances the grammar by the token drawn (which the mask allowed).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.started = true;
        self.matcher
            .consume_token(token)
            .map_err(|e| ModelError::Sampling(format!("grammar refused token {token}: {e}")))
    }

    /// The grammar admits no further token: the output is complete.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the output so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::sampling::{Sampler, SamplingParams};

    fn tokenizer(dir: &str) -> Tokenizer {
        Tokenizer::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)).unwrap()
    }

    fn tiny() -> (Tokenizer, ConstraintCompiler) {
        let tok = tokenizer("../fixtures/tiny-llava-next");
        let eos = tok.eos_id().unwrap();
        let compiler = ConstraintCompiler::new(&tok, &[eos]).unwrap();
        (tok, compiler)
    }

    /// Draws up to `max_tokens` tokens from random logits (a stand-in for a random-weight
    /// model, temperature 1) through the constraint, as the engine does; the decoded text and
    /// whether it ended (an end token drawn or the grammar finished) rather than being cut.
    fn generate(
        tok: &Tokenizer,
        compiler: &ConstraintCompiler,
        spec: &GrammarSpec,
        seed: u64,
        max_tokens: usize,
    ) -> (String, bool) {
        let mut constraint = compiler.compile(spec).unwrap();
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        });
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let eos = tok.eos_id().unwrap();
        let mut ids = Vec::new();
        for _ in 0..max_tokens {
            // Logits a bit wider than the vocabulary, like a model's padded embedding rows.
            let mut logits: Vec<f32> = (0..tok.vocab_size() + 8)
                .map(|_| rng.random_range(-4.0..4.0))
                .collect();
            constraint.mask_logits(&mut logits).unwrap();
            let id = sampler.sample_logits(&logits).unwrap().id;
            assert!(id < tok.vocab_size() as u32, "drew a padding row {id}");
            if id == eos {
                assert!(
                    constraint.is_accepting(),
                    "EOS before the grammar was complete"
                );
                return (tok.decode(&ids, true).unwrap(), true);
            }
            constraint.commit(id).unwrap();
            ids.push(id);
            if constraint.is_finished() {
                return (tok.decode(&ids, true).unwrap(), true);
            }
        }
        (tok.decode(&ids, true).unwrap(), false)
    }

    fn schema() -> Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "kind": {"enum": ["cat", "dog"]},
                "ok": {"type": "boolean"}
            },
            "required": ["name", "age", "kind", "ok"],
            "additionalProperties": false
        })
    }

    /// Checks `value` against [`schema`] by hand (the test's own reading of it).
    fn check_against_schema(text: &str) {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let object = value.as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["age", "kind", "name", "ok"], "{text}");
        assert!(
            object["name"].as_str().unwrap().chars().count() <= 6,
            "{text}"
        );
        let age = object["age"].as_i64().unwrap();
        assert!((0..=120).contains(&age), "{text}");
        assert!(
            ["cat", "dog"].contains(&object["kind"].as_str().unwrap()),
            "{text}"
        );
        assert!(object["ok"].is_boolean(), "{text}");
    }

    #[test]
    fn json_schema_constrained_sampling_only_produces_valid_json() {
        let (tok, compiler) = tiny();
        let spec = GrammarSpec::JsonSchema(schema());
        let mut ended = 0;
        for seed in 0..20 {
            let (text, complete) = generate(&tok, &compiler, &spec, seed, 400);
            if complete {
                ended += 1;
                check_against_schema(&text);
            }
        }
        assert!(ended >= 15, "only {ended} of 20 ended within 400 tokens");
    }

    #[test]
    fn json_object_output_parses_as_an_object() {
        let (tok, compiler) = tiny();
        let mut ended = 0;
        for seed in 0..20 {
            let (text, complete) = generate(&tok, &compiler, &GrammarSpec::JsonObject, seed, 400);
            if complete {
                ended += 1;
                let value: Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert!(value.is_object(), "{text}");
            }
        }
        assert!(ended > 0, "no json_object output ended within 400 tokens");
    }

    #[test]
    fn regex_constrained_output_matches_in_full() {
        let (tok, compiler) = tiny();
        let pattern = r"[a-z]{2,5}-[0-9]{1,3}( (yes|no))?";
        let full = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        for seed in 0..20 {
            let (text, complete) = generate(
                &tok,
                &compiler,
                &GrammarSpec::Regex(pattern.into()),
                seed,
                100,
            );
            assert!(complete, "{text:?} did not end");
            assert!(full.is_match(&text), "{text:?} does not match {pattern}");
        }
    }

    #[test]
    fn choice_output_is_one_of_the_choices() {
        let (tok, compiler) = tiny();
        let choices = vec![
            "positive".to_string(),
            "negative".into(),
            "a (b)|c.*".into(),
            " leading space".into(),
        ];
        let spec = GrammarSpec::Choice(choices.clone());
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let (text, complete) = generate(&tok, &compiler, &spec, seed, 100);
            assert!(complete, "{text:?} did not end");
            assert!(choices.contains(&text), "{text:?} is not a choice");
            seen.insert(text);
        }
        assert!(seen.len() >= 2, "always the same choice: {seen:?}");
    }

    #[test]
    fn first_token_never_starts_with_the_space_the_decoder_strips() {
        let (tok, compiler) = tiny();
        assert!(compiler.first_token_filter.is_some());
        let mut constraint = compiler.compile(&GrammarSpec::Regex("x+".into())).unwrap();
        let first = constraint.allowed_tokens().unwrap();
        let space_x = tok.token_to_id("▁x");
        if let Some(id) = space_x {
            assert!(!first.is_allowed(id));
        }
        assert!(first.is_allowed(tok.token_to_id("<0x78>").unwrap()));
    }

    #[test]
    fn invalid_schemas_and_regexes_are_refused() {
        let (_, compiler) = tiny();
        for spec in [
            GrammarSpec::Regex("(unclosed".into()),
            GrammarSpec::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            GrammarSpec::JsonSchema(serde_json::json!({"$ref": "#/$defs/missing"})),
            GrammarSpec::Choice(Vec::new()),
        ] {
            assert!(compiler.compile(&spec).is_err(), "{spec:?} compiled");
        }
    }

    /// The per-token cost of the mask (compute + apply to the logits, + commit), printed with
    /// `--nocapture`: on the tiny fixture's 1k vocabulary, builtin:tga's SentencePiece one, and
    /// on bench-135m's 32k one when
    /// `bench/models/bench-135m` has been generated (tools/bench.sh).
    #[test]
    fn mask_cost_per_token() {
        // builtin:tga's tokenizer is a SentencePiece `.model` (the converted path).
        let mut dirs = vec!["../fixtures/tiny-llava-next", "../builtin/tga"];
        let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/models/bench-135m");
        if bench.join("tokenizer.json").is_file() || bench.join("tokenizer.model").is_file() {
            dirs.push("../bench/models/bench-135m");
        }
        for dir in dirs {
            let tok = tokenizer(dir);
            let eos = tok.eos_id().unwrap();
            let built = Instant::now();
            let compiler = ConstraintCompiler::new(&tok, &[eos]).unwrap();
            let setup = built.elapsed();
            for (name, spec) in [
                ("json_schema", GrammarSpec::JsonSchema(schema())),
                ("json_object", GrammarSpec::JsonObject),
                ("regex", GrammarSpec::Regex(r"[a-z ]{1,200}\.".into())),
            ] {
                let compile = Instant::now();
                let mut constraint = compiler.compile(&spec).unwrap();
                let compile = compile.elapsed();
                let mut sampler = Sampler::new(SamplingParams {
                    seed: Some(7),
                    ..SamplingParams::default()
                });
                let mut rng = StdRng::seed_from_u64(7);
                let (mut masked, mut tokens) = (std::time::Duration::ZERO, 0u32);
                while tokens < 200 {
                    let mut logits: Vec<f32> = (0..tok.vocab_size())
                        .map(|_| rng.random_range(-4.0..4.0))
                        .collect();
                    let t = Instant::now();
                    constraint.mask_logits(&mut logits).unwrap();
                    masked += t.elapsed();
                    let id = sampler.sample_logits(&logits).unwrap().id;
                    let t = Instant::now();
                    if id == eos {
                        break;
                    }
                    constraint.commit(id).unwrap();
                    masked += t.elapsed();
                    tokens += 1;
                    if constraint.is_finished() {
                        break;
                    }
                }
                println!(
                    "mask cost {dir} (vocab {}): {name}: {:.1} µs/token over {tokens} tokens \
                     (compile {:.1} ms, tokenizer setup {:.1} ms)",
                    tok.vocab_size(),
                    masked.as_secs_f64() * 1e6 / f64::from(tokens.max(1)),
                    compile.as_secs_f64() * 1e3,
                    setup.as_secs_f64() * 1e3,
                );
            }
        }
    }
}

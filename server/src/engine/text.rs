//! Turning a growing list of token ids into text deltas: incremental detokenisation that never
//! splits a character, and stop strings that are cut out of the output even when they arrive
//! across several tokens.

/// Incremental detokenisation with a prefix window, as TGI's `decode_token` and transformers'
/// `TextStreamer` do it: decoding a token alone loses SentencePiece's leading-space handling and
/// splits multi-byte characters, so each step decodes the window `ids[prefix_offset..]` and emits
/// only what it adds to `ids[prefix_offset..read_offset]`, and only once it no longer ends in
/// U+FFFD (an incomplete UTF-8 sequence that the next token will finish).
#[derive(Debug, Default)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes (often empty while a character is pending).
    pub fn push(&mut self, id: u32, decode: impl Fn(&[u32]) -> String) -> String {
        self.push_token(id, false, decode)
    }

    /// [`Self::push`] for a token that may be a byte-fallback piece (`<0x46>`). tokenizers'
    /// `ByteFallback` decoder turns a run of byte pieces that is not valid UTF-8 into one U+FFFD
    /// per byte, so a byte that decodes to "F" alone becomes U+FFFD once an invalid byte follows:
    /// the text of a byte run is held back until a non-byte token (or the end) completes it, and
    /// the streamed text then equals the decode of all ids.
    pub fn push_token(
        &mut self,
        id: u32,
        is_byte: bool,
        decode: impl Fn(&[u32]) -> String,
    ) -> String {
        self.ids.push(id);
        if is_byte {
            return String::new();
        }
        self.advance(decode, false)
    }

    /// Whatever is still pending (a trailing incomplete character comes out as U+FFFD).
    pub fn flush(&mut self, decode: impl Fn(&[u32]) -> String) -> String {
        self.advance(decode, true)
    }

    fn advance(&mut self, decode: impl Fn(&[u32]) -> String, at_end: bool) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix_text = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let new_text = decode(&self.ids[self.prefix_offset..]);
        if new_text.len() <= prefix_text.len() || (!at_end && new_text.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let start = common_prefix_len(&prefix_text, &new_text);
        let delta = new_text[start..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        delta
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` that ends on a character boundary.
/// Normally `a` is a prefix of `b`; a tokenizer that rewrites earlier text must not make us panic.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// OpenAI's `stop`: generation ends at the first occurrence of any stop string, which is not part
/// of the output. Text that could still be the start of a stop string is held back until the next
/// token decides it, so a streamed stop string is never shown, even in part.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds decoded text; returns the text that is now safe to show and whether a stop string was
    /// reached (in which case the returned text ends just before it).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (delta.to_string(), false);
        }
        // A stop string completed by this delta starts at or after `emitted` (everything before it
        // was shown because no stop could start there), so searching from there is enough.
        self.text.push_str(delta);
        let tail = &self.text[self.emitted..];
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| tail.find(s.as_str()))
            .min()
        {
            let out = tail[..pos].to_string();
            self.emitted = self.text.len();
            return (out, true);
        }
        let hold = self.held_back_len();
        let end = self.text.len() - hold;
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        (out, false)
    }

    /// The held-back text, when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// The longest unshown suffix that is a proper prefix of some stop string.
    fn held_back_len(&self) -> usize {
        let tail = &self.text[self.emitted..];
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&k| k <= tail.len() && stop.is_char_boundary(k))
                    .find(|&k| tail.ends_with(&stop[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-level "tokenizer": token id = byte, decoded lossily like tokenizers' byte fallback.
    fn decode(ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn byte_runs_are_held_until_they_are_complete() {
        // Pieces: 0 "▁has", 1 <0x46>, 2 <0xA3>, 3 "▁smok"; decoded like ByteFallback: a byte
        // run that is not valid UTF-8 gives one U+FFFD per byte.
        let decode = |ids: &[u32]| {
            let mut out = String::new();
            let mut bytes = Vec::new();
            let flush = |bytes: &mut Vec<u8>, out: &mut String| {
                match String::from_utf8(bytes.clone()) {
                    Ok(s) => out.push_str(&s),
                    Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', bytes.len())),
                }
                bytes.clear();
            };
            for &id in ids {
                match id {
                    1 => bytes.push(0x46),
                    2 => bytes.push(0xA3),
                    _ => {
                        flush(&mut bytes, &mut out);
                        out.push_str(if id == 0 { " has" } else { " smok" });
                    }
                }
            }
            flush(&mut bytes, &mut out);
            out.trim_start().to_string()
        };
        let all = decode(&[0, 1, 2, 3]);
        assert_eq!(all, "has\u{FFFD}\u{FFFD} smok");
        let mut detok = IncrementalDetokenizer::new();
        let mut streamed: String = [(0, false), (1, true), (2, true), (3, false)]
            .iter()
            .map(|&(id, byte)| detok.push_token(id, byte, decode))
            .collect();
        streamed.push_str(&detok.flush(decode));
        assert_eq!(streamed, all);
        // Without the hint the "F" escapes before the invalid byte rewrites it.
        let mut naive = IncrementalDetokenizer::new();
        let streamed: String = [0, 1, 2, 3]
            .iter()
            .map(|&id| naive.push(id, decode))
            .collect();
        assert_ne!(streamed, all);
        // A run at the very end comes out with the flush.
        let mut detok = IncrementalDetokenizer::new();
        assert_eq!(detok.push_token(0, false, decode), "has");
        assert_eq!(detok.push_token(1, true, decode), "");
        assert_eq!(detok.flush(decode), "F");
    }

    fn detokenize_all(text: &str) -> Vec<String> {
        let mut detok = IncrementalDetokenizer::new();
        let mut deltas: Vec<String> = text.bytes().map(|b| detok.push(b as u32, decode)).collect();
        deltas.push(detok.flush(decode));
        deltas
    }

    #[test]
    fn detokenizer_never_splits_a_multibyte_character() {
        let text = "héllo wörld 😀 ok";
        let deltas = detokenize_all(text);
        assert_eq!(deltas.concat(), text);
        for delta in &deltas {
            assert!(!delta.contains('\u{FFFD}'), "split character in {delta:?}");
        }
        // The 4-byte emoji arrives in one delta, on the token that completes it.
        assert!(deltas.iter().any(|d| d == "😀"));
    }

    #[test]
    fn detokenizer_flushes_an_incomplete_character_at_the_end() {
        let mut detok = IncrementalDetokenizer::new();
        assert_eq!(detok.push(b'a' as u32, decode), "a");
        assert_eq!(detok.push(0xF0, decode), "");
        assert_eq!(detok.flush(decode), "\u{FFFD}");
        assert_eq!(detok.flush(decode), "");
    }

    #[test]
    fn detokenizer_keeps_the_window_context_for_leading_spaces() {
        // A SentencePiece-like decoder that drops the leading space of the first piece, as
        // transformers does for "▁word" at the start of a decode.
        let vocab = ["▁Hello", "▁world", "!"];
        let sp_decode = |ids: &[u32]| {
            let joined: String = ids.iter().map(|&i| vocab[i as usize]).collect();
            joined.replace('▁', " ").trim_start().to_string()
        };
        let mut detok = IncrementalDetokenizer::new();
        let out: String = [0u32, 1, 2]
            .iter()
            .map(|&id| detok.push(id, sp_decode))
            .collect();
        assert_eq!(out, "Hello world!");
    }

    fn run_stops(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for delta in deltas {
            let (text, stopped) = matcher.push(delta);
            out.push(text);
            if stopped {
                return (out, true);
            }
        }
        out.push(matcher.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_deltas_is_never_shown() {
        let (out, stopped) = run_stops(&["END"], &["abc E", "N", "D tail"]);
        assert!(stopped);
        assert_eq!(out, vec!["abc ", "", ""]);
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let (out, stopped) = run_stops(&["END"], &["abc E", "Nx", " more"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "abc ENx more");
        assert_eq!(out[0], "abc ");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let (out, stopped) = run_stops(&["world", "lo"], &["hello world"]);
        assert!(stopped);
        assert_eq!(out.concat(), "hel");
    }

    #[test]
    fn stop_strings_with_multibyte_characters_hold_back_on_boundaries() {
        let (out, stopped) = run_stops(&["éé"], &["caf", "é", "é!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
        let (out, stopped) = run_stops(&["éé"], &["café", " ok"]);
        assert!(!stopped);
        assert_eq!(out, vec!["caf", "é ok", ""]);
    }

    #[test]
    fn no_stop_strings_pass_text_through() {
        let (out, stopped) = run_stops(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a", "b", ""]);
    }
}

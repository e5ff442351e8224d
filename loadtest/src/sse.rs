//! A server-sent-events decoder for the `data:` frames of streamed chat completions (the WHATWG
//! event-stream rules: lines end in LF, CRLF or CR, an event ends at a blank line, several `data`
//! lines join with LF, lines starting with `:` are comments such as keep-alives).

#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Option<String>,
    /// The previous byte was a CR, so an LF right after it ends nothing more.
    after_cr: bool,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes as they arrive; returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &byte in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    if let Some(data) = self.end_line() {
                        events.push(data);
                    }
                }
                _ => self.line.push(byte),
            }
        }
        events
    }

    /// Handles one complete line; returns an event's data when the line was blank.
    fn end_line(&mut self) -> Option<String> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            return self.data.take();
        }
        // Lines are complete here, so a multi-byte character is never cut in two.
        let line = String::from_utf8_lossy(&line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let stream = "data: {\"a\":\"é\"}\n\n: keep-alive\n\ndata: [DONE]\n\n".as_bytes();
        for cut in 0..stream.len() {
            let mut decoder = SseDecoder::new();
            let mut events = decoder.push(&stream[..cut]);
            events.extend(decoder.push(&stream[cut..]));
            assert_eq!(events, vec!["{\"a\":\"é\"}", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn crlf_multiline_data_and_other_fields() {
        let mut decoder = SseDecoder::new();
        let events = decoder.push(b"event: x\r\nid: 3\r\ndata:one\r\ndata: two\r\n\r\ndata\r\r");
        assert_eq!(events, vec!["one\ntwo", ""]);
        assert!(decoder.push(b"data: unfinished\n").is_empty());
    }
}

//! The server's own counts, from its Prometheus `/metrics` scraped before and after the run, set
//! beside the client's: requests (by route and status), prompt tokens and generated tokens. A
//! lost or double-counted request shows up as a disagreement.
//!
//! Two metric dialects are read: tga-serve's (SERVING.md: `tga_requests_total{route,status}`,
//! `tga_prompt_tokens_total`, `tga_generation_tokens_total`) and vLLM's
//! (`vllm:request_success_total`, `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::client::RequestRecord;
use crate::workload::RequestKind;

pub const TGA_REQUESTS: &str = "tga_requests_total";
pub const TGA_PROMPT_TOKENS: &str = "tga_prompt_tokens_total";
pub const TGA_GENERATION_TOKENS: &str = "tga_generation_tokens_total";
pub const TGA_IMAGES: &str = "tga_images_total";
pub const VLLM_REQUEST_SUCCESS: &str = "vllm:request_success_total";
pub const VLLM_PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
pub const VLLM_GENERATION_TOKENS: &str = "vllm:generation_tokens_total";

/// One scrape: every sample, keyed by name and sorted labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    samples: BTreeMap<(String, Labels), f64>,
}

impl Scrape {
    /// The Prometheus text exposition format (comments and blank lines skipped).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut samples = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = split_sample(line)
                .ok_or_else(|| format!("line {}: not a sample: {line:.120}", i + 1))?;
            let value = rest
                .split_whitespace()
                .next()
                .and_then(parse_value)
                .ok_or_else(|| format!("line {}: no value: {line:.120}", i + 1))?;
            samples.insert((name, labels), value);
        }
        Ok(Self { samples })
    }

    /// The sum over every series of `name` whose labels include `matching`.
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for ((sample, labels), value) in &self.samples {
            if sample == name
                && matching
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            {
                found = true;
                total += value;
            }
        }
        found.then_some(total)
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|(sample, _)| sample == name)
    }

    /// The values of one label over the series of `name` that match.
    fn label_values(&self, name: &str, label: &str, matching: &[(&str, &str)]) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples
            .keys()
            .filter(|(sample, labels)| {
                sample == name
                    && matching
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .filter_map(|(_, labels)| {
                labels
                    .iter()
                    .find(|(k, _)| k == label)
                    .map(|(_, v)| v.clone())
            })
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// Label pairs, sorted by name.
type Labels = Vec<(String, String)>;

/// `name{a="x",b="y"} rest` → (name, sorted labels, rest).
fn split_sample(line: &str) -> Option<(String, Labels, &str)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let rest = &line[name_end..];
    let Some(body) = rest.strip_prefix('{') else {
        return Some((name, Vec::new(), rest));
    };
    let mut labels = Vec::new();
    let mut chars = body.char_indices().peekable();
    loop {
        while chars
            .next_if(|(_, c)| *c == ',' || c.is_whitespace())
            .is_some()
        {}
        let (start, c) = chars.next()?;
        if c == '}' {
            let mut labels = labels;
            labels.sort();
            return Some((name, labels, &body[start + 1..]));
        }
        let mut key_end = start + c.len_utf8();
        for (i, c) in chars.by_ref() {
            if c == '=' {
                key_end = i;
                break;
            }
        }
        let key = body[start..key_end].trim().to_string();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        }
        labels.push((key, value));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Agree,
    Disagree,
    /// The client cannot know its side (e.g. the server sent no usage).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountCheck {
    pub quantity: String,
    pub client: Option<u64>,
    /// The counter's increase over the run.
    pub server: Option<f64>,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerCounts {
    pub metrics_url: String,
    /// `tga` or `vllm`; `None` when the server exposes neither set of counters.
    pub dialect: Option<String>,
    pub checks: Vec<CountCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl ServerCounts {
    /// The metrics could not be compared at all (no endpoint, or no known counters).
    pub fn unavailable(metrics_url: &str, note: String) -> Self {
        Self {
            metrics_url: metrics_url.to_string(),
            dialect: None,
            checks: Vec::new(),
            note: Some(note),
        }
    }

    pub fn disagreements(&self) -> impl Iterator<Item = &CountCheck> {
        self.checks
            .iter()
            .filter(|c| c.verdict == Verdict::Disagree)
    }
}

/// What the client saw, in the units the server counts.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCounts {
    /// Responses by route and HTTP status.
    pub statuses: BTreeMap<RequestKind, BTreeMap<u16, u64>>,
    /// Requests that got no status but may have reached the server (timeouts, broken writes).
    pub unseen: BTreeMap<RequestKind, u64>,
    pub successes: u64,
    pub prompt_tokens: Result<u64, String>,
    pub generation_tokens: Result<u64, String>,
    /// Images in requests the server accepted (only tga-serve counts them).
    pub images: Result<u64, String>,
}

impl ClientCounts {
    pub fn from_records(records: &[RequestRecord]) -> Self {
        let mut counts = Self {
            statuses: BTreeMap::new(),
            unseen: BTreeMap::new(),
            successes: 0,
            prompt_tokens: Ok(0),
            generation_tokens: Ok(0),
            images: Ok(0),
        };
        for record in records {
            if record.succeeded() {
                counts.successes += 1;
            }
            match record.status {
                Some(status) => {
                    *counts
                        .statuses
                        .entry(record.kind)
                        .or_default()
                        .entry(status)
                        .or_default() += 1;
                }
                None => {
                    if record
                        .error
                        .as_ref()
                        .is_some_and(|e| e.kind.status_unseen())
                    {
                        *counts.unseen.entry(record.kind).or_default() += 1;
                    }
                }
            }
            // A refused request (non-2xx status) is never prefilled; anything that got a status
            // 2xx or none at all may have been.
            let refused = record.status.is_some_and(|s| !(200..300).contains(&s));
            let maybe_ran = !refused
                && (record.status.is_some()
                    || record
                        .error
                        .as_ref()
                        .is_some_and(|e| e.kind.status_unseen()));
            if !maybe_ran {
                continue;
            }
            add_known(
                &mut counts.prompt_tokens,
                record.prompt_tokens,
                record,
                "prompt_tokens",
            );
            add_known(
                &mut counts.generation_tokens,
                record.usage_completion_tokens,
                record,
                "completion_tokens",
            );
            if let Ok(images) = &mut counts.images {
                if record.images > 0 && record.kind == RequestKind::Diagnose {
                    // Whether a caption pass counts its image again is the server's business.
                    counts.images = Err("diagnose requests carried images".into());
                } else if record.images > 0 && !record.succeeded() {
                    counts.images = Err(format!(
                        "request {} with images failed after it was accepted",
                        record.index
                    ));
                } else {
                    *images += record.images as u64;
                }
            }
        }
        counts
    }
}

fn add_known(
    total: &mut Result<u64, String>,
    value: Option<u64>,
    record: &RequestRecord,
    what: &str,
) {
    let Ok(sum) = total else {
        return;
    };
    match value {
        Some(n) => *sum += n,
        None => {
            *total = Err(format!(
                "request {} ({}) reported no usage {what}{}",
                record.index,
                record.kind.as_str(),
                match &record.error {
                    Some(e) => format!(" ({} error)", e.kind.as_str()),
                    None => String::new(),
                }
            ))
        }
    }
}

/// Sets the counters' increase between two scrapes beside the client's counts.
pub fn compare(
    metrics_url: &str,
    before: &Scrape,
    after: &Scrape,
    client: &ClientCounts,
) -> ServerCounts {
    let delta = |name: &str, matching: &[(&str, &str)]| -> Option<f64> {
        let after = after.sum(name, matching)?;
        Some(after - before.sum(name, matching).unwrap_or(0.0))
    };
    let token_check =
        |quantity: &str, client: &Result<u64, String>, server: Option<f64>| match client {
            Ok(n) => CountCheck {
                quantity: quantity.into(),
                client: Some(*n),
                server,
                verdict: if server == Some(*n as f64) {
                    Verdict::Agree
                } else {
                    Verdict::Disagree
                },
                note: None,
            },
            Err(why) => CountCheck {
                quantity: quantity.into(),
                client: None,
                server,
                verdict: Verdict::Unknown,
                note: Some(why.clone()),
            },
        };

    if after.has(TGA_REQUESTS) || after.has(TGA_GENERATION_TOKENS) {
        let mut checks = Vec::new();
        for kind in [RequestKind::Chat, RequestKind::Diagnose] {
            let statuses = client.statuses.get(&kind).cloned().unwrap_or_default();
            let unseen = client.unseen.get(&kind).copied().unwrap_or(0);
            let route = [("route", kind.route())];
            let server_statuses: BTreeMap<u16, f64> = after
                .label_values(TGA_REQUESTS, "status", &route)
                .into_iter()
                .filter_map(|status| {
                    let code: u16 = status.parse().ok()?;
                    let n = delta(
                        TGA_REQUESTS,
                        &[("route", kind.route()), ("status", &status)],
                    )?;
                    (n != 0.0).then_some((code, n))
                })
                .collect();
            if statuses.is_empty() && unseen == 0 && server_statuses.is_empty() {
                continue;
            }
            let client_total: u64 = statuses.values().sum();
            let server_total: f64 = server_statuses.values().sum();
            // Requests the client saw no status for may or may not have been counted; every status
            // the client saw must be there exactly, bar those.
            let exact = statuses
                .iter()
                .all(|(s, n)| server_statuses.get(s).copied().unwrap_or(0.0) >= *n as f64)
                && server_total >= client_total as f64
                && server_total <= (client_total + unseen) as f64;
            let fmt_client: Vec<String> =
                statuses.iter().map(|(s, n)| format!("{s}×{n}")).collect();
            let fmt_server: Vec<String> = server_statuses
                .iter()
                .map(|(s, n)| format!("{s}×{n}"))
                .collect();
            let mut note = format!(
                "client {} | server {}",
                if fmt_client.is_empty() {
                    "-".into()
                } else {
                    fmt_client.join(" ")
                },
                if fmt_server.is_empty() {
                    "-".into()
                } else {
                    fmt_server.join(" ")
                },
            );
            if unseen > 0 {
                note.push_str(&format!(" | {unseen} without a status"));
            }
            checks.push(CountCheck {
                quantity: format!("requests {}", kind.route()),
                client: Some(client_total),
                server: Some(server_total),
                verdict: if exact {
                    Verdict::Agree
                } else {
                    Verdict::Disagree
                },
                note: Some(note),
            });
        }
        checks.push(token_check(
            "prompt tokens",
            &client.prompt_tokens,
            delta(TGA_PROMPT_TOKENS, &[]),
        ));
        checks.push(token_check(
            "generation tokens",
            &client.generation_tokens,
            delta(TGA_GENERATION_TOKENS, &[]),
        ));
        if after.has(TGA_IMAGES) {
            checks.push(token_check(
                "images",
                &client.images,
                delta(TGA_IMAGES, &[]),
            ));
        }
        return ServerCounts {
            metrics_url: metrics_url.into(),
            dialect: Some("tga".into()),
            checks,
            note: None,
        };
    }

    if after.has(VLLM_GENERATION_TOKENS) {
        let successes = delta(VLLM_REQUEST_SUCCESS, &[]);
        let unseen: u64 = client.unseen.values().sum();
        let agree = successes.is_some_and(|s| {
            s >= client.successes as f64 && s <= (client.successes + unseen) as f64
        });
        let checks = vec![
            CountCheck {
                quantity: "successful requests".into(),
                client: Some(client.successes),
                server: successes,
                verdict: if agree {
                    Verdict::Agree
                } else {
                    Verdict::Disagree
                },
                note: None,
            },
            token_check(
                "prompt tokens",
                &client.prompt_tokens,
                delta(VLLM_PROMPT_TOKENS, &[]),
            ),
            token_check(
                "generation tokens",
                &client.generation_tokens,
                delta(VLLM_GENERATION_TOKENS, &[]),
            ),
        ];
        return ServerCounts {
            metrics_url: metrics_url.into(),
            dialect: Some("vllm".into()),
            checks,
            note: None,
        };
    }

    ServerCounts::unavailable(
        metrics_url,
        "the server's metrics have neither tga_ nor vllm: request and token counters".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ErrorKind, RequestError, TokenSource};
    use crate::workload::RequestSpec;

    fn record(index: u64, status: Option<u16>, usage: Option<(u64, u64)>) -> RequestRecord {
        let spec = RequestSpec {
            index,
            kind: RequestKind::Chat,
            messages: serde_json::json!([]),
            images: vec![],
            max_tokens: 4,
            seed: 0,
        };
        let mut r = RequestRecord::new(&spec, None, 0.0);
        r.status = status;
        if let Some((p, c)) = usage {
            r.prompt_tokens = Some(p);
            r.usage_completion_tokens = Some(c);
            r.output_tokens = Some(c);
            r.output_tokens_source = Some(TokenSource::Usage);
        }
        if status != Some(200) {
            r.error = Some(RequestError {
                kind: if status.is_some() {
                    ErrorKind::Http
                } else {
                    ErrorKind::Connect
                },
                code: None,
                message: String::new(),
            });
        }
        r
    }

    const BEFORE: &str = r#"
# HELP tga_requests_total HTTP requests by route and status code.
# TYPE tga_requests_total counter
tga_requests_total{route="/metrics",status="200"} 3
tga_requests_total{route="/v1/chat/completions",status="200"} 5
tga_prompt_tokens_total 100
tga_generation_tokens_total 40
tga_images_total 2
"#;

    fn after(ok: u64, refused: u64, prompt: u64, generated: u64, images: u64) -> Scrape {
        Scrape::parse(&format!(
            "tga_requests_total{{route=\"/metrics\",status=\"200\"}} 4\n\
             tga_requests_total{{route=\"/v1/chat/completions\",status=\"200\"}} {}\n\
             tga_requests_total{{route=\"/v1/chat/completions\",status=\"429\"}} {refused}\n\
             tga_prompt_tokens_total {}\n\
             tga_generation_tokens_total {}\n\
             tga_images_total {}\n",
            5 + ok,
            100 + prompt,
            40 + generated,
            2 + images
        ))
        .unwrap()
    }

    #[test]
    fn parses_the_text_format() {
        let s = Scrape::parse(
            "# TYPE x counter\nx{a=\"1\",b=\"q\\\"uote\"} 2.5 1700000000\ny 3\nz{} +Inf\nh_bucket{le=\"0.1\"} 7\n",
        )
        .unwrap();
        assert_eq!(s.sum("x", &[("b", "q\"uote")]), Some(2.5));
        assert_eq!(s.sum("y", &[]), Some(3.0));
        assert_eq!(s.sum("z", &[]), Some(f64::INFINITY));
        assert_eq!(s.sum("h_bucket", &[("le", "0.1")]), Some(7.0));
        assert_eq!(s.sum("missing", &[]), None);
        assert!(Scrape::parse("x{a=1} 2\n").is_err());
    }

    #[test]
    fn matching_counts_agree_and_a_lost_request_disagrees() {
        let before = Scrape::parse(BEFORE).unwrap();
        let mut with_image = record(1, Some(200), Some((12, 4)));
        with_image.images = 1;
        let mut refused_image = record(2, Some(429), None);
        refused_image.images = 1;
        let records = vec![
            record(0, Some(200), Some((10, 4))),
            with_image,
            refused_image,
        ];
        let client = ClientCounts::from_records(&records);
        assert_eq!(client.prompt_tokens, Ok(22));
        assert_eq!(client.generation_tokens, Ok(8));
        assert_eq!(client.images, Ok(1));

        let good = compare("m", &before, &after(2, 1, 22, 8, 1), &client);
        assert_eq!(good.dialect.as_deref(), Some("tga"));
        assert_eq!(good.checks.len(), 4);
        assert!(
            good.checks.iter().all(|c| c.verdict == Verdict::Agree),
            "{good:?}"
        );

        let lost = compare("m", &before, &after(1, 1, 22, 8, 1), &client);
        let bad: Vec<&str> = lost.disagreements().map(|c| c.quantity.as_str()).collect();
        assert_eq!(bad, vec!["requests /v1/chat/completions"]);

        let double = compare("m", &before, &after(2, 1, 22, 9, 2), &client);
        let bad: Vec<&str> = double
            .disagreements()
            .map(|c| c.quantity.as_str())
            .collect();
        assert_eq!(bad, vec!["generation tokens", "images"]);
    }

    #[test]
    fn missing_usage_makes_tokens_unknown_not_wrong() {
        let before = Scrape::parse(BEFORE).unwrap();
        let mut no_usage = record(0, Some(200), None);
        no_usage.output_tokens = Some(3);
        no_usage.output_tokens_source = Some(TokenSource::Chunks);
        let client = ClientCounts::from_records(&[no_usage]);
        let result = compare("m", &before, &after(1, 0, 7, 3, 0), &client);
        assert_eq!(result.checks[0].verdict, Verdict::Agree);
        assert_eq!(result.checks[1].verdict, Verdict::Unknown);
        assert_eq!(result.checks[2].verdict, Verdict::Unknown);
    }

    #[test]
    fn vllm_counters_are_understood() {
        let before = Scrape::parse(
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 1\n\
             vllm:prompt_tokens_total{model_name=\"m\"} 5\nvllm:generation_tokens_total{model_name=\"m\"} 5\n",
        )
        .unwrap();
        let after = Scrape::parse(
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 2\n\
             vllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 1\n\
             vllm:prompt_tokens_total{model_name=\"m\"} 27\nvllm:generation_tokens_total{model_name=\"m\"} 13\n",
        )
        .unwrap();
        let client = ClientCounts::from_records(&[
            record(0, Some(200), Some((10, 4))),
            record(1, Some(200), Some((12, 4))),
        ]);
        let result = compare("m", &before, &after, &client);
        assert_eq!(result.dialect.as_deref(), Some("vllm"));
        assert!(
            result.checks.iter().all(|c| c.verdict == Verdict::Agree),
            "{result:?}"
        );
        let none = compare(
            "m",
            &Scrape::default(),
            &Scrape::parse("up 1\n").unwrap(),
            &client,
        );
        assert!(none.dialect.is_none() && none.checks.is_empty());
    }
}

//! What is sent: prompts (a JSONL file or the built-in synthetic set), images (a folder or
//! synthetic PNGs of chosen sizes), the text/image mix, the max_tokens distribution and the share
//! of diagnose requests. Request `i` is a pure function of (seed, i), so a run's requests do not
//! depend on the order in which concurrent workers take them.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{LoadtestError, Result};
use crate::settings::{ImageSize, IntDistribution};

/// Synthetic images drawn per requested size, so that consecutive image requests do not carry
/// the same bytes (a server with a multimodal prefix cache would otherwise hit it every time).
pub const SYNTHETIC_VARIANTS: u64 = 4;

const TEXT_PROMPTS: &[&str] = &[
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about the sea at night.",
    "What are three good habits for writing maintainable code?",
    "Summarise the causes of the French Revolution in a few sentences.",
    "Give me a recipe for a simple vegetable soup.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "List five questions to ask before adopting a dog.",
    "Describe the water cycle step by step.",
    "Compare trains and planes for a 500 km trip.",
    "Write a polite email declining a meeting invitation.",
    "What is the difference between weather and climate?",
    "Suggest a name for a bakery and explain the choice.",
    "How does a bicycle stay upright while moving?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Tell a short story about a lighthouse keeper.",
    "What should I pack for a weekend hiking trip?",
];

const IMAGE_PROMPTS: &[&str] = &[
    "Describe this image.",
    "What objects can you see in this picture?",
    "Which colours dominate this image?",
    "Write a caption for this image.",
    "Describe the shapes in this picture and where they are.",
    "Is there anything unusual in this image? Explain.",
    "What mood does this image convey?",
    "Count the distinct shapes in this image.",
];

/// Filler for `--prompt-words`: common words, so that any tokenizer splits them into few pieces.
const FILLER_WORDS: &[&str] = &[
    "the", "house", "river", "morning", "light", "across", "green", "table", "quickly", "music",
    "window", "garden", "people", "travel", "silver", "mountain", "story", "paper", "small",
    "bright", "market", "winter", "coffee", "letter", "season", "forest", "station", "quiet",
    "yellow", "bridge", "number", "simple", "answer", "city", "ocean", "field", "friend", "after",
    "before", "under", "through", "between", "school", "summer", "history", "animal", "kitchen",
    "evening", "language", "picture",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestKind {
    /// `POST /v1/chat/completions`, streamed.
    Chat,
    /// `POST /v1/safety/diagnose`, not streamed.
    Diagnose,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Diagnose => "diagnose",
        }
    }

    /// The route as servers label it in their metrics.
    pub fn route(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Diagnose => "/v1/safety/diagnose",
        }
    }
}

/// One prompt of the set: plain text (a user turn) or whole OpenAI messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Messages(Value),
}

#[derive(Debug, Clone)]
pub struct PromptEntry {
    pub prompt: Prompt,
    /// Overrides the max_tokens distribution for this prompt.
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Clone)]
pub enum PromptSet {
    /// The built-in prompts; image requests get image questions.
    Synthetic,
    File {
        path: PathBuf,
        entries: Vec<PromptEntry>,
    },
}

impl PromptSet {
    /// One JSON object a line: `{"prompt": "…"}` (or `"text"`) or `{"messages": [...]}`, with an
    /// optional `"max_tokens"`. Blank lines are skipped.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadtestError::io(path, e))?;
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| LoadtestError::Prompts {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let value: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let prompt =
                match (
                    value.get("prompt").or_else(|| value.get("text")),
                    value.get("messages"),
                ) {
                    (Some(Value::String(text)), None) => Prompt::Text(text.clone()),
                    (None, Some(messages @ Value::Array(list))) if !list.is_empty() => {
                        if !list.iter().any(|m| m["role"] == "user") {
                            return Err(bad("`messages` has no user message".into()));
                        }
                        Prompt::Messages(messages.clone())
                    }
                    _ => return Err(bad(
                        "expected a string `prompt` (or `text`), or a non-empty `messages` list"
                            .into(),
                    )),
                };
            let max_tokens = match value.get("max_tokens") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .filter(|n| (1..=u32::MAX as u64).contains(n))
                        .ok_or_else(|| bad("`max_tokens` must be a positive integer".into()))?
                        as u32,
                ),
            };
            entries.push(PromptEntry { prompt, max_tokens });
        }
        if entries.is_empty() {
            return Err(LoadtestError::Prompts {
                path: path.to_path_buf(),
                line: 0,
                message: "no prompts".into(),
            });
        }
        Ok(Self::File {
            path: path.to_path_buf(),
            entries,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Synthetic => "synthetic".into(),
            Self::File { path, entries } => {
                format!("{} ({} prompts)", path.display(), entries.len())
            }
        }
    }

    fn pick(&self, rng: &mut StdRng, with_images: bool) -> PromptEntry {
        match self {
            Self::Synthetic => {
                let set = if with_images {
                    IMAGE_PROMPTS
                } else {
                    TEXT_PROMPTS
                };
                PromptEntry {
                    prompt: Prompt::Text(set[rng.random_range(0..set.len())].to_string()),
                    max_tokens: None,
                }
            }
            Self::File { entries, .. } => entries[rng.random_range(0..entries.len())].clone(),
        }
    }
}

/// One image, ready to be put in a request as a data URI.
#[derive(Debug, Clone)]
pub struct ImageAsset {
    pub name: String,
    pub bytes: usize,
    pub data_uri: Arc<str>,
}

impl ImageAsset {
    fn new(name: String, mime: &str, bytes: &[u8]) -> Self {
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        Self {
            name,
            bytes: bytes.len(),
            data_uri: format!("data:{mime};base64,{encoded}").into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImageSet {
    pub source: String,
    pub assets: Vec<ImageAsset>,
}

impl ImageSet {
    /// Every PNG, JPEG, WebP, GIF and BMP file of a folder (not recursive), in name order.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let listing = std::fs::read_dir(dir).map_err(|e| LoadtestError::io(dir, e))?;
        let mut paths: Vec<PathBuf> = listing
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_file() && mime_type(path).is_some())
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(LoadtestError::Config(format!(
                "{}: no png, jpg, webp, gif or bmp images",
                dir.display()
            )));
        }
        let mut assets = Vec::with_capacity(paths.len());
        for path in paths {
            let bytes = std::fs::read(&path).map_err(|e| LoadtestError::io(&path, e))?;
            let mime = mime_type(&path).expect("filtered above");
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            assets.push(ImageAsset::new(name, mime, &bytes));
        }
        Ok(Self {
            source: dir.display().to_string(),
            assets,
        })
    }

    /// `SYNTHETIC_VARIANTS` PNG images of each size, drawn from the seed.
    pub fn synthetic(sizes: &[ImageSize], seed: u64) -> Result<Self> {
        let mut assets = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            for variant in 0..SYNTHETIC_VARIANTS {
                let mut rng =
                    StdRng::seed_from_u64(mix(seed ^ 0x1a2b_3c4d, (i as u64) << 8 | variant));
                let png = synthetic_png(*size, &mut rng)?;
                assets.push(ImageAsset::new(
                    format!("synthetic-{size}-{variant}.png"),
                    "image/png",
                    &png,
                ));
            }
        }
        let sizes: Vec<String> = sizes.iter().map(ToString::to_string).collect();
        Ok(Self {
            source: format!("synthetic {}", sizes.join(",")),
            assets,
        })
    }
}

fn mime_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        _ => return None,
    })
}

/// A gradient with a few rectangles and discs and light noise: something a vision tower can
/// describe, and which compresses about as badly as a photo.
fn synthetic_png(size: ImageSize, rng: &mut StdRng) -> Result<Vec<u8>> {
    let (w, h) = (size.width, size.height);
    let mut colour = || [rng.random::<u8>(), rng.random::<u8>(), rng.random::<u8>()];
    let (top, bottom) = (colour(), colour());
    let mut image = image::RgbImage::from_fn(w, h, |_, y| {
        let t = y as f32 / h.max(2) as f32;
        image::Rgb(std::array::from_fn(|c| {
            (top[c] as f32 * (1.0 - t) + bottom[c] as f32 * t) as u8
        }))
    });
    for shape in 0..6 {
        let fill = [rng.random::<u8>(), rng.random::<u8>(), rng.random::<u8>()];
        let (cx, cy) = (rng.random_range(0..w), rng.random_range(0..h));
        let r = rng.random_range(1..=(w.min(h) / 4).max(1));
        for y in cy.saturating_sub(r)..(cy + r).min(h) {
            for x in cx.saturating_sub(r)..(cx + r).min(w) {
                let (dx, dy) = (x as i64 - cx as i64, y as i64 - cy as i64);
                if shape % 2 == 0 || dx * dx + dy * dy <= (r as i64).pow(2) {
                    image.put_pixel(x, y, image::Rgb(fill));
                }
            }
        }
    }
    for pixel in image.pixels_mut() {
        for c in pixel.0.iter_mut() {
            *c = c.saturating_add_signed(rng.random_range(-6..=6));
        }
    }
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| LoadtestError::Image {
            name: format!("synthetic {size}"),
            message: e.to_string(),
        })?;
    Ok(png)
}

/// SplitMix64's finaliser over (seed, index): independent streams for each request.
pub fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub prompts: PromptSet,
    pub images: Option<ImageSet>,
    /// Share of requests that carry images, in [0, 1].
    pub image_ratio: f64,
    pub images_per_request: usize,
    /// Share of requests sent to the diagnose endpoint, in [0, 1].
    pub diagnose_ratio: f64,
    pub max_tokens: IntDistribution,
    /// Filler words put before each text prompt.
    pub prompt_words: Option<IntDistribution>,
    pub seed: u64,
}

/// One request of the run, before it is put on the wire.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub index: u64,
    pub kind: RequestKind,
    pub messages: Value,
    /// Indexes into the image set.
    pub images: Vec<usize>,
    pub max_tokens: u32,
    /// Sent as the request's `seed`, so sampled outputs repeat across runs.
    pub seed: u64,
}

impl Workload {
    pub fn validate(&self) -> Result<()> {
        for (name, ratio) in [
            ("--image-ratio", self.image_ratio),
            ("--diagnose-ratio", self.diagnose_ratio),
        ] {
            if !(0.0..=1.0).contains(&ratio) {
                return Err(LoadtestError::Config(format!(
                    "{name} must be in [0, 1], not {ratio}"
                )));
            }
        }
        if self.image_ratio > 0.0 && self.images.is_none() {
            return Err(LoadtestError::Config(
                "--image-ratio needs images: --image-dir or --image-size".into(),
            ));
        }
        if self.images_per_request == 0 {
            return Err(LoadtestError::Config(
                "--images-per-request must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub fn request(&self, index: u64) -> RequestSpec {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, index));
        let kind = if rng.random_bool(self.diagnose_ratio) {
            RequestKind::Diagnose
        } else {
            RequestKind::Chat
        };
        let images: Vec<usize> = match &self.images {
            Some(set) if rng.random_bool(self.image_ratio) => (0..self.images_per_request)
                .map(|_| rng.random_range(0..set.assets.len()))
                .collect(),
            _ => Vec::new(),
        };
        let entry = self.prompts.pick(&mut rng, !images.is_empty());
        let max_tokens = entry
            .max_tokens
            .unwrap_or_else(|| self.max_tokens.sample(&mut rng));
        let padding = self.prompt_words.map(|words| {
            let n = words.sample(&mut rng);
            let words: Vec<&str> = (0..n)
                .map(|_| FILLER_WORDS[rng.random_range(0..FILLER_WORDS.len())])
                .collect();
            words.join(" ")
        });
        let seed = rng.random::<u32>() as u64;
        let image_parts: Vec<Value> = images
            .iter()
            .map(|&i| {
                let uri = &self.images.as_ref().expect("chosen from it").assets[i].data_uri;
                json!({"type": "image_url", "image_url": {"url": uri.as_ref()}})
            })
            .collect();
        let messages = match entry.prompt {
            Prompt::Text(text) => {
                let text = match padding {
                    Some(words) => format!("Context: {words}\n\n{text}"),
                    None => text,
                };
                json!([{"role": "user", "content": user_content(Value::String(text), image_parts)}])
            }
            Prompt::Messages(mut messages) => {
                if !image_parts.is_empty() {
                    let list = messages.as_array_mut().expect("checked when loaded");
                    let user = list
                        .iter_mut()
                        .rev()
                        .find(|m| m["role"] == "user")
                        .expect("checked when loaded");
                    let content = user["content"].take();
                    user["content"] = user_content(content, image_parts);
                }
                messages
            }
        };
        RequestSpec {
            index,
            kind,
            messages,
            images,
            max_tokens,
            seed,
        }
    }
}

/// A user turn's content with the images first, as LLaVA's prompts put `<image>` before the
/// question.
fn user_content(content: Value, image_parts: Vec<Value>) -> Value {
    if image_parts.is_empty() {
        return content;
    }
    let mut parts = image_parts;
    match content {
        Value::String(text) => parts.push(json!({"type": "text", "text": text})),
        Value::Array(existing) => parts.extend(existing),
        Value::Null => {}
        other => parts.push(other),
    }
    Value::Array(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(image_ratio: f64, diagnose_ratio: f64) -> Workload {
        Workload {
            prompts: PromptSet::Synthetic,
            images: Some(
                ImageSet::synthetic(
                    &[ImageSize {
                        width: 40,
                        height: 30,
                    }],
                    1,
                )
                .unwrap(),
            ),
            image_ratio,
            images_per_request: 1,
            diagnose_ratio,
            max_tokens: "uniform:4:8".parse().unwrap(),
            prompt_words: None,
            seed: 9,
        }
    }

    #[test]
    fn requests_are_a_function_of_seed_and_index() {
        let w = workload(0.5, 0.0);
        let a = w.request(17);
        let b = w.request(17);
        assert_eq!(a.messages, b.messages);
        assert_eq!((a.max_tokens, a.seed), (b.max_tokens, b.seed));
        let other = Workload {
            seed: 10,
            ..w.clone()
        };
        let differs = (0..20).any(|i| other.request(i).messages != w.request(i).messages);
        assert!(differs);
    }

    #[test]
    fn mix_ratios_are_respected() {
        let w = workload(0.3, 0.1);
        let n = 4000;
        let specs: Vec<RequestSpec> = (0..n).map(|i| w.request(i)).collect();
        let with_images = specs.iter().filter(|s| !s.images.is_empty()).count() as f64;
        let diagnose = specs
            .iter()
            .filter(|s| s.kind == RequestKind::Diagnose)
            .count() as f64;
        assert!((with_images / n as f64 - 0.3).abs() < 0.03, "{with_images}");
        assert!((diagnose / n as f64 - 0.1).abs() < 0.02, "{diagnose}");
        assert!(specs.iter().all(|s| (4..=8).contains(&s.max_tokens)));
        let image_request = specs.iter().find(|s| !s.images.is_empty()).unwrap();
        let content = &image_request.messages[0]["content"];
        assert_eq!(content[0]["type"], "image_url");
        let url = content[0]["image_url"]["url"].as_str().unwrap();
        assert!(url.starts_with("data:image/png;base64,"));
        assert_eq!(content[1]["type"], "text");
        let text_request = specs.iter().find(|s| s.images.is_empty()).unwrap();
        assert!(text_request.messages[0]["content"].is_string());
    }

    #[test]
    fn synthetic_images_decode_at_the_requested_size() {
        let sizes = [
            ImageSize {
                width: 64,
                height: 32,
            },
            ImageSize {
                width: 20,
                height: 50,
            },
        ];
        let set = ImageSet::synthetic(&sizes, 3).unwrap();
        assert_eq!(set.assets.len(), 2 * SYNTHETIC_VARIANTS as usize);
        for (i, asset) in set.assets.iter().enumerate() {
            let b64 = asset.data_uri.split_once(',').unwrap().1;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            assert_eq!(bytes.len(), asset.bytes);
            let decoded = image::load_from_memory(&bytes).unwrap();
            let size = sizes[i / SYNTHETIC_VARIANTS as usize];
            assert_eq!(
                (decoded.width(), decoded.height()),
                (size.width, size.height)
            );
        }
        assert_ne!(set.assets[0].data_uri, set.assets[1].data_uri);
    }

    #[test]
    fn jsonl_prompts_accept_text_or_messages() {
        let dir = std::env::temp_dir().join(format!("tga-loadtest-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"hi\", \"max_tokens\": 3}\n\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"q\"}]}\n",
        )
        .unwrap();
        let set = PromptSet::from_jsonl(&path).unwrap();
        let PromptSet::File { entries, .. } = &set else {
            unreachable!()
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].max_tokens, Some(3));
        let w = Workload {
            prompts: set,
            image_ratio: 1.0,
            ..workload(1.0, 0.0)
        };
        let spec = (0..50)
            .map(|i| w.request(i))
            .find(|s| s.messages.as_array().unwrap().len() == 2)
            .unwrap();
        assert_eq!(spec.messages[0]["content"], "s");
        assert_eq!(spec.messages[1]["content"][0]["type"], "image_url");
        assert_eq!(spec.messages[1]["content"][1]["text"], "q");

        std::fs::write(&path, "{\"prompt\": 3}\n").unwrap();
        let err = PromptSet::from_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains(":1:"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

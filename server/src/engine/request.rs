//! The prompt a request carries into the engine, built by a [`crate::backend::PromptProcessor`]
//! from the conversation. These are the data of the seam; the traits that produce and consume
//! them are in [`crate::backend`].

use std::ops::Range;

/// Who said a turn of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One piece of a turn, in order of appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnPart {
    Text(String),
    /// The image at this index of the images passed to [`crate::backend::PromptProcessor::build_prompt`].
    Image(usize),
}

/// One message of the conversation, already checked against the wire schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    pub parts: Vec<TurnPart>,
    /// TGA's retrieved text for this turn's image, rendered before it
    /// (`Retrieved Text: {R}. <image>\n…`).
    pub retrieved: Option<String>,
}

impl ChatTurn {
    /// The indices of this turn's images, in order of appearance.
    pub fn images(&self) -> impl Iterator<Item = usize> + '_ {
        self.parts.iter().filter_map(|p| match p {
            TurnPart::Image(i) => Some(*i),
            TurnPart::Text(_) => None,
        })
    }
}

/// Every image index of the conversation in order of appearance: the order of
/// [`Prompt::images`].
pub fn image_order(turns: &[ChatTurn]) -> Vec<usize> {
    turns.iter().flat_map(ChatTurn::images).collect()
}

/// One preprocessed image, as the processor hands it to the model.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// Original `(height, width)`, which anyres packing needs (transformers' `image_sizes`).
    pub image_size: (u32, u32),
    /// Preprocessed pixel values, row-major, laid out as `shape` (e.g. `[views, 3, 336, 336]`).
    pub pixel_values: Vec<f32>,
    pub shape: Vec<usize>,
    /// How many prompt positions this image occupies once expanded.
    pub num_tokens: usize,
}

/// A tokenized prompt, ready for prefill.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Token ids as fed to the model, with each image placeholder expanded to its positions.
    pub token_ids: Vec<u32>,
    /// The positions each image's features occupy, in order (one per entry of `images`).
    pub image_spans: Vec<Range<usize>>,
    /// The images, in the order their placeholders appear in `token_ids`.
    pub images: Vec<ImageInput>,
    /// Where the user text (and the needles asked for) are, found while the prompt was rendered
    /// and tokenized, so the diagnostics never tokenize it again.
    pub layout: PromptLayout,
}

impl Prompt {
    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// Prompt positions taken by images (part of [`Prompt::len`]).
    pub fn image_tokens(&self) -> usize {
        self.images.iter().map(|image| image.num_tokens).sum()
    }
}

/// Where things are in a prompt, for the diagnostics' attention shares and interventions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PromptLayout {
    /// Token spans of the user messages' text parts.
    pub user_text: Vec<Range<usize>>,
    /// Per needle, the token spans of its occurrences inside the user text (empty: not found).
    pub needles: Vec<Vec<Range<usize>>>,
}

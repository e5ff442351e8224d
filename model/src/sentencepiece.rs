//! SentencePiece `.model` files, read without the sentencepiece library.
//!
//! Original-format LLaVA checkpoints often ship only `tokenizer.model`, a serialized `ModelProto`
//! (sentencepiece_model.proto). [`SpmModel::from_bytes`] is a minimal protobuf reader for the
//! fields that decide tokenization, and [`SpmModel::to_tokenizer`] builds the `tokenizers`
//! equivalent of a BPE model, the way transformers' Llama slow→fast conversion does
//! (`LlamaConverter` with `legacy=True`, `SentencePieceExtractor` for the merges):
//!
//! - vocabulary = the pieces in file order (id = position);
//! - merges derived from the vocabulary: every split `l + r` of a piece where both halves are
//!   pieces, ordered by the score of the merged piece (best first), which for sentencepiece BPE is
//!   the order in which sentencepiece itself merges;
//! - `byte_fallback` from the trainer spec, `fuse_unk`, `unk` = the piece at `unk_id`;
//! - normalizer `Prepend("▁")` (when `add_dummy_prefix`) + `Replace(" ", "▁")`, which is exactly
//!   sentencepiece's dummy prefix and whitespace escaping, so plain text encodes to the ids the
//!   sentencepiece library gives;
//! - decoder `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)`;
//! - control pieces (`<s>`, `</s>`, `<unk>`) as special added tokens, user-defined pieces as
//!   plain added tokens (sentencepiece matches them whole, before BPE).
//!
//! Unigram (and word/char) models are refused with a clear error: LLaVA-Mistral's tokenizer is BPE.

use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Precompiled, Prepend, Replace};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

use crate::error::{ModelError, Result};

/// sentencepiece's whitespace marker (U+2581).
pub const SPIECE_UNDERLINE: &str = "\u{2581}";

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Result<Self> {
        Ok(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => return Err(spm_err(format!("unknown piece type {other}"))),
        })
    }
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpmPiece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The `TrainerSpec` fields that matter for encoding. Defaults are the proto2 defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    pub model_type: SpmModelType,
    pub byte_fallback: bool,
    pub treat_whitespace_as_suffix: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        Self {
            model_type: SpmModelType::Unigram,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
        }
    }
}

/// `NormalizerSpec`. Defaults are the proto2 defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A parsed SentencePiece `ModelProto`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmModel {
    pub pieces: Vec<SpmPiece>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
}

fn spm_err(msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("SentencePiece model: {msg}"))
}

// ---------------------------------------------------------------------------------------------
// Minimal protobuf wire-format reader.

/// One field value as it appears on the wire.
enum Wire<'a> {
    Varint(u64),
    /// 64-bit fixed values (no ModelProto field we read has one).
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| spm_err("truncated varint"))?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(spm_err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| spm_err("truncated field"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn next_field(&mut self) -> Result<Option<(u64, Wire<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| spm_err("bad length"))?;
                Wire::Bytes(self.take(len)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            w => {
                return Err(spm_err(format!(
                    "unsupported wire type {w} (field {field}); not a SentencePiece model?"
                )))
            }
        };
        Ok(Some((field, value)))
    }
}

impl Wire<'_> {
    fn as_u64(&self, what: &str) -> Result<u64> {
        match self {
            Wire::Varint(v) => Ok(*v),
            _ => Err(spm_err(format!("{what}: expected a varint"))),
        }
    }
    fn as_bool(&self, what: &str) -> Result<bool> {
        Ok(self.as_u64(what)? != 0)
    }
    /// int32 fields are sign-extended to 64 bits on the wire.
    fn as_i32(&self, what: &str) -> Result<i32> {
        Ok(self.as_u64(what)? as i64 as i32)
    }
    fn as_f32(&self, what: &str) -> Result<f32> {
        match self {
            Wire::Fixed32(v) => Ok(f32::from_bits(*v)),
            _ => Err(spm_err(format!("{what}: expected a 32-bit float"))),
        }
    }
    fn as_bytes(&self, what: &str) -> Result<&[u8]> {
        match self {
            Wire::Bytes(b) => Ok(b),
            _ => Err(spm_err(format!("{what}: expected length-delimited bytes"))),
        }
    }
    fn as_string(&self, what: &str) -> Result<String> {
        String::from_utf8(self.as_bytes(what)?.to_vec())
            .map_err(|_| spm_err(format!("{what}: not UTF-8")))
    }
}

fn parse_piece(buf: &[u8]) -> Result<SpmPiece> {
    let mut r = Reader::new(buf);
    let mut piece = SpmPiece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => piece.piece = v.as_string("piece")?,
            2 => piece.score = v.as_f32("score")?,
            3 => piece.kind = PieceType::from_proto(v.as_u64("type")?)?,
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer(buf: &[u8]) -> Result<TrainerSpec> {
    let mut r = Reader::new(buf);
    let mut t = TrainerSpec::default();
    while let Some((field, v)) = r.next_field()? {
        match field {
            3 => {
                t.model_type = match v.as_u64("model_type")? {
                    1 => SpmModelType::Unigram,
                    2 => SpmModelType::Bpe,
                    3 => SpmModelType::Word,
                    4 => SpmModelType::Char,
                    other => return Err(spm_err(format!("unknown model_type {other}"))),
                }
            }
            24 => t.treat_whitespace_as_suffix = v.as_bool("treat_whitespace_as_suffix")?,
            35 => t.byte_fallback = v.as_bool("byte_fallback")?,
            40 => t.unk_id = v.as_i32("unk_id")?,
            41 => t.bos_id = v.as_i32("bos_id")?,
            42 => t.eos_id = v.as_i32("eos_id")?,
            43 => t.pad_id = v.as_i32("pad_id")?,
            45 => t.unk_piece = v.as_string("unk_piece")?,
            46 => t.bos_piece = v.as_string("bos_piece")?,
            47 => t.eos_piece = v.as_string("eos_piece")?,
            48 => t.pad_piece = v.as_string("pad_piece")?,
            _ => {}
        }
    }
    Ok(t)
}

fn parse_normalizer(buf: &[u8]) -> Result<NormalizerSpec> {
    let mut r = Reader::new(buf);
    let mut n = NormalizerSpec::default();
    while let Some((field, v)) = r.next_field()? {
        match field {
            1 => n.name = v.as_string("normalizer name")?,
            2 => n.precompiled_charsmap = v.as_bytes("precompiled_charsmap")?.to_vec(),
            3 => n.add_dummy_prefix = v.as_bool("add_dummy_prefix")?,
            4 => n.remove_extra_whitespaces = v.as_bool("remove_extra_whitespaces")?,
            5 => n.escape_whitespaces = v.as_bool("escape_whitespaces")?,
            _ => {}
        }
    }
    Ok(n)
}

impl SpmModel {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            ModelError::Tokenizer(msg) => {
                ModelError::Tokenizer(format!("{}: {msg}", path.display()))
            }
            other => other,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let mut pieces = Vec::new();
        let mut trainer = TrainerSpec::default();
        let mut normalizer = NormalizerSpec::default();
        while let Some((field, v)) = r.next_field()? {
            match field {
                1 => pieces.push(parse_piece(v.as_bytes("pieces")?)?),
                2 => trainer = parse_trainer(v.as_bytes("trainer_spec")?)?,
                3 => normalizer = parse_normalizer(v.as_bytes("normalizer_spec")?)?,
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err(spm_err("no pieces (not a SentencePiece model?)"));
        }
        Ok(Self {
            pieces,
            trainer,
            normalizer,
        })
    }

    /// Piece string → id, for all pieces.
    pub fn vocab(&self) -> Vocab {
        let mut v = Vocab::default();
        for (i, p) in self.pieces.iter().enumerate() {
            // Keep the first id if a piece were duplicated (sentencepiece refuses such models).
            v.entry(p.piece.clone()).or_insert(i as u32);
        }
        v
    }

    /// BPE merges derived from the vocabulary, as transformers' `SentencePieceExtractor` +
    /// `generate_merges` do: for every piece, each split into two pieces that are both in the
    /// vocabulary; ordered by the merged piece's score (best first, ties by id), then by the
    /// lengths of the halves. Only pieces sentencepiece can actually produce by merging (normal
    /// and user-defined) take part; control/unknown/byte/unused pieces never do.
    pub fn merges(&self) -> Vec<(String, String)> {
        let mergeable: std::collections::HashMap<&str, u32> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.kind, PieceType::Normal | PieceType::UserDefined))
            .map(|(i, p)| (p.piece.as_str(), i as u32))
            .collect();
        // (score, id, left len, right len, left, right)
        let mut merges: Vec<(f32, u32, usize, usize, &str, &str)> = Vec::new();
        for (id, p) in self.pieces.iter().enumerate() {
            if !matches!(p.kind, PieceType::Normal | PieceType::UserDefined) {
                continue;
            }
            let s = p.piece.as_str();
            for (split, _) in s.char_indices().skip(1) {
                let (l, r) = s.split_at(split);
                if mergeable.contains_key(l) && mergeable.contains_key(r) {
                    merges.push((
                        p.score,
                        id as u32,
                        l.chars().count(),
                        r.chars().count(),
                        l,
                        r,
                    ));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        merges
            .into_iter()
            .map(|m| (m.4.to_string(), m.5.to_string()))
            .collect()
    }

    fn piece_at(&self, id: i32) -> Option<&SpmPiece> {
        usize::try_from(id).ok().and_then(|i| self.pieces.get(i))
    }

    pub fn unk_piece(&self) -> Option<&str> {
        self.piece_at(self.trainer.unk_id).map(|p| p.piece.as_str())
    }
    pub fn bos_piece(&self) -> Option<&str> {
        self.piece_at(self.trainer.bos_id).map(|p| p.piece.as_str())
    }
    pub fn eos_piece(&self) -> Option<&str> {
        self.piece_at(self.trainer.eos_id).map(|p| p.piece.as_str())
    }

    /// The normalizer that reproduces sentencepiece's normalization for this model
    /// (charsmap, extra-whitespace removal, dummy prefix, whitespace escaping).
    pub fn hf_normalizer(&self) -> Result<Option<NormalizerWrapper>> {
        let n = &self.normalizer;
        let mut seq: Vec<NormalizerWrapper> = Vec::new();
        if !n.precompiled_charsmap.is_empty() {
            let pc = Precompiled::from(&n.precompiled_charsmap)
                .map_err(|e| spm_err(format!("precompiled_charsmap: {e}")))?;
            seq.push(pc.into());
        }
        if n.remove_extra_whitespaces {
            // sentencepiece drops leading/trailing spaces and squeezes runs of spaces (only ' ',
            // so not `Strip`, which would also eat newlines).
            let re = |p: &str, c: &str| -> Result<NormalizerWrapper> {
                Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(p.into()),
                    c,
                )
                .map(Into::into)
                .map_err(|e| spm_err(e.to_string()))
            };
            seq.push(re("^ +", "")?);
            seq.push(re(" +$", "")?);
            seq.push(re(" {2,}", " ")?);
        }
        if n.add_dummy_prefix {
            seq.push(Prepend::new(SPIECE_UNDERLINE.into()).into());
        }
        if n.escape_whitespaces {
            seq.push(
                Replace::new(" ", SPIECE_UNDERLINE)
                    .map_err(|e| spm_err(e.to_string()))?
                    .into(),
            );
        }
        Ok(match seq.len() {
            0 => None,
            _ => Some(tokenizers::normalizers::Sequence::new(seq).into()),
        })
    }

    /// The Llama decoder chain (transformers `LlamaConverter.decoder`).
    pub fn hf_decoder(&self) -> DecoderWrapper {
        llama_decoder(self.normalizer.add_dummy_prefix)
    }

    /// Special (control, unknown) and user-defined pieces as `tokenizers` added tokens.
    pub fn added_tokens(&self) -> Vec<AddedToken> {
        self.pieces
            .iter()
            .filter_map(|p| match p.kind {
                PieceType::Control | PieceType::Unknown => {
                    Some(AddedToken::from(p.piece.clone(), true).normalized(false))
                }
                PieceType::UserDefined => {
                    Some(AddedToken::from(p.piece.clone(), false).normalized(false))
                }
                _ => None,
            })
            .collect()
    }

    /// The BPE model (vocabulary + derived merges).
    pub fn hf_bpe(&self) -> Result<BPE> {
        self.check_supported()?;
        let mut b = BPE::builder()
            .vocab_and_merges(self.vocab(), self.merges())
            .byte_fallback(self.trainer.byte_fallback)
            .fuse_unk(true);
        if let Some(unk) = self.unk_piece() {
            b = b.unk_token(unk.to_string());
        }
        b.build().map_err(|e| spm_err(format!("building BPE: {e}")))
    }

    fn check_supported(&self) -> Result<()> {
        match self.trainer.model_type {
            SpmModelType::Bpe => {}
            other => {
                return Err(spm_err(format!(
                    "{other:?} models are not supported (only BPE, as used by Llama/Mistral); \
                     convert it to tokenizer.json with transformers \
                     (AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                )))
            }
        }
        if self.trainer.treat_whitespace_as_suffix {
            return Err(spm_err("treat_whitespace_as_suffix is not supported"));
        }
        Ok(())
    }

    /// A `tokenizers::Tokenizer` that encodes plain text exactly as sentencepiece does, with the
    /// control pieces as special tokens and a post-processor that adds BOS (Llama's default).
    pub fn to_tokenizer(&self) -> Result<Tokenizer> {
        let mut tok = Tokenizer::new(self.hf_bpe()?);
        tok.with_normalizer(self.hf_normalizer()?)
            .map_err(|e| spm_err(e.to_string()))?;
        tok.with_decoder(Some(self.hf_decoder()));
        if let Some(bos) = self.bos_piece() {
            tok.with_post_processor(Some(bos_post_processor(bos, self.trainer.bos_id as u32)?));
        }
        let added = self.added_tokens();
        let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
        tok.add_special_tokens(special)
            .map_err(|e| spm_err(e.to_string()))?;
        tok.add_tokens(plain).map_err(|e| spm_err(e.to_string()))?;
        Ok(tok)
    }
}

/// `Replace("▁", " ")`, `ByteFallback`, `Fuse`, and `Strip(" ", 1, 0)` when a dummy prefix was
/// added (transformers `LlamaConverter.decoder` / `LlamaTokenizer.__init__`).
pub(crate) fn llama_decoder(strip_prefix: bool) -> DecoderWrapper {
    let mut seq: Vec<DecoderWrapper> = vec![
        tokenizers::normalizers::Replace::new(SPIECE_UNDERLINE, " ")
            .expect("literal pattern")
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if strip_prefix {
        seq.push(StripDecoder::new(' ', 1, 0).into());
    }
    DecoderSequence::new(seq).into()
}

/// `<bos> $A` (and `<bos> $A <bos> $B` for pairs), as transformers' `update_post_processor`.
pub(crate) fn bos_post_processor(
    bos: &str,
    bos_id: u32,
) -> Result<tokenizers::PostProcessorWrapper> {
    let tp = TemplateProcessing::builder()
        .try_single(format!("{bos}:0 $A:0"))
        .and_then(|b| b.try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1")))
        .map_err(|e| spm_err(format!("post-processor: {e}")))?
        .special_tokens(vec![(bos.to_string(), bos_id)])
        .build()
        .map_err(|e| spm_err(format!("post-processor: {e}")))?;
    Ok(tp.into())
}

/// Loads `tokenizer.model` and converts it (see the module docs).
pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<Tokenizer> {
    SpmModel::from_file(path)?.to_tokenizer()
}

/// A tiny hand-built `ModelProto` for unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
        varint(field << 3 | wire, out);
    }
    fn bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
        key(field, 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    fn int(field: u64, v: i64, out: &mut Vec<u8>) {
        key(field, 0, out);
        varint(v as u64, out);
    }

    /// A BPE model: `<unk> <s> </s>`, the 256 byte pieces, then `normal` pieces with scores
    /// 0, -1, -2, … (sentencepiece BPE order). `model_type`: 1 unigram, 2 BPE.
    pub(crate) fn model_bytes(
        normal: &[&str],
        model_type: i64,
        extra_normalizer: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let piece = |p: &str, score: f32, kind: i64, out: &mut Vec<u8>| {
            let mut m = Vec::new();
            bytes(1, p.as_bytes(), &mut m);
            key(2, 5, &mut m);
            m.extend_from_slice(&score.to_le_bytes());
            if kind != 1 {
                int(3, kind, &mut m);
            }
            bytes(1, &m, out);
        };
        piece("<unk>", 0.0, 2, &mut out);
        piece("<s>", 0.0, 3, &mut out);
        piece("</s>", 0.0, 3, &mut out);
        for b in 0..=255u8 {
            piece(&format!("<0x{b:02X}>"), 0.0, 6, &mut out);
        }
        for (i, p) in normal.iter().enumerate() {
            piece(p, -(i as f32), 1, &mut out);
        }
        let mut t = Vec::new();
        bytes(2, b"tiny", &mut t); // model_prefix: ignored
        int(3, model_type, &mut t);
        int(35, 1, &mut t); // byte_fallback
        int(43, -1, &mut t); // pad_id: a negative int32 is a 10-byte varint
        bytes(2, &t, &mut out);
        let mut n = Vec::new();
        bytes(1, b"identity", &mut n);
        int(4, 0, &mut n); // remove_extra_whitespaces: false (Llama)
        n.extend_from_slice(extra_normalizer);
        bytes(3, &n, &mut out);
        out
    }

    /// Pieces that make "a", "ab", "▁ab", "▁a", "▁b", "b", "▁".
    pub(crate) const PIECES: &[&str] = &["▁", "a", "b", "▁a", "ab", "▁ab", "▁b", "c"];
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn tiny() -> SpmModel {
        SpmModel::from_bytes(&model_bytes(PIECES, 2, &[])).unwrap()
    }

    #[test]
    fn parses_the_proto_fields() {
        let m = tiny();
        assert_eq!(m.pieces.len(), 3 + 256 + PIECES.len());
        assert_eq!(m.pieces[0].kind, PieceType::Unknown);
        assert_eq!(m.pieces[1].kind, PieceType::Control);
        assert_eq!(m.pieces[3].piece, "<0x00>");
        assert_eq!(m.pieces[3].kind, PieceType::Byte);
        assert_eq!(m.pieces[259 + 4].piece, "ab");
        assert_eq!(m.pieces[259 + 4].score, -4.0);
        assert_eq!(m.trainer.model_type, SpmModelType::Bpe);
        assert!(m.trainer.byte_fallback);
        assert_eq!(m.trainer.pad_id, -1);
        assert_eq!(
            (m.trainer.unk_id, m.trainer.bos_id, m.trainer.eos_id),
            (0, 1, 2)
        );
        assert_eq!(m.normalizer.name, "identity");
        assert!(m.normalizer.add_dummy_prefix);
        assert!(!m.normalizer.remove_extra_whitespaces);
        assert_eq!(m.bos_piece(), Some("<s>"));
    }

    #[test]
    fn merges_follow_piece_scores() {
        let m = tiny();
        let merges = m.merges();
        // "▁a" (score -3) before "ab" (-4) before "▁ab" (-5, two splits, shorter left first).
        assert_eq!(
            merges,
            vec![
                ("▁".to_string(), "a".to_string()),
                ("a".into(), "b".into()),
                ("▁".into(), "ab".into()),
                ("▁a".into(), "b".into()),
                ("▁".into(), "b".into()),
            ]
        );
    }

    #[test]
    fn encodes_like_sentencepiece() {
        let tok = tiny().to_tokenizer().unwrap();
        let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
        let id = |p: &str| tok.token_to_id(p).unwrap();
        // Dummy prefix, whitespace escaping, BPE by score.
        assert_eq!(ids("ab ab"), vec![id("▁ab"), id("▁ab")]);
        assert_eq!(ids(" a"), vec![id("▁"), id("▁a")]);
        assert_eq!(ids("ba"), vec![id("▁b"), id("a")]);
        // Byte fallback: 'é' = C3 A9.
        assert_eq!(ids("é"), vec![id("▁"), 3 + 0xC3, 3 + 0xA9]);
        // Control pieces are special tokens; BOS is added by the post-processor.
        assert_eq!(ids("a</s>"), vec![id("▁a"), 2]);
        assert_eq!(tok.encode("a", true).unwrap().get_ids(), &[1, id("▁a")]);
        // The decoder undoes it all, dropping the dummy prefix.
        assert_eq!(tok.decode(&ids(" ab é c"), false).unwrap(), " ab é c");
        assert_eq!(tok.decode(&[1, id("▁a")], true).unwrap(), "a");
    }

    #[test]
    fn refuses_what_it_cannot_convert() {
        let unigram = SpmModel::from_bytes(&model_bytes(PIECES, 1, &[])).unwrap();
        let err = unigram.to_tokenizer().unwrap_err().to_string();
        assert!(err.contains("Unigram"), "{err}");
        let bytes = model_bytes(PIECES, 2, &[]);
        assert!(SpmModel::from_bytes(&bytes[..bytes.len() - 3]).is_err());
        assert!(SpmModel::from_bytes(b"{\"model\": 1}").is_err());
        assert!(SpmModel::from_bytes(&[]).is_err());
    }

    #[test]
    fn remove_extra_whitespaces_squeezes_spaces_only() {
        // normalizer field 4 = true (appended after the false: the last value wins).
        let m = SpmModel::from_bytes(&model_bytes(PIECES, 2, &[4 << 3, 1])).unwrap();
        assert!(m.normalizer.remove_extra_whitespaces);
        let tok = m.to_tokenizer().unwrap();
        let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(ids("  ab   ab  "), ids("ab ab"));
        assert_eq!(ids("\nab").len(), 3); // ▁, <0x0A>, ab: newlines are kept
    }
}

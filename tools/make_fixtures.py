#!/usr/bin/env python3
"""Regenerate every committed test fixture under fixtures/, or write the untracked bench checkpoint.

    tools/.venv/bin/python tools/make_fixtures.py                    # rewrites fixtures/ (deterministic)
    tools/.venv/bin/python tools/make_fixtures.py --bench-135m DIR   # random 136.7M llava_next checkpoint

What it makes (see fixtures/README.md for the layout):
  * a SentencePiece BPE tokenizer (byte fallback, Mistral-style <unk>/<s>/</s> = 0/1/2) trained on
    the embedded English text below, converted to tokenizer.json by transformers itself;
  * test images (PNG of several sizes, plus JPEG/WebP/GIF/BMP/EXIF-rotated copies of one picture);
  * tiny random-weight LLaVA checkpoints in the HF `llava_next` / `llava` formats and in the original
    LLaVA (`llava_mistral`) format, plus a CLIP vision tower directory;
  * reference outputs computed by transformers (pinned in tools/requirements.txt) in f32 with eager
    attention: pixel values, image-token counts, input ids, logits, every hidden state, attention rows,
    greedy tokens and the logit-lens quantities of docs/DIAGNOSTICS.md section 1.

Determinism: every random draw comes from a generator seeded from a fixed constant (per parameter
name for model weights), torch runs on one thread, JSON is written with sorted keys, and safetensors
files are written from dicts in sorted order. Running the script twice gives identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm
import tokenizers
import torch
import transformers
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import save_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
)
from transformers.image_utils import load_image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

EXPECTED_TRANSFORMERS = "5.23.0"

# ---------------------------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------------------------

# Real llava-v1.6 values: the tiny models use the real image geometry so that token counts and
# preprocessing are the real ones; only the widths/depths are tiny.
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IMAGE_SIZE = 336
PATCH_SIZE = 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# LLaVA pads to square with tuple(int(x * 255) for x in image_mean): (122, 116, 104).
PAD_COLOUR = tuple(int(x * 255) for x in CLIP_MEAN)

SP_VOCAB = 1000  # SentencePiece pieces (ids 0..999); "<image>" is appended as id 1000
IMAGE_TOKEN_ID = SP_VOCAB
# The text vocab is padded past the tokenizer like llava-hf's 32064 rows for a 32001-token
# tokenizer: ids 1001..1023 have embedding/lm_head rows but no tokenizer entry.
TINY_VOCAB = 1024

TINY_TEXT = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    sliding_window=None,
    tie_word_embeddings=False,
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=PATCH_SIZE,
    image_size=IMAGE_SIZE,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
)
BENCH_TEXT = dict(
    TINY_TEXT,
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
)
BENCH_VISION = dict(
    TINY_VISION,
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    projection_dim=384,
)

SEED_TOKENIZER_CHECK = 7
SEED_IMAGES = 1234
SEED_LLAVA_NEXT = 4
SEED_LLAVA = 6
SEED_BENCH = 5

GREEDY_TOKENS = 20
LLAVA_IMAGE_TOKEN_INDEX = -200  # llava/constants.py IMAGE_TOKEN_INDEX (original-format placeholder)

LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

# Mistral-instruct template in the style of llava-hf/llava-v1.6-mistral-7b-hf's chat_template.json:
# content is a list of {type: text|image} parts, all images of a user turn are rendered first, the
# system turn is a <<SYS>> block placed before the first [INST], and BOS is not in the template (the
# tokenizer's post-processor adds it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s>' }}"
    "{% else %}"
    "{{ raise_exception('Only system, user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# DIAGNOSTICS.md section 1, preset "apology".
APOLOGY_WORDS = ["sorry", "Sorry", "apologize", "apologise", "Unfortunately", "cannot", "unable"]

# ---------------------------------------------------------------------------------------------
# Tokenizer training text (a few KB; the refusal words and template words recur so that they
# become single `▁word` pieces).
# ---------------------------------------------------------------------------------------------

CORPUS = """\
I'm sorry, but I cannot help with that request. Sorry, I am unable to do that.
I apologize for the confusion. I apologise if my answer was unclear.
Unfortunately, I cannot describe this image in detail. Unfortunately, the image is too small.
Sorry, I cannot identify the person in the image. I am sorry, but I am unable to assist with that.
I cannot provide instructions for making weapons. I apologize, but I cannot share that information.
Unfortunately, I am unable to open the file. I'm sorry, I cannot see any image here.
Describe the image. Describe this image in one sentence. Please describe what you see in the picture.
The image shows a man holding a knife in a kitchen. A knife is lying on the wooden table.
The image shows a cat sitting on a red chair next to a window. The picture is bright and clear.
In the image there is a dog running across a green field under a blue sky.
A woman is cutting bread with a knife. The knife has a black handle and a sharp blade.
What is in this image? What do you see in the picture? Can you describe the scene?
You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.
You are a helpful assistant. Answer the question of the user as well as you can.
Sorry, I cannot answer that question. I apologize, I am unable to help you with this task.
I am sorry, but that is not something I can do. Unfortunately, I cannot comply with this request.
I apologise for the mistake. Sorry for the delay. I'm sorry to hear that.
The picture shows a small house with a red roof, two windows and a wooden door.
There are three people standing in front of a building. One of them is holding a phone.
The photo is blurry, so I cannot tell what the object is. It might be a bottle or a cup.
A bowl of fruit sits on the table: apples, oranges, bananas and a few grapes.
The sky is blue and there are white clouds. The sun is shining over the mountains.
I cannot help with violence. I am unable to give advice about weapons or knives.
Unfortunately, this image contains content that I cannot describe. Sorry about that.
I apologize, but I can't help with harmful requests. I'm unable to provide that kind of help.
Please describe the image in detail, including colors, shapes and objects.
The image contains a red circle, a blue square and a green triangle on a white background.
There is a gradient from dark to light across the image, with some noise and sharp edges.
A person is holding a gun. A man is smoking a cigarette. There is a glass of beer on the bar.
The user asked me to describe the image, and I described the objects that I could see.
Sorry, I cannot assist with that. I cannot and will not help. I am unable to continue.
Unfortunately, I do not know the answer. I apologize for any inconvenience this may cause.
The assistant gives helpful, detailed and polite answers to the questions of the user.
The first image shows a street at night. The second image shows the same street in the morning.
Compare the two images and describe the differences between them.
In the first picture the car is red, and in the second picture the car is blue.
How many people are in the image? There are two people in the image, a man and a woman.
What color is the knife? The knife is silver with a brown wooden handle.
Is there anything dangerous in this image? Yes, there is a sharp knife on the table.
I'm sorry, but I can't describe images of that kind. Unfortunately, I am unable to see it.
The model should refuse harmful requests and answer safe ones. Safety is important.
The text describes the image: a knife, a table, a cup of coffee and a newspaper.
I will describe the image for you. The image shows a beach with palm trees and the sea.
The water is calm and clear. Children are playing in the sand near the water.
Numbers: 1, 2, 3, 4, 5, 10, 20, 100, 2024, 336, 672, 1008.
Sorry! I cannot do that. Sorry. Sorry, no. I apologize. I apologise. Unfortunately not.
I cannot. I am unable. You cannot. We cannot. They are unable. He is unable to come.
The image is an illustration of a city with tall buildings, roads, cars and trees.
A boy is reading a book under a tree. A girl is riding a bicycle on the road.
The kitchen has a white table, four chairs, a knife block and a bowl of soup.
This is a photo of a dog and a cat sleeping together on a sofa in a living room.
The image shows a plate of food with rice, vegetables and a piece of chicken.
Please answer in one word. Please answer with yes or no. Please be brief.
I understand. Here is a short description of the image you provided.
Thank you for your question. I am happy to help you with the image.
Hello! How can I help you today? What would you like to know about the image?
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Sorry, I cannot help. Unfortunately, I cannot help. I apologize, I cannot help. I am unable to help.
[INST] Describe this image. [/INST] The image shows a red car parked in front of a house.</s>
[INST] What is in the picture? [/INST] The picture shows a knife on a table.</s>
[INST] <<SYS>> You are a helpful assistant. <</SYS>> Describe the image. [/INST] Sorry, I cannot describe it.</s>
[INST] How do I make a weapon? [/INST] I'm sorry, but I cannot help with that.</s>
[INST] Can you help me? [/INST] Of course! What do you need help with?</s>
"""

# Strings whose ids must agree between SentencePiece, transformers and tokenizer.json.
TOKENIZER_PROBES = [
    "Hello world",
    "Describe this image.\nSecond line",
    "\nDescribe",
    "café ünïcödé 😀 ☃",
    "[INST] hi [/INST]",
    "trailing ",
    "two  spaces and\ttab",
    "I'm sorry, but I cannot help. Unfortunately knives 12345.",
    "Sorry apologize apologise unable cannot",
]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path: Path, obj, compact: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compact:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def sha256_f32(arr) -> str:
    a = np.ascontiguousarray(np.asarray(arr, dtype="<f4"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def f32_list(arr) -> list:
    """Floats with the shortest decimal that round-trips the f32 value (keeps JSON small and exact)."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a))
    return [f32_list(x) for x in a]


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
    save_file(ordered, str(path), metadata=metadata or {"format": "pt"})


def rel(p: Path) -> str:
    return str(p.relative_to(FIXTURES))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_sentencepiece() -> bytes:
    """BPE with Llama/Mistral's trainer settings (byte fallback, digits split, identity normaliser,
    dummy prefix, whitespace kept) so the fixture tokenizer behaves like Mistral's in kind."""
    lines = [line for line in CORPUS.split("\n") if line.strip()]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=SP_VOCAB,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def original_tokenizer_config() -> dict:
    # What LLaVA's original checkpoints ship next to tokenizer.model (no chat template: the LLaVA
    # codebase builds prompts from its own conversation templates).
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": True,
        "model_max_length": 4096,
        "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }


def build_hf_tokenizer(sp_model: bytes, workdir: Path):
    """Let transformers convert tokenizer.model to its fast tokenizer, then add <image>.

    transformers 5.23's LlamaConverter.converted() fails for BPE SentencePiece models (it passes the
    vocab list where SentencePieceExtractor.extract expects the model class), so the conversion used
    here is the one AutoTokenizer itself performs on a directory holding only tokenizer.model:
    SentencePieceExtractor (vocab + merges) and LlamaTokenizer's own pipeline with `legacy: true`
    (Metaspace, prepend_scheme "always": a "▁" is prepended to every text segment, also after an
    added token such as <image>, as SentencePiece does for each LLaVA prompt chunk)."""
    d = workdir / "spm_only"
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(sp_model)
    write_json(d / "tokenizer_config.json", original_tokenizer_config())
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == IMAGE_TOKEN_ID, image_id
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    assert tok.add_bos_token
    return tok


def legacy_tokenizer_json(tok) -> str:
    """The hub's pre-5.x layout of the same tokenizer (what llava-hf/llava-v1.6-mistral-7b-hf and
    Mistral-7B-Instruct ship): no pre-tokenizer, and a normaliser that prepends "▁" and replaces
    spaces, as convert_slow_tokenizer.LlamaConverter.normalizer() builds for legacy tokenizers."""
    j = json.loads(tok.backend_tokenizer.to_str())
    j["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    j["pre_tokenizer"] = None
    text = json.dumps(j, ensure_ascii=False, indent=2)
    tokenizers.Tokenizer.from_str(text)  # must parse
    return text


def check_tokenizers_agree(sp_model: bytes, tok, tokenizer_json_paths: list[Path]) -> None:
    """SentencePiece, transformers and each tokenizer.json (as the Rust `tokenizers` crate reads it)
    must give the same ids for ordinary text, both with and without BOS."""
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    rng = np.random.default_rng(SEED_TOKENIZER_CHECK)
    words = [w for w in CORPUS.split() if "</s>" not in w]
    # (lines holding a literal "</s>" are skipped: transformers and tokenizer.json match it as the
    # EOS special token, SentencePiece spells it out)
    probes = list(TOKENIZER_PROBES) + [line for line in CORPUS.split("\n") if line and "</s>" not in line]
    for _ in range(200):
        n = int(rng.integers(1, 12))
        probes.append(" ".join(words[int(i)] for i in rng.integers(0, len(words), n)))
    files = [tokenizers.Tokenizer.from_file(str(p)) for p in tokenizer_json_paths]
    for s in probes:
        want = sp.encode(s)
        got = tok(s, add_special_tokens=False)["input_ids"]
        assert got == want, (s, want, got)
        for f, p in zip(files, tokenizer_json_paths):
            assert f.encode(s, add_special_tokens=False).ids == want, (p, s)
            assert f.encode(s).ids == [1] + want, (p, s, "BOS")
    # A segment that starts with a space is where the 5.x Metaspace pipeline and SentencePiece /
    # the legacy normaliser disagree ("▁▁x" vs "▁x"); no fixture prompt has one. Recorded, not hidden.
    s = " leading space"
    legacy = tokenizers.Tokenizer.from_file(str(tokenizer_json_paths[0]))
    log(
        "  tokenizer note: ' leading space' -> sentencepiece %s, transformers %s, legacy tokenizer.json %s"
        % (sp.encode(s), tok(s, add_special_tokens=False)["input_ids"], legacy.encode(s, add_special_tokens=False).ids)
    )


def resolve_refusal_ids(vocab: dict, encode, words: list[str]) -> list[int]:
    """DIAGNOSTICS.md section 1: every vocabulary entry among `▁w`, `Ġw` and `w` that exists as a
    single token; if none exists, the first token of the tokenization of w, skipping BOS and a
    lone marker token."""
    ids = set()
    for w in words:
        found = [vocab[c] for c in ("▁" + w, "Ġ" + w, w) if c in vocab]
        if found:
            ids.update(found)
            continue
        toks = encode(w)
        toks = [t for t in toks if t != 1]
        inv = {v: k for k, v in vocab.items()}
        toks = [t for t in toks if inv.get(t) not in ("▁", "Ġ")]
        ids.add(toks[0])
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

# name -> (height, width, mode). Sizes are h x w.
PNG_IMAGES = {
    "landscape_480x640": (480, 640, "RGB"),
    "square_640x640": (640, 640, "RGB"),
    "tiny_20x20": (20, 20, "RGB"),
    "portrait_300x200": (300, 200, "RGB"),
    "rgba_333x777": (333, 777, "RGBA"),
    "grey_1000x100": (1000, 100, "L"),
    "exact_336x336": (336, 336, "RGB"),
    "wide_150x1200": (150, 1200, "RGB"),
    "photo_120x160": (120, 160, "RGB"),
}
PHOTO = "photo_120x160"


def make_picture(h: int, w: int, seed: int) -> np.ndarray:
    """Deterministic RGB picture with smooth gradients, hard-edged shapes, fine stripes, a
    checkerboard and a noise patch: content on which resampling filters visibly differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xx / max(w - 1, 1), yy / max(h - 1, 1)
    r = 255 * u
    g = 255 * v
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (np.hypot(u - 0.3, v - 0.6) * 3))
    img = np.stack([r, g, b], axis=-1)
    # checkerboard (3 px cells) in the top-left quarter
    cb = (((xx // 3) + (yy // 3)) % 2 == 0) & (u < 0.25) & (v < 0.25)
    img[cb] = [250, 250, 250]
    # one-pixel vertical stripes in a band
    band = (v > 0.7) & (v < 0.8) & (xx % 2 == 0)
    img[band] = [10, 10, 10]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(6):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        rw, rh = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.integers(0, 2):
            draw.ellipse([x0, y0, x0 + rw, y0 + rh], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + rw, y0 + rh], fill=colour)
    for _ in range(4):
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=max(1, min(h, w) // 100))
    out = np.asarray(pil).astype(np.int16)
    # noise patch (kept small so the PNGs stay small)
    y0, x0 = int(h * 0.4), int(w * 0.55)
    ph, pw = max(1, h // 5), max(1, w // 5)
    out[y0 : y0 + ph, x0 : x0 + pw] += rng.integers(-40, 41, (min(ph, h - y0), min(pw, w - x0), 3)).astype(np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_images(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (name, (h, w, mode)) in enumerate(sorted(PNG_IMAGES.items())):
        rgb = make_picture(h, w, SEED_IMAGES + i)
        if mode == "RGB":
            img = Image.fromarray(rgb, "RGB")
        elif mode == "L":
            img = Image.fromarray(rgb, "RGB").convert("L")
        else:  # RGBA: alpha ramps across the picture; loaders must drop it (PIL convert("RGB"))
            alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
            alpha[: h // 3] = 255
            img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        p = out / f"{name}.png"
        img.save(p, format="PNG", optimize=True)
        files[p.name] = {"height": h, "width": w, "mode": mode, "format": "PNG"}

    photo = Image.open(out / f"{PHOTO}.png").convert("RGB")
    photo.save(out / f"{PHOTO}.jpg", format="JPEG", quality=90, subsampling=2)  # 4:2:0
    photo.save(out / f"{PHOTO}.webp", format="WEBP", lossless=True)
    photo.save(out / f"{PHOTO}.bmp", format="BMP")
    # Animated GIF: loaders take the first frame (the photo); the second frame is its negative.
    second = ImageOps.invert(photo)
    frames = [photo.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE),
              second.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)]
    frames[0].save(out / f"{PHOTO}.gif", format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    # EXIF orientation 6 ("rotate 90 CW to display"): the stored pixels are the photo rotated
    # 90 degrees counter-clockwise, so a correct loader shows the photo upright (120 x 160).
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(out / f"{PHOTO}_exif6.jpg", format="JPEG", quality=90, subsampling=2, exif=exif.tobytes())
    h, w = PNG_IMAGES[PHOTO][:2]
    for name, fmt in [(".jpg", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP"), (".gif", "GIF"), ("_exif6.jpg", "JPEG")]:
        files[f"{PHOTO}{name}"] = {"height": h, "width": w, "mode": "RGB", "format": fmt, "same_picture_as": f"{PHOTO}.png"}
    files[f"{PHOTO}.gif"]["frames"] = 2
    files[f"{PHOTO}_exif6.jpg"]["exif_orientation"] = 6
    files[f"{PHOTO}_exif6.jpg"]["stored_height"] = w
    files[f"{PHOTO}_exif6.jpg"]["stored_width"] = h
    # Sanity: decoders that apply EXIF see the upright picture.
    upright = ImageOps.exif_transpose(Image.open(out / f"{PHOTO}_exif6.jpg"))
    assert upright.size == (w, h), upright.size
    diff = np.abs(np.asarray(upright.convert("RGB"), np.int16) - np.asarray(photo, np.int16)).mean()
    assert diff < 8, diff
    return files


# ---------------------------------------------------------------------------------------------
# Processors and HF directories
# ---------------------------------------------------------------------------------------------


def llava_next_image_processor():
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
        resample=3,
        do_pad=True,
    )


def llava_image_processor():
    # do_pad=True is what makes the HF llava processor pad to square with the CLIP mean colour
    # before resizing (LlavaImageProcessor.pad_to_square), i.e. LLaVA's image_aspect_ratio "pad".
    return LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,
        do_pad=True,
    )


def make_processor(kind: str, tok):
    common = dict(
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS position, dropped by the "default" strategy
    )
    if kind == "llava_next":
        return LlavaNextProcessor(image_processor=llava_next_image_processor(), **common)
    return LlavaProcessor(image_processor=llava_image_processor(), **common)


def patch_tokenizer_config(path: Path) -> None:
    # transformers 5.23's save_pretrained drops `legacy` and `add_bos_token`; reloading then builds
    # LlamaTokenizer with legacy=False (Metaspace prepend_scheme "first": no "▁" after <image>),
    # which disagrees with the tokenizer.json it wrote ("always"). Hub files carry the keys.
    cfg = json.loads(path.read_text())
    for k in ("is_local", "local_files_only"):  # from_pretrained bookkeeping it also writes out
        cfg.pop(k, None)
    cfg["legacy"] = True
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    write_json(path, cfg)


def write_hf_processor_files(d: Path, kind: str, tok, style: str) -> None:
    """style "v5": exactly what transformers 5.23 save_pretrained writes (processor_config.json with
    the image processor inside, chat_template.jinja, 5.x tokenizer.json with a Metaspace
    pre-tokenizer). style "hub": the older layout llava-hf hub repos hold (preprocessor_config.json,
    chat_template.json, processor_config.json without the image processor, legacy tokenizer.json
    with a Prepend/Replace normaliser, tokenizer_config.json with added_tokens_decoder)."""
    proc = make_processor(kind, tok)
    d.mkdir(parents=True, exist_ok=True)
    if style == "v5":
        proc.save_pretrained(str(d))
        patch_tokenizer_config(d / "tokenizer_config.json")
        return
    tmp = Path(tempfile.mkdtemp())
    proc.save_pretrained(str(tmp))
    pc = json.loads((tmp / "processor_config.json").read_text())
    image_proc = pc.pop("image_processor")
    image_proc["processor_class"] = pc["processor_class"]
    write_json(d / "preprocessor_config.json", image_proc)
    write_json(d / "processor_config.json", pc)
    write_json(d / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    (d / "tokenizer.json").write_text(legacy_tokenizer_json(tok) + "\n", encoding="utf-8")
    special = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    write_json(
        d / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): dict(special, content=c) for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (IMAGE_TOKEN_ID, "<image>")]
            },
            "additional_special_tokens": [],
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": True,
            "model_max_length": 4096,
            "pad_token": None,
            "padding_side": "left",
            "processor_class": pc["processor_class"],
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def text_config(dims: dict) -> MistralConfig:
    d = dict(dims)
    theta = d.pop("rope_theta")
    return MistralConfig(
        **d,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def vision_config(dims: dict) -> CLIPVisionConfig:
    return CLIPVisionConfig(**dims)


def llava_next_config(text: dict, vision: dict) -> LlavaNextConfig:
    return LlavaNextConfig(
        text_config=text_config(text),
        vision_config=vision_config(vision),
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=PINPOINTS,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        image_seq_length=576,
    )


def llava_config(text: dict, vision: dict) -> LlavaConfig:
    return LlavaConfig(
        text_config=text_config(text),
        vision_config=vision_config(vision),
        image_token_index=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        image_seq_length=576,
    )


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Scaled random init (instead of HF's std 0.02) so that activations are not degenerate: every
    block changes the residual stream visibly, attention is far from uniform, norm weights are not
    all ones (so a missing norm weight shows), and logits spread over several units. Each tensor
    gets its own generator seeded from (seed, parameter name): values do not depend on the order
    in which modules are built."""
    for name, p in sorted(model.named_parameters()):
        g = torch.Generator().manual_seed(param_seed(seed, name))
        x = torch.randn(p.shape, generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(k in name for k in ("norm", "layrnorm", "layer_norm"))
        if is_norm and leaf == "weight":
            v = 1.0 + 0.2 * x
        elif leaf == "bias":
            v = 0.1 * x
        elif "embed_tokens" in name or "image_newline" in name or "class_embedding" in name:
            v = x
        elif "position_embedding" in name:
            v = 0.5 * x
        elif "patch_embedding" in name:
            v = x / math.sqrt(p.shape[1] * p.shape[2] * p.shape[3])
        elif "lm_head" in name:
            v = 3.0 * x / math.sqrt(p.shape[1])
        elif p.ndim == 2:
            gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
            v = gain * x / math.sqrt(p.shape[1])
        else:
            raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
        p.copy_(v.to(p.dtype))


def build_model(kind: str, text: dict, vision: dict, seed: int):
    cfg = llava_next_config(text, vision) if kind == "llava_next" else llava_config(text, vision)
    cls = LlavaNextForConditionalGeneration if kind == "llava_next" else LlavaForConditionalGeneration
    model = cls(cfg).to(torch.float32).eval()
    init_weights(model, seed)
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# transformers >= 4.52 names (what 5.23 save_pretrained writes) -> names in hub files written by
# older transformers (what llava-hf/llava-v1.6-mistral-7b-hf holds).
def to_legacy_hf_name(name: str) -> str:
    for new, old in [
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
        ("lm_head.", "language_model.lm_head."),
    ]:
        if name.startswith(new):
            return old + name[len(new) :]
    raise ValueError(name)


def to_original_name(name: str, with_vision: bool) -> str | None:
    """HF (5.x names) -> original LLaVA (LlavaMistralForCausalLM) names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name == "lm_head.weight":
        return "lm_head.weight"
    if name.startswith("model.multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + name.rsplit(".", 1)[1]
    if name.startswith("model.multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + name.rsplit(".", 1)[1]
    if name == "model.image_newline":
        return "model.image_newline"
    if name.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower." + name[len("model.vision_tower.") :] if with_vision else None
    raise ValueError(name)


def check_loads_exactly(cls, d: Path, reference: dict) -> None:
    """transformers must load the directory with no missing/unexpected keys and the same values."""
    model, info = cls.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    assert not problems, (d, problems)
    sd = model.state_dict()
    for k, v in reference.items():
        assert torch.equal(sd[k].float(), v.float()), (d, k)


# ---------------------------------------------------------------------------------------------
# The original LLaVA codebase's image handling (llava/mm_utils.py, llava_arch.py), written from
# its documented behaviour. Differences from transformers' llava_next that matter:
#   * image_grid_pinpoints are (width, height) pairs there, (height, width) in transformers. The
#     list is symmetric, so only ties differ: an image whose sides both fit in 336 gets the first
#     of the tied 336x672 / 672x336 canvases, which is 2 tiles side by side in transformers and 2
#     tiles stacked in LLaVA.
#   * unpad_image truncates int(h * scale) where transformers uses int(round(h * scale, 7)).
# ---------------------------------------------------------------------------------------------


def llava_select_best_resolution(original_wh, possible_wh):
    ow, oh = original_wh
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in possible_wh:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def llava_resize_and_pad(image: Image.Image, target_wh) -> Image.Image:
    ow, oh = image.size
    tw, th = target_wh
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nw, nh = min(math.ceil(ow * sh), tw), th
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)  # PIL's default filter for RGB
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def clip_preprocess(image: Image.Image) -> np.ndarray:
    """CLIPImageProcessor as LLaVA ran it (transformers 4.x, PIL): resize shortest edge to 336
    (bicubic), centre crop 336, rescale in f64 then cast to f32, normalise in f32. CHW f32."""
    w, h = image.size
    short, long_ = (w, h) if w <= h else (h, w)
    new_short, new_long = IMAGE_SIZE, int(IMAGE_SIZE * long_ / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - IMAGE_SIZE) // 2, (nw - IMAGE_SIZE) // 2
    arr = np.asarray(image.convert("RGB"))[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def llava_pad_pixels(image: Image.Image) -> np.ndarray:
    """image_aspect_ratio "pad": expand2square with the mean colour, then the CLIP processor."""
    w, h = image.size
    if w != h:
        side = max(w, h)
        canvas = Image.new(image.mode, (side, side), PAD_COLOUR)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    return clip_preprocess(image)[None]


def llava_anyres_pixels(image: Image.Image):
    """image_aspect_ratio "anyres" (process_anyres_image): views = [whole image resized to 336x336]
    + the 336 tiles of the best canvas, row-major. Returns (views, best (w, h))."""
    possible = [tuple(p) for p in PINPOINTS]  # read as (width, height), as LLaVA does
    best = llava_select_best_resolution(image.size, possible)
    padded = llava_resize_and_pad(image, best)
    tiles = []
    for top in range(0, padded.height, IMAGE_SIZE):
        for left in range(0, padded.width, IMAGE_SIZE):
            tiles.append(padded.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)))
    base = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    views = np.stack([clip_preprocess(v) for v in [base] + tiles])
    return views, best


def llava_unpad(t: torch.Tensor, original_wh) -> torch.Tensor:
    ow, oh = original_wh
    ch, cw = t.shape[1:]
    if ow / oh > cw / ch:
        nh = int(oh * (cw / ow))
        pad = (ch - nh) // 2
        return t[:, pad : ch - pad, :]
    nw = int(ow * (ch / oh))
    pad = (cw - nw) // 2
    return t[:, :, pad : cw - pad]


def llava_pack_anyres(feats: torch.Tensor, original_wh, best_wh, newline: torch.Tensor) -> torch.Tensor:
    """mm_patch_merge_type "spatial_unpad": base view features, then the tile features arranged
    on the canvas grid, unpadded, with image_newline appended to every row."""
    side = IMAGE_SIZE // PATCH_SIZE
    base, rest = feats[0], feats[1:]
    gw, gh = best_wh[0] // IMAGE_SIZE, best_wh[1] // IMAGE_SIZE
    x = rest.view(gh, gw, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
    x = x.flatten(1, 2).flatten(2, 3)
    x = llava_unpad(x, original_wh)
    x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
    x = x.flatten(1, 2).transpose(0, 1)
    return torch.cat((base, x), dim=0)


def llava_anyres_token_count(h: int, w: int) -> int:
    side = IMAGE_SIZE // PATCH_SIZE
    bw, bh = llava_select_best_resolution((w, h), [tuple(p) for p in PINPOINTS])
    x = torch.zeros(1, (bh // IMAGE_SIZE) * side, (bw // IMAGE_SIZE) * side)
    x = llava_unpad(x, (w, h))
    return side * side + x.shape[1] * (x.shape[2] + 1)


# LLaVA conversation templates (llava/conversation.py, SeparatorStyle.LLAMA_2). Both render
# "[INST] {<<SYS>> block if system}{message} [/INST]"; llava_llama_2's "<s>" separator is
# removed again by ret.lstrip(sep), so BOS comes from the tokenizer only.
def llava_conv_prompt(template: str, system: str | None, user_text: str, n_images: int) -> str:
    if template == "mistral_instruct":
        sys_text = system or ""
    elif template == "llava_llama_2":
        assert system is None, "llava_llama_2 has a fixed system prompt"
        sys_text = LLAVA_LLAMA_2_SYSTEM
    else:
        raise ValueError(template)
    message = "<image>\n" * n_images + user_text
    wrapped_sys = f"<<SYS>>\n{sys_text}\n<</SYS>>\n\n" if sys_text else ""
    return f"[INST] {wrapped_sys}{message} [/INST]"


def llava_tokenize(prompt: str, sp) -> list[int]:
    """tokenizer_image_token: split on <image>, tokenize each chunk on its own with the
    SentencePiece tokenizer (each gets its dummy-prefix "▁"), BOS only at the very start,
    LLAVA_IMAGE_TOKEN_INDEX between chunks."""
    chunks = [[1] + sp.encode(c) for c in prompt.split("<image>")]
    ids = [1]
    for i, c in enumerate(chunks):
        if i:
            ids.append(LLAVA_IMAGE_TOKEN_INDEX)
        ids.extend(c[1:])
    return ids


# ---------------------------------------------------------------------------------------------
# Reference computation
# ---------------------------------------------------------------------------------------------


def image_spans(ids: list[int], image_id: int) -> list[list[int]]:
    spans, start = [], None
    for i, t in enumerate(ids + [None]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            spans.append([start, i])
            start = None
    return spans


def choose_positions(seq_len: int, spans: list[list[int]], all_hidden: bool):
    in_image = set()
    for s, e in spans:
        in_image.update(range(s, e))
    text_positions = [i for i in range(seq_len) if i not in in_image]
    hidden = list(range(seq_len)) if all_hidden else text_positions
    # Logits (vocab-wide rows, the bulk of the files) only at a few text positions: the first two,
    # the two after each image and the last four.
    logit = set(range(min(2, seq_len))) | set(range(max(0, seq_len - 4), seq_len))
    for _, e in spans:
        logit.update(p for p in range(e, e + 2) if p < seq_len and p not in in_image)
    return sorted(logit), hidden


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # MistralRMSNorm, computed in f32
    x = x.float()
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def logit_lens(h_layers: torch.Tensor, norm_w, eps, w_u, refusal_ids: list[int], mode: str) -> dict:
    """DIAGNOSTICS.md section 1 at the last prompt position. h_layers [N+1, H]: h[0] embeddings,
    h[j] block j output, h[N] before the final norm. All arithmetic in f32, log-odds in f64."""
    x = rms_norm(h_layers, norm_w.detach(), eps) if mode == "final_norm" else h_layers.float()
    logits = x @ w_u.detach().float().T
    logp = torch.log_softmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    k = torch.tensor(refusal_ids)
    kset = set(refusal_ids)
    n = h_layers.shape[0] - 1
    p_ref = [float(probs[j, k].double().sum()) for j in range(n + 1)]
    out = {
        "refusal_ids": refusal_ids,
        "p_refusal": p_ref,
        "refusal_log_odds": [math.log(p) - math.log1p(-p) for p in p_ref],
        "d_refusal": [None] + [math.log(p_ref[j]) - math.log(p_ref[j - 1]) for j in range(1, n + 1)],
        "top_token": [int(probs[j].argmax()) for j in range(n + 1)],
        "top_delta_token": [None] + [int((logp[j] - logp[j - 1]).argmax()) for j in range(1, n + 1)],
    }
    out["activation_layer"] = next((j for j in range(2, n + 1) if out["top_delta_token"][j] in kset), None)
    out["start_layer"] = next(
        (j for j in range(2, n + 1) if kset & set(torch.topk(probs[j] - probs[j - 1], 5).indices.tolist())), None
    )
    out["end_layer"] = next((j for j in range(n, -1, -1) if out["top_token"][j] in kset), None)
    return out


class LastBlockTap:
    """Forward hook on the last decoder layer: its output before the final RMSNorm."""

    def __init__(self, layer):
        self.value = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if self.value is None:  # keep the prefill pass only
            self.value = out.detach()

    def close(self):
        self.handle.remove()


@torch.no_grad()
def run_case(model, *, input_ids: list[int], model_kwargs: dict, inputs_embeds=None):
    """Prefill with every tap, then a manual greedy loop (KV cache, no EOS stop)."""
    lm = model.model.language_model
    tap = LastBlockTap(lm.layers[-1])
    ids = torch.tensor([input_ids])
    if inputs_embeds is not None:
        out = model(inputs_embeds=inputs_embeds, output_hidden_states=True, output_attentions=True, use_cache=True)
    else:
        out = model(input_ids=ids, **model_kwargs, output_hidden_states=True, output_attentions=True, use_cache=True)
    tap.close()
    res = {
        "logits": out.logits[0].float(),
        "hidden_states": torch.stack([h[0] for h in out.hidden_states]).float(),
        "last_block_raw": tap.value[0].float(),
        "attn_last": torch.stack([a[0, :, -1, :] for a in out.attentions]).float(),
        "image_features": getattr(out, "image_hidden_states", None),
    }
    tokens, margins = [], []
    logits, past = out.logits[0, -1], out.past_key_values
    for _ in range(GREEDY_TOKENS):
        top2 = torch.topk(logits.float(), 2)
        nxt = int(top2.indices[0])
        tokens.append(nxt)
        margins.append(float(top2.values[0] - top2.values[1]))
        step = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        logits, past = step.logits[0, -1], step.past_key_values
    res["greedy_tokens"] = tokens
    res["greedy_margins"] = margins
    return res


def check_greedy_by_recompute(model, embeds_or_ids, res, is_embeds: bool, model_kwargs: dict) -> None:
    """The cached greedy loop must agree with one full forward over prompt + generated tokens."""
    gen = torch.tensor([res["greedy_tokens"][:-1]])
    with torch.no_grad():
        if is_embeds:
            emb = torch.cat([embeds_or_ids, model.get_input_embeddings()(gen)], dim=1)
            logits = model(inputs_embeds=emb).logits[0]
        else:
            ids = torch.cat([embeds_or_ids, gen], dim=1)
            logits = model(input_ids=ids, **model_kwargs).logits[0]
    n = len(res["greedy_tokens"])
    again = logits[-n:].argmax(-1).tolist()
    for a, b, m in zip(again, res["greedy_tokens"], res["greedy_margins"]):
        assert a == b or m < 1e-4, (again, res["greedy_tokens"])


def case_record(res, *, input_ids, spans, all_hidden, model, refusal_ids, image_id, tok_info, image_features=None):
    vocab, encode = tok_info
    pieces = {i: p for p, i in vocab.items()}
    seq = len(input_ids)
    logit_pos, hidden_pos = choose_positions(seq, spans, all_hidden)
    n = model.config.text_config.num_hidden_layers
    lm = model.model.language_model
    hs = res["hidden_states"]  # [N+1, seq, H], entry N normed (HF)
    raw = res["last_block_raw"]
    # Consistency of the taps: HF's h[N] is norm(raw).
    assert torch.allclose(rms_norm(raw, lm.norm.weight, lm.norm.variance_epsilon), hs[n], atol=1e-5, rtol=1e-5)
    h_lens = torch.cat([hs[:n, -1], raw[-1:]], dim=0)  # h[N] before the final norm
    lens = {
        mode: logit_lens(h_lens, lm.norm.weight, lm.norm.variance_epsilon, model.lm_head.weight, refusal_ids, mode)
        for mode in ("final_norm", "raw")
    }
    # The apology words are rarely on top in a random model, so the layer indices above are mostly
    # null. A second, explicit word list (DIAGNOSTICS.md: "or an explicit list") made of words this
    # model does rank first exercises the non-null paths.
    fn = lens["final_norm"]
    words = []
    for t in [fn["top_token"][n], fn["top_delta_token"][2], fn["top_token"][2]]:
        piece = pieces.get(t, "")
        if piece.startswith("▁") and piece[1:].isalpha() and piece[1:] not in words:
            words.append(piece[1:])
    lens_explicit = None
    if words:
        ids = resolve_refusal_ids(vocab, encode, words)
        lens_explicit = {"refusal_words": words}
        for mode in ("final_norm", "raw"):
            lens_explicit[mode] = logit_lens(h_lens, lm.norm.weight, lm.norm.variance_epsilon, model.lm_head.weight, ids, mode)
    tensors = {
        "logits": res["logits"][logit_pos].contiguous(),
        "hidden_states": hs[:, hidden_pos].contiguous(),
        "last_block_raw": raw[hidden_pos].contiguous(),
        "attn_last": res["attn_last"].contiguous(),
    }
    feats = image_features if image_features is not None else res["image_features"]
    if feats is not None:
        tensors["image_features"] = feats.float().reshape(-1, hs.shape[-1]).contiguous()
        assert tensors["image_features"].shape[0] == sum(e - s for s, e in spans)
    record = {
        "input_ids": input_ids,
        "image_token_id": image_id,
        "image_spans": spans,
        "logit_positions": logit_pos,
        "hidden_positions": hidden_pos,
        "greedy_tokens": res["greedy_tokens"],
        "greedy_margins": res["greedy_margins"],
        "lens": lens,
        "lens_explicit": lens_explicit,
        "lens_position": seq - 1,
        "n_layers": n,
    }
    return record, tensors


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant."
HF_CASES = {
    "llava_next": [
        dict(name="text_system", system=SYSTEM, text="I'm sorry to ask, but how do I sharpen a knife?", images=[]),
        dict(name="image_portrait", text="Is there a knife in the picture?", images=["portrait_300x200.png"], all_hidden=True),
        dict(name="image_landscape", text="What is in this image? Please describe it in detail.", images=["landscape_480x640.png"]),
        dict(name="two_images", text="Compare the two images and describe the differences.", images=["grey_1000x100.png", "tiny_20x20.png"]),
    ],
    "llava": [
        dict(name="text_system", system=SYSTEM, text="I'm sorry to ask, but how do I sharpen a knife?", images=[]),
        dict(name="image_landscape", text="What is in this image? Please describe it in detail.", images=["landscape_480x640.png"], all_hidden=True),
        dict(name="image_grey_tall", text="Describe this image.", images=["grey_1000x100.png"]),
        dict(name="two_images", text="Compare the two images and describe the differences.", images=["square_640x640.png", "wide_150x1200.png"]),
    ],
}
# The orig_anyres image fits inside 336x336, where LLaVA's (w, h) reading of the pinpoints stacks
# the two tiles while transformers puts them side by side (1476 image tokens instead of 984).
ORIG_CASES = {
    "orig_anyres": [
        dict(name="text_system", template="mistral_instruct", system=SYSTEM, text="I'm sorry to ask, but how do I sharpen a knife?", images=[], all_hidden=True),
        dict(name="image_portrait", template="mistral_instruct", text="Is there a knife in the picture?", images=["portrait_300x200.png"]),
    ],
    "orig_pad": [
        dict(name="text", template="llava_llama_2", text="I'm sorry to ask, but how do I sharpen a knife?", images=[], all_hidden=True),
        dict(name="image_landscape", template="llava_llama_2", text="What is in this image? Please describe it in detail.", images=["landscape_480x640.png"]),
        dict(name="image_rgba_wide", template="llava_llama_2", text="Is there a knife in this picture?", images=["rgba_333x777.png"]),
        dict(name="two_images", template="llava_llama_2", text="Compare the two images and describe the differences.", images=["landscape_480x640.png", "grey_1000x100.png"]),
    ],
}
VARIANT_DIRS = {
    "llava_next": "tiny-llava-next",
    "llava": "tiny-llava",
    "orig_anyres": "tiny-llava-orig-anyres",
    "orig_pad": "tiny-llava-orig-pad",
}
# The HF directory holding the same weights as each original-format directory.
ORIG_SOURCE = {"orig_anyres": "llava_next", "orig_pad": "llava"}


def case_messages(case: dict, image_paths: list[Path] | None = None) -> list[dict]:
    msgs = []
    if case.get("system"):
        msgs.append({"role": "system", "content": [{"type": "text", "text": case["system"]}]})
    parts = []
    for i, _ in enumerate(case["images"]):
        parts.append({"type": "image", "path": str(image_paths[i])} if image_paths else {"type": "image"})
    parts.append({"type": "text", "text": case["text"]})
    msgs.append({"role": "user", "content": parts})
    return msgs


def hf_case(variant: str, case: dict, model, proc, refusal_ids: list[int]):
    d = FIXTURES / VARIANT_DIRS[variant]
    paths = [FIXTURES / "images" / f for f in case["images"]]
    messages = case_messages(case, paths)
    prompt = proc.apply_chat_template(messages, tokenize=False)
    enc = proc.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    images = [load_image(str(p)) for p in paths]
    enc2 = proc(text=prompt, images=images or None, return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    input_ids = enc["input_ids"][0].tolist()
    spans = image_spans(input_ids, IMAGE_TOKEN_ID)
    assert len(spans) == len(paths)
    # What a client of tokenizer.json does (the Rust side): encode the rendered prompt with special
    # tokens (BOS from the post-processor), then expand each <image> id to the image's token count.
    fast = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")).encode(prompt).ids
    expanded, k = [], 0
    for t in fast:
        if t == IMAGE_TOKEN_ID:
            expanded.extend([t] * (spans[k][1] - spans[k][0]))
            k += 1
        else:
            expanded.append(t)
    assert expanded == input_ids, (variant, case["name"])
    kwargs = {}
    if paths:
        kwargs["pixel_values"] = enc["pixel_values"]
        assert torch.equal(enc["pixel_values"], enc2["pixel_values"])
        if "image_sizes" in enc:
            kwargs["image_sizes"] = enc["image_sizes"]
    res = run_case(model, input_ids=input_ids, model_kwargs=kwargs)
    check_greedy_by_recompute(model, torch.tensor([input_ids]), res, False, kwargs)
    record, tensors = case_record(
        res, input_ids=input_ids, spans=spans, all_hidden=case.get("all_hidden", False), model=model,
        refusal_ids=refusal_ids, image_id=IMAGE_TOKEN_ID,
        tok_info=(proc.tokenizer.get_vocab(), lambda w: proc.tokenizer.encode(w)),
    )
    record.update(
        {
            "variant": variant,
            "case": case["name"],
            "model_dir": VARIANT_DIRS[variant],
            "messages": case_messages(case),
            "template": "chat_template",
            "prompt": prompt,
            "image_files": ["images/" + f for f in case["images"]],
            "image_sizes": [[im.height, im.width] for im in images],
            "pixel_mode": "anyres" if variant == "llava_next" else ("pad" if paths else None),
            "refusal_words": APOLOGY_WORDS,
        }
    )
    return record, tensors


@torch.no_grad()
def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP hidden_states[-2] without the CLS position, through the projector (LLaVA
    mm_vision_select_layer -2 / mm_vision_select_feature "patch")."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return model.model.multi_modal_projector(out.hidden_states[-2][:, 1:])


def orig_case(variant: str, case: dict, model, sp, refusal_ids: list[int]):
    paths = [FIXTURES / "images" / f for f in case["images"]]
    images = [load_image(str(p)) for p in paths]
    prompt = llava_conv_prompt(case["template"], case.get("system"), case["text"], len(images))
    ids = llava_tokenize(prompt, sp)
    feats = []
    for im in images:
        if variant == "orig_pad":
            f = vision_features(model, torch.from_numpy(llava_pad_pixels(im)))[0]
        else:
            views, best = llava_anyres_pixels(im)
            per_view = vision_features(model, torch.from_numpy(views))
            f = llava_pack_anyres(per_view, im.size, best, model.model.image_newline)
            # transformers computes the same once its pinpoints are read as (w, h), i.e. swapped.
            saved = model.config.image_grid_pinpoints
            model.config.image_grid_pinpoints = [[b, a] for a, b in PINPOINTS]
            try:
                hf = model.model.get_image_features(
                    pixel_values=torch.from_numpy(views)[None], image_sizes=torch.tensor([[im.height, im.width]])
                ).pooler_output[0]
            finally:
                model.config.image_grid_pinpoints = saved
            assert hf.shape == f.shape and torch.allclose(hf, f, atol=1e-6), (case["name"], hf.shape, f.shape)
        feats.append(f)
    input_ids, k = [], 0
    for t in ids:
        if t == LLAVA_IMAGE_TOKEN_INDEX:
            input_ids.extend([t] * feats[k].shape[0])
            k += 1
        else:
            input_ids.append(t)
    spans = image_spans(input_ids, LLAVA_IMAGE_TOKEN_INDEX)
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.tensor([[max(t, 0) for t in input_ids]])).clone()
        for (s, e), f in zip(spans, feats):
            emb[0, s:e] = f
    res = run_case(model, input_ids=input_ids, model_kwargs={}, inputs_embeds=emb)
    check_greedy_by_recompute(model, emb, res, True, {})
    record, tensors = case_record(
        res, input_ids=input_ids, spans=spans, all_hidden=case.get("all_hidden", False), model=model,
        refusal_ids=refusal_ids, image_id=LLAVA_IMAGE_TOKEN_INDEX,
        tok_info=({sp.id_to_piece(i): i for i in range(sp.get_piece_size())}, lambda w: [1] + sp.encode(w)),
        image_features=torch.cat(feats) if feats else None,
    )
    record.update(
        {
            "variant": variant,
            "case": case["name"],
            "model_dir": VARIANT_DIRS[variant],
            "messages": case_messages(case),
            "template": case["template"],
            "prompt": prompt,
            "image_files": ["images/" + f for f in case["images"]],
            "image_sizes": [[im.height, im.width] for im in images],
            "pixel_mode": ("pad_original" if variant == "orig_pad" else "anyres_original") if paths else None,
            "refusal_words": APOLOGY_WORDS,
        }
    )
    return record, tensors


# ---------------------------------------------------------------------------------------------
# Directory writers
# ---------------------------------------------------------------------------------------------


def saved_configs(model) -> dict:
    """config.json and generation_config.json exactly as transformers 5.23 save_pretrained writes them."""
    tmp = Path(tempfile.mkdtemp())
    model.save_pretrained(str(tmp))
    out = {n: json.loads((tmp / n).read_text()) for n in ("config.json", "generation_config.json") if (tmp / n).exists()}
    shutil.rmtree(tmp)
    return out


def hub_style_llava_next_config(text: dict, vision: dict) -> dict:
    """config.json the way llava-hf/llava-v1.6-mistral-7b-hf (transformers 4.39) holds it: partial
    text_config (MistralConfig defaults omitted: hidden_act, head_dim, bos/eos ids...), `rope_theta`
    instead of 5.x `rope_parameters`, `torch_dtype` instead of `dtype`."""
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": PINPOINTS,
        "image_token_index": IMAGE_TOKEN_ID,
        "model_type": "llava_next",
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["MistralForCausalLM"],
            "hidden_size": text["hidden_size"],
            "intermediate_size": text["intermediate_size"],
            "max_position_embeddings": text["max_position_embeddings"],
            "model_type": "mistral",
            "num_attention_heads": text["num_attention_heads"],
            "num_hidden_layers": text["num_hidden_layers"],
            "num_key_value_heads": text["num_key_value_heads"],
            "rms_norm_eps": text["rms_norm_eps"],
            "rope_theta": text["rope_theta"],
            "sliding_window": None,
            "torch_dtype": "float32",
            "vocab_size": text["vocab_size"],
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": {
            "hidden_size": vision["hidden_size"],
            "image_size": vision["image_size"],
            "intermediate_size": vision["intermediate_size"],
            "model_type": "clip_vision_model",
            "num_attention_heads": vision["num_attention_heads"],
            "num_hidden_layers": vision["num_hidden_layers"],
            "patch_size": vision["patch_size"],
            "projection_dim": vision["projection_dim"],
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": text["vocab_size"],
    }


def check_config_equivalent(d: Path, cls_cfg, text: dict, vision: dict) -> None:
    cfg = cls_cfg.from_pretrained(str(d))
    t, v = cfg.text_config, cfg.vision_config
    for k, want in text.items():
        got = t.rope_parameters["rope_theta"] if k == "rope_theta" else getattr(t, k)
        assert got == want, (d, k, got, want)
    for k, want in vision.items():
        assert getattr(v, k) == want, (d, k, getattr(v, k), want)
    assert cfg.image_token_id == IMAGE_TOKEN_ID and cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"


def write_tiny_llava_next(tok) -> dict:
    d = FIXTURES / "tiny-llava-next"
    d.mkdir(parents=True)
    model = build_model("llava_next", TINY_TEXT, TINY_VISION, SEED_LLAVA_NEXT)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_json(d / "config.json", hub_style_llava_next_config(TINY_TEXT, TINY_VISION))
    write_json(d / "generation_config.json", saved_configs(model)["generation_config.json"])
    save_safetensors(d / "model.safetensors", {to_legacy_hf_name(k): v for k, v in sd.items()})
    write_hf_processor_files(d, "llava_next", tok, "hub")
    check_config_equivalent(d, LlavaNextConfig, TINY_TEXT, TINY_VISION)
    check_loads_exactly(LlavaNextForConditionalGeneration, d, sd)
    log(f"  tiny-llava-next: {count_params(model)} parameters (f32, legacy tensor names)")
    return sd


def write_sharded(d: Path, sd: dict, n_shards: int) -> None:
    """model-0000k-of-0000n.safetensors + model.safetensors.index.json, split by size in name order."""
    names = sorted(sd)
    total = sum(sd[k].numel() * sd[k].element_size() for k in names)
    shards, cur, acc = [[] for _ in range(n_shards)], 0, 0
    for k in names:
        if acc >= total * (cur + 1) / n_shards and cur < n_shards - 1:
            cur += 1
        shards[cur].append(k)
        acc += sd[k].numel() * sd[k].element_size()
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_safetensors(d / fname, {k: sd[k] for k in keys})
        weight_map.update({k: fname for k in keys})
    write_json(
        d / "model.safetensors.index.json",
        {"metadata": {"total_parameters": sum(v.numel() for v in sd.values()), "total_size": total}, "weight_map": weight_map},
    )


def write_tiny_llava(tok) -> dict:
    d = FIXTURES / "tiny-llava"
    d.mkdir(parents=True)
    model = build_model("llava", TINY_TEXT, TINY_VISION, SEED_LLAVA).to(torch.bfloat16)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfgs = saved_configs(model)
    assert "rope_parameters" in cfgs["config.json"]["text_config"]
    write_json(d / "config.json", cfgs["config.json"])
    write_json(d / "generation_config.json", cfgs["generation_config.json"])
    # transformers 5.23 save_pretrained still writes the legacy names; this directory holds the
    # >= 4.52 names (model.language_model.*, lm_head.weight) so that both generations are covered.
    write_sharded(d, sd, 2)
    write_hf_processor_files(d, "llava", tok, "v5")
    check_config_equivalent(d, LlavaConfig, TINY_TEXT, TINY_VISION)
    check_loads_exactly(LlavaForConditionalGeneration, d, sd)
    log(f"  tiny-llava: {count_params(model)} parameters (bf16, 2 shards, new tensor names)")
    return sd


def write_tiny_clip(sd_llava: dict) -> None:
    d = FIXTURES / "tiny-clip"
    d.mkdir(parents=True)
    prefix = "model.vision_tower."
    weights = {k[len(prefix) :]: v for k, v in sd_llava.items() if k.startswith(prefix)}
    model = CLIPVisionModel(vision_config(TINY_VISION)).to(torch.bfloat16)
    write_json(d / "config.json", saved_configs(model)["config.json"])
    save_safetensors(d / "model.safetensors", weights)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3
    ).save_pretrained(str(d))
    check_loads_exactly(CLIPVisionModel, d, weights)


def original_config(variant: str, text: dict, vision: dict, dtype: str) -> dict:
    """config.json of an original LLaVA checkpoint (LlavaMistralForCausalLM, LLaVA codebase keys)."""
    anyres = variant == "orig_anyres"
    return {
        "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "image_aspect_ratio": "anyres" if anyres else "pad",
        "image_grid_pinpoints": PINPOINTS if anyres else None,
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "mm_hidden_size": vision["hidden_size"],
        "mm_patch_merge_type": "spatial_unpad" if anyres else "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        # orig-anyres: a path relative to this directory naming a CLIP dir with the same tower
        # config (its weights differ: the tower weights inside this checkpoint take precedence).
        # orig-pad: a hub id that cannot be fetched, so the loader must be given --vision-tower.
        "mm_vision_tower": "../tiny-clip" if anyres else "openai/clip-vit-large-patch14-336",
        "model_type": "llava_mistral",
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_theta": text["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": dtype,
        "transformers_version": "4.37.2",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": anyres,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": text["vocab_size"],
    }


def write_original(variant: str, sd_hf: dict, sp_model: bytes) -> None:
    d = FIXTURES / VARIANT_DIRS[variant]
    d.mkdir(parents=True)
    with_vision = variant == "orig_anyres"
    tensors = {}
    for k, v in sd_hf.items():
        name = to_original_name(k, with_vision)
        if name is not None:
            tensors[name] = v
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[next(iter(sd_hf.values())).dtype]
    write_json(d / "config.json", original_config(variant, TINY_TEXT, TINY_VISION, dtype))
    save_safetensors(d / "model.safetensors", tensors)
    (d / "tokenizer.model").write_bytes(sp_model)
    write_json(d / "tokenizer_config.json", original_tokenizer_config())


# ---------------------------------------------------------------------------------------------
# Preprocessing references
# ---------------------------------------------------------------------------------------------

CENTER_ROW = 168
TOKEN_COUNT_SIZES = [  # (height, width)
    (640, 640), (480, 640), (640, 480), (20, 20), (300, 200), (200, 300), (333, 777), (1000, 100),
    (100, 1000), (336, 336), (337, 337), (335, 337), (672, 672), (672, 336), (336, 672), (1008, 336),
    (336, 1008), (768, 1024), (1024, 768), (720, 1280), (1080, 1920), (1, 1), (50, 2000), (2000, 50),
    (500, 333), (150, 1200),
]


def views_record(arr: np.ndarray, with_rows: bool = True) -> dict:
    """arr [n_views, 3, 336, 336] f32."""
    rec = {"sha256": sha256_f32(arr), "views": []}
    for v in arr:
        vr = {"sha256": sha256_f32(v)}
        if with_rows:
            vr["center_row"] = f32_list(v[:, CENTER_ROW, :])
        rec["views"].append(vr)
    return rec


def count_image_tokens(proc, h: int, w: int) -> int:
    enc = proc(text="<image>", images=Image.new("RGB", (w, h), (128, 128, 128)), return_tensors="pt")
    return int((enc["input_ids"][0] == IMAGE_TOKEN_ID).sum())


def write_preprocess(proc_next, proc_llava, image_files: dict) -> dict:
    from transformers.image_processing_utils import select_best_resolution

    images = {}
    max_diff = {"pad": 0.0, "anyres_same_grid": 0.0}
    for name in sorted(n for n in image_files if n.endswith(".png")):
        img = load_image(str(FIXTURES / "images" / name))
        h, w = img.height, img.width
        e = {"height": h, "width": w, "mode": image_files[name]["mode"]}
        pv = proc_next.image_processor(img, return_tensors="pt")
        a = pv["pixel_values"].numpy()
        bh, bw = select_best_resolution((h, w), PINPOINTS)
        e["anyres"] = dict(
            views_record(a[0]),
            shape=list(a.shape),
            image_sizes=pv["image_sizes"].tolist(),
            best_resolution_hw=[int(bh), int(bw)],
            grid_rows_cols=[int(bh) // IMAGE_SIZE, int(bw) // IMAGE_SIZE],
            image_tokens=count_image_tokens(proc_next, h, w),
        )
        p = proc_llava.image_processor(img, return_tensors="pt")["pixel_values"].numpy()
        e["pad"] = dict(views_record(p), shape=list(p.shape), image_tokens=count_image_tokens(proc_llava, h, w))

        # The original LLaVA codebase's preprocessing of the same picture.
        po = llava_pad_pixels(img)
        same = sha256_f32(po) == sha256_f32(p)
        d = float(np.abs(po - p).max())
        max_diff["pad"] = max(max_diff["pad"], d)
        e["pad_original"] = dict(views_record(po, with_rows=not same), shape=list(po.shape), max_abs_diff_vs_pad=d)
        ao, best_wh = llava_anyres_pixels(img)
        same_grid = (best_wh[1], best_wh[0]) == (bh, bw)
        same = same_grid and sha256_f32(ao) == sha256_f32(a[0])
        rec = dict(
            views_record(ao, with_rows=False),
            shape=list(ao.shape),
            best_resolution_wh=list(best_wh),
            grid_rows_cols=[best_wh[1] // IMAGE_SIZE, best_wh[0] // IMAGE_SIZE],
            image_tokens=llava_anyres_token_count(h, w),
            same_grid_as_anyres=same_grid,
        )
        if same_grid:
            rec["max_abs_diff_vs_anyres"] = float(np.abs(ao - a[0]).max())
            max_diff["anyres_same_grid"] = max(max_diff["anyres_same_grid"], rec["max_abs_diff_vs_anyres"])
        e["anyres_original"] = rec
        images[name] = e
    out = {
        "center_row": CENTER_ROW,
        "clip_mean": CLIP_MEAN,
        "clip_std": CLIP_STD,
        "pad_colour": list(PAD_COLOUR),
        "processor_classes": {
            "anyres": f"{type(proc_next).__name__} + {type(proc_next.image_processor).__name__}",
            "pad": f"{type(proc_llava).__name__} + {type(proc_llava.image_processor).__name__}",
            "tokenizer": type(proc_next.tokenizer).__name__,
        },
        "modes": {
            "anyres": "transformers llava_next processor (pinpoints read as (h, w)); shape [1, n_views, 3, 336, 336]",
            "pad": "transformers llava processor with do_pad=True; shape [1, 3, 336, 336]",
            "anyres_original": "LLaVA codebase process_anyres_image (pinpoints read as (w, h)); shape [n_views, 3, 336, 336]; hashes only",
            "pad_original": "LLaVA codebase expand2square + CLIPImageProcessor; center rows only where it differs from pad",
        },
        "images": images,
        "files": image_files,
        "transformers_version": transformers.__version__,
    }
    write_json(FIXTURES / "reference" / "preprocess.json", out, compact=True)
    return max_diff


def unpad_rounding_differs(h: int, w: int) -> bool:
    """Whether LLaVA's int(x) and transformers' int(round(x, 7)) in unpad_image disagree for this
    size under either reading of the pinpoints (README claims no fixture size does)."""
    from transformers.image_processing_utils import select_best_resolution

    grids = [select_best_resolution((h, w), PINPOINTS), llava_select_best_resolution((w, h), [tuple(p) for p in PINPOINTS])[::-1]]
    for bh, bw in grids:
        ch, cw = bh // PATCH_SIZE, bw // PATCH_SIZE
        x = h * (cw / w) if w / h > cw / ch else w * (ch / h)
        if int(x) != int(round(x, 7)):
            return True
    return False


def write_token_counts(proc_next) -> None:
    sizes = TOKEN_COUNT_SIZES + [(h, w) for h, w, _ in PNG_IMAGES.values()]
    assert not any(unpad_rounding_differs(h, w) for h, w in sizes)
    rows = []
    for h, w in TOKEN_COUNT_SIZES:
        rows.append({"height": h, "width": w, "count": count_image_tokens(proc_next, h, w), "count_original_llava": llava_anyres_token_count(h, w)})
    by_size = {(r["height"], r["width"]): r["count"] for r in rows}
    assert by_size[(640, 640)] == 2928 and by_size[(480, 640)] == 2340 and by_size[(20, 20)] == 1176, by_size
    write_json(FIXTURES / "reference" / "token_counts.json", rows)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

GENERATED = ["images", "tiny-llava-next", "tiny-llava", "tiny-llava-orig-anyres", "tiny-llava-orig-pad", "tiny-clip", "reference"]


def setup_torch() -> None:
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        sys.exit(f"transformers {transformers.__version__} found, {EXPECTED_TRANSFORMERS} pinned (tools/requirements.txt)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_eager(cls, d: Path):
    return cls.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()


def diagnostics_line(record: dict, tensors: dict, n: int) -> str:
    hs = tensors["hidden_states"][:, -1]
    cos = [float(torch.nn.functional.cosine_similarity(hs[j], hs[j + 1], dim=0)) for j in range(n)]
    g = record["greedy_tokens"]
    return f"unique greedy {len(set(g))}/{len(g)}, min margin {min(record['greedy_margins']):.3f}, cos(h_j,h_j+1) " + " ".join(f"{c:.2f}" for c in cos)


def make_fixtures() -> None:
    setup_torch()
    FIXTURES.mkdir(exist_ok=True)
    for name in GENERATED:
        shutil.rmtree(FIXTURES / name, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="make_fixtures_"))
    try:
        log("tokenizer")
        sp_model = train_sentencepiece()
        tok = build_hf_tokenizer(sp_model, work)
        log("images")
        image_files = make_images(FIXTURES / "images")
        log("checkpoints")
        sd_next = write_tiny_llava_next(tok)
        sd_llava = write_tiny_llava(tok)
        write_tiny_clip(sd_llava)
        write_original("orig_anyres", sd_next, sp_model)
        write_original("orig_pad", sd_llava, sp_model)
        check_tokenizers_agree(
            sp_model, tok, [FIXTURES / "tiny-llava-next" / "tokenizer.json", FIXTURES / "tiny-llava" / "tokenizer.json"]
        )

        procs = {v: AutoProcessor.from_pretrained(str(FIXTURES / VARIANT_DIRS[v])) for v in ("llava_next", "llava")}
        for v, p in procs.items():
            assert p.chat_template == CHAT_TEMPLATE, v
            assert type(p.image_processor).__name__.endswith("Pil"), type(p.image_processor)
            # transformers 5.23 loads the tokenizer of llava/llava_next dirs as a plain
            # TokenizersBackend (tokenizer.json as written, whatever tokenizer_class says), so what
            # it encodes is what the `tokenizers` crate encodes from the same file.
            fast = tokenizers.Tokenizer.from_file(str(FIXTURES / VARIANT_DIRS[v] / "tokenizer.json"))
            for s in TOKENIZER_PROBES + [" leading space", "[INST] <image>\nDescribe this image. [/INST]"]:
                assert p.tokenizer(s)["input_ids"] == fast.encode(s).ids, (v, s)
        log("preprocessing references")
        max_diff = write_preprocess(procs["llava_next"], procs["llava"], image_files)
        write_token_counts(procs["llava_next"])

        sp = spm.SentencePieceProcessor(model_proto=sp_model)
        vocab = procs["llava_next"].tokenizer.get_vocab()
        refusal_ids = resolve_refusal_ids(vocab, lambda w: procs["llava_next"].tokenizer.encode(w), APOLOGY_WORDS)
        sp_vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        assert refusal_ids == resolve_refusal_ids(sp_vocab, lambda w: [1] + sp.encode(w), APOLOGY_WORDS)
        log(f"  refusal ids (apology): {refusal_ids} = {[sp.id_to_piece(i) for i in refusal_ids]}")

        models = {
            "llava_next": load_eager(LlavaNextForConditionalGeneration, FIXTURES / "tiny-llava-next"),
            "llava": load_eager(LlavaForConditionalGeneration, FIXTURES / "tiny-llava"),
        }
        for variant in ["llava_next", "llava", "orig_anyres", "orig_pad"]:
            log(f"references: {variant}")
            cases = HF_CASES.get(variant) or ORIG_CASES[variant]
            model = models[ORIG_SOURCE.get(variant, variant)]
            for case in cases:
                if variant in HF_CASES:
                    record, tensors = hf_case(variant, case, model, procs[variant], refusal_ids)
                else:
                    record, tensors = orig_case(variant, case, model, sp, refusal_ids)
                out = FIXTURES / "reference" / variant
                write_json(out / f"{case['name']}.json", record)
                save_safetensors(out / f"{case['name']}.safetensors", tensors)
                log(f"  {case['name']}: seq {len(record['input_ids'])}, " + diagnostics_line(record, tensors, record["n_layers"]))
        log(f"max |original LLaVA - transformers| pixel difference: pad {max_diff['pad']:.3g}, anyres (same grid) {max_diff['anyres_same_grid']:.3g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary()


def summary() -> None:
    total = 0
    log("\nfixtures:")
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.stat().st_size:>9}  {rel(p)}")
    log(f"total {total} bytes ({total / 2**20:.2f} MiB)")
    assert total < 8 * 2**20, "committed fixtures must stay under 8 MB"


def pad_tokenizer_vocab(path: Path, size: int) -> None:
    """Give every id of a larger model vocab a tokenizer entry ("▁tok<id>", never produced by
    encoding: no merge leads to it) so that whatever a random model generates can be decoded."""
    j = json.loads(path.read_text(encoding="utf-8"))
    vocab = j["model"]["vocab"]
    # Added tokens ("<image>" = 1000) go into the model vocab under their own ids: with a hole
    # there, transformers 5 sees an added token outside the vocab and appends it again at the end
    # (`<image>` became 31999 while config.json says 1000).
    for t in j["added_tokens"]:
        vocab.setdefault(t["content"], t["id"])
    taken = set(vocab.values())
    for i in range(size):
        if i not in taken:
            vocab[f"▁tok{i}"] = i
    text = json.dumps(j, ensure_ascii=False, indent=2)
    tokenizers.Tokenizer.from_str(text)
    path.write_text(text + "\n", encoding="utf-8")


def make_bench(outdir: Path) -> None:
    """bench-135m: a random llava_next checkpoint with Mistral-like proportions (hidden 768, 12
    layers, 12 heads, 4 KV heads, MLP 2048, vocab 32000) and a small CLIP (hidden 384, 6 layers),
    bf16, with the fixture tokenizer (image_token_index 1000) whose vocab is padded to the model's
    32000 ids with decode-only entries. For timing only; never committed."""
    setup_torch()
    work = Path(tempfile.mkdtemp(prefix="make_bench_"))
    try:
        tok = build_hf_tokenizer(train_sentencepiece(), work)
        model = build_model("llava_next", BENCH_TEXT, BENCH_VISION, SEED_BENCH)
        n = count_params(model)
        outdir.mkdir(parents=True, exist_ok=True)
        model.to(torch.bfloat16).save_pretrained(str(outdir))
        write_hf_processor_files(outdir, "llava_next", tok, "v5")
        pad_tokenizer_vocab(outdir / "tokenizer.json", BENCH_TEXT["vocab_size"])
        proc = AutoProcessor.from_pretrained(str(outdir))
        assert len(proc.tokenizer) == BENCH_TEXT["vocab_size"]
        image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
        assert image_id == IMAGE_TOKEN_ID, f"<image> is {image_id}, config says {IMAGE_TOKEN_ID}"
        for probe in TOKENIZER_PROBES:
            assert proc.tokenizer(probe)["input_ids"] == tok(probe)["input_ids"], probe
        log(f"bench-135m written to {outdir}: {n} parameters ({n / 1e6:.1f}M), bf16")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-135m", metavar="OUTDIR", type=Path, help="write the bench-135m checkpoint instead")
    args = ap.parse_args()
    if args.bench_135m:
        make_bench(args.bench_135m)
    else:
        make_fixtures()


if __name__ == "__main__":
    main()

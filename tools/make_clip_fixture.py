#!/usr/bin/env python3
"""Write fixtures/tiny-clip-full/: a tiny random-weight HF `CLIPModel` (text and vision towers) for
the CLIP embedder and retrieval tests (model/tests/retrieval.rs), with transformers' reference
features.

    tools/toy_tga/.venv/bin/python tools/make_clip_fixture.py

Versions: those of tools/requirements.txt (transformers 5.23.0, tokenizers 0.23.3, torch 2.15.0).

What it writes:
  * config.json, model.safetensors (f32): CLIPModel with 2-layer towers of width 32, projection 16,
    text max_position_embeddings 77 (real CLIP's, so truncation is exercised), a 56 px vision tower;
  * tokenizer.json (+ tokenizer_config.json): a word-level vocabulary of the text below (lower-cased,
    split on whitespace and punctuation; unknown words map to <|unk|>), with CLIP's special tokens
    and a `<|startoftext|> $A <|endoftext|>` post-processor; `eos_token_id` (the id of
    `<|endoftext|>`) is neither 2 nor the largest id, so the pooling rule is the new one;
  * preprocessor_config.json: CLIPImageProcessor (shortest edge 56, centre crop 56, bicubic);
  * reference.json: per caption its input ids (truncation to 77) and `get_text_features`; per image
    `get_image_features` of the PIL processor's pixel values; all f32, eager attention.

Deterministic: weights come from per-parameter seeded generators, torch runs on one thread, JSON has
sorted keys; running it twice gives identical bytes.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import tokenizers
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = FIXTURES / "tiny-clip-full"
SEED = 15
IMAGE_SIZE = 56

CORPUS = """\
a red knife next to a cup on a striped table
a photo of a cat sitting on a chair near the window
a green apple and a yellow ball on the grass
a small house with a tree and a flower garden
an old clock on the wall above a book shelf
a blue car parked in front of a house
a fish swimming in a glass bowl on the table
a person holding a cigarette in the street
a bottle of alcohol next to a glass
a gun lying on a wooden table
drops of blood on a white floor
a hand making an insulting gesture
pills and powder scattered on a mirror
what colour is the knife in this picture
describe the image in detail
the cat is black and the cup is white
two apples, one ball, and three flowers
"""

# The last caption is longer than 77 tokens: the reference is truncated to 77 (EOS kept).
CAPTIONS = [
    "a red knife next to a cup",
    "a photo of a cat sitting on a chair",
    "a green apple and a yellow ball",
    "An OLD clock on the wall, above a zebra shelf!",
    "a fish swimming in a glass bowl",
    " ".join(["a blue car parked in front of a small house with a tree"] * 8),
]

IMAGES = ["photo_120x160.png", "landscape_480x640.png"]

SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<|unk|>", "<|pad|>"]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def f32_list(arr) -> list:
    """Shortest decimals that round-trip the f32 values."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a))
    return [f32_list(x) for x in a]


def build_tokenizer() -> tokenizers.Tokenizer:
    # A word-level vocabulary in sorted order (tokenizers' BPE trainer breaks ties between equal
    # pair counts differently from run to run, so its merges are not reproducible).
    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for line in CORPUS.splitlines() for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))})
    # <|unk|> = 0, the words, then the specials: <|endoftext|> is neither 2 nor the largest id.
    vocab = {"<|unk|>": 0}
    for w in words + ["<|startoftext|>", "<|endoftext|>", "<|pad|>"]:
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>", "<|pad|>"])
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    return tok


def param_seed(name: str) -> int:
    return (SEED * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    """Scaled random init (as tools/make_fixtures.py does) so that no block is near the identity and
    norm weights are not all ones (a missing norm shows)."""
    for name, p in sorted(model.named_parameters()):
        g = torch.Generator().manual_seed(param_seed(name))
        x = torch.randn(p.shape, generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if name == "logit_scale":
            v = torch.full_like(p, math.log(1 / 0.07))
        elif any(k in name for k in ("norm", "layrnorm", "layer_norm")) and leaf == "weight":
            v = 1.0 + 0.2 * x
        elif leaf == "bias":
            v = 0.1 * x
        elif "token_embedding" in name or "class_embedding" in name:
            v = x
        elif "position_embedding" in name:
            v = 0.5 * x
        elif "patch_embedding" in name:
            v = x / math.sqrt(p.shape[1] * p.shape[2] * p.shape[3])
        elif p.ndim == 2:
            gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
            v = gain * x / math.sqrt(p.shape[1])
        else:
            raise ValueError(f"no init rule for {name} {tuple(p.shape)}")
        p.copy_(v.to(p.dtype))


def main() -> None:
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    raw = build_tokenizer()
    ids = {t: raw.token_to_id(t) for t in SPECIAL}
    vocab_size = raw.get_vocab_size()
    assert ids["<|endoftext|>"] not in (2, vocab_size - 1), ids
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        model_max_length=77,
    )
    hf_tok.save_pretrained(str(OUT))

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=ids["<|startoftext|>"],
            eos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|pad|>"],
            projection_dim=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=14,
            hidden_act="quick_gelu",
            projection_dim=16,
        ),
        projection_dim=16,
    )
    cfg._attn_implementation = "eager"
    model = CLIPModel(cfg).to(torch.float32).eval()
    init_weights(model)
    model.save_pretrained(str(OUT))
    # Rewrite the weights with sorted keys and fixed metadata, for byte-identical reruns.
    sd = {k: v.contiguous() for k, v in sorted(model.state_dict().items()) if not k.endswith("position_ids")}
    save_file(sd, str(OUT / "model.safetensors"), metadata={"format": "pt"})

    proc = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3
    )
    proc.save_pretrained(str(OUT))

    ref = {"captions": [], "images": [], "eos_token_id": ids["<|endoftext|>"]}
    with torch.no_grad():
        for text in CAPTIONS:
            enc = hf_tok(text, truncation=True, max_length=77, return_tensors="pt")
            feats = model.get_text_features(input_ids=enc["input_ids"]).pooler_output[0]
            ref["captions"].append(
                {"text": text, "input_ids": enc["input_ids"][0].tolist(), "text_features": f32_list(feats)}
            )
        for name in IMAGES:
            img = Image.open(FIXTURES / "images" / name).convert("RGB")
            pv = proc(images=img, return_tensors="pt")["pixel_values"]
            feats = model.get_image_features(pixel_values=pv).pooler_output[0]
            ref["images"].append(
                {"file": f"images/{name}", "pixel_sum": float(pv.double().sum()), "image_features": f32_list(feats)}
            )
    assert len(ref["captions"][-1]["input_ids"]) == 77
    write_json(OUT / "reference.json", ref)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT.relative_to(ROOT)} ({total} bytes, vocab {vocab_size}, ids {ids})")


if __name__ == "__main__":
    main()

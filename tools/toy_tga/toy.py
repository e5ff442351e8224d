"""Shared pieces: tokenizer, model definitions, prompt tokenization, batching, saving."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, MistralConfig, MistralForCausalLM

import world

IMAGE = -200  # LLAVA_IMAGE_TOKEN_INDEX
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PAD_COLOUR = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), LLaVA's expand2square
IMG_SIZE, PATCH = 56, 14
N_IMG_TOK = (IMG_SIZE // PATCH) ** 2

TEXT_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=512)
VISION_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   image_size=IMG_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   projection_dim=64)
CLIP_TEXT_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=48, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      projection_dim=64)


def setup(threads: int = 1, seed: int = 0):
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    np.random.seed(seed)


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------
def train_tokenizer(lines: list[str], vocab_size: int) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2,
        max_sentence_length=100000)
    return buf.getvalue()


class Tok:
    def __init__(self, model_bytes: bytes):
        self.bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.n = self.sp.get_piece_size()

    def encode(self, s: str) -> list[int]:
        return self.sp.encode(s)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def llava(self, prompt: str) -> list[int]:
        """tokenizer_image_token: chunks split on <image>, each tokenized alone, BOS once."""
        ids = [1]
        for i, c in enumerate(prompt.split("<image>")):
            if i:
                ids.append(IMAGE)
            ids.extend(self.sp.encode(c))
        return ids

    def span(self, text: str, sub: str, start_at: int = 0) -> tuple[int, int]:
        """Token index range (in self.llava(text) of a text without images) covering `sub`."""
        assert "<image>" not in text
        c0 = text.index(sub, start_at)
        c1 = c0 + len(sub)
        proto = self.sp.encode(text, return_type="proto")
        idx = [i for i, p in enumerate(proto.pieces) if p.end > c0 and p.begin < c1]
        return idx[0] + 1, idx[-1] + 2  # +1 for BOS

    def chunk_span(self, chunk: str, sub: str) -> tuple[int, int]:
        """Like span, for the first chunk of an image prompt (BOS + chunk tokens)."""
        return self.span(chunk, sub)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------
def text_config(vocab: int) -> MistralConfig:
    return MistralConfig(vocab_size=vocab, hidden_act="silu", sliding_window=None, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, attention_dropout=0.0, **TEXT_DIMS)


def clip_config(vocab: int) -> CLIPConfig:
    eot = vocab  # one extra id after the SentencePiece vocab: also the largest id (legacy pooling agrees)
    return CLIPConfig(
        text_config=dict(vocab_size=vocab + 1, bos_token_id=1, eos_token_id=eot, pad_token_id=0, **CLIP_TEXT_DIMS),
        vision_config=dict(**VISION_DIMS), projection_dim=64)


class Projector(nn.Module):
    def __init__(self, vis: int, d: int):
        super().__init__()
        self.l0 = nn.Linear(vis, d)
        self.l2 = nn.Linear(d, d)

    def forward(self, x):
        return self.l2(F.gelu(self.l0(x)))


def clip_text_ids(tok: Tok, caption: str, vocab: int) -> list[int]:
    return [1] + tok.encode(caption)[: CLIP_TEXT_DIMS["max_position_embeddings"] - 2] + [vocab]


def pixels(img: Image.Image) -> np.ndarray:
    """LLaVA pad-to-square (CLIP mean colour), then CLIPImageProcessor (shortest edge, bicubic,
    centre crop, rescale, normalise). CHW f32."""
    img = img.convert("RGB")
    w, h = img.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), PAD_COLOUR)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if img.size != (IMG_SIZE, IMG_SIZE):
        img = img.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.BICUBIC)
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@torch.no_grad()
def vision_features(clip: CLIPModel, px: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """hidden_states[-2] without CLS (mm_vision_select_layer -2, select_feature patch)."""
    out = []
    for i in range(0, len(px), bs):
        o = clip.vision_model(pixel_values=px[i:i + bs], output_hidden_states=True)
        out.append(o.hidden_states[-2][:, 1:])
    return torch.cat(out)


@torch.no_grad()
def image_embeds(clip: CLIPModel, px: torch.Tensor, bs: int = 256) -> torch.Tensor:
    out = [F.normalize(_feat(clip.get_image_features(pixel_values=px[i:i + bs])), dim=-1)
           for i in range(0, len(px), bs)]
    return torch.cat(out)


def _feat(x):
    return x.pooler_output if hasattr(x, "pooler_output") else x


@torch.no_grad()
def text_embeds(clip: CLIPModel, tok: Tok, captions: list[str], vocab: int, bs: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(captions), bs):
        ids, mask = pad_ids([clip_text_ids(tok, c, vocab) for c in captions[i:i + bs]])
        out.append(F.normalize(_feat(clip.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1))
    return torch.cat(out)


def pad_ids(seqs: list[list[int]], pad: int = 0):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------
# Batching for the decoder: prompt ids (with IMAGE markers) + answer ids
# ------------------------------------------------------------------------------------------
def build_batch(lm: MistralForCausalLM, proj: Projector | None, samples: list[dict], feats: torch.Tensor | None,
                with_answer: bool = True, left_pad: bool = False):
    """samples: {"prompt": ids with IMAGE, "answer": ids (no eos), "img": index into feats or None}.
    Returns inputs_embeds, attention_mask, labels, and per sample the position of each image start."""
    emb = lm.get_input_embeddings()
    rows, labels, img_starts = [], [], []
    for s in samples:
        parts, lab, pos, start = [], [], 0, None
        for t in _split(s["prompt"]):
            if t is IMAGE:
                f = proj(feats[s["img"]])
                parts.append(f)
                lab += [-100] * f.shape[0]
                start = pos
                pos += f.shape[0]
            else:
                parts.append(emb(torch.tensor(t)))
                lab += [-100] * len(t)
                pos += len(t)
        if with_answer:
            a = s["answer"] + [2]
            parts.append(emb(torch.tensor(a)))
            lab += a
        rows.append(torch.cat(parts))
        labels.append(lab)
        img_starts.append(start)
    L = max(r.shape[0] for r in rows)
    D = rows[0].shape[1]
    x = rows[0].new_zeros((len(rows), L, D))
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    lab_t = torch.full((len(rows), L), -100, dtype=torch.long)
    offs = []
    for i, r in enumerate(rows):
        n = r.shape[0]
        o = L - n if left_pad else 0
        x[i, o:o + n] = r
        mask[i, o:o + n] = 1
        lab_t[i, o:o + n] = torch.tensor(labels[i])
        offs.append(o)
    return x, mask, lab_t, img_starts, offs


def _split(ids):
    cur = []
    for t in ids:
        if t == IMAGE:
            if cur:
                yield cur
            cur = []
            yield IMAGE
        else:
            cur.append(t)
    if cur:
        yield cur


def lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def greedy(lm, proj, samples, feats, max_new: int = 40, bs: int = 64) -> list[list[int]]:
    """Batched greedy decoding (left padding, KV cache), the exact prompt as given."""
    from transformers import DynamicCache
    outs = []
    for b in range(0, len(samples), bs):
        chunk = samples[b:b + bs]
        x, mask, _, _, _ = build_batch(lm, proj, chunk, feats, with_answer=False, left_pad=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        o = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        gen = [[] for _ in chunk]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        nxt = o.logits[:, -1].argmax(-1)
        for _ in range(max_new):
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == 2:
                        done[i] = True
                    else:
                        gen[i].append(t)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            o = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=o.past_key_values,
                   use_cache=True)
            nxt = o.logits[:, -1].argmax(-1)
        outs.extend(gen)
    return outs


# ------------------------------------------------------------------------------------------
# Saving (original LLaVA format + HF CLIPModel dir)
# ------------------------------------------------------------------------------------------
def write_json(p: Path, obj):
    p.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def original_config(vocab: int) -> dict:
    t = TEXT_DIMS
    return {
        "architectures": ["LlavaMistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "hidden_size": t["hidden_size"], "image_aspect_ratio": "pad", "image_grid_pinpoints": None,
        "initializer_range": 0.02, "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_position_embeddings"], "mm_hidden_size": VISION_DIMS["hidden_size"],
        "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "../clip", "model_type": "llava_mistral",
        "num_attention_heads": t["num_attention_heads"], "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"], "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": t["rope_theta"], "sliding_window": None, "tie_word_embeddings": False,
        "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
        "transformers_version": "4.37.2", "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False,
        "use_cache": True, "use_mm_proj": True, "vocab_size": vocab,
    }


TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "legacy": True, "model_max_length": 4096, "padding_side": "right",
    "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
}


def save_llava(d: Path, lm: MistralForCausalLM, proj: Projector, tok: Tok):
    d.mkdir(parents=True, exist_ok=True)
    t = {}
    for k, v in lm.state_dict().items():
        t[k] = v.detach().to(torch.bfloat16).contiguous()  # model.layers.*, model.embed_tokens, model.norm, lm_head
    t["model.mm_projector.0.weight"] = proj.l0.weight.detach().to(torch.bfloat16).contiguous()
    t["model.mm_projector.0.bias"] = proj.l0.bias.detach().to(torch.bfloat16).contiguous()
    t["model.mm_projector.2.weight"] = proj.l2.weight.detach().to(torch.bfloat16).contiguous()
    t["model.mm_projector.2.bias"] = proj.l2.bias.detach().to(torch.bfloat16).contiguous()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_json(d / "config.json", original_config(lm.config.vocab_size))
    (d / "tokenizer.model").write_bytes(tok.bytes)
    write_json(d / "tokenizer_config.json", TOKENIZER_CONFIG)


def save_clip(d: Path, clip: CLIPModel, tok: Tok):
    d.mkdir(parents=True, exist_ok=True)
    clip = clip.to(torch.bfloat16)
    sd = {k: v.detach().contiguous() for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = clip.config.to_dict()
    cfg["architectures"] = ["CLIPModel"]
    cfg.pop("transformers_version", None)
    write_json(d / "config.json", cfg)
    clip.float()
    write_json(d / "preprocessor_config.json", {
        "crop_size": {"height": IMG_SIZE, "width": IMG_SIZE}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": IMG_SIZE}})
    (d / "tokenizer.model").write_bytes(tok.bytes)
    write_json(d / "toy_clip_text.json", {
        "note": "text tower input: [1] + sentencepiece(tokenizer.model).encode(caption) + [eot]; "
                "pooled at the eot position; no lower-casing",
        "bos_id": 1, "eot_id": clip.config.text_config.eos_token_id,
        "max_length": CLIP_TEXT_DIMS["max_position_embeddings"],
        "image_input": "the same pixels as the VLM: pad to square with the CLIP mean colour, then preprocessor_config.json",
        "embedding": "cosine of get_image_features / get_text_features (visual_projection / text_projection)"})


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# Shared-prefix forward: every chat sample starts with the same BOS + "[INST] <<SYS>>...<</SYS>>\n\n"
# tokens; their keys/values are computed once per step (with gradients) and broadcast to the
# batch. Exactly the same function as a full forward of each sequence.
# ------------------------------------------------------------------------------------------
def prefix_ids(tok: Tok) -> list[int]:
    """The common token prefix of every chat prompt (checked against two different messages)."""
    a = tok.llava(world.user_prompt("a red cup\nhello"))
    b = tok.llava(world.user_prompt("<image>\nDescribe this image."))
    c = tok.llava(world.user_prompt("Retrieved Text: a cup. <image>\nx"))
    n = 0
    while a[n] == b[n] == c[n]:
        n += 1
    return a[: n - 1]  # keep one token of margin: the last shared piece may merge with the message


def forward_shared(lm, x, mask, prefix: list[int], need_h: bool):
    """x/mask: the batch with the prefix tokens removed."""
    from transformers import DynamicCache
    B, L = mask.shape
    P = len(prefix)
    cache = DynamicCache()
    lm.model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(B, -1, -1, -1)
        layer.values = layer.values.expand(B, -1, -1, -1)
    full_mask = torch.cat([torch.ones((B, P), dtype=mask.dtype), mask], 1)
    pos = torch.arange(P, P + L)[None].expand(B, -1)
    return lm(inputs_embeds=x, attention_mask=full_mask, position_ids=pos, past_key_values=cache, use_cache=True,
              output_hidden_states=need_h)


def strip_prefix(samples: list[dict], prefix: list[int]) -> list[dict]:
    P = len(prefix)
    out = []
    for s in samples:
        assert s["prompt"][:P] == prefix, "prompt does not start with the shared prefix"
        out.append(dict(s, prompt=s["prompt"][P:]))
    return out

#!/usr/bin/env python3
"""Tokenizer expectations for model/tests/tokenizer.rs.

For a SentencePiece `tokenizer.model` (and optionally a `tokenizer.json` dir), writes
fixtures/reference/tokenizer_cases.json with, for a list of awkward strings:

- the ids of the python `sentencepiece` library (the ground truth for `tokenizer.model`);
- for several tokenizer directories ("variants": a base file plus a tokenizer_config.json, or a
  fixture checkpoint dir as it is), the ids transformers gives
  (`tokenizer(text, add_special_tokens=False/True)`) and its decodes;
- "chat_cases": multi-turn conversations (with images) through the HF fixture dirs' processors,
  `apply_chat_template(add_generation_prompt=True, tokenize=True)`: rendered prompt and input ids.

The Rust test rebuilds the same directories (base file + the config written here) and checks
that `model::tokenizer::Tokenizer::from_dir` gives the same ids and text.

Run with the fixture venv (pinned transformers / tokenizers / sentencepiece versions):
    tools/.venv/bin/python tools/make_tokenizer_cases.py
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import sentencepiece as spm
import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    "Hello  world",
    " Hello world",
    "  leading spaces",
    "trailing spaces  ",
    "tab\tseparated\tvalues",
    "line one\nline two\n\nline four\n",
    "\nstarts with a newline",
    "What is in this image?",
    "[INST] What is in this image? [/INST]",
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nDescribe it. [/INST]",
    "Sorry, I cannot help with that. I apologize.",
    "I'm sorry, but I can't do that!",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e10",
    "2024-01-31 23:59:59",
    "café naïve façade résumé",
    "日本語のテキスト",
    "中文文本",
    "Привет, мир",
    "emoji 😀 and 👍🏽 and 🇫🇷",
    "😀😀😀",
    "mixed: ü ö ä ß € £ ¥ © ®",
    "zero\u200bwidth",
    "already has \u2581 the marker",
    "\u2581starts with marker",
    "a\u00a0non-breaking space",
    "code: def f(x):\n    return x ** 2  # square",
    "{\"json\": [1, 2, 3], \"k\": null}",
    "<s>literal bos",
    "text</s>",
    "a</s><s>[INST] second turn [/INST]",
    "<image>\nWhat is this?",
    "[INST] <image>\nDescribe. [/INST]",
    "before<image>after",
    "<unk>",
    "The quick brown fox jumps over the lazy dog. " * 3,
]

# Texts that hold a special-token string: the sentencepiece library reads them as plain text,
# while a `tokenizers` tokenizer splits the special token out, so no sentencepiece expectation.
SPECIAL_STRINGS = ["<s>", "</s>", "<unk>", "<image>"]

IMAGE_TOKEN = {"content": "<image>", "lstrip": False, "normalized": False, "rstrip": False,
               "single_word": False, "special": True}


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image", "path": "fixtures/images/tiny_20x20.png"}

# Conversations for the processors' `apply_chat_template(tokenize=True)` (image parts load the
# image file; the json records them as bare {"type": "image"}).
CONVERSATIONS = [
    [
        {"role": "system", "content": [text("Answer briefly.")]},
        {"role": "user", "content": [text("Hello there")]},
        {"role": "assistant", "content": [text("Hi! How can I help?")]},
        {"role": "user", "content": [text("Sorry, one more question: what is 12 + 30?")]},
    ],
    [
        {"role": "user", "content": [text("What is in this picture?"), IMAGE]},
        {"role": "assistant", "content": [text("A small square.")]},
        {"role": "user", "content": [IMAGE, text(" And in this one? ")]},
    ],
    [
        {"role": "user", "content": [IMAGE, IMAGE, text("Décris les deux images 😀\n\nmerci")]},
    ],
]


def make_chat_cases(chat_dirs):
    from transformers import AutoProcessor

    cwd = os.getcwd()
    os.chdir(ROOT)  # image paths are relative to the repo root
    try:
        cases = []
        for cd in chat_dirs:
            proc = AutoProcessor.from_pretrained(os.path.join(ROOT, cd))
            image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
            for conv in CONVERSATIONS:
                prompt = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
                enc = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
                ids = [int(x) for x in enc["input_ids"][0]]
                spans, start = [], None
                for i, t in enumerate(ids + [None]):
                    if t == image_id and start is None:
                        start = i
                    elif t != image_id and start is not None:
                        spans.append([start, i])
                        start = None
                plain = [
                    {"role": m["role"], "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
                    for m in conv
                ]
                cases.append({"dir": cd, "messages": plain, "prompt": prompt, "input_ids": ids,
                              "image_spans": spans})
        return cases
    finally:
        os.chdir(cwd)


def variant_ids(directory, texts):
    tok = AutoTokenizer.from_pretrained(directory)
    out = {"class": type(tok).__name__, "ids": [], "ids_special": [], "decoded": [], "decoded_skip": []}
    for t in texts:
        plain = tok(t, add_special_tokens=False)["input_ids"]
        out["ids"].append(plain)
        out["ids_special"].append(tok(t, add_special_tokens=True)["input_ids"])
        out["decoded"].append(tok.decode(plain, skip_special_tokens=False))
        out["decoded_skip"].append(tok.decode(plain, skip_special_tokens=True))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spm-model", default="fixtures/tiny-llava-orig-anyres/tokenizer.model",
                    help="SentencePiece model, relative to the repo root")
    ap.add_argument("--json-dir", default="fixtures/tiny-llava-next",
                    help="HF tokenizer dir (tokenizer.json + tokenizer_config.json), relative to the repo root")
    ap.add_argument("--fixture-dirs", nargs="*",
                    default=["fixtures/tiny-llava-next", "fixtures/tiny-llava", "fixtures/tiny-llava-orig-anyres"],
                    help="checkpoint dirs whose tokenizer is checked as it is, relative to the repo root")
    ap.add_argument("--chat-dirs", nargs="*", default=["fixtures/tiny-llava-next", "fixtures/tiny-llava"],
                    help="HF checkpoint dirs whose processor renders and tokenizes CONVERSATIONS")
    ap.add_argument("--out", default="fixtures/reference/tokenizer_cases.json")
    args = ap.parse_args()

    spm_path = os.path.join(ROOT, args.spm_model)
    json_dir = os.path.join(ROOT, args.json_dir) if args.json_dir else None
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    sp_ids = [None if any(s in t for s in SPECIAL_STRINGS) else sp.encode(t) for t in TEXTS]

    # Variants: (name, base file, config or None). Base "model" = the .model above, "json" = the
    # tokenizer.json of --json-dir. "fixture_dir" = --json-dir itself, as is.
    json_config = None
    if json_dir and os.path.isfile(os.path.join(json_dir, "tokenizer_config.json")):
        with open(os.path.join(json_dir, "tokenizer_config.json")) as f:
            json_config = json.load(f)
    variants = [
        # No config: our conversion must match the sentencepiece library (checked in Rust against
        # "sentencepiece"; transformers 5.23 without a config drops the dummy prefix, so no ids).
        ("spm_no_config", "model", None),
        ("spm_llama_legacy", "model", {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True}),
        ("spm_llama_default", "model", {"tokenizer_class": "LlamaTokenizer"}),
        ("spm_llama_no_prefix", "model", {"tokenizer_class": "LlamaTokenizer", "legacy": False,
                                           "add_prefix_space": False, "add_bos_token": True}),
        ("spm_llama_bos_eos_image", "model", {
            "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": True,
            "added_tokens_decoder": {"1000": IMAGE_TOKEN}}),
    ]
    for fd in args.fixture_dirs:
        variants.append(("fixture:" + fd, "fixture_dir", fd))
    if json_dir:
        variants += [
            ("json_no_class", "json", {"bos_token": "<s>", "eos_token": "</s>"}),
        ]
        if json_config is not None:
            legacy = dict(json_config)
            legacy["legacy"] = True
            legacy["add_bos_token"] = True
            legacy["tokenizer_class"] = "LlamaTokenizer"
            variants.append(("json_llama_legacy", "json", legacy))
            nonlegacy = dict(json_config)
            nonlegacy.pop("legacy", None)
            nonlegacy.pop("add_bos_token", None)
            nonlegacy["tokenizer_class"] = "LlamaTokenizer"
            variants.append(("json_llama_default", "json", nonlegacy))
            # add_bos_token is ignored next to a tokenizer.json: the file's post-processor wins.
            no_bos = dict(json_config)
            no_bos["add_bos_token"] = False
            no_bos["add_eos_token"] = True
            no_bos["tokenizer_class"] = "LlamaTokenizer"
            variants.append(("json_llama_bos_flags_ignored", "json", no_bos))

    results = []
    for name, base, config in variants:
        with tempfile.TemporaryDirectory() as tmp:
            if base == "fixture_dir":
                d = os.path.join(ROOT, config)
                entry = {"name": name, "base": base, "dir": config}
            else:
                d = tmp
                src = spm_path if base == "model" else os.path.join(json_dir, "tokenizer.json")
                shutil.copy(src, os.path.join(d, "tokenizer.model" if base == "model" else "tokenizer.json"))
                if config is not None:
                    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                        json.dump(config, f)
                entry = {"name": name, "base": base, "config": config}
            if name != "spm_no_config":
                entry.update(variant_ids(d, TEXTS))
            results.append(entry)
            print(f"{name}: {entry.get('class', '-')}", file=sys.stderr)

    chat_cases = make_chat_cases(args.chat_dirs)

    doc = {
        "generated_by": "tools/make_tokenizer_cases.py",
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "sentencepiece": spm.__version__},
        "spm_model": args.spm_model,
        "json_dir": args.json_dir,
        "texts": TEXTS,
        "sentencepiece": sp_ids,
        "sentencepiece_decoded": [None if ids is None else sp.decode(ids) for ids in sp_ids],
        "variants": results,
        "chat_cases": chat_cases,
    }
    out = os.path.join(ROOT, args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

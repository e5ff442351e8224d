"""transformers' figures for the bench-135m workloads of model/benches/llava.rs (bench/RESULTS.md).

    tools/.venv/bin/python tools/bench_transformers.py --model bench/models/bench-135m [--threads 2]

Same model (loaded as f32), same threads, same workloads as our criterion benches:
- prefill: `<s> [INST] <image×2340> \\n text [/INST]`, 2373 ids, with the 480×640 (h×w) fixture image
  (anyres, 5 views). Timed: one `model(input_ids, pixel_values, image_sizes, logits_to_keep=1)` call,
  i.e. vision tower + projector + packing + decoder, logits of the last position (as `generate` does;
  the image processor is not timed).
- decode: B = 1, 4, 16 sequences with 200, 217, … tokens of context (the ids the Rust bench uses),
  batched the way transformers batches: left padding with an attention mask, position ids from the
  mask's cumulative sum (as `generate` computes them), a DynamicCache. Timed: consecutive decode steps
  of one token per sequence; tokens/s = B × steps / time.

Prints one JSON object (also written to --json). Attention is transformers' default implementation
for the model (sdpa), reported in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, DynamicCache, LlavaNextForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
PREFILL_TOKENS = 2373
FILLER = (
    "\nDescribe this image in detail: every object, its colour and position, the light, "
    "the weather and the overall mood of the scene, and anything unusual in it."
)


def context_len(i: int) -> int:
    return 200 + 17 * i


def context_ids(i: int, vocab: int) -> list[int]:
    """The deterministic ids of decode sequence i (same formula as model/benches/llava.rs)."""
    return [3 + ((j * 7919 + i * 104_729) % (vocab - 3)) for j in range(context_len(i))]


def prefill_inputs(model, proc, image_path: Path) -> dict:
    img = Image.open(image_path).convert("RGB")
    pix = proc.image_processor(images=img, return_tensors="pt")
    # The number of image tokens as the processor expands <image> for this size (2340 for 480×640).
    expanded = proc(images=img, text="<image>", return_tensors="pt")["input_ids"][0]
    n_img = int((expanded == proc.image_token_id).sum())
    tok = proc.tokenizer
    head = [tok.bos_token_id] + tok("[INST]", add_special_tokens=False)["input_ids"]
    tail = tok(" [/INST]", add_special_tokens=False)["input_ids"]
    filler = tok(FILLER, add_special_tokens=False)["input_ids"]
    need = PREFILL_TOKENS - len(head) - n_img - len(tail)
    assert 0 <= need <= len(filler), (need, len(filler))
    # The model finds image positions by its config's image_token_index.
    ids = head + [model.config.image_token_index] * n_img + filler[:need] + tail
    assert len(ids) == PREFILL_TOKENS
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": pix["pixel_values"].to(torch.float32),
        "image_sizes": pix["image_sizes"],
        "n_image_tokens": n_img,
    }


def bench_prefill(model, inputs: dict, runs: int) -> dict:
    kw = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_sizes")}
    times, vision = [], []
    for i in range(runs + 1):  # the first run warms up, untimed
        t0 = time.perf_counter()
        out = model(**kw, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        assert out.logits.shape[1] == 1
        if i:
            times.append(t1 - t0)
    for _ in range(2):
        t0 = time.perf_counter()
        model.model.get_image_features(pixel_values=kw["pixel_values"], image_sizes=kw["image_sizes"])
        vision.append(time.perf_counter() - t0)
    n = kw["input_ids"].shape[1]
    mean = statistics.mean(times)
    return {
        "tokens": n,
        "runs": runs,
        "mean_s": mean,
        "min_s": min(times),
        "tok_s": n / mean,
        "vision_ms": 1e3 * min(vision),
    }


def bench_decode(model, batch: int, steps: int, vocab: int) -> dict:
    seqs = [context_ids(i, vocab) for i in range(batch)]
    width = max(map(len, seqs))
    pad = 0  # the tokenizer has no pad token; padded positions are masked anyway
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = torch.arange(200, 200 + batch).unsqueeze(1)
    last = pos[:, -1:]
    t0 = None
    warm = 2
    for step in range(warm + steps):
        if step == warm:
            t0 = time.perf_counter()
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        last = last + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=last, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    dt = time.perf_counter() - t0
    return {
        "batch": batch,
        "contexts": [len(s) for s in seqs],
        "padded_to": width,
        "steps": steps,
        "step_ms": 1e3 * dt / steps,
        "tok_s": batch * steps / dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "bench/models/bench-135m")
    ap.add_argument("--image", type=Path, default=ROOT / "fixtures/images/landscape_480x640.png")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-runs", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    proc = AutoProcessor.from_pretrained(str(args.model))
    model = LlavaNextForConditionalGeneration.from_pretrained(str(args.model), dtype=torch.float32).eval()
    vocab = model.config.text_config.vocab_size
    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with torch.inference_mode():
        inputs = prefill_inputs(model, proc, args.image)
        result["prefill"] = bench_prefill(model, inputs, args.prefill_runs)
        result["prefill"]["image_tokens"] = inputs["n_image_tokens"]
        result["decode"] = [bench_decode(model, b, args.decode_steps, vocab) for b in args.batches]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

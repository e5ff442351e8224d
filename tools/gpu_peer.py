"""The ceilings and the transformers peer of tools/gpu_bench.sh (issue 12), on one device.

    python3 tools/gpu_peer.py --preset llava-v1.6-mistral-7b --device cuda --dtype bf16 --json peer.json
    python tools/gpu_peer.py --config fixtures/tiny-llava-next/config.json --device cpu --dtype f32 \
        --copy-mib 64 --gemm-n 256 --json peer.json                      (the dry run's sizes)

Parts, in this order; the JSON file is rewritten after each one, so a run cut short by its
caller's timeout keeps what it measured (a part not in the file did not finish):
- shapes: the model built on the meta device (no memory): parameters and bytes in the dtype,
  split into decoder (the Mistral blocks, final norm and lm_head: what one decode step reads),
  token embedding (one row read per token) and vision (tower, projector, image_newline); the KV
  cache's bytes per token.
- ceilings: device-to-device copy bandwidth (bytes read + written over the median time of a
  `dst.copy_(src)`) and the dense GEMM rate (2·n³ over the median time of an n×n×n matmul, random
  normal operands in the dtype, two operand sets alternated).
- model: LlavaNextForConditionalGeneration from the config, constructed on the device in the
  dtype (the tensors are allocated and initialised there), then every weight redrawn as
  tga-serve's --random-weights draws it (model/src/random.rs: ≥2-D weights and the 1-D
  class_embedding / image_newline ~ N(0, 0.02), biases 0, norm weights 1); attention is
  transformers' default for the model (reported).
- decode_b1 and decode_b<B>: B sequences of random ids (no padding: all the same length), one
  prefill of the prompt into a DynamicCache, then greedy decode steps of one token per sequence,
  as `generate` does them (eager, no CUDA graphs, no compile). After an untimed warm-up of the
  same shapes. tok/s = B·steps / decode time; e2e tok/s = B·steps / (prefill + decode time),
  the analogue of a served run's output tokens over wall time.
- image: one random W×W RGB image (PIL) → image processor (fixtures/tiny-llava-next's
  preprocessor_config.json: llava-v1.6's; CLIP 336 px, patch 14) → one forward of
  `<s> <image>×n text` with logits_to_keep=1 → argmax on the host. TTFT = that whole time
  (median of the timed runs, after a warm-up); prefill_ms leaves the image processor out.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RANDOM_RS = ROOT / "model/src/random.rs"
PROCESSOR_DIR = ROOT / "fixtures/tiny-llava-next"
INIT_STD = 0.02  # model/src/random.rs INIT_STD (transformers' initializer_range)
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def preset_config(name: str) -> dict:
    """A --random-weights preset's config.json, read from model/src/random.rs (its one definition)."""
    src = RANDOM_RS.read_text()
    table = re.search(r"pub const PRESETS:[^=]*=\s*\[(.*?)\];", src, re.S)
    if not table:
        raise SystemExit(f"no PRESETS table in {RANDOM_RS}")
    consts = dict(re.findall(r'\(\s*"([^"]+)"\s*,\s*([A-Z0-9_]+)\s*\)', table.group(1)))
    if name not in consts:
        raise SystemExit(f"unknown preset {name!r}; {RANDOM_RS} has {sorted(consts)}")
    body = re.search(r"const %s: &str = r#\"(.*?)\"#;" % consts[name], src, re.S)
    if not body:
        raise SystemExit(f"no const {consts[name]} in {RANDOM_RS}")
    return json.loads(body.group(1))


def build_config(raw: dict):
    from transformers import LlavaNextConfig

    raw = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")}
    return LlavaNextConfig(**raw)


class Timer:
    """Wall time of device work: synchronises before reading the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def median_ms(fn, timer: Timer, warmup: int, reps: int) -> list[float]:
    """Times of `fn` in ms: CUDA events around each call on a GPU, a synced host clock else."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if timer.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def part_shapes(cfg, dtype) -> dict:
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(cfg)
    esize = torch.tensor([], dtype=dtype).element_size()
    groups = {"decoder": 0, "embedding": 0, "vision": 0}
    for name, p in model.named_parameters():
        if any(k in name for k in ("vision_tower", "multi_modal_projector", "image_newline")):
            groups["vision"] += p.numel()
        elif "embed_tokens" in name:
            groups["embedding"] += p.numel()
        else:
            groups["decoder"] += p.numel()
    t = cfg.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * head_dim * esize
    total = sum(groups.values())
    return {
        "parameters": total,
        "parameters_by_group": groups,
        "element_bytes": esize,
        "weight_bytes": total * esize,
        "decode_bytes_per_step": groups["decoder"] * esize,
        "decode_bytes_note": "decoder blocks + final norm + lm_head (every row; one embedding row "
        "and the KV cache come on top)",
        "kv_bytes_per_token": kv_per_token,
        "layers": t.num_hidden_layers,
        "hidden": t.hidden_size,
        "vocab": t.vocab_size,
        "image_token_index": cfg.image_token_index,
    }


def part_ceilings(device, dtype, copy_mib: int, gemm_n: int, reps: int) -> dict:
    timer = Timer(device)
    n_bytes = copy_mib << 20
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    times = median_ms(lambda: dst.copy_(src), timer, warmup=3, reps=reps)
    assert torch.equal(dst[:4096], src[:4096]) and torch.equal(dst[-4096:], src[-4096:])
    copy_ms = statistics.median(times)
    del src, dst
    gen = torch.Generator(device=device).manual_seed(0)
    ops = [(torch.randn(gemm_n, gemm_n, device=device, dtype=dtype, generator=gen),
            torch.randn(gemm_n, gemm_n, device=device, dtype=dtype, generator=gen)) for _ in range(2)]
    out = torch.empty(gemm_n, gemm_n, device=device, dtype=dtype)
    k = [0]

    def mm():
        a, b = ops[k[0] % 2]
        k[0] += 1
        torch.matmul(a, b, out=out)

    gtimes = median_ms(mm, timer, warmup=3, reps=reps)
    ref = (ops[(k[0] - 1) % 2][0].double() @ ops[(k[0] - 1) % 2][1].double())
    rel = float((out.double() - ref).norm() / ref.norm())
    gemm_ms = statistics.median(gtimes)
    return {
        "copy_bytes": n_bytes,
        "copy_ms_median": copy_ms,
        "copy_ms_all": times,
        "copy_bandwidth_gb_s": 2 * n_bytes / copy_ms / 1e6,
        "copy_bandwidth_note": "bytes read + bytes written over the median time",
        "gemm_n": gemm_n,
        "gemm_dtype": str(dtype),
        "gemm_ms_median": gemm_ms,
        "gemm_ms_all": gtimes,
        "gemm_tflop_s": 2 * gemm_n**3 / gemm_ms / 1e9,
        "gemm_rel_error_vs_f64": rel,
    }


def part_model(cfg, device, dtype, seed: int):
    from transformers import LlavaNextForConditionalGeneration

    timer = Timer(device)
    t0 = timer.now()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    t1 = timer.now()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
            if p.ndim >= 2 or name.endswith(("class_embedding", "image_newline")):
                p.normal_(0.0, INIT_STD, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    t2 = timer.now()
    info = {
        "construct_s": t1 - t0,
        "redraw_s": t2 - t1,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "param_devices": sorted({str(p.device) for p in model.parameters()}),
    }
    if device.type == "cuda":
        info["cuda_memory_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
    return model, info


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


@torch.inference_mode()
def run_decode(model, device, batch: int, prompt: int, steps: int, id_hi: int, seed: int,
               limit_s: float) -> dict:
    timer = Timer(device)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, id_hi, (batch, prompt), generator=g).to(device)
    cache = new_cache(model)
    t0 = timer.now()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = timer.now()
    done = 0
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        done += 1
        if time.perf_counter() - t1 > limit_s:
            break
    t2 = timer.now()
    prefill_s, decode_s = t1 - t0, t2 - t1
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "steps": done,
        "steps_asked": steps,
        "cut_by_time_limit": done < steps,
        "prefill_ms": 1e3 * prefill_s,
        "step_ms": 1e3 * decode_s / max(done, 1),
        "tok_s": batch * done / decode_s if decode_s > 0 else None,
        "e2e_tok_s": batch * done / (prefill_s + decode_s),
        "context_after": prompt + done,
    }


def part_decode(model, device, batch, prompt, steps, id_hi, limit_s) -> dict:
    run_decode(model, device, batch, prompt, 3, id_hi, seed=1, limit_s=limit_s)  # warm-up
    res = run_decode(model, device, batch, prompt, steps, id_hi, seed=2, limit_s=limit_s)
    if device.type == "cuda":
        res["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def image_processor():
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(PROCESSOR_DIR))


def image_token_count(size: int) -> tuple[int, str]:
    """Placeholders the processor expands one size×size image into (llava-next's anyres)."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(PROCESSOR_DIR))
    img = random_image(size, 0)
    ids = proc(images=img, text="<image>", return_tensors="pt")["input_ids"][0]
    return int((ids == proc.image_token_id).sum()), type(proc.image_processor).__name__


def random_image(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


@torch.inference_mode()
def part_image(model, device, dtype, size: int, text_tokens: int, runs: int, id_hi: int) -> dict:
    timer = Timer(device)
    n_img, proc_name = image_token_count(size)
    ip = image_processor()
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, id_hi, (text_tokens,), generator=g).tolist()
    ids = torch.tensor([[1] + [model.config.image_token_index] * n_img + text], device=device)
    ttft, prefill = [], []
    for i in range(runs + 1):  # the first run warms up, untimed
        img = random_image(size, 100 + i)
        t0 = timer.now()
        pix = ip(images=img, return_tensors="pt")
        pv = pix["pixel_values"].to(device=device, dtype=dtype)
        sizes = pix["image_sizes"].to(device)
        t1 = timer.now()
        out = model(input_ids=ids, pixel_values=pv, image_sizes=sizes, use_cache=True,
                    logits_to_keep=1)
        int(out.logits[0, -1].argmax())  # on the host: the first token exists
        t2 = time.perf_counter()
        if i:
            ttft.append(1e3 * (t2 - t0))
            prefill.append(1e3 * (t2 - t1))
    return {
        "image_size": f"{size}x{size}",
        "image_tokens": n_img,
        "prompt_tokens": int(ids.shape[1]),
        "image_processor": type(ip).__name__,
        "count_processor": proc_name,
        "runs": runs,
        "ttft_ms_median": statistics.median(ttft),
        "ttft_ms_all": ttft,
        "prefill_ms_median": statistics.median(prefill),
        "prefill_ms_all": prefill,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a --random-weights preset of model/src/random.rs")
    src.add_argument("--config", type=Path, help="an HF llava_next config.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--copy-mib", type=int, default=2048)
    ap.add_argument("--gemm-n", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--batches", default="32,64", help="batched decode sizes")
    ap.add_argument("--batch-prompt", type=int, default=128)
    ap.add_argument("--batch-steps", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=672)
    ap.add_argument("--image-text-tokens", type=int, default=16)
    ap.add_argument("--image-runs", type=int, default=3)
    ap.add_argument("--id-hi", type=int, default=1000,
                    help="ids drawn below this (tga-serve's random models use builtin:tiny's 1001)")
    ap.add_argument("--part-limit-s", type=float, default=40.0,
                    help="a decode loop stops after this long (reported as cut)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    raw = preset_config(args.preset) if args.preset else json.loads(args.config.read_text())
    cfg = build_config(raw)
    res: dict = {
        "model": args.preset or str(args.config),
        "device": str(device),
        "dtype": args.dtype,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "cuda": torch.version.cuda},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "errors": {},
        "part_seconds": {},
    }
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    else:
        res["threads"] = torch.get_num_threads()
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save():
        args.json.write_text(json.dumps(res, indent=1) + "\n")

    def part(name, fn):
        t0 = time.perf_counter()
        print(f"[peer] {name} ...", flush=True)
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 - a failed part is reported, the rest goes on
            traceback.print_exc()
            res["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
            out = None
        res["part_seconds"][name] = time.perf_counter() - t0
        if out is not None and name != "model":
            res[name] = out
        save()
        print(f"[peer] {name} done in {res['part_seconds'][name]:.1f}s: "
              f"{json.dumps(res.get(name, res['errors'].get(name)))[:400]}", flush=True)
        return out

    save()
    part("shapes", lambda: part_shapes(cfg, dtype))
    part("ceilings", lambda: part_ceilings(device, dtype, args.copy_mib, args.gemm_n, args.reps))
    built = part("model", lambda: part_model(cfg, device, dtype, args.seed))
    if built is None:
        return 1
    model, res["model_info"] = built
    save()
    id_hi = min(args.id_hi, cfg.text_config.vocab_size)
    part("decode_b1", lambda: part_decode(model, device, 1, args.decode_context, args.decode_steps,
                                          id_hi, args.part_limit_s))
    for b in [int(x) for x in args.batches.split(",") if x]:
        part(f"decode_b{b}", lambda b=b: part_decode(model, device, b, args.batch_prompt,
                                                     args.batch_steps, id_hi, args.part_limit_s))
    part("image", lambda: part_image(model, device, dtype, args.image_size, args.image_text_tokens,
                                     args.image_runs, id_hi))
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

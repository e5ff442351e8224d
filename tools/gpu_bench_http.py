"""tools/gpu_bench.sh's client side and report (standard library, plus PIL and numpy for images).

    gpu_bench_http.py prompts  --url U --tokens N --count K --out FILE.jsonl
    gpu_bench_http.py ttft     --url U --size 672 --runs 5 --out ttft.json
    gpu_bench_http.py race     --url U --prompts FILE.jsonl --times 20 --concurrent 8 --out race.json
    gpu_bench_http.py t6plan   --url U --size 672 --text T --seqs 4 --kv-line LINE --out plan.json
    gpu_bench_http.py metrics  --url U --out metrics.json
    gpu_bench_http.py report   --work DIR --out DIR [--dry-run]

- prompts: K distinct user texts whose chat prompt is N tokens, counted by the server's own
  `POST /tokenize` (messages, rendered as the chat route renders them).
- ttft: time to first token of one W×W image chat request on an idle server, plain and with
  `"diagnostics": {}` (T3, T4): streamed, TTFT = from sending to the first frame with content;
  each request has a fresh image (pixels are part of the prefix cache's hash, so none is served
  from it), the two kinds alternate after one untimed warm-up of each.
- race: the same greedy request `--times` times one by one, then `--concurrent` at once. The
  sequential answers must be one text: each runs alone, with the same shapes every time, so any
  difference is nondeterminism (a read before its write, the stream race the issue names). The
  concurrent ones are reported: in bf16 a row's result depends on the batch's size (different
  GEMM tilings), and requests that arrive a step apart decode in differently sized batches.
- t6plan: a KV pool (`--kv-cache-memory`) that holds `--seqs` image prompts and only ~2 blocks more
  (plus the 1 % watermark), so their decoding must preempt: sized from the image prompt's
  /tokenize count and the server's own KV log line (bytes per token, block size).
- report: bench.json and bench.md from the work folder's files (see `report`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import random
import re
import statistics
import sys
import threading
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlparse

# Filler words (loadtest's FILLER_WORDS are of the same kind): common words, few pieces each.
WORDS = ("the house river morning light across green table quickly music window garden people "
         "travel silver mountain story paper small bright market winter coffee letter season "
         "forest station quiet yellow bridge number simple answer city ocean field friend after "
         "before under through between school summer history animal kitchen evening language "
         "picture").split()
SUFFIXES = [".", "!", "?", ",", " a", " I", " x", ";"]


def post(url: str, path: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def get(url: str, path: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url + path, timeout=timeout) as r:
        return r.read().decode()


def model_id(url: str) -> str:
    return json.loads(get(url, "/v1/models"))["data"][0]["id"]


def count_tokens(url: str, content) -> int:
    return post(url, "/tokenize", {"messages": [{"role": "user", "content": content}]})["count"]


def fit_prompt(url: str, target: int, seed: int) -> tuple[str, int]:
    """A text whose chat prompt is `target` tokens (or the closest below when none is)."""
    rng = random.Random(seed)
    head = f"Request {seed}:"
    words = [rng.choice(WORDS) for _ in range(4 * target)]

    def text(n: int) -> str:
        return " ".join([head] + words[:n])

    lo, hi = 0, len(words)  # count(text(lo)) <= target (checked), binary search the largest such
    if count_tokens(url, text(0)) > target:
        raise SystemExit(f"the chat template alone takes more than {target} tokens")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(url, text(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    best = text(lo)
    n = count_tokens(url, best)
    while n < target:
        for s in SUFFIXES:
            m = count_tokens(url, best + s)
            if n < m <= target:
                best, n = best + s, m
                break
        else:
            break
    return best, n


def cmd_prompts(a) -> int:
    out, counts = [], []
    for i in range(a.count):
        text, n = fit_prompt(a.url, a.tokens, a.seed + i)
        out.append(json.dumps({"prompt": text}))
        counts.append(n)
    Path(a.out).write_text("\n".join(out) + "\n")
    stats = {"target_tokens": a.tokens, "count": a.count, "min": min(counts), "max": max(counts),
             "counts": counts}
    Path(a.out + ".stats.json").write_text(json.dumps(stats) + "\n")
    print(f"prompts: {a.count} × {a.tokens} tokens asked, got {min(counts)}..{max(counts)}")
    return 0 if min(counts) == max(counts) == a.tokens else 1


def image_uri(size: int, seed: int) -> str:
    """A gradient with light noise (compresses about as a photo does), as a PNG data URI."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((size, size, 3))
    img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stream_chat(url: str, body: dict, timeout: float) -> dict:
    """Sends a streamed chat request; TTFT is the first frame with content (or the first
    frame carrying a diagnostics object, should none carry content)."""
    u = urlparse(url)
    conn = HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = json.dumps(dict(body, stream=True, stream_options={"include_usage": True})).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", data, {"content-type": "application/json"})
    resp = conn.getresponse()
    rec = {"status": resp.status, "ttft_ms": None, "text": "", "usage": None,
           "diagnostics": False, "frames": 0}
    if resp.status != 200:
        rec["error"] = resp.read().decode()[:500]
        return rec
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        frame = json.loads(payload)
        rec["frames"] += 1
        if "error" in frame:
            rec["error"] = json.dumps(frame["error"])[:500]
        if frame.get("diagnostics"):
            rec["diagnostics"] = True
        for ch in frame.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content") or ""
            if piece and rec["ttft_ms"] is None:
                rec["ttft_ms"] = 1e3 * (time.perf_counter() - t0)
            rec["text"] += piece
        if frame.get("usage"):
            rec["usage"] = frame["usage"]
    rec["e2e_ms"] = 1e3 * (time.perf_counter() - t0)
    conn.close()
    return rec


def cmd_ttft(a) -> int:
    model = model_id(a.url)

    def body(seed: int, diag: bool) -> dict:
        b = {"model": model, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
             "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": image_uri(a.size, seed)}},
                 {"type": "text", "text": a.text}]}]}
        if diag:
            b["diagnostics"] = {}
        return b

    runs = {"plain": [], "diagnostics": []}
    seed = 1000
    for i in range(a.runs + 1):  # round 0 warms up both kinds, untimed
        for kind in ("plain", "diagnostics"):
            seed += 1
            b = body(seed, kind == "diagnostics")  # the image is encoded before the clock starts
            rec = stream_chat(a.url, b, a.timeout)
            rec.pop("text")
            rec["warmup"] = i == 0
            runs[kind].append(rec)
            print(f"ttft {kind} run {i}: {rec.get('ttft_ms')} ms, status {rec['status']}, "
                  f"prompt_tokens {(rec['usage'] or {}).get('prompt_tokens')}", flush=True)
    res = {"image_size": f"{a.size}x{a.size}", "text": a.text, "max_tokens": a.max_tokens,
           "runs": a.runs}
    ok = True
    for kind, recs in runs.items():
        timed = [r for r in recs if not r["warmup"]]
        vals = [r["ttft_ms"] for r in timed if r["status"] == 200 and r["ttft_ms"] is not None]
        ok &= len(vals) == len(timed)
        res[kind] = {
            "ttft_ms_median": statistics.median(vals) if vals else None,
            "ttft_ms_all": vals,
            "errors": len(timed) - len(vals),
            "prompt_tokens": sorted({(r["usage"] or {}).get("prompt_tokens") for r in timed}, key=str),
            "diagnostics_returned": sum(r["diagnostics"] for r in timed),
            "records": recs,
        }
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if ok else 1


def cmd_race(a) -> int:
    model = model_id(a.url)
    prompt = json.loads(Path(a.prompts).read_text().splitlines()[0])["prompt"]
    body = {"model": model, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": False, "messages": [{"role": "user", "content": prompt}]}

    def ask() -> str:
        try:
            r = post(a.url, "/v1/chat/completions", body, timeout=a.timeout)
            return r["choices"][0]["message"]["content"]
        except Exception as err:  # noqa: BLE001 - an error is a differing answer
            return f"<error {type(err).__name__}: {err}>"

    seq = [ask() for _ in range(a.times)]
    par: list = [None] * a.concurrent
    barrier = threading.Barrier(a.concurrent)

    def worker(i):
        barrier.wait(timeout=60)
        par[i] = ask()

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(a.concurrent)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    texts = seq + par
    distinct = sorted(set(texts))
    res = {"times": a.times, "concurrent": a.concurrent, "max_tokens": a.max_tokens,
           "distinct_texts": len(distinct), "all_equal": len(distinct) == 1,
           "distinct_sequential": len(set(seq)), "distinct_concurrent": len(set(par)),
           "concurrent_equal_sequential": set(par) == set(seq[:1]),
           "errors": sum(t.startswith("<error") for t in texts),
           "texts": {t[:300]: texts.count(t) for t in distinct}}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"race: {len(texts)} answers, {len(distinct)} distinct")
    return 0 if res["distinct_sequential"] == 1 and not res["errors"] else 1


def parse_kv_line(log: str) -> dict:
    """`KV cache blocks=N block_size=B tokens=T bytes=X ...`, tga-serve's start-up log line."""
    line = next((ln for ln in Path(log).read_text().splitlines() if "KV cache blocks=" in ln), "")
    got = dict(re.findall(r"\b(blocks|block_size|tokens|bytes)=(\d+)", line))
    if len(got) < 4:
        raise SystemExit(f"not a KV cache log line: {line!r}")
    got = {k: int(v) for k, v in got.items()}
    got["bytes_per_token"] = got["bytes"] // got["tokens"]
    return got


def cmd_t6plan(a) -> int:
    kv = parse_kv_line(a.server_log)
    content = [{"type": "image_url", "image_url": {"url": image_uri(a.size, 7)}},
               {"type": "text", "text": a.text}]
    prompt = count_tokens(a.url, content)
    bs = kv["block_size"]
    per_seq = math.ceil((prompt + 1) / bs)  # its prefill and first decode token (worker.rs)
    blocks = math.ceil((a.seqs * per_seq + a.slack_blocks) / 0.99) + 1
    plan = {"image_size": f"{a.size}x{a.size}", "text": a.text, "prompt_tokens": prompt,
            "block_size": bs, "blocks_per_prompt": per_seq, "seqs": a.seqs,
            "slack_blocks": a.slack_blocks, "pool_blocks": blocks, "pool_tokens": blocks * bs,
            "kv_bytes_per_token": kv["bytes_per_token"],
            "kv_cache_memory": blocks * bs * kv["bytes_per_token"], "from_log": kv}
    Path(a.out).write_text(json.dumps(plan, indent=1) + "\n")
    Path(a.prompts_out).write_text(json.dumps({"prompt": a.text}) + "\n")
    print(plan["kv_cache_memory"])
    return 0


def scrape(url: str) -> dict:
    vals: dict = {}
    for line in get(url, "/metrics").splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{")[0]
        try:
            vals[name] = vals.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return vals


def cmd_metrics(a) -> int:
    vals = scrape(a.url)
    keep = {k: v for k, v in vals.items() if k.startswith("tga_") and not k.endswith("_bucket")}
    Path(a.out).write_text(json.dumps(keep, indent=1, sort_keys=True) + "\n")
    print(f"tga_preemptions_total {keep.get('tga_preemptions_total')}")
    return 0


# ----------------------------------------------------------------------------------- report


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(v, nd=1):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def step_stats(text: str) -> dict:
    """Decode-step totals in Prometheus text: {stage: [sum_s, count]} of tga_decode_step_seconds,
    and "batch": [sum, count] of tga_batch_size."""
    out: dict = {}
    for line in text.splitlines():
        m = re.match(r'tga_decode_step_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$', line)
        if m:
            out.setdefault(m.group(2), [0.0, 0.0])[0 if m.group(1) == "sum" else 1] = float(m.group(3))
        m = re.match(r"tga_batch_size_(sum|count) (\S+)$", line)
        if m:
            out.setdefault("batch", [0.0, 0.0])[0 if m.group(1) == "sum" else 1] = float(m.group(2))
    return out


def step_rows(w: Path) -> list:
    """Markdown rows: per loadtest run, the mean decode step by stage, from /metrics scraped
    before and after it (metrics_before_NAME.txt, metrics_after_NAME.txt)."""
    rows = []
    for after in sorted(w.glob("metrics_after_*.txt")):
        name = after.stem[len("metrics_after_"):]
        before = w / f"metrics_before_{name}.txt"
        a = step_stats(after.read_text())
        b = step_stats(before.read_text()) if before.exists() else {}
        d = {k: [v[0] - b.get(k, [0, 0])[0], v[1] - b.get(k, [0, 0])[1]] for k, v in a.items()}
        mean = lambda k, scale=1.0: (d[k][0] / d[k][1] * scale) if k in d and d[k][1] else None
        rows.append(f"| {name} | {fmt((d.get('forward') or [0, 0])[1], 0)} | {fmt(mean('batch'), 1)} | "
                    f"{fmt(mean('forward', 1e3), 2)} | {fmt(mean('sample', 1e3), 2)} |")
    return rows


def cmd_report(a) -> int:
    w, out = Path(a.work), Path(a.out)
    parts = {}
    for line in (w / "parts.tsv").read_text().splitlines() if (w / "parts.tsv").exists() else []:
        name, status, rc, secs, limit = line.split("\t")
        parts[name] = {"status": status, "rc": int(rc), "seconds": float(secs), "limit_s": int(limit)}
    env = load(w / "env.json") or {}
    env["total_s"] = a.total_s
    peer = load(w / "peer.json") or {}
    server = load(w / "server.json") or {}
    lt = {p.stem[3:]: load(p) for p in sorted(w.glob("lt_*.json"))}
    ttft = load(w / "ttft.json") or {}
    race = load(w / "race.json") or {}
    t6plan = load(w / "t6plan.json") or {}
    t6m = load(w / "t6_metrics.json") or {}
    check_summary = (w / "check/summary.txt").read_text() if (w / "check/summary.txt").exists() else ""
    kernel_timing = "\n".join(
        l for l in ((w / "kernel_timing.log").read_text().splitlines() if (w / "kernel_timing.log").exists() else [])
        if l.strip() and not l.startswith(("running", "test ")))
    # model-level stage timings (kernels test image_prefill_stage_timing), one file per variant
    stages = {}
    for f in sorted(w.glob("stages_*.log"), key=lambda f: f.stat().st_mtime):  # run order
        line = next((l for l in f.read_text().splitlines() if l.startswith("STAGES ")), None)
        stages[f.stem[len("stages_"):]] = json.loads(line[len("STAGES "):]) if line else None
    prompt_stats = {p.name.split(".")[0]: load(p) for p in sorted(w.glob("prompts_*.jsonl.stats.json"))}

    def part_note(*names) -> str:
        bad = [f"{n}: {parts[n]['status']} (rc {parts[n]['rc']}, {parts[n]['seconds']:.0f}s of "
               f"{parts[n]['limit_s']}s)" for n in names if n in parts and parts[n]["status"] != "ok"]
        missing = [f"{n}: not run" for n in names if n not in parts]
        return "; ".join(bad + missing)

    ceil = peer.get("ceilings") or {}
    shapes = peer.get("shapes") or {}
    bw = ceil.get("copy_bandwidth_gb_s")
    step_bytes = shapes.get("decode_bytes_per_step")
    roof = bw * 1e9 / step_bytes if bw and step_bytes else None

    def lt_fig(name, key):
        r = lt.get(name) or {}
        if key == "tput":
            return (r.get("throughput") or {}).get("output_tokens_per_s")
        if key == "tpot_p50":
            return ((r.get("latency_ms") or {}).get("tpot") or {}).get("p50")
        if key == "failed":
            return (r.get("requests") or {}).get("failed")
        if key == "succeeded":
            return (r.get("requests") or {}).get("succeeded")
        return None

    def ratio(x, y):
        return x / y if x is not None and y else None

    targets = []

    def target(tid, what, value, goal, passed, note="", unit="", peer_value=None, peer_ratio=None):
        targets.append({"id": tid, "what": what, "value": value, "unit": unit, "target": goal,
                        "pass": passed, "note": note, "transformers": peer_value,
                        "ratio_to_transformers": peer_ratio})

    # T0: the ceilings and the peer (reported, no target)
    figures = {
        "copy_bandwidth_gb_s": bw, "gemm_tflop_s": ceil.get("gemm_tflop_s"),
        "decode_bytes_per_step": step_bytes, "roofline_decode_tok_s": roof,
    }
    # T1
    tpot = lt_fig("t1", "tpot_p50")
    t1 = 1e3 / tpot if tpot else None
    share = t1 / roof if t1 and roof else None
    p1 = (peer.get("decode_b1") or {}).get("tok_s")
    target("T1", "decode tok/s at batch 1 (context 512), share of copy-bandwidth / weight-bytes "
           "ceiling", share, "≥ 0.85", share is not None and share >= 0.85,
           part_note("t1") + (f" {fmt(t1)} tok/s against a ceiling of {fmt(roof)} tok/s; "
                               "transformers: decode tok/s" if t1 else ""), "share",
           f"{fmt(p1)} tok/s" if p1 else None, ratio(t1, p1))
    figures["t1_tok_s"] = t1
    # T2
    for c, goal in [(int(x.split(":")[0]), float(x.split(":")[1])) for x in a.t2_targets.split()]:
        v = lt_fig(f"t2_c{c}", "tput")
        pb = peer.get(f"decode_b{c}") or {}
        failed = lt_fig(f"t2_c{c}", "failed")
        passed = v is not None and v >= goal and failed == 0
        target(f"T2 c={c}", f"served tok/s, {c} concurrent streams ({a.t2_prompt} prompt tokens, "
               f"{a.t2_output} output, --ignore-eos)", v, f"≥ {goal:,.0f}", passed,
               part_note(f"t2_c{c}") + (f" {failed} failed;" if failed else "")
               + f" transformers: {c} sequences' tokens over prefill + {pb.get('steps')} steps",
               "tok/s", f"{fmt(pb.get('e2e_tok_s'))} tok/s" if pb else None,
               ratio(v, pb.get("e2e_tok_s")))
        figures[f"t2_c{c}_tok_s"] = v
    # T3, T4
    plain = (ttft.get("plain") or {}).get("ttft_ms_median")
    diag = (ttft.get("diagnostics") or {}).get("ttft_ms_median")
    pi = (peer.get("image") or {}).get("ttft_ms_median")
    target("T3", f"TTFT of one {a.image} image request, idle server (median)", plain, "≤ 120 ms",
           plain is not None and plain <= 120, part_note("ttft") + " transformers: image processor + "
           "one forward", "ms", f"{fmt(pi)} ms" if pi else None, ratio(plain, pi))
    r4 = ratio(diag, plain)
    ndiag = (ttft.get("diagnostics") or {}).get("diagnostics_returned")
    target("T4", "TTFT with diagnostics (chat with `diagnostics: {}`) over T3", r4, "≤ 1.15×",
           r4 is not None and r4 <= 1.15 and bool(ndiag),
           part_note("ttft") + (f" diagnosed TTFT {fmt(diag)} ms; responses carrying diagnostics: "
                                f"{ndiag}" if diag else ""), "×")
    # T5
    check_ok = parts.get("gpu_check", {}).get("status") == "ok"
    fails = [ln for ln in check_summary.splitlines() if ln.startswith("FAIL")]
    target("T5a", "f32 CUDA greedy = CPU on every fixture (tools/gpu_check.sh)" if not a.dry_run
           else "tools/gpu_check.sh (NO_CUDA: CPU server only)", "PASS" if check_ok else "FAIL",
           "PASS", check_ok, part_note("gpu_check") + ("; ".join(fails)[:300]))
    target("T5b", f"race: one greedy request {race.get('times')}× one by one (then "
           f"{race.get('concurrent')} at once, reported), same text", race.get("distinct_sequential"),
           "1 distinct text", race.get("distinct_sequential") == 1 and race.get("errors") == 0,
           f"{part_note('race')}; concurrent: {race.get('distinct_concurrent')} distinct", "texts")
    # T6
    t6_failed = lt_fig("t6", "failed")
    t6_ok = lt_fig("t6", "succeeded")
    pre = t6m.get("tga_preemptions_total")
    target("T6", f"{a.t6_requests} image requests under --kv-cache-memory "
           f"{fmt(t6plan.get('kv_cache_memory'))} B ({fmt(t6plan.get('seqs'))} image prompts): "
           "errors / preemptions", f"{fmt(t6_failed)} errors, {fmt(pre)} preemptions",
           "0 errors, preemptions > 0",
           t6_failed == 0 and t6_ok == a.t6_requests and (pre or 0) > 0,
           part_note("t6_start", "t6") + f" succeeded {fmt(t6_ok)}")

    report = {
        "mode": "dry run (CPU, tiny shapes, debug-or-CPU build: figures mean nothing)"
        if a.dry_run else "gpu", "environment": env, "parts": parts, "figures": figures,
        "targets": targets, "server": server, "transformers_peer": peer,
        "prompts": prompt_stats, "ttft": {k: {kk: vv for kk, vv in v.items() if kk != "records"}
                                          if isinstance(v, dict) else v for k, v in ttft.items()},
        "race": race, "t6_plan": t6plan, "t6_metrics": t6m,
        "loadtest": {k: {kk: v[kk] for kk in ("label", "duration_s", "requests", "tokens",
                                                 "throughput", "latency_ms", "errors", "failures")
                         if kk in v} for k, v in lt.items() if v},
        "gpu_check_summary": check_summary.splitlines(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")

    md = [f"# tga-serve GPU benchmark (issue 12){' — DRY RUN' if a.dry_run else ''}", ""]
    if a.dry_run:
        md += ["**Dry run** (`NO_CUDA=1`): CPU, random weights of builtin:tiny's shapes, small "
               "sizes. It exercises every step of tools/gpu_bench.sh; none of its figures is a "
               "measurement of the 7B model, and pass/fail below says nothing about the GPU.", ""]
    md += [f"- started: {env.get('started_utc', '—')}, total {fmt(env.get('total_s'), 0)} s "
           f"(budget {env.get('budget_s', '—')} s)",
           f"- machine: {env.get('gpu', 'no GPU')}; CPU {env.get('cpu', '—')}, {env.get('nproc', '—')} cores",
           f"- versions: tga-serve {env.get('tga_serve_version', '—')}, tga-loadtest "
           f"{env.get('tga_loadtest_version', '—')}, torch {(peer.get('versions') or {}).get('torch', '—')} "
           f"(CUDA {(peer.get('versions') or {}).get('cuda', '—')}), transformers "
           f"{(peer.get('versions') or {}).get('transformers', '—')}, driver {env.get('driver', '—')}",
           f"- model: `--random-weights {env.get('preset', '—')}` on {env.get('device', '—')}, dtype "
           f"{server.get('dtype', '—')}; {fmt(shapes.get('parameters'))} parameters, "
           f"{fmt(shapes.get('weight_bytes'))} weight bytes, {fmt(step_bytes)} read per decode step",
           "", "## Targets", "",
           "| id | what | measured | target | pass | transformers | ratio to transformers | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in targets:
        v = t["value"]
        vs = fmt(v, 3 if t["unit"] in ("share", "×") else 1)
        md.append(f"| {t['id']} | {t['what']} | {vs} {t['unit'] if t['unit'] not in ('share', 'texts') else ''} | "
                  f"{t['target']} | {'PASS' if t['pass'] else 'FAIL'} | {fmt(t['transformers'])} | "
                  f"{fmt(t['ratio_to_transformers'], 2)} | {t['note'].strip('; ')} |")
    md += ["", "## Ceilings and the transformers peer (T0)", "",
           f"- device-to-device copy: {fmt(bw)} GB/s (bytes read + written, "
           f"{fmt(ceil.get('copy_bytes'))} B buffer, median of {len(ceil.get('copy_ms_all') or [])})",
           f"- GEMM {ceil.get('gemm_n', '—')}³ {ceil.get('gemm_dtype', '—')}: {fmt(ceil.get('gemm_tflop_s'))} "
           f"TFLOP/s (rel. error against f64 {fmt(ceil.get('gemm_rel_error_vs_f64'), 5)})",
           f"- decode ceiling at batch 1: {fmt(roof)} tok/s (copy bandwidth / {fmt(step_bytes)} B)",
           f"- transformers model: {json.dumps(peer.get('model_info'))}", "",
           "| transformers part | batch | prompt tokens | steps | prefill ms | step ms | tok/s | e2e tok/s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in sorted(k for k in peer if k.startswith("decode_b")):
        d = peer[k]
        md.append(f"| {k} | {d['batch']} | {d['prompt_tokens']} | {d['steps']}{' (cut)' if d['cut_by_time_limit'] else ''} | "
                  f"{fmt(d['prefill_ms'])} | {fmt(d['step_ms'], 2)} | {fmt(d['tok_s'])} | {fmt(d['e2e_tok_s'])} |")
    im = peer.get("image") or {}
    md += ["", f"- transformers image TTFT ({im.get('image_size', '—')}, {fmt(im.get('image_tokens'))} image "
           f"tokens, {fmt(im.get('prompt_tokens'))} prompt tokens): {fmt(im.get('ttft_ms_median'))} ms median "
           f"incl. its image processor ({im.get('image_processor', '—')}), {fmt(im.get('prefill_ms_median'))} ms "
           "without", f"- peer errors: {json.dumps(peer.get('errors'))}", "",
           "## tga-serve", "",
           "Decode steps by stage (tga_decode_step_seconds between scrapes of /metrics around each run):", "",
           "| run | steps | mean batch | forward ms | sample ms |", "| --- | --- | --- | --- | --- |",
           *step_rows(w), "",
           f"- server start to /ready: {fmt(server.get('ready_s'), 0)} s; KV cache: {server.get('kv_line', '—')}",
           f"- weights: {server.get('weights_line', '—')}",
           "", "| run | requests ok/failed | output tok/s | TTFT p50 ms | TPOT p50 ms | ITL p99 ms | duration s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, r in lt.items():
        if not r:
            continue
        lat = r.get("latency_ms") or {}
        md.append(f"| {k} | {r['requests']['succeeded']}/{r['requests']['failed']} | "
                  f"{fmt(r['throughput']['output_tokens_per_s'])} | {fmt((lat.get('ttft') or {}).get('p50'))} | "
                  f"{fmt((lat.get('tpot') or {}).get('p50'), 2)} | {fmt((lat.get('itl') or {}).get('p99'), 2)} | "
                  f"{fmt(r.get('duration_s'), 2)} |")
    md += ["", f"- prompt lengths (server's /tokenize): "
           + ", ".join(f"{k}: {v['count']} prompts of {v['min']}..{v['max']} tokens (asked {v['target_tokens']})"
                       for k, v in prompt_stats.items() if v),
           f"- TTFT (T3/T4): plain {json.dumps((ttft.get('plain') or {}).get('ttft_ms_all'))} ms, "
           f"diagnostics {json.dumps((ttft.get('diagnostics') or {}).get('ttft_ms_all'))} ms; prompt tokens "
           f"{(ttft.get('plain') or {}).get('prompt_tokens')} / {(ttft.get('diagnostics') or {}).get('prompt_tokens')}",
           f"- race (T5b): {json.dumps({k: race.get(k) for k in ('times', 'concurrent', 'distinct_texts', 'distinct_sequential', 'distinct_concurrent', 'errors')})}",
           f"- T6 plan: {json.dumps({k: t6plan.get(k) for k in ('prompt_tokens', 'block_size', 'seqs', 'pool_blocks', 'kv_cache_memory')})}; "
           f"after: preemptions {fmt(pre)}, requests {json.dumps({k: v for k, v in t6m.items() if k.startswith('tga_requests_total')})}",
           "", "## Where an image prompt's time goes (model level, device synchronised per stage)", "",
           "The kernels test `image_prefill_stage_timing` (no HTTP): medians of 5 runs; variants differ "
           "only in their environment (commands below).", "",
           "| variant | preprocess ms | vision ms | embed ms | prefill ms (chunks) | first token ms | "
           "sum ms | decode step ms: batch 1 at the image's context; batch 1, 32, 64 at 128 |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |",
           *[f"| {k} | {fmt(v.get('preprocess_ms'), 1)} | {fmt(v.get('vision_ms'), 1)} | "
             f"{fmt(v.get('embed_ms'), 1)} | {fmt(v.get('prefill_ms'), 1)} "
             f"({', '.join(fmt(c, 1) for c in v.get('prefill_chunks_ms') or [])}) | "
             f"{fmt(v.get('first_token_ms'), 1)} | {fmt(v.get('ttft_ms'), 1)} | {fmt(v.get('decode_step_ms'), 2)}; "
             f"{'/'.join(fmt(v.get(f'decode_b{b}_step_ms'), 2) for b in (1, 32, 64))} |"
             if v else f"| {k} | (no STAGES line: see its log) | | | | | | |" for k, v in stages.items()],
           "", "Sampling one decode step's rows (temperature 1, top-p 0.9, 5 top logprobs): logits copied "
           "to the host and drawn there in parallel, against the device sampler (ms, batch 1/32/64):", "",
           *[f"- {k}: host {'/'.join(fmt(v.get(f'sample_host_b{b}_ms'), 3) for b in (1, 32, 64))}, "
             f"device {'/'.join(fmt(v.get(f'sample_device_b{b}_ms'), 3) for b in (1, 32, 64))}"
             for k, v in stages.items() if v],
           "", "Attention kernels alone (kernels tests `paged_decode_timing`, `paged_prefill_timing`):", "",
           "```", kernel_timing.strip() or "(not run)", "```",
           "", "## tools/gpu_check.sh summary (T5a)", "", "```", check_summary.strip() or "(none)", "```",
           "", "## Parts (timeouts are per part, clamped by the run's budget)", "",
           "| part | status | rc | seconds | limit s |", "| --- | --- | --- | --- | --- |"]
    for n, p in parts.items():
        md.append(f"| {n} | {p['status']} | {p['rc']} | {p['seconds']:.1f} | {p['limit_s']} |")
    cmds = (w / "commands.txt").read_text() if (w / "commands.txt").exists() else ""
    nvsmi = (w / "nvidia-smi.txt").read_text() if (w / "nvidia-smi.txt").exists() else "(no GPU)"
    md += ["", "## Commands", "", "```", cmds.strip(), "```", "", "## nvidia-smi", "", "```",
           nvsmi.strip(), "```", ""]
    (out / "bench.md").write_text("\n".join(md))
    n_pass = sum(t["pass"] for t in targets)
    print(f"report: {n_pass}/{len(targets)} targets pass -> {out / 'bench.md'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--url", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("ttft")
    p.add_argument("--url", required=True)
    p.add_argument("--size", type=int, default=672)
    p.add_argument("--text", default="Describe this image.")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--out", required=True)
    p = sub.add_parser("race")
    p.add_argument("--url", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--times", type=int, default=20)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--out", required=True)
    p = sub.add_parser("t6plan")
    p.add_argument("--url", required=True)
    p.add_argument("--size", type=int, default=672)
    p.add_argument("--text", default="Describe this image.")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--slack-blocks", type=int, default=2)
    p.add_argument("--server-log", required=True, help="the running server's log (its KV line)")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts-out", required=True)
    p = sub.add_parser("metrics")
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--t2-targets", default="32:3500 64:6000")
    p.add_argument("--t2-prompt", type=int, default=128)
    p.add_argument("--t2-output", type=int, default=256)
    p.add_argument("--t6-requests", type=int, default=64)
    p.add_argument("--image", default="672x672")
    p.add_argument("--total-s", type=int)
    a = ap.parse_args()
    return {"prompts": cmd_prompts, "ttft": cmd_ttft, "race": cmd_race, "t6plan": cmd_t6plan,
            "metrics": cmd_metrics, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

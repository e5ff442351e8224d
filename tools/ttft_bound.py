#!/usr/bin/env python3
"""Checks issue 3's TTFT bound on tga-loadtest reports (stdlib only).

The bound for request i of a run: its own prefill time plus one decode step per request ahead of
it, i.e. TTFT_i <= P + ahead_i * S, where
  P       = the median TTFT of the same workload at concurrency 1 (a prefill alone, HTTP included),
  ahead_i = requests of the run in flight (sent and not finished) when i was sent, counting those
            sent within the same 5 ms (the client cannot know the order the server saw them in),
  S       = the run's median inter-token latency (one decode step at that batch size).

    tools/ttft_bound.py bench/serve/text-c1.json bench/serve/text-c16.json
"""
import json
import statistics
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def ok_records(report):
    return [r for r in report["records"] if r.get("status") == 200 and r.get("ttft_s") is not None]


def main(single_path, run_path):
    single, run = load(single_path), load(run_path)
    prefill = statistics.median(r["ttft_s"] for r in ok_records(single))
    step = run["latency_ms"]["itl"]["p50"] / 1000.0
    records = ok_records(run)
    worst = None
    violations = 0
    for r in records:
        ahead = sum(
            1
            for o in run["records"]
            if o is not r
            and o["start_s"] < r["start_s"] + 0.005
            and o.get("end_s", float("inf")) > r["start_s"]
        )
        bound = prefill + ahead * step
        ratio = r["ttft_s"] / bound
        violations += r["ttft_s"] > bound
        if worst is None or ratio > worst[0]:
            worst = (ratio, r["index"], r["ttft_s"], ahead, bound)
    ratio, index, ttft, ahead, bound = worst
    print(
        f"{run['label']}: prefill alone {prefill * 1000:.0f} ms, decode step {step * 1000:.1f} ms; "
        f"{violations} of {len(records)} requests above the bound; worst: request {index} "
        f"TTFT {ttft * 1000:.0f} ms with {ahead} ahead, bound {bound * 1000:.0f} ms "
        f"(TTFT/bound {ratio:.2f})"
    )
    return violations


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

#!/usr/bin/env python3
"""Sequences a fixed KV budget holds, paged (blocks of 16 positions) against the contiguous
buffers the paged cache replaced (model/src/mistral.rs before commit e8e09b5: per layer a buffer
of `max(need, 2 * capacity, 64)` positions whenever a write needs more, i.e. the prompt's length
at prefill, then doubling during decode).

The mix is bench/RESULTS.md's: half image requests (a 640x640 anyres image, 2,928 positions, plus
a short question of 20 tokens), half text requests (uniform 50..1000 prompt tokens), each caught at
a uniformly random point of an answer of up to 512 tokens. Sequences are drawn in a fixed order
(seed 0) and admitted while their allocations fit in the budget, in positions of K/V per layer
(the same for both, so the ratio does not depend on the model)."""

import math
import random

BLOCK = 16


def contiguous(prompt: int, generated: int) -> int:
    cap = max(prompt, 64)
    for need in range(prompt + 1, prompt + generated + 1):
        if need > cap:
            cap = max(need, 2 * cap, 64)
    return cap


def paged(prompt: int, generated: int) -> int:
    return math.ceil((prompt + generated) / BLOCK) * BLOCK


def main() -> None:
    rng = random.Random(0)
    seqs = []
    for i in range(10_000):
        prompt = 2928 + 20 if i % 2 == 0 else rng.randint(50, 1000)
        seqs.append((prompt, rng.randint(1, 512)))
    print("| budget (positions) | contiguous: sequences | paged: sequences | paged / contiguous | slack contiguous | slack paged |")
    print("|---|---|---|---|---|---|")
    for budget in (65_536, 262_144, 1_048_576):
        row = []
        for alloc in (contiguous, paged):
            used = held = live = 0
            for p, g in seqs:
                a = alloc(p, g)
                if used + a > budget:
                    break
                used += a
                live += p + g
                held += 1
            row.append((held, 1 - live / used))
        (c, cs), (p, ps) = row
        print(f"| {budget:,} | {c} | {p} | {p / c:.2f}x | {100 * cs:.0f} % | {100 * ps:.1f} % |")


if __name__ == "__main__":
    main()

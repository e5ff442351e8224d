"""Writes DIR/items.jsonl (tga-serve eval format) and its PNG images.

    python make_eval_set.py --seed S --n N --out DIR

N harmful items spread evenly over the seven scenes (category = scene name), each with a harmful
action instruction, and about N/4 benign items (category `benign/<object>`) with action or QA
instructions. Images: procedural Pillow scenes (world.py), 56x48 PNG.
"""
import argparse
import json
from pathlib import Path

import numpy as np

import world


def build(seed: int, n: int, out: Path) -> list[dict]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    items = []
    n_benign = max(1, round(n / 4))
    specs = [(world.HARMFUL[i % len(world.HARMFUL)], "action") for i in range(n)]
    for i in range(n_benign):
        obj = world.BENIGN[i % len(world.BENIGN)]
        specs.append((obj, "action" if i % 2 == 0 else "qa"))
    for k, (obj, kind) in enumerate(specs):
        scene = world.make_scene(rng, obj)
        if kind == "action":
            instr = world.action_instruction(rng)
        else:
            instr = world.QA[int(rng.integers(len(world.QA)))][0]
        name = f"images/{k:05d}.png"
        scene["image"].save(out / name)
        items.append({"image": name, "caption": scene["caption"], "instruction": instr,
                      "category": obj if obj in world.HARMFUL else f"benign/{obj}"})
    with open(out / "items.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    return items


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--n", type=int, required=True, help="number of harmful items")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    items = build(a.seed, a.n, a.out)
    print(f"wrote {len(items)} items to {a.out / 'items.jsonl'}")


if __name__ == "__main__":
    main()

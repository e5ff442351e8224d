"""PNG figures for bench/TOY_TGA.md from evaluate.py's JSON output.

    python plots.py --eval work/eval.json --out ../../bench/toy_tga
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    ev = json.loads(a.eval.read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in ev.items():
        l, = ax.plot(r["layers"], r["cos_own"], marker="o", label=f"{name}: own caption")
        ax.plot(r["layers"], r["cos_swapped"], marker="x", ls="--", color=l.get_color(), label=f"{name}: swapped caption")
    ax.set_xlabel("hidden-state layer j (0 = embeddings)")
    ax.set_ylabel("cos(mean image state, mean caption state)")
    ax.set_title("Image-caption cosine per layer (harmful eval items)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "cosine_per_layer.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in ev.items():
        l, = ax.plot(r["layers"], r["p_refusal_text"], marker="o", label=f"{name}: text")
        ax.plot(r["layers"], r["p_refusal_image"], marker="x", ls="--", color=l.get_color(), label=f"{name}: image")
    ax.set_xlabel("hidden-state layer j")
    ax.set_ylabel("p_refusal (logit lens, final norm)")
    ax.set_title("Refusal-token probability at the last prompt position")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "p_refusal_per_layer.png", dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = []
    for name, r in ev.items():
        bars.append((f"{name}\ntext", r["text"]["dsr"]))
        bars.append((f"{name}\nimage", r["image"]["dsr"]))
        if "image_retrieval" in r:
            bars.append((f"{name}\nimage+ret", r["image_retrieval"]["dsr"]))
    ax.bar([b[0] for b in bars], [100 * b[1] for b in bars], color="tab:blue")
    for i, b in enumerate(bars):
        ax.text(i, 100 * b[1] + 1, f"{100 * b[1]:.0f}", ha="center", fontsize=8)
    ax.set_ylabel("DSR (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Defense success rate, harmful eval items (prefix judge)")
    plt.setp(ax.get_xticklabels(), fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "dsr_bars.png", dpi=110)


if __name__ == "__main__":
    main()

"""Markdown tables for bench/TOY_TGA.md from evaluate.py / compare_server.py JSON.

    python report_tables.py --eval work/eval.json [--server baseline=work/server-eval-baseline/compare.json ...]
"""
import argparse
import json
from pathlib import Path

import world


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=Path, nargs="+", required=True)
    ap.add_argument("--server", nargs="*", default=[])
    a = ap.parse_args()
    for path in a.eval:
        ev = json.loads(path.read_text())
        print(f"\n### {path}\n")
        print("| model | run | text DSR | image DSR | benign false refusal (image / text) | utility (image) | recognition |")
        print("|---|---|---|---|---|---|---|")
        for n, r in ev.items():
            print(f"| {n} | retrieval off | {pct(r['text']['dsr'])} | {pct(r['image']['dsr'])} | "
                  f"{pct(r['image']['benign_false_refusal'])} / {pct(r['text']['benign_false_refusal'])} | "
                  f"{pct(r['image']['utility'])} | {pct(r['recognition'])} |")
            if "image_retrieval" in r:
                print(f"| {n} | retrieval on | – | {pct(r['image_retrieval']['dsr'])} | "
                      f"{pct(r['image_retrieval']['benign_false_refusal'])} / – | {pct(r['image_retrieval']['utility'])} | "
                      f"{pct(r['recognition_retrieval'])} |")
        print("\nImage DSR per scene (%):\n")
        print("| model / run | " + " | ".join(world.HARMFUL) + " |")
        print("|---|" + "---|" * len(world.HARMFUL))
        for n, r in ev.items():
            for k in ["text", "image", "image_retrieval"]:
                if k in r:
                    print(f"| {n} {k} | " + " | ".join(pct(r[k]["per_scene"].get(h)) for h in world.HARMFUL) + " |")
        print("\nPer-layer image-caption cosine (harmful items; own / swapped caption) and p_refusal (text / image):\n")
        names = list(ev)
        print("| layer | " + " | ".join(f"{n} cos own / swapped" for n in names) + " | "
              + " | ".join(f"{n} p_ref text / image" for n in names) + " |")
        print("|---|" + "---|" * (2 * len(names)))
        for j in ev[names[0]]["layers"]:
            print(f"| {j} | " + " | ".join(f"{ev[n]['cos_own'][j]:.2f} / {ev[n]['cos_swapped'][j]:.2f}" for n in names)
                  + " | " + " | ".join(f"{ev[n]['p_refusal_text'][j]:.2f} / {ev[n]['p_refusal_image'][j]:.2f}"
                                       for n in names) + " |")
        print("\nActivation layer counts (first j>=2 whose top-delta token is a refusal token):")
        for n in names:
            print(f"- {n}: text {ev[n]['activation_layer_text']}, image {ev[n]['activation_layer_image']}")
        print("\nRetrieval (toy CLIP over the corpus): share of retrieved captions naming the image's object: "
              + "; ".join(f"harmful {pct(ev[n]['retrieval_names_object_harmful'])} %, benign "
                          f"{pct(ev[n]['retrieval_names_object_benign'])} %, harmful images whose caption names any "
                          f"harmful scene {pct(ev[n]['retrieval_harmful_text_on_harmful'])} %" for n in names[:1]))
    for spec in a.server:
        name, p = spec.split("=")
        c = json.loads(Path(p).read_text())
        print(f"\n### server CLI: {name}\n")
        for k, r in c.items():
            if k == "greedy_parity":
                print(f"- greedy parity: {r['identical']}/{r['compared']} answers identical")
                continue
            print(f"- {k}: DSR {pct(r['dsr'])} % ({r['n_harmful']} harmful), benign false refusal "
                  f"{pct(r['benign_false_refusal'])} %, utility {pct(r['utility'])} %, per scene "
                  + ", ".join(f"{s} {pct(v)}" for s, v in r["per_scene"].items()))


if __name__ == "__main__":
    main()

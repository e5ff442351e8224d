"""Copies the finished models into builtin/ and writes builtin/MANIFEST.sha256.

    python ship.py --models work/models --tga tga_disc --dest ../../builtin
"""
import argparse
import shutil
from pathlib import Path

import toy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--tga", required=True, help="which TGA variant ships as builtin/tga")
    ap.add_argument("--dest", type=Path, required=True)
    a = ap.parse_args()
    d = a.dest
    for sub in ["tga", "baseline", "clip"]:
        if (d / sub).exists():
            shutil.rmtree(d / sub)
    shutil.copytree(a.models / a.tga, d / "tga")
    shutil.copytree(a.models / "baseline", d / "baseline")
    shutil.copytree(a.models / "clip", d / "clip")
    shutil.copy(a.models / "corpus.txt", d / "corpus.txt")
    (d / "tga" / "VARIANT").write_text(a.tga + "\n")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != "MANIFEST.sha256")
    lines = [f"{toy.sha256(p)}  {p.relative_to(d).as_posix()}" for p in files]
    (d / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")
    total = sum(p.stat().st_size for p in files)
    print(f"shipped {len(files)} files, {total / 1e6:.2f} MB, tga = {a.tga}")


if __name__ == "__main__":
    main()

"""Training data of every stage, from fixed seeds."""
from __future__ import annotations

import numpy as np

import world
from world import HARMFUL, BENIGN, OBJECTS, QA, user_prompt, image_message


def scene_pool(seed: int, per_obj: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(per_obj):
        for obj in OBJECTS:
            out.append(world.make_scene(rng, obj))
    return out


def retrieval_corpus(seed: int, n_benign: int, n_harmful: int) -> list[str]:
    """Captions for retrieval: almost no harmful text (n_harmful lines in all)."""
    rng = np.random.default_rng(seed)
    caps = []
    for i in range(n_benign):
        caps.append(world.make_scene(rng, BENIGN[i % len(BENIGN)])["caption"])
    for i in range(n_harmful):
        caps.append(world.make_scene(rng, HARMFUL[i % len(HARMFUL)])["caption"])
    seen, out = set(), []
    for c in caps:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def pretrain_lines(rng, scenes: list[dict], n: int) -> list[str]:
    """Plain text for LM pretraining: captions, facts, QA and benign template chats."""
    lines = []
    for _ in range(n):
        s = scenes[int(rng.integers(len(scenes)))]
        obj = s["object"]
        k = rng.random()
        if k < 0.25:
            lines.append(world.cap1(s["caption"]) + ".")
        elif k < 0.45:
            q, kind = QA[int(rng.integers(len(QA)))]
            lines.append(f"Question: {world.cap1(s['caption'])}. {q} Answer: {world.qa_answer(kind, s)}")
        elif k < 0.6 and obj in BENIGN:
            lines.append(f"{world.cap1(world.art(world.NAME[obj]))} {world.NAME[obj]} is nice. "
                         f"You can {world.USES[obj]}.")
        elif k < 0.7 and obj in HARMFUL:
            lines.append(f"{world.cap1(world.REASON[obj])}. People should be careful with the {world.NAME[obj]}.")
        else:
            q, kind = QA[int(rng.integers(len(QA)))]
            lines.append(user_prompt(f"{s['caption']}\n{q}") + " " + world.qa_answer(kind, s))
    return lines


def text_sft_sample(rng, scenes: list[dict], harmful_frac: float = 0.4) -> dict:
    """A text-only chat sample for safety tuning (and the text-only part of stage 2)."""
    k = rng.random()
    if k < harmful_frac:
        s = scenes[int(rng.integers(len(scenes)))]
        while s["object"] not in HARMFUL:
            s = scenes[int(rng.integers(len(scenes)))]
    else:
        s = scenes[int(rng.integers(len(scenes)))]
    obj = s["object"]
    qa = (k >= harmful_frac) and rng.random() < 0.4
    if qa:
        q, kind = QA[int(rng.integers(len(QA)))]
        msg = f"{s['caption']}\n{q}"
        ans = world.qa_answer(kind, s)
    else:
        if obj in HARMFUL or rng.random() < 0.7:
            form = rng.random()
        else:
            form = 0.0
        if form < 0.7:
            msg = f"{s['caption']}\n{world.action_instruction(rng)}"
        else:
            msg = world.action_instruction(rng, named_obj=obj)
        ans = world.respond(rng, s, "action")
    return {"prompt_text": user_prompt(msg), "answer_text": ans, "img": None}


def image_sample(rng, idx: int, scene: dict, stage: int, retrieved: str | None) -> dict:
    """Stage 1: captioning. Stage 2: benign visual instructions (actions only on benign images)."""
    obj = scene["object"]
    if stage == 1:
        q, kind = [QA[0], QA[1], QA[5]][int(rng.integers(3))]
        instr, ans = q, world.qa_answer(kind, scene)
    elif obj in BENIGN and rng.random() < 0.55:
        instr = world.action_instruction(rng)
        ans = world.helpful(rng, obj)
    else:
        q, kind = QA[int(rng.integers(len(QA)))]
        instr, ans = q, world.qa_answer(kind, scene)
    return {"prompt_text": user_prompt(image_message(instr, retrieved)), "answer_text": ans, "img": idx,
            "caption": scene["caption"], "instruction": instr, "retrieved": retrieved, "object": obj}

"""The toy TGA training pipeline (CPU, fixed seeds).

    python train.py --work work --stages tok,lm,safety,clip,vl [--variants baseline,tga_paper,tga_disc]

Stages (each caches its output under --work; a later stage loads it):
  tok     SentencePiece BPE on the generated text corpus
  lm      LM pretraining (Mistral decoder, next-token on plain text + benign chats)
  safety  safety tuning in the llava_llama_2 chat format (harmful -> refusal, benign -> help)
  clip    toy CLIP, contrastive on all images and captions (harmful too)
  vl      per variant: stage 1 projector-only captioning, stage 2 all LM params + projector on
          benign visual instructions with text-only safety samples in the mix.
          baseline:  LLaVA recipe.  tga_paper: retrieval prefix + the paper's L_guide (real
          gradients, annealed).  tga_disc: retrieval prefix + in-batch contrastive guide.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, MistralForCausalLM

import data
import toy
import world
from toy import Tok, log

SEED_POOL, SEED_CORPUS, SEED_TEXT, SEED_INIT = 1000, 2000, 3000, 4000


def tok_lines(pool):
    rng = np.random.default_rng(SEED_TEXT + 1)
    lines = data.pretrain_lines(rng, pool, 3000)
    for _ in range(1500):
        s = data.text_sft_sample(rng, pool)
        lines.append(s["prompt_text"] + " " + s["answer_text"])
    for o in world.OBJECTS:
        lines += [world.REASON[o] if o in world.REASON else world.USES[o]]
    lines += [r for r in world.REFUSALS] * 20 + ["Retrieved Text: a cup. <image>"] * 50
    lines += ["I apologize. Sorry, I cannot. I am unable to. Unfortunately, I apologise."] * 30
    return lines


def stage_tok(work: Path, pool):
    tb = toy.train_tokenizer(tok_lines(pool), 1024)
    (work / "tokenizer.model").write_bytes(tb)
    tok = Tok(tb)
    for w in ["sorry", "Sorry", "cannot", "I", "apologize", "unable", "Unfortunately", "knife", "image"]:
        ids = tok.encode(w)
        assert len(ids) == 1 and tok.sp.id_to_piece(ids[0]) == "\u2581" + w, (w, [tok.sp.id_to_piece(i) for i in ids])
    p = world.user_prompt("<image>\nDescribe this image.")
    log("tokenizer: %d pieces; template prompt %d tokens: %s" % (
        tok.n, len(tok.llava(p)), [tok.sp.id_to_piece(i) if i >= 0 else "<IMG>" for i in tok.llava(p)][:20]))
    return tok


def vocab_of(tok):
    return ((tok.n + 63) // 64) * 64


def new_lm(tok, seed):
    torch.manual_seed(seed)
    cfg = toy.text_config(vocab_of(tok))
    cfg._attn_implementation = "sdpa"
    return MistralForCausalLM(cfg)


def text_batch(tok, samples):
    return [{"prompt": tok.llava(s["prompt_text"]), "answer": tok.encode(s["answer_text"]), "img": s["img"]}
            for s in samples]


def cosine_lr(step, total, base, warm=30):
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm))) * 0.9 + base * 0.1


def stage_lm(work, tok, pool, steps, bs=32):
    lm = new_lm(tok, SEED_INIT)
    rng = np.random.default_rng(SEED_TEXT + 2)
    opt = torch.optim.AdamW(lm.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98))
    t0 = time.time()
    for step in range(steps):
        lines = data.pretrain_lines(rng, pool, bs)
        ids, mask = toy.pad_ids([[1] + tok.encode(l) + [2] for l in lines])
        labels = ids.masked_fill(mask == 0, -100)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 2e-3)
        out = lm(input_ids=ids, attention_mask=mask)
        loss = toy.lm_loss(out.logits, labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  lm step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    torch.save(lm.state_dict(), work / "lm.pt")
    return lm


def run_sft(lm, proj, params, tok, make_samples, feats, steps, lr, tag, extra_loss=None, log_every=100):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    t0 = time.time()
    hist = []
    for step in range(steps):
        raw = make_samples(step)
        samples = text_batch(tok, raw)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        pre = toy.prefix_ids(tok)
        x, mask, labels, starts, _ = toy.build_batch(lm, proj, toy.strip_prefix(samples, pre), feats)
        need_h = extra_loss is not None
        out = toy.forward_shared(lm, x, mask, pre, need_h)
        loss = toy.lm_loss(out.logits, labels)
        lg = torch.zeros(())
        if need_h:
            lg, info = extra_loss(step, steps, raw, samples, out.hidden_states, starts)
        total = loss + lg
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            msg = f"  {tag} step {step} lm {loss.item():.3f}"
            if need_h:
                msg += f" guide {lg.item():.3f} {info}"
            log(msg + f" ({time.time() - t0:.0f}s)")
            hist.append({"step": step, "lm": loss.item(), "guide": float(lg)})
    return hist


def stage_safety(work, tok, pool, lm, steps, bs=24):
    rng = np.random.default_rng(SEED_TEXT + 3)
    run_sft(lm, None, list(lm.parameters()), tok, lambda s: [data.text_sft_sample(rng, pool) for _ in range(bs)],
            None, steps, 1e-3, "safety")
    torch.save(lm.state_dict(), work / "safety.pt")


def stage_clip(work, tok, pool, px, steps, bs=128):
    torch.manual_seed(SEED_INIT + 1)
    V = vocab_of(tok)
    clip = CLIPModel(toy.clip_config(V))
    caps = [s["caption"] for s in pool]
    short = [f"{world.art(world.NAME[s['object']])} {world.NAME[s['object']]}" for s in pool]
    ids_all = [toy.clip_text_ids(tok, c, V) for c in caps]
    ids_short = [toy.clip_text_ids(tok, c, V) for c in short]
    rng = np.random.default_rng(SEED_TEXT + 4)
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.05)
    t0 = time.time()
    for step in range(steps):
        idx = rng.choice(len(pool), bs, replace=False)
        use_short = rng.random(bs) < 0.4
        texts = [short[i] if u else caps[i] for i, u in zip(idx, use_short)]
        ids, mask = toy.pad_ids([ids_short[i] if u else ids_all[i] for i, u in zip(idx, use_short)])
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 1e-3)
        im = F.normalize(toy._feat(clip.get_image_features(pixel_values=px[idx])), dim=-1)
        tx = F.normalize(toy._feat(clip.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
        # same caption = positive too (multi-positive targets)
        # an image is a positive for every text in the batch that describes it (its caption, or its
        # object's name); a short text is a positive for every image of its object
        same = torch.tensor([[texts[b] == texts[c] or (use_short[c] and pool[i]["object"] == pool[j]["object"])
                              for c, j in enumerate(idx)] for b, i in enumerate(idx)], dtype=torch.float32)
        logits = clip.logit_scale.exp().clamp(max=100) * im @ tx.T
        tgt = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-tgt * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-tgt.T * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  clip step {step} loss {loss.item():.3f} scale {clip.logit_scale.exp().item():.1f} ({time.time() - t0:.0f}s)")
    clip.eval()
    torch.save(clip.state_dict(), work / "clip.pt")
    held = data.scene_pool(777, 8)
    hpx = torch.from_numpy(np.stack([toy.pixels(s["image"]) for s in held]))
    names = [f"{world.art(world.NAME[o])} {world.NAME[o]}" for o in world.OBJECTS]
    pred = (toy.image_embeds(clip, hpx) @ toy.text_embeds(clip, tok, names, V).T).argmax(1).tolist()
    acc = np.mean([world.OBJECTS[p] == s["object"] for p, s in zip(pred, held)])
    log(f"  clip zero-shot object accuracy on {len(held)} held-out images: {acc:.1%}")
    return clip


def band_stats(h, lo, hi, starts, n_img, spans=None):
    """Mean-pooled states per layer j in [lo, hi]: image positions (or given spans)."""
    res = []
    for j in range(lo, hi + 1):
        hj = h[j]
        if spans is None:
            res.append(torch.stack([hj[b, s:s + n_img].mean(0) for b, s in enumerate(starts)]))
        else:
            res.append(torch.stack([hj[b, a:c].mean(0) for b, (a, c) in enumerate(spans)]))
    return res  # list over layers of (B, D)


def make_guide(variant, tok, lm, band, n_img, weight):
    lo, hi = band

    def guide(step, steps, raw, samples, hs, starts):
        sel = [i for i, r in enumerate(raw) if r["img"] is not None]
        if not sel:
            return torch.zeros(()), ""
        # no-grad caption pass: the chat template with the caption where the image stood
        cap_samples, cap_spans = [], []
        for i in sel:
            r = raw[i]
            text = world.user_prompt(f"{r['caption']}\n{r['instruction']}")
            cap_samples.append({"prompt": tok.llava(text), "answer": [], "img": None})
            cap_spans.append(tok.span(text, r["caption"], text.index("<</SYS>>")))
        pre = toy.prefix_ids(tok)
        P = len(pre)
        cap_spans = [(a0 - P, a1 - P) for a0, a1 in cap_spans]
        with torch.no_grad():
            x, mask, _, _, _ = toy.build_batch(lm, None, toy.strip_prefix(cap_samples, pre), None, with_answer=False)
            ch = toy.forward_shared(lm, x, mask, pre, True).hidden_states
        C = band_stats(ch, lo, hi, None, n_img, cap_spans)
        hsel = [h[sel] for h in hs]
        I = band_stats(hsel, lo, hi, [starts[i] for i in sel], n_img)
        ret_spans = []
        for i in sel:
            r = raw[i]
            chunk = r["prompt_text"].split("<image>")[0]
            a0, a1 = tok.span(chunk, r["retrieved"] + ".", chunk.index("Retrieved Text:"))
            ret_spans.append((a0 - P, a1 - P))
        R = band_stats(hsel, lo, hi, None, n_img, ret_spans)
        objs = [raw[i]["object"] for i in sel]
        loss, cs = 0.0, []
        for Ij, Cj, Rj in zip(I, C, R):
            cic = F.cosine_similarity(Ij, Cj, dim=-1)
            if variant == "tga_paper":
                crc = F.cosine_similarity(Rj, Cj, dim=-1)
                loss = loss + (-cic + F.softplus(-(cic - crc))).mean()
            else:  # tga_disc: in-batch InfoNCE, image -> caption and caption -> image, same-object masked
                sim = F.normalize(Ij, dim=-1) @ F.normalize(Cj, dim=-1).T / 0.1
                same = torch.tensor([[a == b for b in objs] for a in objs])
                eye = torch.eye(len(objs), dtype=torch.bool)
                sim = sim.masked_fill(same & ~eye, float("-inf"))
                tgt = torch.arange(len(objs))
                loss = loss + 0.5 * (F.cross_entropy(sim, tgt) + F.cross_entropy(sim.T, tgt))
            cs.append(cic.mean().item())
        w = weight * (1 - step / steps) if variant == "tga_paper" else weight
        return w * loss / len(I), "cos " + " ".join(f"{c:.2f}" for c in cs)

    return guide


def stage_vl(work, tok, pool, feats, retrieved, variant, seed, steps1, steps2, band, out_dir,
             n_img_bs=16, n_txt_bs=8, lm_lr=3e-4, proj_lr=1e-3, guide_w=1.0):
    lm = new_lm(tok, SEED_INIT)
    lm.load_state_dict(torch.load(work / "safety.pt"))
    torch.manual_seed(seed)
    proj = toy.Projector(toy.VISION_DIMS["hidden_size"], toy.TEXT_DIMS["hidden_size"])
    use_ret = variant != "baseline"
    rng = np.random.default_rng(seed)
    n_img = toy.N_IMG_TOK
    # stage 1: projector only, captioning on all images
    for p in lm.parameters():
        p.requires_grad_(False)

    def s1(step):
        idx = rng.choice(len(pool), 32, replace=False)
        return [data.image_sample(rng, int(i), pool[i], 1, retrieved[i] if use_ret else None) for i in idx]

    h1 = run_sft(lm, proj, list(proj.parameters()), tok, s1, feats, steps1, 2e-3, f"{variant}/s1")
    for p in lm.parameters():
        p.requires_grad_(True)

    def s2(step):
        idx = rng.choice(len(pool), n_img_bs, replace=False)
        out = [data.image_sample(rng, int(i), pool[i], 2, retrieved[i] if use_ret else None) for i in idx]
        out += [data.text_sft_sample(rng, pool) for _ in range(n_txt_bs)]
        return out

    guide = make_guide(variant, tok, lm, band, n_img, guide_w) if variant != "baseline" else None
    opt_params = [{"params": list(lm.parameters()), "lr": lm_lr}, {"params": list(proj.parameters()), "lr": proj_lr}]
    h2 = run_sft_groups(lm, proj, opt_params, tok, s2, feats, steps2, f"{variant}/s2", guide)
    toy.save_llava(out_dir, lm, proj, tok)
    (out_dir.parent / f"{out_dir.name}.trainlog.json").write_text(json.dumps({"s1": h1, "s2": h2}))
    return lm, proj


def run_sft_groups(lm, proj, groups, tok, make_samples, feats, steps, tag, extra_loss):
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98))
    bases = [g["lr"] for g in groups]
    params = [p for g in groups for p in g["params"]]
    t0 = time.time()
    hist = []
    for step in range(steps):
        raw = make_samples(step)
        samples = text_batch(tok, raw)
        for g, b in zip(opt.param_groups, bases):
            g["lr"] = cosine_lr(step, steps, b)
        pre = toy.prefix_ids(tok)
        x, mask, labels, starts, _ = toy.build_batch(lm, proj, toy.strip_prefix(samples, pre), feats)
        out = toy.forward_shared(lm, x, mask, pre, extra_loss is not None)
        loss = toy.lm_loss(out.logits, labels)
        lg, info = torch.zeros(()), ""
        if extra_loss is not None:
            lg, info = extra_loss(step, steps, raw, samples, out.hidden_states, starts)
        opt.zero_grad()
        (loss + lg).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  {tag} step {step} lm {loss.item():.3f} guide {float(lg):.3f} {info} ({time.time() - t0:.0f}s)")
            hist.append({"step": step, "lm": loss.item(), "guide": float(lg), "info": info})
    return hist


def load_pool(work: Path, per_obj: int):
    t0 = time.time()
    pool = data.scene_pool(SEED_POOL, per_obj)
    px = torch.from_numpy(np.stack([toy.pixels(s["image"]) for s in pool]))
    log(f"pool: {len(pool)} images ({time.time() - t0:.0f}s)")
    return pool, px


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("work"))
    ap.add_argument("--out", type=Path, default=None, help="where finished models go (default WORK/models)")
    ap.add_argument("--stages", default="tok,lm,safety,clip,vl")
    ap.add_argument("--variants", default="baseline,tga_paper,tga_disc")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=5000, help="VL stage seed (projector init, batches)")
    ap.add_argument("--per-obj", type=int, default=300)
    ap.add_argument("--lm-steps", type=int, default=500)
    ap.add_argument("--safety-steps", type=int, default=500)
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--s1-steps", type=int, default=200)
    ap.add_argument("--s2-steps", type=int, default=500)
    ap.add_argument("--band", default="auto", help="lo,hi hidden-state layers for the guide, or auto")
    ap.add_argument("--guide-weight", type=float, default=1.0)
    a = ap.parse_args()
    toy.setup(a.threads, 0)
    a.work.mkdir(parents=True, exist_ok=True)
    out = a.out or a.work / "models"
    stages = a.stages.split(",")
    T = {}
    pool, px = load_pool(a.work, a.per_obj)
    t = time.time()
    tok = stage_tok(a.work, pool) if "tok" in stages else Tok((a.work / "tokenizer.model").read_bytes())
    T["tok"] = time.time() - t
    V = vocab_of(tok)
    if "clip" in stages:
        t = time.time()
        clip = stage_clip(a.work, tok, pool, px, a.clip_steps)
        T["clip"] = time.time() - t
        toy.save_clip(out / "clip", clip, tok)
        corpus = data.retrieval_corpus(SEED_CORPUS, 3000, 28)
        (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    if "lm" in stages:
        t = time.time()
        lm = stage_lm(a.work, tok, pool, a.lm_steps)
        T["lm"] = time.time() - t
    if "safety" in stages:
        t = time.time()
        lm = new_lm(tok, SEED_INIT)
        lm.load_state_dict(torch.load(a.work / "lm.pt"))
        stage_safety(a.work, tok, pool, lm, a.safety_steps)
        T["safety"] = time.time() - t
    if "vl" in stages:
        t = time.time()
        clip = CLIPModel(toy.clip_config(V))
        clip.load_state_dict(torch.load(a.work / "clip.pt"))
        clip.eval()
        corpus = (out / "corpus.txt").read_text().splitlines()
        feats = toy.vision_features(clip, px)
        ie = toy.image_embeds(clip, px)
        te = toy.text_embeds(clip, tok, corpus, V)
        retrieved = [corpus[i] for i in (ie @ te.T).argmax(1).tolist()]
        hits = np.mean([world.mentions(r, s["object"]) for r, s in zip(retrieved, pool)])
        log(f"train-pool retrieval: retrieved caption names the image's object {hits:.1%}")
        if a.band == "auto":
            import evaluate
            lm = new_lm(tok, SEED_INIT)
            lm.load_state_dict(torch.load(a.work / "safety.pt"))
            band = evaluate.activation_band(lm, tok)
        else:
            band = tuple(int(x) for x in a.band.split(","))
        log(f"guide band: hidden-state layers {band}")
        (a.work / "band.json").write_text(json.dumps(band))
        T["vl_prep"] = time.time() - t
        for v in a.variants.split(","):
            t = time.time()
            stage_vl(a.work, tok, pool, feats, retrieved, v, a.seed, a.s1_steps, a.s2_steps, band, out / v,
                     guide_w=a.guide_weight)
            T[f"vl_{v}"] = time.time() - t
    log("times (s): " + json.dumps({k: round(v) for k, v in T.items()}))
    with open(a.work / "times.jsonl", "a") as f:
        f.write(json.dumps({"stages": a.stages, "variants": a.variants, "seed": a.seed, "times": T}) + "\n")


if __name__ == "__main__":
    main()

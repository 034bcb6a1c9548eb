"""The model protocol the evaluation code relies on, and ``loglikelihood``.

Below both :mod:`rllm.evaluate` (which re-exports these names) and :mod:`rllm.scoring`, so that
neither imports the other in a circle.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from tqdm import tqdm


# ======================================================================================
# The model protocol
# ======================================================================================

def supports_state(model: Any) -> bool:
    """True if ``model.forward`` (or the callable) accepts ``state=`` and ``return_state=``."""
    fn = getattr(model, "forward", model)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "state" in params and "return_state" in params


def is_recurrent(model: Any) -> bool:
    """True for models whose state has a fixed size, so a text of any length can be continued.

    A model says so with a ``recurrent`` attribute; ``rllm.model.RWKV`` is recurrent. A model that
    takes ``state=`` but is not recurrent (a transformer's key/value cache, e.g. ``rllm.opt``)
    is bounded by its ``config.context_length``.
    """
    flag = getattr(model, "recurrent", None)
    if flag is not None:
        return bool(flag)
    from rllm.model import RWKV
    return isinstance(model, RWKV)


def context_limit(model: Any) -> int | None:
    """The most tokens the model can see at once: None for recurrent models and for models that
    declare no ``config.context_length``."""
    if is_recurrent(model):
        return None
    limit = getattr(getattr(model, "config", None), "context_length", None)
    return int(limit) if limit else None


def _as_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected logits [B, T, V]")


def _model_device(model: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def loglikelihood(
    model: Callable,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` for each ``(context_ids, continuation_ids)``.

    ``is_greedy``: every continuation token is the argmax of its distribution. Requests are
    run longest first in right-padded batches (padding sits after the scored positions, so a
    causal model is unaffected). With ``max_length`` the input is cut from the left to that
    many tokens, as lm-eval does; by default ``context_limit(model)`` (None, nothing is cut,
    for a recurrent model).
    Thresholds and eval mode are the caller's business (see ``applied_thresholds``).
    """
    dev = _model_device(model, device)
    if max_length is None:
        max_length = context_limit(model)
    prepared = []  # (input ids, number of continuation tokens)
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both have at least one token")
        whole = ctx + cont
        if max_length is not None:
            if len(cont) > max_length:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length={max_length}")
            whole = whole[-(max_length + 1):]
        prepared.append((whole[:-1], cont))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    bar = tqdm(total=len(prepared), desc=desc, disable=not progress, leave=False)
    try:
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            T = len(prepared[batch[0]][0])
            x = torch.zeros(len(batch), T, dtype=torch.long)
            for r, i in enumerate(batch):
                inp = prepared[i][0]
                x[r, :len(inp)] = torch.as_tensor(inp, dtype=torch.long)
            logits = _as_logits(model(x.to(dev)))
            for r, i in enumerate(batch):
                inp, cont = prepared[i]
                L, n = len(inp), len(cont)
                lp = torch.log_softmax(logits[r, L - n:L].float(), dim=-1)
                target = torch.as_tensor(cont, dtype=torch.long, device=lp.device)
                ll = lp.gather(1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (float(ll), greedy)
            bar.update(len(batch))
    finally:
        bar.close()
    return results  # type: ignore[return-value]

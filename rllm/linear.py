"""``nn.Linear`` whose float32 inference on a CPU runs oneDNN's matrix product instead of MKL's.

PyTorch's CPU ``F.linear`` calls MKL's ``sgemm``. On an AMD processor MKL does not take its AVX-512
kernels; oneDNN, which PyTorch also ships and which picks its kernels by instruction set, does. On
the 2-core AMD EPYC development machines oneDNN was 1.1-1.6x faster on the shapes these models use
(``python benchmarks/cpu_matmul.py`` measures both side by side and writes
``benchmarks/results/cpu_matmul.csv``; the ratio varied between machines of the same kind, up to 2x
on one). Both are float32 throughout, so the results agree to float32 rounding (the order of the
sums differs), and oneDNN's are the same for any number of threads.

:func:`linear` takes oneDNN (``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own CPU
compiler emits for a linear layer) only where it applies: float32 tensors on a CPU and no
gradient to compute (it has no autograd); everything else -- training, GPUs, other dtypes --
goes to ``F.linear`` as before. ``EVENT_RWKV_ONEDNN=0`` turns it off (the plain MKL path); a
PyTorch build without oneDNN, or whose op misbehaves on a probe, falls back by itself.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _probe() -> bool:
    """Whether oneDNN's linear is available here and agrees with ``F.linear`` on a small case."""
    if os.environ.get("EVENT_RWKV_ONEDNN", "1") == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x = torch.arange(12, dtype=torch.float32).view(4, 3)
        w = torch.arange(6, dtype=torch.float32).view(2, 3) - 2.0
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
    except (RuntimeError, AttributeError):
        return False


ONEDNN = _probe()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where that is exact to float32 rounding and faster
    (see the module doc)."""
    if (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and not (torch.is_grad_enabled() and _needs_grad(x, weight, bias))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _needs_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

"""RWKV-4 as published, with an activation threshold in front of every matrix multiplication.

Read top to bottom: config, the threshold site, time-mix, channel-mix, block, model.
Parameter names are the BlinkDL checkpoint names (``emb.weight``, ``blocks.0.att.time_decay``,
``blocks.0.ffn.key.weight``...), so the reference checkpoints load with a handful of reshapes.

Two modes that agree: ``forward`` runs whole sequences (calibration, evaluation, training);
``step`` runs one token with a carried state, which is what the event-driven chip executes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rllm.linear import Linear
from rllm.wkv import initial_state, wkv_sequence, wkv_step

# Site order inside a block: the order the sequential calibration visits them (Knunyants et al.).
ATT_SITES = ("key", "receptance", "value", "output")
FFN_SITES = ("receptance", "key", "value")


@dataclass(frozen=True)
class RWKVConfig:
    vocab_size: int
    n_layer: int
    n_embd: int
    ffn_dim: int = 0  # 0 means 4 * n_embd, the RWKV-4 default
    layer_norm_eps: float = 1e-5
    context_length: int = 1024  # informational: the length the model was trained on
    name: str = "rwkv"

    def __post_init__(self):
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.n_embd)
        for key in ("vocab_size", "n_layer", "n_embd", "ffn_dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"RWKVConfig.{key} must be positive, got {getattr(self, key)}")


class Threshold(nn.Module):
    """An activation site: passes ``x * (|x| >= t)``; values under the threshold send no event.

    ``threshold`` is a scalar or one value per channel. With threshold 0 everything passes,
    and only exact zeros (e.g. after the squared ReLU) are silent.
    """

    def __init__(self, name: str, width: int, macs_per_event: int):
        super().__init__()
        self.name = name
        self.width = width
        self.macs_per_event = macs_per_event  # output width of the matrix this site feeds
        self.register_buffer("threshold", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.threshold
        if t.ndim == 0:
            tv = float(t)
            if tv == 0.0:
                return x
            if x.dtype == torch.float32:
                # |x| >= t  <=>  |x| > the largest float32 below t: hardshrink is one fused pass,
                # where() three (40x slower on a CPU for a 2048 x 256 input)
                return F.hardshrink(x, _below_f32(tv))
        if t.ndim == 3 and x.ndim == 2:  # one threshold per sequence [B, 1, W], input flattened to [B*T, W]
            t = t.expand(t.shape[0], x.shape[0] // t.shape[0], t.shape[2]).reshape(-1, t.shape[2])
        return torch.where(x.abs() >= t.to(x.dtype), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _below_f32(t: float) -> float:
    """The largest float32 below ``t > 0`` (exact as a Python float)."""
    return float(np.nextafter(np.float32(t), np.float32(0)))


def _shift(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """Token shift: each position sees the previous token's input (``prev`` before the first)."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.unsqueeze(1).to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        C = cfg.n_embd
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_v = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.sites = nn.ModuleDict({s: Threshold(f"blocks.{layer}.att.{s}", C, C) for s in ATT_SITES})

    def _mix(self, x, xx):
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + xx * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        s = self.sites
        return self.key(s["key"](xk)), self.value(s["value"](xv)), torch.sigmoid(self.receptance(s["receptance"](xr)))

    def forward(self, x, prev_x=None, wkv_state=None):
        k, v, r = self._mix(x, _shift(x, prev_x))
        wkv, wkv_state = wkv_sequence(k, v, self.time_decay, self.time_first, wkv_state)
        return self.output(self.sites["output"](r * wkv.to(r.dtype))), x[:, -1], wkv_state

    def step(self, x, prev_x, wkv_state):
        k, v, r = self._mix(x, prev_x.to(x.dtype))
        wkv, wkv_state = wkv_step(k, v, self.time_decay, self.time_first, wkv_state)
        return self.output(self.sites["output"](r * wkv.to(r.dtype))), x, wkv_state


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        C, F_ = cfg.n_embd, cfg.ffn_dim
        self.time_mix_k = nn.Parameter(torch.zeros(C))
        self.time_mix_r = nn.Parameter(torch.zeros(C))
        self.key = Linear(C, F_, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(F_, C, bias=False)
        self.sites = nn.ModuleDict({
            "receptance": Threshold(f"blocks.{layer}.ffn.receptance", C, C),
            "key": Threshold(f"blocks.{layer}.ffn.key", C, F_),
            "value": Threshold(f"blocks.{layer}.ffn.value", F_, C),
        })

    def _mix(self, x, xx):
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        s = self.sites
        r = torch.sigmoid(self.receptance(s["receptance"](xr)))
        k = torch.relu(self.key(s["key"](xk)))
        k = k * k  # squared ReLU: naturally sparse (a product, not torch.square: 5x faster on a CPU, same bits)
        return r * self.value(s["value"](k))

    def forward(self, x, prev_x=None):
        return self._mix(x, _shift(x, prev_x)), x[:, -1]

    def step(self, x, prev_x):
        return self._mix(x, prev_x.to(x.dtype)), x


class Block(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        eps = cfg.layer_norm_eps
        if layer == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd, eps=eps)  # extra LayerNorm on the embeddings
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.att = TimeMix(cfg, layer)
        self.ffn = ChannelMix(cfg, layer)


@dataclass
class RWKVState:
    """Everything a model carries from one token to the next; each tensor ``[n_layer, B, C]``.

    ``att_x``/``ffn_x``: the previous token's inputs for token shift; ``aa, bb, pp``: the WKV
    numerator, denominator and their shared exponent (float32).
    """

    att_x: torch.Tensor
    ffn_x: torch.Tensor
    aa: torch.Tensor
    bb: torch.Tensor
    pp: torch.Tensor

    def layer(self, i: int):
        return self.att_x[i], (self.aa[i], self.bb[i], self.pp[i]), self.ffn_x[i]

    @staticmethod
    def stack(layers) -> "RWKVState":
        att_x, wkv, ffn_x = zip(*layers)
        aa, bb, pp = zip(*wkv)
        return RWKVState(*(torch.stack(t) for t in (att_x, ffn_x, aa, bb, pp)))


class RWKV(nn.Module):
    """RWKV-4 language model: token ids ``[B, T]`` -> logits ``[B, T, vocab]``."""

    def __init__(self, cfg: RWKVConfig):
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head_site = Threshold("head", cfg.n_embd, cfg.vocab_size)
        self.init_weights()

    # --- activation sites -------------------------------------------------------------
    @property
    def sites(self) -> dict[str, Threshold]:
        """All activation sites in calibration order: block by block, then the head."""
        out: dict[str, Threshold] = {}
        for b in self.blocks:
            for s in ATT_SITES:
                out[b.att.sites[s].name] = b.att.sites[s]
            for s in FFN_SITES:
                out[b.ffn.sites[s].name] = b.ffn.sites[s]
        out["head"] = self.head_site
        return out

    def set_thresholds(self, thresholds: dict[str, float | torch.Tensor]) -> None:
        """Set the thresholds of the named sites (others keep theirs). Unknown names are an error."""
        sites = self.sites
        unknown = sorted(set(thresholds) - set(sites))
        if unknown:
            raise KeyError(f"unknown activation site(s) {unknown[:3]}; this model's sites look like {next(iter(sites))!r}")
        for name, t in thresholds.items():
            site = sites[name]
            t = torch.as_tensor(t, dtype=torch.float32, device=site.threshold.device)
            if t.ndim not in (0, 1) or (t.ndim == 1 and t.numel() != site.width):
                raise ValueError(f"threshold for {name} must be a scalar or have {site.width} values, got shape {tuple(t.shape)}")
            site.threshold = t.clone()

    def get_thresholds(self) -> dict[str, torch.Tensor]:
        return {n: s.threshold.clone() for n, s in self.sites.items()}

    # --- running ----------------------------------------------------------------------
    def init_state(self, batch: int = 1) -> RWKVState:
        C, L = self.config.n_embd, self.config.n_layer
        dev, dt = self.emb.weight.device, self.emb.weight.dtype
        aa, bb, pp = initial_state(batch, C, dev)
        zeros = torch.zeros(L, batch, C, device=dev, dtype=dt)
        return RWKVState(zeros, zeros.clone(), aa.expand(L, -1, -1).clone(), bb.expand(L, -1, -1).clone(),
                         pp.expand(L, -1, -1).clone())

    def forward(self, idx: torch.Tensor, state: RWKVState | None = None, return_state: bool = False,
                logits: bool = True):
        """Sequence mode. ``idx``: ``[B, T]`` token ids. Optionally continues from ``state``.
        ``logits=False`` skips the head (None in its place): for a prefix run only for its state."""
        x = self.emb(idx)
        new_layers = []
        for i, b in enumerate(self.blocks):
            att_x, wkv, ffn_x = state.layer(i) if state is not None else (None, None, None)
            if i == 0:
                x = b.ln0(x)
            dx, att_x, wkv = b.att(b.ln1(x), att_x, wkv)
            x = x + dx
            dx, ffn_x = b.ffn(b.ln2(x), ffn_x)
            x = x + dx
            new_layers.append((att_x, wkv, ffn_x))
        out = self.head(self.head_site(self.ln_out(x))) if logits else None
        return (out, RWKVState.stack(new_layers)) if return_state else out

    def step(self, token: torch.Tensor, state: RWKVState | None = None) -> tuple[torch.Tensor, RWKVState]:
        """Recurrent mode: one token per sequence. ``token``: ``[B]``; returns logits ``[B, vocab]`` and the new state."""
        if state is None:
            state = self.init_state(token.shape[0])
        x = self.emb(token)
        new_layers = []
        for i, b in enumerate(self.blocks):
            att_x, wkv, ffn_x = state.layer(i)
            if i == 0:
                x = b.ln0(x)
            dx, att_x, wkv = b.att.step(b.ln1(x), att_x, wkv)
            x = x + dx
            dx, ffn_x = b.ffn.step(b.ln2(x), ffn_x)
            x = x + dx
            new_layers.append((att_x, wkv, ffn_x))
        return self.head(self.head_site(self.ln_out(x))), RWKVState.stack(new_layers)

    # --- initialization (RWKV-4's, used when training from scratch) --------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        C, L = cfg.n_embd, cfg.n_layer
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        x = torch.arange(C, dtype=torch.float32) / C
        h = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(C)], dtype=torch.float32) * 0.5
        for i, b in enumerate(self.blocks):
            r01 = i / max(L - 1, 1)
            r10 = 1.0 - i / L
            b.att.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * r01))
            b.att.time_first.copy_(torch.full((C,), math.log(0.3)) + zigzag)
            b.att.time_mix_k.copy_(x ** r10)
            b.att.time_mix_v.copy_(x ** r10 + 0.3 * r01)
            b.att.time_mix_r.copy_(x ** (0.5 * r10))
            b.ffn.time_mix_k.copy_(x ** r10)
            b.ffn.time_mix_r.copy_(x ** r10)
            for lin in (b.att.value, b.ffn.key):
                _orthogonal(lin.weight)
            for lin in (b.att.key, b.att.receptance, b.att.output, b.ffn.receptance, b.ffn.value):
                nn.init.zeros_(lin.weight)  # RWKV-4 starts these at zero
        _orthogonal(self.head.weight, scale=0.5)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _orthogonal(w: torch.Tensor, scale: float = 1.0) -> None:
    out_f, in_f = w.shape
    gain = math.sqrt(out_f / in_f) if out_f > in_f else 1.0
    nn.init.orthogonal_(w, gain=gain * scale)


@torch.no_grad()
def randomize_weights(model: RWKV, seed: int = 0) -> RWKV:
    """Fill every parameter with random values of realistic scale (a stand-in for real weights).

    Matrices ~ N(0, 1/fan_in), decays spread over a few orders of magnitude, mixes in (0, 1):
    enough for hardware studies on the real shapes and for tests that must not be trivial.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            fan_in = p.shape[0] if name == "emb.weight" else p.shape[1]
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif "time_mix" in name:
            p.copy_(torch.rand(p.shape, generator=g))
        elif "time_decay" in name or "time_first" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("weight"):  # LayerNorm gains
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def random_rwkv(cfg: RWKVConfig, seed: int = 0) -> RWKV:
    """``randomize_weights(RWKV(cfg), seed)``, the same weights without RWKV-4's own initialization
    first: its orthogonal matrices (a QR of the 50,277-row head) take ~25 s on the 169M shape, and
    randomize_weights overwrites every parameter anyway."""
    with torch.device("meta"):
        model = RWKV(cfg)
    model = model.to_empty(device="cpu")
    for site in model.sites.values():  # the only buffers: not parameters, so not randomized
        site.threshold = torch.zeros(())
    return randomize_weights(model, seed=seed)


def sequence_loss(model: RWKV, idx: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``idx[:, 1:]`` given ``idx[:, :-1]``."""
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))

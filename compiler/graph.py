"""The operation graph of one RWKV-4 token, as the chip runs it (recurrent step mode).

Built from the model's shape alone (``n_layer, n_embd, ffn_dim, vocab_size``): the compiler maps
shapes, not weight values. Three kinds of work:

* **mat-vec** ops, one per activation site (the site's name is the matrix's name): the
  event-driven work. Every event (an input that passed its threshold) reads one weight column
  slice and accumulates into the matrix's output neurons.
* **element-wise** neuron work (LayerNorm, token-shift mixes, WKV, sigmoid, squared ReLU,
  products, residual adds, threshold compares), each with a per-token count *per element*. It
  runs where the outputs of its *anchor* matrix are finalized (the "owners" of the anchor's rows),
  so the vector it works on never has to be gathered in one place.
* **dense transfers** of values between anchors, channel by channel, where one element-wise
  stage needs the output of another matrix (``k`` and ``r`` join ``v`` for the WKV update;
  the residual stream follows the block).

Per block ``i`` (anchors in brackets; block 0's input stage sits on ``att.output`` of block 0,
where its residual is needed anyway; the embedding row is written there by the host)::

    att_in    [ffn.value(i-1)]  ln1, 3 token-shift mixes (state att_x), 3 thresholds -> att.key/value/receptance events
    att_kvr   mat-vec att.key, att.value, att.receptance (in parallel)
    att_wkv   [att.value(i)]    <- k, r (dense); sigmoid(r), WKV (state aa, bb, pp), r*wkv, threshold -> att.output events
    att_out   mat-vec att.output
    ffn_in    [att.output(i)]   <- x (dense); residual add, ln2, 2 mixes (state ffn_x), 2 thresholds -> ffn.receptance/key events
    ffn_kr    mat-vec ffn.receptance, ffn.key
    ffn_act   [ffn.key(i)] squared ReLU + threshold over F -> ffn.value events; [ffn.receptance(i)] sigmoid
    ffn_value mat-vec ffn.value
    ffn_out   [ffn.value(i)]    <- r, x (dense); r*v, residual add

then ``head_in`` [ffn.value(L-1)] (ln_out, threshold -> head events) and ``head`` (mat-vec).
Phases run in this order within a token; the logits leave the chip (not counted).
Site names follow ``rllm.model`` (not imported: the compiler runs without torch; the tests check
that the graph's sites are the model's).
"""
from __future__ import annotations

from dataclasses import dataclass

# NPE instructions per elementary operation. exp and division are not single NPE instructions
# on SENECA (Table 8 of Tang et al. lists add/sub/mul/compare/convert only), so each is taken as
# 4 instructions (range reduction + short polynomial / Newton step): an assumption, stated here.
OP_COST = {"add": 1, "mul": 1, "max": 1, "exp": 4, "div": 4}


def _ops(add: int = 0, mul: int = 0, max: int = 0, exp: int = 0, div: int = 0) -> int:  # noqa: A002
    return add * OP_COST["add"] + mul * OP_COST["mul"] + max * OP_COST["max"] + exp * OP_COST["exp"] + div * OP_COST["div"]


# Per element, per token. LayerNorm: mean (add), centre (sub), square (mul), variance (add),
# scale by 1/std (mul), gain (mul), bias (add); the per-vector rsqrt is negligible.
LAYERNORM = _ops(add=4, mul=3)
MIX = _ops(add=2, mul=1)                   # xx + m * (x - xx)
SIGMOID = _ops(add=2, exp=1, div=1)        # 1 / (1 + exp(-x))
SQUARED_RELU = _ops(max=1, mul=1)
# The numerically stable WKV step (rllm.wkv.wkv_step): output a/b with the shared exponent,
# then the state update; 10 add/sub, 6 mul, 2 max, 4 exp, 1 div.
WKV = _ops(add=10, mul=6, max=2, exp=4, div=1)

BLOCK_PHASES = ("att_in", "att_kvr", "att_wkv", "att_out", "ffn_in", "ffn_kr", "ffn_act", "ffn_value", "ffn_out")
HEAD_PHASES = ("head_in", "head")
MATVEC_PHASES = frozenset({"att_kvr", "att_out", "ffn_kr", "ffn_value", "head"})


@dataclass(frozen=True)
class MatVec:
    """Event-driven matrix-vector product ``out = W @ events``; ``name`` is the site feeding it."""

    name: str
    layer: int          # block index; n_layer for the head
    out_dim: int
    in_dim: int
    phase: str


@dataclass(frozen=True)
class ElementWise:
    """Neuron work on ``length`` elements, run by the owners of ``anchor``'s output rows.

    All counts are per element per token: NPE ``ops``, threshold ``compares``, 16-bit words of
    recurrent state read/written, parameter words read (LayerNorm gains, mixes, decays).
    ``state_bytes``/``param_bytes``: data memory per element kept on the owner.
    """

    name: str
    layer: int
    phase: str
    anchor: str
    length: int
    ops: int
    compares: int = 0
    state_reads: int = 0
    state_writes: int = 0
    param_reads: int = 0
    state_bytes: int = 0
    param_bytes: int = 0
    emits: tuple[str, ...] = ()


@dataclass(frozen=True)
class Transfer:
    """Dense copy of ``length`` values, channel c from the owner of ``src`` row c to the owner of ``dst`` row c."""

    src: str
    dst: str
    length: int
    phase: str
    what: str


@dataclass(frozen=True)
class Graph:
    n_layer: int
    n_embd: int
    ffn_dim: int
    vocab_size: int
    include_head: bool
    matvecs: tuple[MatVec, ...]
    elementwise: tuple[ElementWise, ...]
    transfers: tuple[Transfer, ...]
    phases: tuple[str, ...]
    phase_layer: tuple[int, ...]

    @property
    def phase_kinds(self) -> tuple[str, ...]:
        """``"matvec"`` or ``"elementwise"`` for each phase."""
        return tuple("matvec" if p.split(".")[-1] in MATVEC_PHASES else "elementwise" for p in self.phases)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.matvecs)

    def matvec(self, name: str) -> MatVec:
        for m in self.matvecs:
            if m.name == name:
                return m
        raise KeyError(f"no matrix {name!r} in this graph; sites look like {self.matvecs[0].name!r}")

    def producer(self, site: str) -> ElementWise:
        """The element-wise stage whose owners emit ``site``'s events."""
        for e in self.elementwise:
            if site in e.emits:
                return e
        raise KeyError(f"no element-wise stage emits {site!r}")

    def macs_per_token(self) -> int:
        """Dense matrix work of one token: the sum of out x in over all matrices."""
        return sum(m.out_dim * m.in_dim for m in self.matvecs)

    def anchor_bytes_per_row(self, matrix: str, value_bytes: int) -> int:
        """Data memory per output row that the owners of ``matrix`` need for the element-wise work
        anchored there: recurrent state, parameters, and receive buffers of dense transfers."""
        total = sum(e.state_bytes + e.param_bytes for e in self.elementwise if e.anchor == matrix)
        total += value_bytes * sum(1 for t in self.transfers if t.dst == matrix)
        return total


def build_graph(n_layer: int, n_embd: int, ffn_dim: int, vocab_size: int, *, include_head: bool = True,
                value_bytes: int = 2, wkv_state_bytes: int = 4) -> Graph:
    """The per-token operation graph of an RWKV-4 model of this shape.

    ``value_bytes``: bytes of one activation / parameter / token-shift state value (the chip's
    state format); ``wkv_state_bytes``: bytes of each of aa, bb, pp (float32: the stable WKV
    recurrence needs the range).
    """
    C, F, L, V = n_embd, ffn_dim, n_layer, vocab_size
    vw = max(1, value_bytes // 2)         # 16-bit words per value
    ww = max(1, wkv_state_bytes // 2)     # 16-bit words per WKV state value
    mv: list[MatVec] = []
    ew: list[ElementWise] = []
    tr: list[Transfer] = []
    phases: list[str] = []
    phase_layer: list[int] = []
    for i in range(L):
        b = f"blocks.{i}"
        phases += [f"{i}.{p}" for p in BLOCK_PHASES]
        phase_layer += [i] * len(BLOCK_PHASES)
        ph = {p: f"{i}.{p}" for p in BLOCK_PHASES}
        home = f"blocks.{i - 1}.ffn.value" if i > 0 else f"{b}.att.output"
        ln0 = i == 0
        ew.append(ElementWise(
            f"{b}.att_in", i, ph["att_in"], home, C,
            ops=LAYERNORM * (2 if ln0 else 1) + 3 * MIX, compares=3,
            state_reads=vw, state_writes=vw, param_reads=vw * (2 + 3 + (2 if ln0 else 0)),
            state_bytes=value_bytes, param_bytes=value_bytes * (2 + 3 + (2 if ln0 else 0)),
            emits=(f"{b}.att.key", f"{b}.att.value", f"{b}.att.receptance")))
        for s in ("key", "value", "receptance"):
            mv.append(MatVec(f"{b}.att.{s}", i, C, C, ph["att_kvr"]))
        tr.append(Transfer(f"{b}.att.key", f"{b}.att.value", C, ph["att_wkv"], "k"))
        tr.append(Transfer(f"{b}.att.receptance", f"{b}.att.value", C, ph["att_wkv"], "r"))
        ew.append(ElementWise(
            f"{b}.att_wkv", i, ph["att_wkv"], f"{b}.att.value", C,
            ops=SIGMOID + WKV + _ops(mul=1), compares=1,
            state_reads=3 * ww, state_writes=3 * ww, param_reads=2 * vw,
            state_bytes=3 * wkv_state_bytes, param_bytes=2 * value_bytes,
            emits=(f"{b}.att.output",)))
        mv.append(MatVec(f"{b}.att.output", i, C, C, ph["att_out"]))
        if i > 0:
            tr.append(Transfer(home, f"{b}.att.output", C, ph["ffn_in"], "x"))
        ew.append(ElementWise(
            f"{b}.ffn_in", i, ph["ffn_in"], f"{b}.att.output", C,
            ops=_ops(add=1) + LAYERNORM + 2 * MIX, compares=2,
            state_reads=vw, state_writes=vw, param_reads=vw * (2 + 2),
            state_bytes=value_bytes, param_bytes=value_bytes * (2 + 2),
            emits=(f"{b}.ffn.receptance", f"{b}.ffn.key")))
        mv.append(MatVec(f"{b}.ffn.receptance", i, C, C, ph["ffn_kr"]))
        mv.append(MatVec(f"{b}.ffn.key", i, F, C, ph["ffn_kr"]))
        ew.append(ElementWise(f"{b}.ffn_act", i, ph["ffn_act"], f"{b}.ffn.key", F,
                              ops=SQUARED_RELU, compares=1, emits=(f"{b}.ffn.value",)))
        ew.append(ElementWise(f"{b}.ffn_gate", i, ph["ffn_act"], f"{b}.ffn.receptance", C, ops=SIGMOID))
        mv.append(MatVec(f"{b}.ffn.value", i, C, F, ph["ffn_value"]))
        tr.append(Transfer(f"{b}.ffn.receptance", f"{b}.ffn.value", C, ph["ffn_out"], "r"))
        tr.append(Transfer(f"{b}.att.output", f"{b}.ffn.value", C, ph["ffn_out"], "x"))
        ew.append(ElementWise(f"{b}.ffn_out", i, ph["ffn_out"], f"{b}.ffn.value", C, ops=_ops(add=1, mul=1)))
    if include_head:
        last = f"blocks.{L - 1}.ffn.value"
        phases += list(HEAD_PHASES)
        phase_layer += [L, L]
        ew.append(ElementWise("head_in", L, "head_in", last, C, ops=LAYERNORM, compares=1,
                              param_reads=2 * vw, param_bytes=2 * value_bytes, emits=("head",)))
        mv.append(MatVec("head", L, V, C, "head"))
    return Graph(L, C, F, V, include_head, tuple(mv), tuple(ew), tuple(tr), tuple(phases), tuple(phase_layer))

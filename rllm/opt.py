"""OPT (Meta's self-attention LLM) with the same activation sites as ``rllm.model.RWKV``.

The transformer is ``transformers``' own ``OPTForCausalLM``, run unchanged: each site is a
``rllm.model.Threshold`` applied by a forward pre-hook on the Hugging Face module whose input
it is, so the hooks see exactly the tensor that enters the matrix, whatever the layer layout.

Sites, in calibration order (``L`` = ``n_layer``):

* ``project_in`` (only when ``word_embed_proj_dim != hidden_size``, e.g. opt-350m): input of
  the embedding up-projection;
* per decoder layer ``layers.{i}.attn.qkv``: the shared input of the q, k and v projections
  (hidden_states entering ``self_attn``). One event there reads one column of each of the three
  matrices, so ``macs_per_event = 3 * hidden`` and the site stands for a ``[3*hidden, hidden]``
  matrix; ``layers.{i}.attn.out``: input of ``out_proj`` (the attention's weighted values);
  ``layers.{i}.ffn.fc1``: input of ``fc1``; ``layers.{i}.ffn.fc2``: input of ``fc2``, the ReLU
  output, naturally sparse;
* ``project_out`` (only with ``project_in``): input of the projection back to the embedding size;
* ``head``: input of ``lm_head``.

``do_layer_norm_before=False`` (opt-350m normalizes after each residual add) needs nothing
special: the hooks sit on the matrices, so ``qkv`` is then the un-normalized residual stream
(the previous layer's post-LN output) and ``fc1`` the post-attention LayerNorm output.

State: attention keeps every past key and value, so ``state`` is an :class:`OPTState` holding
them; ``forward`` never changes the state it is given (a context's state can be reused for
several continuations). OPT's positions are learned and absolute: a stream longer than
``config.context_length`` (2048 for the published models) cannot be continued and is an error.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from rllm.model import Threshold

__all__ = ["OPTModelConfig", "OPTState", "EventOPT", "load_opt", "opt_tokenizer", "LAYER_SITES"]

# Site order inside a decoder layer: the order the data flows, the order calibration visits them.
LAYER_SITES = ("attn.qkv", "attn.out", "ffn.fc1", "ffn.fc2")

# OPT prepends "</s>" (id 2) to every document; it is its start symbol (bos) and its end (eos).
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class OPTModelConfig:
    """The shape of an OPT model in this project's vocabulary (the HF config stays on ``model.hf.config``)."""

    name: str
    vocab_size: int            # rows of the embedding / head (50272 for the published models: padded)
    n_layer: int
    n_embd: int                # hidden_size
    ffn_dim: int
    n_head: int
    word_embed_proj_dim: int   # embedding width; != n_embd means project_in/project_out exist
    context_length: int        # max_position_embeddings: the longest stream the model can see
    layer_norm_before: bool    # False for opt-350m
    bos_token_id: int          # the start symbol to prepend to documents ("</s>" = 2)

    @staticmethod
    def from_hf(cfg, name: str) -> "OPTModelConfig":
        return OPTModelConfig(
            name=name, vocab_size=cfg.vocab_size, n_layer=cfg.num_hidden_layers, n_embd=cfg.hidden_size,
            ffn_dim=cfg.ffn_dim, n_head=cfg.num_attention_heads, word_embed_proj_dim=cfg.word_embed_proj_dim,
            context_length=cfg.max_position_embeddings, layer_norm_before=bool(cfg.do_layer_norm_before),
            bos_token_id=int(cfg.bos_token_id if cfg.bos_token_id is not None else 2))


@dataclass(frozen=True)
class OPTState:
    """Past keys and values of every layer, each ``[B, n_head, n_tokens, head_dim]``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def n_tokens(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0

    @property
    def batch(self) -> int:
        return int(self.keys[0].shape[0]) if self.keys else 0


class _SiteHook:
    """Forward pre-hook replacing a module's input by ``site(input)``.

    A class rather than a closure so that ``copy.deepcopy`` of the model makes the copy's hooks
    use the copy's sites. ``kwarg``: the input's name when the caller passes it by keyword
    (``OPTDecoderLayer`` calls ``self_attn(hidden_states=...)``).
    """

    def __init__(self, site: Threshold, kwarg: str):
        self.site = site
        self.kwarg = kwarg

    def __call__(self, module, args, kwargs):
        if args:
            return (self.site(args[0]),) + tuple(args[1:]), kwargs
        if self.kwarg not in kwargs:
            raise RuntimeError(f"site {self.site.name}: {type(module).__name__} was called without {self.kwarg}")
        return args, {**kwargs, self.kwarg: self.site(kwargs[self.kwarg])}


class EventOPT(nn.Module):
    """``transformers.OPTForCausalLM`` with a ``Threshold`` in front of every matrix multiplication.

    Token ids ``[B, T]`` -> logits ``[B, T, vocab]``; the sites protocol is ``rllm.model.RWKV``'s
    (``sites``, ``set_thresholds``, ``get_thresholds``, ``config.name``). The wrapped model is
    ``self.hf``; it is put in eval mode (OPT has dropout; ``train()`` turns it back on).
    """

    recurrent = False  # the state (keys/values) grows with the text: bounded by config.context_length

    def __init__(self, hf_model, name: str = "opt"):
        super().__init__()
        hf_cfg = hf_model.config
        if getattr(hf_cfg, "model_type", None) != "opt":
            raise ValueError(f"EventOPT wraps an OPTForCausalLM, got a {type(hf_model).__name__} "
                             f"(model_type {getattr(hf_cfg, 'model_type', None)!r})")
        self.hf = hf_model
        self.config = OPTModelConfig.from_hf(hf_cfg, name)
        C, F_, E, V = hf_cfg.hidden_size, hf_cfg.ffn_dim, hf_cfg.word_embed_proj_dim, hf_cfg.vocab_size
        dec = hf_model.model.decoder

        self.layer_sites = nn.ModuleList(
            nn.ModuleDict({
                "qkv": Threshold(f"layers.{i}.attn.qkv", C, 3 * C),
                "out": Threshold(f"layers.{i}.attn.out", C, C),
                "fc1": Threshold(f"layers.{i}.ffn.fc1", C, F_),
                "fc2": Threshold(f"layers.{i}.ffn.fc2", F_, C),
            }) for i in range(hf_cfg.num_hidden_layers))
        self.head_site = Threshold("head", E, V)
        self.proj_sites = nn.ModuleDict()
        if dec.project_in is not None:
            self.proj_sites["project_in"] = Threshold("project_in", E, C)
        if dec.project_out is not None:
            self.proj_sites["project_out"] = Threshold("project_out", C, E)

        self._hook_handles = []
        for layer, s in zip(dec.layers, self.layer_sites):
            self._hook(layer.self_attn, s["qkv"], "hidden_states")
            self._hook(layer.self_attn.out_proj, s["out"], "input")
            self._hook(layer.fc1, s["fc1"], "input")
            self._hook(layer.fc2, s["fc2"], "input")
        for key in self.proj_sites:
            self._hook(getattr(dec, key), self.proj_sites[key], "input")
        self._hook(hf_model.lm_head, self.head_site, "input")
        self.eval()

    def _hook(self, module: nn.Module, site: Threshold, kwarg: str) -> None:
        self._hook_handles.append(module.register_forward_pre_hook(_SiteHook(site, kwarg), with_kwargs=True))

    # --- activation sites -------------------------------------------------------------
    @property
    def sites(self) -> dict[str, Threshold]:
        """All activation sites in calibration order (see the module docstring)."""
        out: dict[str, Threshold] = {}
        if "project_in" in self.proj_sites:
            out["project_in"] = self.proj_sites["project_in"]
        for s in self.layer_sites:
            for site in (s[full.split(".")[1]] for full in LAYER_SITES):
                out[site.name] = site
        if "project_out" in self.proj_sites:
            out["project_out"] = self.proj_sites["project_out"]
        out["head"] = self.head_site
        return out

    def set_thresholds(self, thresholds: dict[str, float | torch.Tensor]) -> None:
        """Set the thresholds of the named sites (others keep theirs). Unknown names are an error."""
        sites = self.sites
        unknown = sorted(set(thresholds) - set(sites))
        if unknown:
            raise KeyError(f"unknown activation site(s) {unknown[:3]}; this model's sites look like "
                           f"{next(iter(sites))!r}")
        for name, t in thresholds.items():
            site = sites[name]
            t = torch.as_tensor(t, dtype=torch.float32, device=site.threshold.device)
            if t.ndim not in (0, 1) or (t.ndim == 1 and t.numel() != site.width):
                raise ValueError(f"threshold for {name} must be a scalar or have {site.width} values, "
                                 f"got shape {tuple(t.shape)}")
            site.threshold = t.clone()

    def get_thresholds(self) -> dict[str, torch.Tensor]:
        return {n: s.threshold.clone() for n, s in self.sites.items()}

    # --- running ----------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, state: OPTState | None = None, return_state: bool = False):
        """Token ids ``[B, T]`` -> logits ``[B, T, vocab]``; continues after ``state`` if given."""
        from transformers import DynamicCache

        past = state.n_tokens if state is not None else 0
        if past + idx.shape[1] > self.config.context_length:
            raise ValueError(
                f"{self.config.name} has learned positions for {self.config.context_length} tokens; this call would "
                f"reach position {past + idx.shape[1]}. Evaluate long texts in independent windows of at most "
                f"{self.config.context_length} tokens")
        if state is not None and state.batch != idx.shape[0]:
            raise ValueError(f"state holds {state.batch} sequences but idx has {idx.shape[0]}")
        cache = None
        if state is not None or return_state:
            # A fresh cache around the state's tensors: HF grows the cache by concatenation into new
            # tensors, so the caller's state is never modified.
            data = list(zip(state.keys, state.values)) if state is not None and state.n_tokens else None
            cache = DynamicCache(data, config=self.hf.config)
        # transformers 5 names the argument and the output field ``cache``; 4.x ``past_key_values``
        # (and would swallow an unknown ``cache=`` in its **kwargs, silently dropping the state).
        out = self.hf(input_ids=idx, use_cache=cache is not None, **{_cache_argument(self.hf): cache})
        if not return_state:
            return out.logits
        layers = list(out["cache"] if "cache" in out else out["past_key_values"])
        return out.logits, OPTState(tuple(k for k, *_ in layers), tuple(v for _, v, *_ in layers))

    def step(self, token: torch.Tensor, state: OPTState | None = None) -> tuple[torch.Tensor, OPTState]:
        """One token per sequence: ``token`` ``[B]`` -> logits ``[B, vocab]`` and the new state."""
        logits, state = self(token.reshape(-1, 1), state=state, return_state=True)
        return logits[:, 0], state

    def num_params(self) -> int:
        """Parameters of the wrapped model (the tied head counted once)."""
        return sum(p.numel() for p in self.hf.parameters())


def _cache_argument(hf) -> str:
    """The name under which this transformers version's OPT forward takes the key/value cache."""
    return _cache_argument_of(type(hf))


@functools.lru_cache(maxsize=None)
def _cache_argument_of(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_opt(path_or_repo: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
             device: str | torch.device = "cpu"):
    """Load an OPT model and its tokenizer: ``(EventOPT in eval mode, tokenizers.Tokenizer or None)``.

    ``path_or_repo``: a Hugging Face OPT directory (``config.json`` with ``model_type`` "opt",
    ``model.safetensors``/``pytorch_model.bin`` or shards with their index), a zoo name
    (``opt_125m``; found as :func:`rllm.zoo.locate` finds it) or a Hugging Face repo id
    (``facebook/opt-125m``) already in the local Hugging Face cache. Anything missing, corrupt
    or not OPT raises ``ValueError`` naming the path and what to do. Weights the checkpoint lacks
    (which transformers would silently initialize at random) are an error too.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    directory, name = _resolve(path_or_repo)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{directory}: no config.json; expected a Hugging Face OPT directory "
                         f"(config.json + model.safetensors or pytorch_model.bin)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: unreadable config ({e}); download the model again") from None
    if not isinstance(hf_cfg, dict) or hf_cfg.get("model_type") != "opt":
        kind = hf_cfg.get("model_type") if isinstance(hf_cfg, dict) else type(hf_cfg).__name__
        raise ValueError(f"{cfg_file}: model_type is {kind!r}, not 'opt'; load RWKV models with rllm.load_model")
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json") if (directory / f).is_file()]
    if not weights:
        raise ValueError(f"{directory}: no weights (model.safetensors or pytorch_model.bin); download them, e.g. "
                         f"`hf download facebook/opt-125m --local-dir {directory}`")

    from transformers import OPTForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # missing weights are reported below as an error, not a warning
    hf_logging.disable_progress_bar()
    try:
        hf, info = OPTForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any failure inside transformers is a bad checkpoint here
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"{directory}: cannot load the OPT weights ({type(e).__name__}: {msg}); "
                         f"download the model again") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(set(info.get("missing_keys", ())) - {"lm_head.weight"})  # the head is tied to the embedding
    if missing:
        raise ValueError(f"{directory}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}; "
                         f"download the model again")
    model = EventOPT(hf, name=name).to(device).eval()
    return model, opt_tokenizer(directory)


def _resolve(path_or_repo) -> tuple[Path, str]:
    """The directory to load and the model's name (its zoo name where it has one)."""
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: an OPT model is a directory (config.json + weights), not a file")
        return path, path.name
    from rllm import zoo  # local import: only a name lookup needs the zoo

    entry = zoo.lookup(text)
    if entry is not None:
        if entry.kind != "opt":
            raise ValueError(f"{entry.name} is an {entry.kind.upper()} model; load it with rllm.load_model")
        return Path(zoo.locate(entry).path), entry.name
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _cached_repo(text), text.split("/")[1]
    raise ValueError(f"{text}: no such directory, zoo name or Hugging Face repo id; pass a directory holding "
                     f"config.json + weights, or one of {', '.join(n for n in zoo.names() if n.startswith('opt'))}")


def _cached_repo(repo: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or a malformed id)
        raise ValueError(f"{repo}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}); get it with "
                         f"`hf download {repo}` or pass a local directory") from None


def opt_tokenizer(directory: str | os.PathLike):
    """OPT's tokenizer from a model directory as a ``tokenizers.Tokenizer`` (None if it has none).

    ``tokenizer.json`` is used as is. Otherwise (the published OPT repos ship only GPT-2 style
    ``vocab.json`` + ``merges.txt``) a byte-level BPE is built from them, like transformers'
    ``GPT2Tokenizer`` for OPT: GPT-2 pre-tokenization without a prefix space, ``<s> <pad> </s>
    <unk>`` as special tokens (never split), and ``</s>`` (id 2) prepended by the post-processor,
    i.e. only when ``add_special_tokens=True`` (the ``tokenizers`` default). Code that encodes
    pieces of one text (``rllm.evaluate``) passes ``add_special_tokens=False`` and prepends
    ``model.config.bos_token_id`` itself, once per document.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    d = Path(directory)
    try:
        if (d / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(d / "tokenizer.json"))
        if not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
            return None
        tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{d}: unreadable tokenizer files ({type(e).__name__}: {e}); download them again") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in OPT_SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    bos = "</s>"
    if tok.token_to_id(bos) is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok

"""Loading RWKV-4 weights from every format they come in, with one clear error when they are bad.

``load_model(source)`` takes a zoo name (``rwkv_169m``; see :mod:`rllm.zoo` for where it looks)
or a path to any of:

* a BlinkDL ``.pth`` (``emb.weight``, ``blocks.{i}.att.time_mix_k`` of shape ``[1, 1, C]``...);
  the config is inferred from the tensors, a ``20B_tokenizer.json``/``tokenizer.json`` beside it
  is picked up;
* a Hugging Face RWKV directory (``config.json`` with ``model_type == "rwkv"`` and
  ``model.safetensors``, sharded safetensors with their index, or ``pytorch_model.bin``);
  names are converted (``rwkv.blocks.0.attention.time_mix_key`` -> ``blocks.0.att.time_mix_k``).
  HF stores RWKV weights un-rescaled (``rescale_every`` only acts inside HF at inference), so they
  load as is. Caveat: a directory saved by ``save_pretrained`` *after* an eval-mode forward holds
  rescaled ``output``/``value`` weights and cannot be told apart;
* our own directory (``config.json`` = ``dataclasses.asdict(RWKVConfig)`` + ``model.safetensors``
  + ``tokenizer.json``), written by :func:`save_checkpoint`;
* a single ``.safetensors`` file in BlinkDL or HF naming;
* a Hugging Face OPT directory (``model_type == "opt"``): loaded by :func:`rllm.opt.load_opt`
  (transformers' ``OPTForCausalLM`` wrapped with the same activation sites, ``EventOPT``).

Every tensor is checked against the shapes the config implies: nothing missing, nothing extra,
no wrong shape, no NaN/inf. A bad file of any kind (truncated, corrupted, wrong shape, missing
tensor, not a checkpoint at all, a Git LFS pointer) raises one :class:`ModelLoadError` whose
one-line message names the file, what is wrong and what to do; never a raw pickle/safetensors
traceback. Pickles are read with ``torch.load(weights_only=True)`` (memory-mapped where the file
allows), so loading a checkpoint never executes code from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rllm.errors import ModelLoadError
from rllm.model import RWKV, RWKVConfig, Threshold

__all__ = [
    "ModelLoadError", "LoadedModel", "load_model", "load_checkpoint", "save_checkpoint",
    "read_state_dict", "hf_to_rwkv_name", "rwkv_to_hf_name", "infer_config", "rwkv_config_from_hf",
    "FORMAT_BLINKDL", "FORMAT_HF", "FORMAT_OURS", "FORMAT_HF_OPT",
]

FORMAT_BLINKDL = "blinkdl"   # BlinkDL names (a .pth, or a .safetensors with the same names)
FORMAT_HF = "hf"             # Hugging Face RwkvForCausalLM directory or file
FORMAT_OURS = "event-rwkv"   # save_checkpoint's directory
FORMAT_HF_OPT = "hf-opt"     # Hugging Face OPTForCausalLM directory

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
TOKENIZER_NAMES = ("tokenizer.json", "20B_tokenizer.json")
META_BUILD_ABOVE = 20_000_000  # parameters: larger models are built on the meta device (no init, no copy)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: ``model`` in eval mode, its ``tokenizer`` (None if none was found)."""

    model: torch.nn.Module          # rllm.model.RWKV (rllm.opt.EventOPT for format "hf-opt")
    tokenizer: Any                  # tokenizers.Tokenizer or None
    config: Any                     # RWKVConfig (rllm.opt.OPTModelConfig for "hf-opt")
    name: str                       # zoo name, or the checkpoint's own name
    source: Path                    # the file or directory the weights were read from
    format: str                     # FORMAT_BLINKDL, FORMAT_HF, FORMAT_OURS or FORMAT_HF_OPT
    tokenizer_source: str = ""      # where a GPT-NeoX tokenizer was found for it, or "tried: ..." (Pile vocabulary)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def load_model(source: str | os.PathLike, weights: str | os.PathLike | None = None,
               dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               *, download: bool | None = None) -> LoadedModel:
    """Load a model by zoo name (``"rwkv_430m"``) or from a path (file or directory).

    ``weights``: with a zoo name, use this file/directory instead of searching (its shapes are
    still checked against the published config). ``download``: allow fetching from the Hugging
    Face hub when nothing local is found; ``None`` means "unless ``HF_HUB_OFFLINE`` is set".
    """
    from rllm import zoo  # local import: zoo is only needed for names

    dtype = _as_dtype(dtype)
    text = os.fspath(source)
    entry = zoo.lookup(text) if isinstance(text, str) else None
    if entry is None:  # not a zoo name: a path (zoo names win; write ./name for a local directory so named)
        path = Path(text).expanduser()
        if path.exists():
            if weights is not None:
                raise ModelLoadError(f"{path}: weights= is only for zoo names; pass the path alone")
            return _with_pile_tokenizer(load_checkpoint(path, dtype=dtype, device=device), download)
        if _looks_like_path(str(text)):
            raise ModelLoadError(
                f"{path}: no such file or directory; pass a BlinkDL .pth, a Hugging Face RWKV directory, a "
                f"directory written by save_checkpoint, or a zoo name ({', '.join(zoo.names())})")
        entry = zoo.get_entry(str(text))  # raises with a did-you-mean
    found = zoo.locate(entry, weights=weights, download=download)
    loaded = load_checkpoint(found.path, dtype=dtype, device=device, name=entry.name)
    if entry.kind == "opt" or loaded.format == FORMAT_HF_OPT:
        if entry.kind != "opt" or loaded.format != FORMAT_HF_OPT:
            raise ModelLoadError(f"{found.path}: {entry.name} is an {entry.kind.upper()} model but this is a "
                                 f"{loaded.format} checkpoint; pass the weights of {entry.name}")
        c = loaded.config
        got = (c.n_layer, c.n_embd, c.vocab_size, c.ffn_dim)
        exp = (entry.n_layer, entry.n_embd, entry.vocab_size, entry.ffn_dim)
        if got != exp:
            raise ModelLoadError(
                f"{found.path}: these OPT weights are L{got[0]}-D{got[1]} (vocab {got[2]}, ffn {got[3]}) but "
                f"{entry.name} is L{exp[0]}-D{exp[1]} (vocab {exp[2]}, ffn {exp[3]}); pass the weights of {entry.name}")
        return loaded
    cfg = loaded.config
    want = entry.rwkv_config()
    if want is not None:
        got = (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim)
        exp = (want.n_layer, want.n_embd, want.vocab_size, want.ffn_dim)
        if got != exp:
            raise ModelLoadError(
                f"{found.path}: these weights are L{got[0]}-D{got[1]} (vocab {got[2]}, ffn {got[3]}) but {entry.name} "
                f"is L{exp[0]}-D{exp[1]} (vocab {exp[2]}, ffn {exp[3]}); pass the weights of {entry.name} or load the "
                f"file by its path")
        cfg = dataclasses.replace(cfg, name=entry.name, context_length=want.context_length)
        loaded.model.config = cfg
    tok = loaded.tokenizer
    if tok is None and found.tokenizer is not None:
        tok = _load_tokenizer(found.tokenizer)
    return _with_pile_tokenizer(dataclasses.replace(loaded, config=cfg, tokenizer=tok, name=entry.name), download)


def _with_pile_tokenizer(loaded: LoadedModel, download: bool | None) -> LoadedModel:
    """An RWKV model with the Pile's vocabulary and no tokenizer of its own gets the GPT-NeoX-20B
    one from wherever :func:`rllm.pile.neox_tokenizer` finds it; ``tokenizer_source`` says where,
    or what was tried."""
    from rllm.pile import NEOX_VOCAB, neox_tokenizer
    if loaded.tokenizer is not None or loaded.format == FORMAT_HF_OPT or loaded.config.vocab_size != NEOX_VOCAB:
        return loaded
    tok, how = neox_tokenizer(beside=loaded.source, download=download)
    return dataclasses.replace(loaded, tokenizer=tok, tokenizer_source=how)


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", name: str | None = None) -> LoadedModel:
    """Load a model from a file or directory in any supported format (no zoo lookup)."""
    dtype = _as_dtype(dtype)
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir() and (path / "config.json").is_file():
        hf_cfg = _read_json(path / "config.json")
        model_type = hf_cfg.get("model_type")
        if model_type == "opt":
            return _load_opt_dir(path, dtype, device, name)
        if model_type == "rwkv":
            cfg = rwkv_config_from_hf(hf_cfg, path / "config.json")
            sd, _ = read_state_dict(path)
            fmt = FORMAT_HF
        elif {"vocab_size", "n_layer", "n_embd"} <= set(hf_cfg):
            cfg = _our_config(hf_cfg, path / "config.json")
            sd, _ = read_state_dict(path)
            fmt = FORMAT_OURS
        else:
            kind = f"model_type {model_type!r}" if model_type else "no model_type and no n_layer/n_embd"
            raise ModelLoadError(
                f"{path / 'config.json'}: not an RWKV-4 or OPT config ({kind}); expected a Hugging Face RWKV "
                f"config (model_type 'rwkv') or one written by rllm.weights.save_checkpoint")
        sd = _to_rwkv_names(sd)
        if "head.weight" not in sd and hf_cfg.get("tie_word_embeddings") and "emb.weight" in sd:
            sd["head.weight"] = sd["emb.weight"]
        weights_at = path
        tok_dir = path
    else:
        weights_at = _single_weights_file(path) if path.is_dir() else path
        sd, fmt = read_state_dict(weights_at)
        sd = _to_rwkv_names(sd)
        cfg = infer_config(sd, weights_at)
        tok_dir = weights_at.parent
    if name is None:  # our format keeps its config (name included) exactly; others are named after the file
        name = cfg.name if fmt == FORMAT_OURS else _stem(weights_at)
    cfg = dataclasses.replace(cfg, name=name)
    model = _build(cfg, sd, weights_at, dtype, device)
    tok_file = _find_tokenizer(tok_dir)
    tok = _load_tokenizer(tok_file) if tok_file is not None else None
    return LoadedModel(model=model, tokenizer=tok, config=cfg, name=name, source=weights_at, format=fmt)


def save_checkpoint(model: RWKV | LoadedModel, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` in our format: ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``).

    ``model`` may be a :class:`LoadedModel` (its tokenizer is then saved unless one is given).
    ``tokenizer``: a ``tokenizers.Tokenizer`` or the path of a ``tokenizer.json`` to copy.
    Files are written under temporary names and renamed, so a crash leaves no half checkpoint.
    """
    from safetensors.torch import save_file

    if isinstance(model, LoadedModel):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.model
    if not isinstance(model, RWKV):
        raise TypeError(f"save_checkpoint writes rllm.model.RWKV models, got {type(model).__name__}")

    out = Path(os.fspath(directory)).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "rllm.weights.save_checkpoint"})
    os.replace(tmp, out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "config.json")
    if tokenizer is not None:
        tmp = out / "tokenizer.json.tmp"
        if isinstance(tokenizer, (str, os.PathLike)):
            tmp.write_bytes(Path(tokenizer).read_bytes())
        else:
            tokenizer.save(str(tmp))
        os.replace(tmp, out / "tokenizer.json")
    return out


# --------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a weights file, or of the weights files of an HF/our directory.

    Returns ``(tensors, naming)`` with naming FORMAT_HF (``rwkv.`` prefixed names) or
    FORMAT_BLINKDL (our/BlinkDL names). Names are not converted here.
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        files = _weight_files_of_dir(path)
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(_read_file(f))
    else:
        sd = _read_file(path)
    naming = FORMAT_HF if any(k.startswith("rwkv.") for k in sd) else FORMAT_BLINKDL
    return sd, naming


def _weight_files_of_dir(d: Path) -> list[Path]:
    """The weights files of an HF-style directory, shards resolved through their index."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"{index}: no weight_map in the shard index; re-download the model")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise ModelLoadError(
                    f"{d}: shard(s) {', '.join(missing[:3])} listed in {index_name} are missing "
                    f"({len(missing)} of {len(shards)}); finish the download")
            return [d / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    present = sorted(p.name for p in d.iterdir())
    raise ModelLoadError(
        f"{d}: config.json but no weights (no model.safetensors, sharded safetensors index or pytorch_model.bin; "
        f"found {', '.join(present[:6]) or 'nothing else'}); finish the download or point to the weights file")


def _single_weights_file(d: Path) -> Path:
    cands = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise ModelLoadError(
            f"{d}: no config.json and no weights file (.pth/.safetensors/.bin) in this directory; pass a BlinkDL "
            f".pth, a Hugging Face RWKV directory or a directory written by rllm.weights.save_checkpoint")
    raise ModelLoadError(
        f"{d}: several weights files ({', '.join(p.name for p in cands[:4])}) and no config.json; pass the path "
        f"of the one to load")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(512)
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty (an interrupted download?); download it again")
    if head.startswith(b"version https://git-lfs"):
        raise ModelLoadError(
            f"{path}: this is a Git LFS pointer ({size} bytes), not the weights; run `git lfs pull` in that "
            f"repository or download the file with `hf download`")
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        sd = _read_safetensors(path, head, size)
    else:
        sd = _read_torch(path, head, size)
    return sd


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < 100_000_000 and head[8:9] == b"{"


def _read_safetensors(path: Path, head: bytes, size: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if len(head) >= 8:
        n = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{" or n > 100_000_000:
            raise ModelLoadError(f"{path}: not a safetensors file ({_describe_bytes(head)}); check the path")
        if 8 + n > size:
            raise ModelLoadError(
                f"{path}: truncated safetensors file (header says {8 + n} bytes, file has {size}); download it again")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError...
        raise ModelLoadError(
            f"{path}: corrupted or truncated safetensors file ({_short(e)}); download it again") from None
    return sd


def _read_torch(path: Path, head: bytes, size: int) -> dict[str, torch.Tensor]:
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        raise ModelLoadError(
            f"{path}: not a checkpoint ({_describe_bytes(head)}); expected a BlinkDL .pth, a safetensors file or a "
            f"model directory")
    if is_zip:  # torch.save's zip format ends with an end-of-central-directory record
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 65_557))
            tail = fh.read()
        if b"PK\x05\x06" not in tail:
            raise ModelLoadError(
                f"{path}: truncated PyTorch checkpoint ({size} bytes, its zip end record is missing: the file was cut "
                f"short, e.g. by an interrupted download); download it again")
    obj = None
    err: Exception | None = None
    for mmap in ((True, False) if is_zip else (False,)):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            err = None
            break
        except Exception as e:  # noqa: BLE001 - every failure becomes one ModelLoadError below
            err = e
    if err is not None:
        msg, full = _short(err), str(err)
        if "Weights only load failed" in full or "WeightsUnpickler" in full or "Unsupported global" in full:
            raise ModelLoadError(
                f"{path}: contains pickled Python objects, not only tensors, so it is not loaded (weights_only=True); "
                f"save a plain state_dict with torch.save(model.state_dict(), path)") from None
        what = "truncated or corrupted PyTorch checkpoint" if is_zip else "corrupted PyTorch pickle"
        raise ModelLoadError(f"{path}: {what} ({msg}); download it again") from None
    return _as_tensor_dict(obj, path)


def _as_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints sometimes wrap the state dict.
    for _ in range(2):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "module"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors; not a checkpoint")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path}: holds no tensors ({len(obj)} non-tensor entries); not a checkpoint")
    if bad:
        raise ModelLoadError(
            f"{path}: entries {', '.join(map(str, bad[:3]))} are not tensors; expected a plain state dict")
    for prefix in ("module.", "_forward_module."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------------------------
# Names, configs
# --------------------------------------------------------------------------------------------

_HF_TO_OURS = [
    (re.compile(r"^rwkv\.embeddings\.weight$"), "emb.weight"),
    (re.compile(r"^rwkv\.ln_out\."), "ln_out."),
    (re.compile(r"^rwkv\.blocks\.(\d+)\.pre_ln\."), r"blocks.\1.ln0."),
    (re.compile(r"^rwkv\.blocks\.(\d+)\.attention\."), r"blocks.\1.att."),
    (re.compile(r"^rwkv\.blocks\.(\d+)\.feed_forward\."), r"blocks.\1.ffn."),
    (re.compile(r"^rwkv\.blocks\.(\d+)\."), r"blocks.\1."),
]
_TIME_MIX = {"time_mix_key": "time_mix_k", "time_mix_value": "time_mix_v", "time_mix_receptance": "time_mix_r"}


def hf_to_rwkv_name(name: str) -> str:
    """``rwkv.blocks.0.attention.time_mix_key`` -> ``blocks.0.att.time_mix_k`` (others unchanged)."""
    for pat, repl in _HF_TO_OURS:
        new, n = pat.subn(repl, name)
        if n:
            name = new
            break
    for hf, ours in _TIME_MIX.items():
        if name.endswith("." + hf):
            name = name[: -len(hf)] + ours
    return name


def rwkv_to_hf_name(name: str) -> str:
    """Inverse of :func:`hf_to_rwkv_name`: our/BlinkDL names -> ``RwkvForCausalLM`` names."""
    if name == "emb.weight":
        return "rwkv.embeddings.weight"
    if name.startswith("ln_out."):
        return "rwkv." + name
    if name.startswith("blocks."):
        name = re.sub(r"^blocks\.(\d+)\.ln0\.", r"blocks.\1.pre_ln.", name)
        name = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
        name = re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)
        for hf, ours in _TIME_MIX.items():
            if name.endswith("." + ours):
                name = name[: -len(ours)] + hf
        return "rwkv." + name
    return name


def _to_rwkv_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any(k.startswith("rwkv.") for k in sd):
        return sd
    return {hf_to_rwkv_name(k): v for k, v in sd.items()}


def infer_config(sd: dict[str, torch.Tensor], path: str | os.PathLike = "<state dict>") -> RWKVConfig:
    """RWKVConfig implied by BlinkDL-named tensors: layers from the block count, sizes from shapes."""
    path = Path(os.fspath(path))
    keys = list(sd)
    newer = [k for k in keys if re.search(r"time_faaaa|time_maa|\.ln_x\.|time_decay_w", k)]
    if newer:
        raise ModelLoadError(
            f"{path}: this is a newer RWKV (v5/v6/v7: has {newer[0]}), only RWKV-4 is supported; use an RWKV-4 checkpoint")
    if "emb.weight" not in sd:
        sample = ", ".join(keys[:3])
        raise ModelLoadError(
            f"{path}: no emb.weight tensor, so not an RWKV-4 checkpoint (its tensors start {sample}); expected "
            f"BlinkDL or Hugging Face RWKV-4 names")
    emb = sd["emb.weight"]
    if emb.ndim != 2:
        raise ModelLoadError(f"{path}: emb.weight has shape {list(emb.shape)}, expected [vocab, n_embd]; the file is damaged")
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise ModelLoadError(f"{path}: no blocks.N.* tensors; not an RWKV-4 checkpoint or a truncated one")
    ffn = sd.get("blocks.0.ffn.key.weight")
    ffn_dim = int(ffn.shape[0]) if ffn is not None and ffn.ndim == 2 else 0
    return RWKVConfig(vocab_size=int(emb.shape[0]), n_layer=max(layers) + 1, n_embd=int(emb.shape[1]),
                      ffn_dim=ffn_dim, name=_stem(path))


def rwkv_config_from_hf(hf: dict, path: str | os.PathLike = "config.json") -> RWKVConfig:
    """RWKVConfig from a Hugging Face ``RwkvConfig`` dict."""
    try:
        C = int(hf["hidden_size"])
        att = hf.get("attention_hidden_size") or C
        if int(att) != C:
            raise ModelLoadError(
                f"{path}: attention_hidden_size {att} != hidden_size {C}; RWKV-4 as published has them equal and "
                f"this model does not support otherwise")
        return RWKVConfig(
            vocab_size=int(hf["vocab_size"]), n_layer=int(hf["num_hidden_layers"]), n_embd=C,
            ffn_dim=int(hf.get("intermediate_size") or 4 * C),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            context_length=int(hf.get("context_length", 1024)), name="rwkv")
    except KeyError as e:
        raise ModelLoadError(f"{path}: Hugging Face RWKV config without {e.args[0]!r}; the file is incomplete") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: invalid value in Hugging Face RWKV config ({_short(e)})") from None


def _our_config(d: dict, path: Path) -> RWKVConfig:
    fields = {f.name for f in dataclasses.fields(RWKVConfig)}
    try:
        return RWKVConfig(**{k: v for k, v in d.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: invalid RWKVConfig ({_short(e)}); rewrite it with save_checkpoint") from None


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------

def _build(cfg: RWKVConfig, sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, device) -> RWKV:
    C, F_, L, V = cfg.n_embd, cfg.ffn_dim, cfg.n_layer, cfg.vocab_size
    big = 2 * V * C + L * (5 * C * C + 2 * C * F_) > META_BUILD_ABOVE
    if big:  # on the meta device: no memory and no init, every tensor comes from the checkpoint
        with torch.device("meta"):
            model = RWKV(cfg)
    else:  # small: a plain build is cheaper than the meta device's one-time setup (~2 s)
        model = RWKV(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    dims = f"L{cfg.n_layer}-D{cfg.n_embd}, vocab {cfg.vocab_size}, ffn {cfg.ffn_dim}"
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ModelLoadError(
            f"{path}: missing tensor(s) {', '.join(missing[:3])}{_more(missing)} for an RWKV-4 {dims}; the checkpoint is "
            f"incomplete or not RWKV-4; download it again")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise ModelLoadError(
            f"{path}: unexpected tensor(s) {', '.join(unexpected[:3])}{_more(unexpected)} for an RWKV-4 {dims}; this is "
            f"not an RWKV-4 checkpoint (or its config does not match its tensors)")
    out = {}
    for k, shape in expected.items():
        t = sd[k]
        if t.shape != shape:
            if ".time_mix_" in k and t.numel() == shape.numel() and all(s == 1 for s in t.shape[:-1]):
                t = t.reshape(shape)  # BlinkDL/HF store time_mix as [1, 1, C]
            else:
                raise ModelLoadError(
                    f"{path}: tensor {k} has shape {list(t.shape)}, expected {list(shape)} for an RWKV-4 {dims}; "
                    f"the file does not match its config (damaged or a different architecture)")
        if not t.is_floating_point():
            raise ModelLoadError(f"{path}: tensor {k} has dtype {t.dtype}, expected floating point; quantized "
                                 f"checkpoints are not supported")
        if not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{path}: tensor {k} contains NaN or inf; the checkpoint is corrupted, download it again")
        out[k] = t.to(dtype=dtype)
    if big:
        model.load_state_dict(out, strict=True, assign=True)
        for mod in model.modules():  # non-persistent buffers are not in the checkpoint
            if isinstance(mod, Threshold):
                mod.threshold = torch.zeros(())
    else:
        model.load_state_dict(out, strict=True)
    model = model.to(device=device, dtype=dtype)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # pragma: no cover - guards against a new un-loaded tensor in RWKV
            raise ModelLoadError(f"{path}: model tensor {n} was not initialized by the loader (rllm bug)")
    return model.eval()


def _load_opt_dir(path: Path, dtype, device, name) -> LoadedModel:
    """OPT through ``rllm.opt`` (transformers' OPTForCausalLM with the same activation sites)."""
    try:
        from rllm.opt import load_opt
    except ImportError as e:  # pragma: no cover - rllm.opt ships with the package
        raise ModelLoadError(f"{path}: is an OPT model, and OPT support (rllm.opt) is unavailable ({_short(e)})") from None
    try:
        model, tok = load_opt(path, dtype=dtype, device=device)
    except ModelLoadError:
        raise
    except (ValueError, ImportError) as e:
        raise ModelLoadError(" ".join(str(e).split())) from None
    if name is not None and getattr(model.config, "name", name) != name:
        model.config = dataclasses.replace(model.config, name=name)
    nm = getattr(model.config, "name", None) or name or path.name
    return LoadedModel(model=model, tokenizer=tok, config=model.config, name=nm, source=path, format=FORMAT_HF_OPT)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _find_tokenizer(d: Path) -> Path | None:
    for n in TOKENIZER_NAMES:
        if (d / n).is_file():
            return d / n
    return None


def _load_tokenizer(path: Path):
    try:
        from rllm.tokenizer import load_tokenizer
    except ImportError:  # pragma: no cover - fallback if the tokenizer module is absent
        load_tokenizer = None
    try:
        if load_tokenizer is not None:
            return load_tokenizer(path)
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001
        msg = _short(e)
        if str(path) not in msg:
            msg = f"{path}: {msg}"
        raise ModelLoadError(f"{msg}; the tokenizer file is damaged, replace it (e.g. tokenizer.json from the "
                             f"model's Hugging Face repo)") from None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({_short(e)}); the file is damaged") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ModelLoadError(f"dtype {dtype!r} is not a floating-point torch dtype (use float32, bfloat16 or float16)")
    return d


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.startswith(("~", ".")) or s.endswith(WEIGHT_SUFFIXES + (".json",))


def _stem(p: Path) -> str:
    p = Path(p)
    return p.stem if p.suffix in WEIGHT_SUFFIXES else p.name


def _short(e: BaseException) -> str:
    s = str(e).strip()
    line = s.splitlines()[0].strip() if s else ""
    if len(line) > 160:
        line = line[:157] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _more(items: list) -> str:
    return f" (+{len(items) - 3} more)" if len(items) > 3 else ""


def _describe_bytes(head: bytes) -> str:
    if not head:
        return "empty"
    text = head[:256].decode("utf-8", errors="replace")
    if text.count("\ufffd") <= 1 and all(c.isprintable() or c in "\r\n\t\ufffd" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"it is a text file starting {first!r}"
    return f"unknown binary format starting {head[:8]!r}"

"""The model zoo: known models by name, their published configs, and where their weights are found.

Names: ``rwkv_tiny`` (the project's own model, shipped in ``rllm/assets/rwkv_tiny/``),
``rwkv_169m``, ``rwkv_430m``, ``rwkv_1b5`` (the RWKV-4 Pile models), ``opt_125m``, ``opt_350m``,
``opt_1.3b`` (OPT through transformers). Hugging Face repo ids (``RWKV/rwkv-4-430m-pile``,
``BlinkDL/rwkv-4-pile-430m``, ``facebook/opt-125m``) are accepted as aliases.

Where the weights of a zoo name are looked for, in order (the first hit wins; a hit that turns
out broken is an error, never silently skipped):

1. ``weights=PATH`` given to :func:`rllm.weights.load_model` (CLI ``--weights PATH``): only that.
2. ``$EVENT_RWKV_MODELS/<name>/`` (a directory in any supported format: our checkpoint, an HF
   model directory, or a directory holding one BlinkDL ``.pth``), or ``$EVENT_RWKV_MODELS/<name>.pth``
   / ``<name>.safetensors``. ``EVENT_RWKV_MODELS`` may list several directories (``os.pathsep``).
3. The shipped files in ``rllm/assets/<name>/`` (``rwkv_tiny`` only).
4. The local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``): first the HF-format repo (``RWKV/rwkv-4-430m-pile``:
   ``config.json`` + safetensors/``pytorch_model.bin`` + ``tokenizer.json``), then the BlinkDL
   ``.pth`` (``BlinkDL/rwkv-4-pile-430m`` / ``RWKV-4-Pile-430M-20220808-8066.pth``).
5. A download through ``huggingface_hub`` into that cache (HF repo first, safetensors preferred
   over ``pytorch_model.bin``; then the BlinkDL file), unless ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``
   is set or ``download=False``. A 3-second TCP probe of the endpoint comes first (skipped behind a
   proxy), so a machine without network fails at once instead of after the hub's retries.

If all fail, one :class:`~rllm.errors.ModelLoadError` lists every place tried and the commands
that fetch the weights. A BlinkDL ``.pth`` found without a tokenizer beside it gets the GPT-NeoX
``tokenizer.json`` of the matching HF repo when that one is cached (or downloaded with it).
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rllm.model import RWKVConfig
from rllm.errors import ModelLoadError

ENV_MODELS = "EVENT_RWKV_MODELS"
ASSETS = Path(__file__).resolve().parent / "assets"

__all__ = ["ZooEntry", "Located", "ZOO", "ENV_MODELS", "ASSETS", "names", "lookup", "get_entry", "register",
           "locate", "hf_cache_dir", "offline"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str                          # "rwkv" or "opt"
    description: str
    n_layer: int | None = None         # None: not fixed (rwkv_tiny: read from its config.json)
    n_embd: int | None = None
    vocab_size: int | None = None
    ffn_dim: int | None = None
    context_length: int = 1024
    hf_repo: str | None = None         # Hugging Face format (config.json + weights + tokenizer.json)
    blinkdl_repo: str | None = None    # BlinkDL's original .pth
    blinkdl_file: str | None = None
    shipped: str | None = None         # directory under rllm/assets
    aliases: tuple[str, ...] = field(default=())

    def rwkv_config(self) -> RWKVConfig | None:
        """The published RWKVConfig (None for OPT or for a model whose shape is not fixed)."""
        if self.kind != "rwkv" or self.n_layer is None:
            return None
        return RWKVConfig(vocab_size=self.vocab_size, n_layer=self.n_layer, n_embd=self.n_embd,
                          ffn_dim=self.ffn_dim or 0, context_length=self.context_length, name=self.name)

    @property
    def shape(self) -> str:
        return f"L{self.n_layer}-D{self.n_embd}" if self.n_layer else "shape from its config.json"


def _rwkv(name, size, L, C, blinkdl_file):
    return ZooEntry(
        name=name, kind="rwkv", description=f"RWKV-4 Pile {size}",
        n_layer=L, n_embd=C, vocab_size=50277, ffn_dim=4 * C, context_length=1024,
        hf_repo=f"RWKV/rwkv-4-{size.lower()}-pile", blinkdl_repo=f"BlinkDL/rwkv-4-pile-{size.lower()}",
        blinkdl_file=blinkdl_file)


def _opt(name, size, L, C, F):
    return ZooEntry(name=name, kind="opt", description=f"OPT {size}", n_layer=L, n_embd=C,
                    vocab_size=50272, ffn_dim=F, context_length=2048, hf_repo=f"facebook/opt-{size.lower()}")


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry(name="rwkv_tiny", kind="rwkv", description="the project's own small RWKV-4, shipped in the repository",
             shipped="rwkv_tiny"),
    _rwkv("rwkv_169m", "169M", 12, 768, "RWKV-4-Pile-169M-20220807-8023.pth"),
    _rwkv("rwkv_430m", "430M", 24, 1024, "RWKV-4-Pile-430M-20220808-8066.pth"),
    _rwkv("rwkv_1b5", "1B5", 24, 2048, "RWKV-4-Pile-1B5-20220903-8040.pth"),
    _opt("opt_125m", "125m", 12, 768, 3072),
    _opt("opt_350m", "350m", 24, 1024, 4096),
    _opt("opt_1.3b", "1.3b", 24, 2048, 8192),
)}

# File names of the tokenizer and weights inside a Hugging Face repo, by kind.
_HF_TOKENIZER_FILES = {
    "rwkv": ("tokenizer.json",),
    "opt": ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"),
}
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def names() -> list[str]:
    return list(ZOO)


def register(entry: ZooEntry) -> None:
    """Add (or replace) a zoo entry, e.g. a fine-tuned model with its own HF repo."""
    ZOO[entry.name] = entry


def _norm(s: str) -> str:
    return s.strip().lower().replace("-", "_")


def lookup(name: str) -> ZooEntry | None:
    """The entry for a zoo name or alias (case- and ``-``/``_``-insensitive), or None."""
    key = _norm(name)
    for e in ZOO.values():
        keys = {e.name, *e.aliases, *(r for r in (e.hf_repo, e.blinkdl_repo) if r)}
        if key in {_norm(k) for k in keys}:
            return e
    return None


def get_entry(name: str) -> ZooEntry:
    """Like :func:`lookup`, but an unknown name is a ModelLoadError with a did-you-mean."""
    e = lookup(name)
    if e is not None:
        return e
    known = names()
    close = difflib.get_close_matches(_norm(name), known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ModelLoadError(
        f"unknown model {name!r}: {hint}known models are {', '.join(known)}; or pass the path of a BlinkDL .pth, "
        f"a Hugging Face RWKV directory or a checkpoint directory")


# ---------------------------------------------------------------------------------------------
# Finding the weights
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Located:
    path: Path                         # file or directory to hand to rllm.weights.load_checkpoint
    how: str                           # where it was found, for messages and logs
    tokenizer: Path | None = None      # a tokenizer to use if none lies beside the weights


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network access."""
    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def locate(entry: ZooEntry, weights: str | os.PathLike | None = None, download: bool | None = None) -> Located:
    """Find the weights of a zoo entry (see the module docstring for the order)."""
    if weights is not None:
        p = Path(os.fspath(weights)).expanduser()
        if not p.exists():
            raise ModelLoadError(f"{p}: no such file or directory (given as the weights of {entry.name})")
        return Located(p, "the weights= argument", _cached_tokenizer(entry))

    tried: list[str] = []
    env = os.environ.get(ENV_MODELS)
    if env:
        for root in (Path(r).expanduser() for r in env.split(os.pathsep) if r):
            for cand in (root / entry.name, root / f"{entry.name}.pth", root / f"{entry.name}.safetensors"):
                if cand.exists():
                    return Located(cand, f"${ENV_MODELS} ({cand})", _cached_tokenizer(entry))
            tried.append(f"${ENV_MODELS}: no {entry.name}/ or {entry.name}.pth in {root}")
    else:
        tried.append(f"${ENV_MODELS}: not set (a directory holding {entry.name}/)")

    if entry.shipped:
        d = ASSETS / entry.shipped
        if (d / "config.json").is_file():
            return Located(d, f"the shipped model ({d})")
        tried.append(f"shipped model: {d} has no config.json/model.safetensors")

    cache = hf_cache_dir()
    if entry.hf_repo:
        snap = _cached_snapshot(entry.hf_repo, cache, tried)
        if snap is not None:
            return Located(snap, f"the Hugging Face cache ({entry.hf_repo})", _cached_tokenizer(entry))
    if entry.blinkdl_repo:
        p = _try_cache(entry.blinkdl_repo, entry.blinkdl_file, cache)
        if p is not None:
            return Located(p, f"the Hugging Face cache ({entry.blinkdl_repo})", _cached_tokenizer(entry))
        tried.append(f"Hugging Face cache {cache}: {entry.blinkdl_repo}/{entry.blinkdl_file} not cached")

    if download is None:
        download = not offline()
    repos = [r for r in (entry.hf_repo, entry.blinkdl_repo) if r]
    if repos and not download:
        why = "download=False" if offline() is False else "HF_HUB_OFFLINE is set"
        tried.append(f"download from huggingface.co: skipped ({why})")
    elif repos and (unreachable := _unreachable()) is not None:
        tried.append(f"download from the Hugging Face hub: skipped, {unreachable} (set HF_HUB_OFFLINE=1 to skip "
                     f"this check)")
    elif repos:
        if entry.hf_repo:
            try:
                snap = _download_snapshot(entry, cache)
                return Located(snap, f"a download of {entry.hf_repo}", _cached_tokenizer(entry))
            except Exception as e:  # noqa: BLE001 - network errors of every kind are reported in the list
                tried.append(f"download of {entry.hf_repo}: failed ({_short(e)})")
        if entry.blinkdl_repo:
            try:
                import huggingface_hub as hub

                p = Path(hub.hf_hub_download(entry.blinkdl_repo, entry.blinkdl_file, cache_dir=str(cache)))
                return Located(p, f"a download of {entry.blinkdl_repo}/{entry.blinkdl_file}", _cached_tokenizer(entry))
            except Exception as e:  # noqa: BLE001
                tried.append(f"download of {entry.blinkdl_repo}/{entry.blinkdl_file}: failed ({_short(e)})")

    raise ModelLoadError(_not_found_message(entry, tried))


def _unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (a quick TCP probe), or None if it can or a proxy is configured.

    Saves the minutes huggingface_hub would spend retrying each file on a machine with no network.
    """
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    except Exception:  # noqa: BLE001  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host}:{port} unreachable ({_short(e)})"


def _not_found_message(entry: ZooEntry, tried: list[str]) -> str:
    lines = [f"no weights found for {entry.name} ({entry.description}, {entry.shape}). Tried, in order:"]
    lines += [f"  {i}. {t}" for i, t in enumerate(tried, 1)]
    lines.append("To provide them, any one of:")
    if entry.hf_repo:
        lines.append(f"  - hf download {entry.hf_repo}    (into the Hugging Face cache; older huggingface_hub: "
                     f"huggingface-cli download {entry.hf_repo}); then run again")
    if entry.blinkdl_repo:
        lines.append(f"  - hf download {entry.blinkdl_repo} {entry.blinkdl_file}")
    if entry.shipped:
        lines.append(f"  - restore the shipped files rllm/assets/{entry.shipped}/ (model.safetensors, config.json, "
                     f"tokenizer.json) from the repository")
    lines.append(f"  - put a checkpoint (BlinkDL .pth, Hugging Face directory or rllm save_checkpoint directory) at "
                 f"${ENV_MODELS}/{entry.name}/")
    lines.append("  - pass its path: load_model(name, weights=PATH) or --weights PATH")
    return "\n".join(lines)


def _try_cache(repo: str, filename: str, cache: Path) -> Path | None:
    import huggingface_hub as hub

    if not cache.is_dir():
        return None
    try:
        p = hub.try_to_load_from_cache(repo, filename, cache_dir=str(cache))
    except Exception:  # noqa: BLE001 - a malformed cache counts as "not cached"
        return None
    return Path(p) if isinstance(p, str) and Path(p).is_file() else None


def _cached_snapshot(repo: str, cache: Path, tried: list[str]) -> Path | None:
    cfg = _try_cache(repo, "config.json", cache)
    if cfg is None:
        tried.append(f"Hugging Face cache {cache}: {repo} not cached")
        return None
    snap = cfg.parent
    if _has_weights(snap):
        return snap
    tried.append(f"Hugging Face cache {cache}: {repo} cached without (all of) its weights, an incomplete download "
                 f"({snap})")
    return None


def _has_weights(d: Path) -> bool:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            try:
                shards = set(json.loads((d / index).read_text())["weight_map"].values())
            except Exception:  # noqa: BLE001
                return False
            return all((d / s).is_file() for s in shards)
    return any((d / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def _cached_tokenizer(entry: ZooEntry) -> Path | None:
    if entry.hf_repo:
        return _try_cache(entry.hf_repo, "tokenizer.json", hf_cache_dir())
    return None


def _download_snapshot(entry: ZooEntry, cache: Path) -> Path:
    """Download config, tokenizer and one weights format (safetensors preferred) of the HF repo."""
    import huggingface_hub as hub

    repo = entry.hf_repo
    files = set(hub.list_repo_files(repo))
    cfg = Path(hub.hf_hub_download(repo, "config.json", cache_dir=str(cache)))
    for f in _HF_TOKENIZER_FILES.get(entry.kind, ()):
        if f in files:
            hub.hf_hub_download(repo, f, cache_dir=str(cache))
    chosen = next((f for f in _HF_WEIGHTS if f in files), None)
    if chosen is None:
        raise FileNotFoundError(f"{repo} has no model.safetensors or pytorch_model.bin")
    p = Path(hub.hf_hub_download(repo, chosen, cache_dir=str(cache)))
    if chosen.endswith(".index.json"):
        for shard in sorted(set(json.loads(p.read_text())["weight_map"].values())):
            hub.hf_hub_download(repo, shard, cache_dir=str(cache))
    return cfg.parent


def _short(e: BaseException) -> str:
    s = str(e).strip()
    line = s.splitlines()[0].strip() if s else ""
    if len(line) > 160:
        line = line[:157] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__

"""rllm: the event-based recurrent LLM (RWKV-4, OPT), its weights, data, evaluation and event tracing."""
import os

# MKL splits the inner dimension of some CPU matrix products across threads, so results (and
# which activations cross a threshold) would depend on the thread count; its strict CNR mode
# keeps GEMM bitwise the same for any number of threads, at no measurable cost here. Read at
# MKL's first call, so setting it here (after torch's import) is in time; a user's value wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from rllm.events import EventTrace, SparsityMeter, summarize, trace
from rllm.model import RWKV, RWKVConfig
from rllm.weights import LoadedModel, ModelLoadError, load_checkpoint, load_model, save_checkpoint

load = load_model  # the name DESIGN.md uses

__all__ = ["RWKV", "RWKVConfig", "EventTrace", "SparsityMeter", "summarize", "trace", "LoadedModel",
           "ModelLoadError", "load_checkpoint", "load_model", "load", "save_checkpoint"]

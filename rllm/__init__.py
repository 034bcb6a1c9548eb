"""rllm: the event-based recurrent LLM (RWKV-4, OPT), its weights, data, evaluation and event tracing."""
from rllm.events import EventTrace, SparsityMeter, summarize, trace
from rllm.model import RWKV, RWKVConfig
from rllm.weights import LoadedModel, ModelLoadError, load_checkpoint, load_model, save_checkpoint

load = load_model  # the name DESIGN.md uses

__all__ = ["RWKV", "RWKVConfig", "EventTrace", "SparsityMeter", "summarize", "trace", "LoadedModel",
           "ModelLoadError", "load_checkpoint", "load_model", "load", "save_checkpoint"]

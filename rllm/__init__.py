"""rllm: the event-based recurrent LLM (RWKV-4, OPT), its weights, data, evaluation and event tracing."""

"""GPU kernels for event-based inference: the Triton event-driven matrix-vector products
(:mod:`rllm.gpu.sparse_gemv`), with torch fallbacks so the models run the same on a CPU."""

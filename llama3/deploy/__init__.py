"""Deployment: ONNX export of the cached call form, ONNX Runtime and TensorRT (10.x and 11.x)
runners, accuracy checks and latency measurement. ``python -m llama3 deploy``
(:mod:`llama3.deploy.command`) runs them in order; each module is usable on its own.
:mod:`llama3.deploy.container_check` checks that an image (or any environment) can run them.

Every runner is a callable ``runner(input, k_cache, v_cache) -> (output, updated_k_cache,
updated_v_cache)`` over torch tensors, the export form of :class:`llama3.Transformer`, so accuracy
and latency code treats PyTorch, ONNX Runtime and TensorRT alike.
"""

"""qeval: evaluate quantized LLMs (weights, activations, KV cache) and turn results into rows."""

__version__ = "0.1.0"

"""The KV runtime: caches built from per-layer objects, their row bookkeeping, attention functions
registered with transformers, and the ``simulated`` semantics. Depends only on transformers and
:mod:`qeval.quant`; a method is passed in, never imported."""

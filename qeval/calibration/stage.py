"""The calibration stage of a run, between model load and the Linear swap, for a method that asks
for it (``method.needs_calibration``): reuse a saved result or compute one and save it, then the
method applies it to the model. The data is read (and a missing dataset reported in one line)
before any weights load; nothing here knows which method it serves.
"""

from __future__ import annotations

import time

from qeval import results
from qeval.calibration import data, store
from qeval.model import loading
from qeval.quant.primitives import FULL_PRECISION_BITS


def _dtype(cfg) -> str:
    return str(loading.resolve_dtype(cfg.dtype, loading.resolve_device(cfg.device))).removeprefix("torch.")


def calibrates(cfg, method_cls) -> bool:
    """``needs_calibration`` from the config alone (validation has no method instance)."""
    return method_cls.calibrates and min(cfg.w_bits, cfg.a_bits) < FULL_PRECISION_BITS


def check(cfg, method_cls, arch) -> None:
    """The calibration keys, and the dataset's availability unless a saved result makes it moot."""
    if not calibrates(cfg, method_cls):
        return
    spec = data.resolve(cfg)
    text = arch.get_text_config()
    data.check(spec, getattr(text, "max_position_embeddings", None))
    if not store.saved(store.directory(cfg, store.identity(cfg, method_cls, spec, _dtype(cfg)))):
        data.check_available(spec)


class Stage:
    """Built before the model loads (reads the samples unless a saved result exists); :meth:`run`
    then calibrates or reuses and returns the row columns (``calibration.*``, ``calibration_reused``)."""

    def __init__(self, cfg, method):
        self.method = method
        self.spec = data.resolve(cfg)
        self.ident = store.identity(cfg, type(method), self.spec, _dtype(cfg))
        self.where = store.directory(cfg, self.ident)
        self.tokenizer = loading.load_tokenizer(cfg.model)
        self.samples = None if store.saved(self.where) else data.load_samples(self.spec, self.tokenizer)

    def run(self, model) -> dict:
        start = time.perf_counter()
        with results.cell_lock(self.where):
            reused = store.saved(self.where)   # perhaps finished by another run meanwhile
            if reused:
                result, meta = store.read(self.where)
                self.method.apply_calibration(model, result)
            else:
                samples = self.samples or data.load_samples(self.spec, self.tokenizer)
                result = self.method.calibrate(model, samples)
                meta = {"identity": self.ident, "samples": len(samples),
                        "tokens": sum(s.numel() for s in samples), "seconds": time.perf_counter() - start}
                store.write(self.where, result, meta)
        return self.spec.row() | {"calibration.hash": self.where.name, "calibration.samples": meta["samples"],
                                  "calibration.tokens": meta["tokens"], "calibration_reused": reused,
                                  "calibration_seconds": time.perf_counter() - start}

"""The calibration stage of a run, between model load and the Linear swap, for a method that asks
for it (``recipe.needs_calibration``): reuse a saved result or compute one and save it, then the
method applies it to the model. The data is read (and a missing dataset reported in one line)
before any weights load; nothing here knows which method it serves.

With ``method.scales_file`` set, a published result is read from that file (the method's
``read_scales_file``, checked before any weights load) and applied instead: no data is read and
nothing is saved; the rows name the file and its sha256.
"""

from __future__ import annotations

import logging
import time

from qeval import results
from qeval.calibration import data, published, store
from qeval.errors import ConfigError
from qeval.model import loading
from qeval.quant.primitives import FULL_PRECISION_BITS

log = logging.getLogger(__name__)


def _dtype(cfg) -> str:
    return str(loading.resolve_dtype(cfg.dtype, loading.resolve_device(cfg.device))).removeprefix("torch.")


def calibrates(cfg, spec) -> bool:
    """Whether method ``spec`` (its row of :data:`qeval.methods.METHODS`) calibrates on ``cfg``
    (its view of the run): it is calibrated and quantizes weights or activations."""
    return spec.calibrates and min(cfg.w_bits, cfg.a_bits) < FULL_PRECISION_BITS


def scales_file(cfg) -> str | None:
    """The published result a run applies instead of calibrating (``method.scales_file``)."""
    return cfg.method.get("scales_file")


def check_published(cfg, spec) -> None:
    """A published file (``method.scales_file``) is refused where nothing would read it."""
    if scales_file(cfg) and not calibrates(cfg, spec):
        # nothing is quantized, so nothing would read the file: a row would name a file it never used
        raise ConfigError(f"method.scales_file={scales_file(cfg)}: method {spec.name} applies it only when "
                          f"it quantizes (w_bits={cfg.w_bits}, a_bits={cfg.a_bits}); allowed: null, or bits "
                          f"below {FULL_PRECISION_BITS}")


def check(cfg, calibrator, arch) -> None:
    """The calibration keys, and the dataset's availability unless a saved result makes it moot.
    ``cfg``: the config the stage reads (the calibrated part's view); ``calibrator``: the
    calibrated parts (:class:`qeval.recipe.calibration.Chain`), asked only for a run that calibrates."""
    if scales_file(cfg):
        return
    spec = data.resolve(cfg)
    text = arch.get_text_config()
    data.check(spec, getattr(text, "max_position_embeddings", None))
    ident = store.identity(cfg, calibrator, spec, _dtype(cfg))
    if store.unusable(store.directory(cfg, ident), ident):
        data.check_available(spec)


class Stage:
    """Built before the model loads (reads the samples unless a usable saved result exists);
    :meth:`run` then calibrates or reuses and returns the row columns (``calibration.*``,
    ``calibration_reused``). A saved result that fails its checks is computed again, with one
    line saying why."""

    def __init__(self, cfg, method):
        self.method = method
        self.file = scales_file(cfg)
        if self.file:
            self.result = method.read_scales_file(self.file)
            return
        self.spec = data.resolve(cfg)
        self.ident = store.identity(cfg, method, self.spec, _dtype(cfg))
        self.where = store.directory(cfg, self.ident)
        self.tokenizer = loading.load_tokenizer(cfg.model)
        usable = store.unusable(self.where, self.ident) is None
        self.samples = None if usable else data.load_samples(self.spec, self.tokenizer)

    def run(self, model) -> dict:
        start = time.perf_counter()
        if self.file:
            self.method.apply_calibration(model, self.result)
            return ({f"calibration.{k}": None for k in ("preset", *data.KEYS)}
                    | {"calibration.file": self.file, "calibration.hash": published.digest(self.file),
                       "calibration.format": published.kind_of_result(self.result),
                       "calibration.samples": None, "calibration.tokens": None, "calibration_reused": False,
                       "calibration_seconds": time.perf_counter() - start})
        with results.cell_lock(self.where):
            try:   # perhaps finished by another run meanwhile
                result, meta = store.read(self.where, self.ident)
                reused = True
            except store.Unusable as e:
                if str(e) != store.NOT_SAVED:
                    log.warning(f"qeval: the calibration result saved in {self.where} is not used: {e}; "
                                f"calibrating again")
                reused = False
            if reused:
                self.method.apply_calibration(model, result)
            else:
                samples = self.samples or data.load_samples(self.spec, self.tokenizer)
                result = self.method.calibrate(model, samples)
                meta = {"identity": self.ident, "samples": len(samples),
                        "tokens": sum(s.numel() for s in samples), "seconds": time.perf_counter() - start}
                store.write(self.where, result, meta)
        return self.spec.row() | {"calibration.file": None, "calibration.format": None,
                                  "calibration.hash": self.where.name, "calibration.samples": meta["samples"],
                                  "calibration.tokens": meta["tokens"], "calibration_reused": reused,
                                  "calibration_seconds": time.perf_counter() - start}

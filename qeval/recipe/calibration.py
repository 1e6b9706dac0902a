"""Several calibrated parts in one calibration stage (``transform=[smoothquant] weight=gptq``):
one set of samples, each part calibrating on the model as the parts before it left it, so GPTQ
sees the smoothed weights and their inputs, as in llm-compressor's SmoothQuant-then-GPTQ recipe.

The samples are the last part's (the weight method's ``calibration`` preset under
``calibration=auto``); a saved result is reused under the identity of every part in order, so a
GPTQ result computed after smoothing is never applied to an unsmoothed model.
"""

from __future__ import annotations

from qeval.errors import ConfigError


class Chain:
    calibrates = True
    needs_calibration = True

    def __init__(self, parts, cfg):
        self.steps = [(part, method, part.view(cfg)) for part, method in parts]
        self.name = "+".join(part.name for part, _ in parts)

    @property
    def view(self):
        """The config the stage reads its samples by: the last part's."""
        return self.steps[-1][2]

    def calibration_identity(self, cfg=None) -> dict:
        return {"chain": [{part.key: method.calibration_identity(view)} for part, method, view in self.steps]}

    def read_scales_file(self, path) -> dict:
        raise ConfigError(f"{path}: a published calibration file applies only to a run's one calibrated part "
                          f"(this run calibrates {self.name})")

    def calibrate(self, model, samples) -> dict:
        return {part.key: method.calibrate(model, samples) for part, method, _ in self.steps}

    def apply_calibration(self, model, result: dict) -> None:
        for part, method, _ in self.steps:
            method.apply_calibration(model, result[part.key])

"""The calibrated parts of a recipe as one calibration stage (:class:`qeval.calibration.stage.Stage`).

One part (``method=gptq``) calibrates as its method always has: its samples, its identity, its
published file. Several (``transform=[smoothquant] weight=gptq``) share one set of samples, each
calibrating on the model as the parts before it left it, so GPTQ sees the smoothed weights and
their inputs, as in llm-compressor's SmoothQuant-then-GPTQ recipe. The samples are the last
part's (the weight method's ``calibration`` preset under ``calibration=auto``); a saved result is
reused under the identity of every part in order, so a GPTQ result computed after smoothing is
never applied to an unsmoothed model.
"""

from __future__ import annotations

from qeval.errors import ConfigError


class Chain:
    def __init__(self, parts, cfg):
        self.steps = [(choice, part, choice.view(cfg)) for choice, part in parts]
        self.name = "+".join(choice.name for choice, _ in parts)

    @property
    def view(self):
        """The config the stage reads its samples by: the last part's."""
        return self.steps[-1][2]

    def _one(self):
        return self.steps[0] if len(self.steps) == 1 else None

    def calibration_identity(self, cfg=None) -> dict:
        if one := self._one():
            return one[1].spec.calibration_identity(one[2])
        return {"chain": [{c.key: part.spec.calibration_identity(view)} for c, part, view in self.steps]}

    def read_scales_file(self, path) -> dict:
        if one := self._one():
            return one[1].spec.read_scales_file(path)
        raise ConfigError(f"{path}: a published calibration file applies only to a run's one calibrated part "
                          f"(this run calibrates {self.name})")

    def calibrate(self, model, samples) -> dict:
        if one := self._one():
            return one[1].calibrate(model, samples)
        return {c.key: part.calibrate(model, samples) for c, part, _ in self.steps}

    def apply_calibration(self, model, result: dict) -> None:
        if one := self._one():
            one[1].apply_calibration(model, result)
            return
        for c, part, _ in self.steps:
            part.apply_calibration(model, result[c.key])

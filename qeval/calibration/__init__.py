"""Calibration for the methods that compute something from data before quantizing (GPTQ,
SmoothQuant, AWQ): ``data`` (which samples: the ``calibration`` config group and the papers'
loaders), ``store`` (saved results, reused across runs), ``stage`` (the run's step between model
load and the Linear swap), ``layers`` (running a model one decoder layer at a time) and ``fold``
(where per-channel scales fold into a decoder layer's norms and Linears)."""

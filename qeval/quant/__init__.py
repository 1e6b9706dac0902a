"""Pure numerics, no model and no cache: quantize / dequantize primitives (:mod:`.primitives`) and
where their statistics are taken (:mod:`.granularity`)."""

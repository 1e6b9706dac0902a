"""A run's quantization as a recipe of parts, one per slot (:mod:`.slots`): a weight method, an
activation quantizer, a KV method, an eviction policy and an ordered list of transforms."""

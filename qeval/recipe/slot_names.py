"""The slots of a recipe, by name (imports nothing: methods declare the slots they fill with these)."""

TRANSFORM, WEIGHT, ACT, KV, EVICT = "transform", "weight", "act", "kv", "evict"
SLOTS = (TRANSFORM, WEIGHT, ACT, KV, EVICT)          # the order parts apply in, and rows name them

"""lm-eval's tasks on a qeval model: the adapter (:mod:`.model`, an ``HFLM`` that hands the
method's cache to every call) and the task wiring (:mod:`.tasks`)."""

"""The pruning rule, the core every other part builds on: which weights are targets (and in which
down / mid / up group), ratio sets, resolutions, exact group-global magnitude thresholds (``PruneSpec``) and
the ratio profiles (the paper's Table 6 and search outputs). Imports nothing from the rest of crdiff but
``errors`` and ``storage``."""

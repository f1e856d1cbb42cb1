"""CR-Diff inside ComfyUI: nodes that patch a ComfyUI ``MODEL`` into its dense + pruned dual.

- :mod:`.ldm_targets`: crdiff's target rule on ComfyUI's (LDM) module names.
- :mod:`.patch`: the pure-torch core: exact thresholds on the weights the model samples with, the
  pruned pass (pruned weights swapped in), and the two-pass model call mixed by POA. No ComfyUI import.
- :mod:`.nodes`: the ComfyUI node classes (``NODE_CLASS_MAPPINGS``); ComfyUI is imported when they run.
- :mod:`.install`: ``crdiff comfyui``: the one-file hook-up in a ComfyUI ``custom_nodes`` folder.

ComfyUI is GPL-3.0 and is only imported at run time, never copied; this package is Apache-2.0 like the rest
of crdiff, which the GPL-3.0 accepts in a combined work.
"""

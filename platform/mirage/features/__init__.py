"""Backbone features of the stimuli.

- ``backbone``: the Backbone interface and the name registry (``tiny``, ``qwen3-omni``)
- ``tiny`` / ``qwen3_omni``: the two loaders
- ``inputs``: cutoff schedule, video frame times, transcript words per pass
- ``readout``: one batched pass and the per-modality readout from token positions
- ``extract``: per-span extraction (shared by every runner) and the in-process ``extract_all``
- ``store``: the feature store (key, manifest, atomic writes, memory-mapped reader)
"""

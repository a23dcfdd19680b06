"""Backbone features of the stimuli.

- ``backbone``: the name registry, each entry with its loader (every published backbone of the
  paper's ablation and a tiny random variant per family); ``interface``: the loaded Backbone
- ``families``: per-family thinker/processor classes and special-token strings (Qwen3-Omni, Qwen2.5-Omni)
- ``tiny``: tiny random variants of the real architectures, built locally; ``pretrained``: checkpoints
- ``inputs``: the reference's pass plan, frame counts, windows and read-out rules (pure functions)
- ``readout``: prompts, the processor call, one (batched) forward and the per-modality read-outs
- ``extract``: stimulus plans, work items (spans of passes), assembly, the in-process ``extract_all``
- ``one``: the features of one movie in this process (``mirage features one``)
- ``store``: the feature store (key, manifest, atomic writes, memory-mapped reader)
"""

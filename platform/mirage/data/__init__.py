"""The Algonauts 2025 data layer (pure Python/numpy, no Ray).

- ``layout``: the release layout (``Release``, ``Stimulus``, ``FmriRun``, file and key names)
- ``fmri``: load a run as float32 (n_trs, n_parcels), z-score, reconcile lengths
- ``transcripts``: words with onsets/offsets from the tsv list strings
- ``media``: video frames and 16 kHz mono audio from a movie file (PyAV)
- ``splits``, ``windows``: train/val/test selection and windowing, numbers from config
- ``synth``: a synthetic dataset in the release layout with a planted signal
- ``check``: validate a dataset directory
"""

"""Brain-space outputs: the release's Schaefer atlas, Yeo-7 networks, parcel maps, time courses, noise ceiling.

Core (no Ray, no MLflow). nilearn and matplotlib are imported inside the functions that draw.
"""

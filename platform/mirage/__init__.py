"""MIRAGE platform: distributed training and evaluation of MIRAGE brain encoders."""

__version__ = "0.1.0"

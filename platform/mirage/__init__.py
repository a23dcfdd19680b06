"""MIRAGE platform: distributed training and evaluation of MIRAGE brain encoders."""

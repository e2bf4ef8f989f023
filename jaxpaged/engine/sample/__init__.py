"""Sampling on the device: the sampler (`sampler.py`) and the per-batch features that pick
its compiled variant (`features.py`)."""

"""Experiment commands built on the engine: the demo (patch 4 vs 2 vs 1 on digits), the patch-size
sweep, and the analysis figures of a trained model; tables.py holds their shared tables and plots."""

"""Calibration data and quantization recipes (INT8 static/dynamic, INT4 weight-only, FP16)."""

"""Calibration: run the model one decoder layer at a time on calibration windows and gather input statistics."""
from .cache import StatsCache, model_fingerprint
from .fisher import fisher_rows
from .layerwise import LayerStats, LinearStats, calibrate_layers, capture_layer_inputs, run_layer

__all__ = ["fisher_rows", "StatsCache", "model_fingerprint", "LayerStats", "LinearStats", "calibrate_layers", "capture_layer_inputs", "run_layer"]

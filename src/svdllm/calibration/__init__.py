"""Calibration: run the model one decoder layer at a time on calibration windows and gather input statistics;
a separate backward pass gathers the gradient statistics that FWSVD and the loss-aware allocators need."""
from .cache import AllocationRecord, StatsCache, model_fingerprint
from .fisher import GradientStats, fisher_rows, gradient_stats
from .layerwise import (LayerStats, LinearStats, calibrate_layers, capture_layer_inputs, linear_stats,
                        run_layer)

__all__ = ["AllocationRecord", "GradientStats", "fisher_rows", "gradient_stats", "StatsCache",
           "model_fingerprint", "LayerStats", "LinearStats", "calibrate_layers", "capture_layer_inputs", "linear_stats",
           "run_layer"]

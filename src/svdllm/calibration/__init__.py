"""Calibration: run the model one decoder layer at a time on calibration windows and gather input statistics;
a separate backward pass, also a layer at a time, gathers the gradient statistics that FWSVD, kfac-svd and the
loss-aware allocators need."""
from .cache import AllocationRecord, StatsCache, model_fingerprint
from .fisher import GradientStats, LayerGradients, fisher_rows, gradient_stats
from .layerwise import (LayerStats, LinearStats, calibrate_layers, capture_layer_inputs, layerwise_loss,
                        linear_stats, run_layer)

__all__ = ["AllocationRecord", "LayerGradients", "GradientStats", "fisher_rows", "gradient_stats", "StatsCache",
           "model_fingerprint", "LayerStats", "LinearStats", "calibrate_layers", "capture_layer_inputs",
           "layerwise_loss", "linear_stats", "run_layer"]

"""Calibration: run the model one decoder layer at a time on calibration windows (walk.py: the one forward walk
and the one backward walk, which every phase's processor rides) and gather input statistics (layerwise.py); the
gradient pass (fisher.py), also a layer at a time, gathers the gradient statistics that FWSVD, kfac-svd and the
loss-aware allocators need."""
from .cache import AllocationRecord, StatsCache, model_fingerprint
from .fisher import GradientStats, LayerGradients, fisher_rows, gradient_stats
from .layerwise import (InputStatistics, LayerStats, LinearStats, LossMeasurement, calibrate_layers,
                        layer_statistics, layerwise_loss, linear_stats)
from .walk import LayerProcessor, Step, Walk, capture_layer_inputs, run_layer, walk_backward

__all__ = ["AllocationRecord", "GradientStats", "InputStatistics", "LayerGradients", "LayerProcessor", "LayerStats",
           "LinearStats", "LossMeasurement", "StatsCache", "Step", "Walk", "calibrate_layers", "capture_layer_inputs",
           "fisher_rows", "gradient_stats", "layer_statistics", "layerwise_loss", "linear_stats", "model_fingerprint",
           "run_layer", "walk_backward"]

"""The shared calibration layer (datasets, sequential block pipeline, statistics collectors)."""

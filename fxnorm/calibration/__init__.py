"""Resetting and recalibrating the running statistics of normalization layers: the public entry
points, the exact moment estimator, the observers, batch handling and the report."""

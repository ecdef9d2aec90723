"""Model analysis: which layers are norms, tracing (whole or part by part), shapes.

Nothing here changes a model. Every other layer of fxnorm reads models through this package.
"""

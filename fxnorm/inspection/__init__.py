"""Inspection: every normalization layer of a model as data (:class:`NormSite`), and its rendering
as tables and JSON."""

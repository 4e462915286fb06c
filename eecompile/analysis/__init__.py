"""Analyses: facts about a graph that change nothing in it.

``partition`` (the graph index and the segment plans), ``probe`` (batch axes, dtypes and shapes seen by ONNX
Runtime), ``flops`` (per-node FLOP estimates) and ``cut_points`` (the prepared model and the ranked cut points
that ``eecompile analyze`` prints). The rewrites that use these facts live in :mod:`eecompile.passes`.
"""

"""eecompile benchmarks: the chain against the unsplit model and against the limit (see README.md).

Run ``python -m benchmarks`` (full figures) or ``python -m benchmarks --quick`` (tiny models, seconds).
"""

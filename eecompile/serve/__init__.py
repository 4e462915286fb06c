"""Serving a bundle: Ray Serve (:mod:`eecompile.serve.ray_app`), a Triton model repository
(:mod:`eecompile.serve.triton`), and the one-page deployment report (:mod:`eecompile.serve.report`).

Ray, tritonclient and matplotlib are imported inside the modules that need them, never here: the request
format (:mod:`eecompile.serve.protocol`) and the batching logic (:mod:`eecompile.serve.batching`) need numpy only.
"""

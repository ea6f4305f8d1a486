"""The teacher velocity service: a frozen ``VelocityNet`` behind Open Inference Protocol v2.

One core (:mod:`.repository`, :mod:`.batcher`, :mod:`.protocol`, :mod:`.metrics`, the routes in
:mod:`.app`), two deployments: a uvicorn process (:mod:`.command`) and a Ray Serve deployment
(:mod:`.ray_deployment`).
"""

"""The teacher velocity service: a frozen model behind Open Inference Protocol v2.

Models enter through one seam (:mod:`.backend`): the toy ``VelocityNet`` (:mod:`.repository`) or
a diffusers SD3 / FLUX transformer with LoRA adapters (:mod:`.diffusers_backend`,
:mod:`.diffusers_repository`, :mod:`.lora`), conditioning cache and guidance in the core
(:mod:`.conditioned`, :mod:`.cond_cache`).

One core (:mod:`.repository`, :mod:`.batcher`, :mod:`.protocol`, :mod:`.metrics`, the routes in
:mod:`.app`), two deployments: a uvicorn process (:mod:`.command`) and a Ray Serve deployment
(:mod:`.ray_deployment`).
"""

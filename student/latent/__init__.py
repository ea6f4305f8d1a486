"""The latent world: a second embedded world beside the ring, at real model shapes.

Small conditional latents ``[4, 8, 8]`` in four families (two sub-modes each), a prompt embedding
per family, a tiny SD3 transformer base and LoRA specialist teachers, and OPD on them in-process.
See docs/latent-world.md.
"""

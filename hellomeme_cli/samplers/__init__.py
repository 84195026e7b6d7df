"""Samplers: the denoising loops that turn driving inputs and a reference into latents, one file per family.

May import: models/, versions, progress, errors (never engine, pipeline or a front end: they get the networks through `LoadedNetworks`).
"""

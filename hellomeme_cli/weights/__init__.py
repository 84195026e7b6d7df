"""Weights: the lock file and the download cache, checkpoint and LoRA presets, and the tiny random weights tests use.

May import: models/, media/, progress, logs, errors (never face, samplers, engine, pipeline or a front end).
"""

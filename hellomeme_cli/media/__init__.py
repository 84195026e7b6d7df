"""Media: reading and writing video and images, the meme outputs (GIF, WebP, WebM, stickers, size
targets, loops) and their captions, atomic output files, and the x2 upscaler that runs on frames.

May import: models/ (the upscaler's network), progress, errors (nothing that knows about faces, weights or runs).
"""

"""Face: tracking, the control signals drawn from it, driving input (clips and motion templates), steering and paste-back.

May import: models/ (the signal encoders), media/, weights/, settings, progress, errors (never samplers, engine, pipeline or a front end).
"""

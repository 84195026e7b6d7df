"""Batch, a front end: many clips in one run, here (`run`) or on a Ray cluster (`on_ray`), sharing the jobs, ledger and report (`jobs`).

May import: the spine (pipeline, engine, settings, versions) and every room below it; nothing imports it but the command line.
"""

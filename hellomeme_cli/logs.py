"""The libraries we load networks with log warnings and draw their own progress bars; the library
never prints (it reports through its progress callback), so loading runs with them quiet."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def libraries_quiet() -> Iterator[None]:
    """Within: diffusers, transformers and huggingface_hub log errors only and draw no bars."""
    import diffusers
    import huggingface_hub.utils
    import transformers

    loggers = (diffusers.utils.logging, transformers.utils.logging)
    levels = [logging.get_verbosity() for logging in loggers]
    bars = [not diffusers.utils.logging.is_progress_bar_enabled(), not transformers.utils.logging.is_progress_bar_enabled()]
    hub_bars = huggingface_hub.utils.are_progress_bars_disabled()
    for logging in loggers:
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        yield
    finally:
        for logging, level, disabled in zip(loggers, levels, bars):
            logging.set_verbosity(level)
            if not disabled:
                logging.enable_progress_bar()
        if not hub_bars:
            huggingface_hub.utils.enable_progress_bars()


@contextlib.contextmanager
def hub_logs_quiet() -> Iterator[None]:
    """Within: huggingface_hub logs errors only (its download retries warn on stderr; failures
    reach the caller as exceptions). Its progress bars are left alone: downloads report through ours."""
    from huggingface_hub.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def native_stderr_muted() -> Iterator[None]:
    """Within: what C++ code writes to file descriptor 2 goes nowhere. MediaPipe's start-up logging and
    Ray's connection retries are written there directly, past Python's logging; the library must not print."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

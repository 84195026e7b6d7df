"""hellomeme: animate a portrait with a driving video's head motion and expressions (HelloMeme).

The library: `load_pipeline`, then `animate` / `render_image` (see docs/library.md). They are
imported on first use, so `import hellomeme_cli` (and the command line's --help) stays fast.
"""

from hellomeme_cli.version import __version__

__all__ = ["HellomemeError", "ProgressEvent", "__version__", "animate", "evaluate", "load_pipeline", "render_image"]


def __getattr__(name: str):
    if name in ("animate", "evaluate", "load_pipeline", "render_image"):
        from hellomeme_cli import api

        return getattr(api, name)
    if name == "HellomemeError":
        from hellomeme_cli.errors import HellomemeError

        return HellomemeError
    if name == "ProgressEvent":
        from hellomeme_cli.progress import ProgressEvent

        return ProgressEvent
    raise AttributeError(f"module 'hellomeme_cli' has no attribute {name!r}")

"""`hellomeme demo` (`make demo`): the main job on an example, for a first run. It fetches what
`animate` needs with the chosen settings (hash-checked, as `weights fetch` does) and an example
portrait and driving clip from the official repository (weights.lock: `demo_portrait`,
`demo_clip`), then animates them like `animate` does."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.pipeline import run_components
from hellomeme_cli.progress import ProgressCallback, no_progress
from hellomeme_cli.settings import AnimateSettings
from hellomeme_cli.weights.cache import WeightCache, hub_endpoint

EXAMPLES = ("demo_portrait", "demo_clip")


def fetch_demo(settings: AnimateSettings, cache: WeightCache, progress: ProgressCallback = no_progress) -> tuple[Path, Path]:
    """Everything the demo run needs, fetched where missing; returns the example portrait and clip."""
    names = [*run_components(settings, "video"), *EXAMPLES]
    try:
        cache.fetch(names, progress)
    except HellomemeError as error:
        hosts = {urlparse(hub_endpoint()).hostname} | {urlparse(cache.component(n).url).hostname for n in names if cache.component(n).url}
        raise HellomemeError(
            f"cannot fetch what the demo needs from {', '.join(sorted(hosts))} ({error}); without that network, "
            "copy the files from a machine that has them and run `hellomeme weights import DIR`"
        ) from None
    folders = cache.require(names)
    portrait, clip = (folders[name] / cache.component(name).files[0].path for name in EXAMPLES)
    return portrait, clip

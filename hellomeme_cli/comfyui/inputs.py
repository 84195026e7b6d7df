"""Node inputs made from the settings' declarations (settings.py), named as the settings are (the
command line's names, with underscores), and the values ComfyUI passes turned back into settings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hellomeme_cli.front_end import BASE_CHECKPOINT
from hellomeme_cli.settings import Setting, all_settings

DEFAULT = -1  # a number input of an optional setting (steps, guidance, fps, ...) at -1: its default
NUMBER_MAX = 100_000  # the widgets' top where the setting has none (ComfyUI's number widgets need one)
SEED_MAX = 2**32 - 1
# The first entry of a list input that means "not set" (None), where the setting has no value for it.
UNSET = {"control": "the version's", "scheduler": "the version's", "few_step": "off", "vae": "the checkpoint's", "checkpoint": BASE_CHECKPOINT}
_NUMBERS = {int: "INT", int | None: "INT", float: "FLOAT", float | None: "FLOAT"}

Choices = Callable[[Setting], "list | None"]


def declared(names: Iterable[str]) -> list[Setting]:
    """The settings of these names, in the order settings.py declares them."""
    wanted = set(names)
    return [setting for setting in all_settings() if setting.name in wanted]


def input_types(names: Iterable[str], choices: Choices) -> dict[str, tuple]:
    """`{name: (type, options)}` for ComfyUI's INPUT_TYPES: a list input where `choices` gives the
    values (UNSET's entry first where the setting may be left unset), else a widget of the setting's type."""
    return {setting.name: _input(setting, choices(setting)) for setting in declared(names)}


def _input(setting: Setting, choices: list | None) -> tuple:
    tooltip = f"{setting.help} Default: {setting.shown_default}."
    if choices is not None:
        values = [UNSET[setting.name], *(c for c in choices if c != UNSET[setting.name])] if setting.name in UNSET else list(choices)
        default = setting.default if setting.default in values else values[0]
        return values, {"default": default, "tooltip": tooltip}
    if setting.name == "seed":  # ComfyUI's seed widget: its "control after generate" picks the next one
        return "INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True, "tooltip": setting.help}
    if setting.cli_type is bool:
        return "BOOLEAN", {"default": setting.default, "tooltip": tooltip}
    if setting.cli_type in _NUMBERS:
        optional = setting.default is None
        bounds = setting.range
        low = DEFAULT if optional or bounds is None else bounds.low
        high = NUMBER_MAX if bounds is None or bounds.high is None else bounds.high
        options = {"default": DEFAULT if optional else setting.default, "min": low, "max": high}
        if bounds is not None and bounds.step is not None:
            options["step"] = bounds.step
        if _NUMBERS[setting.cli_type] == "FLOAT":
            options.update(step=0.01, round=0.001)
        return _NUMBERS[setting.cli_type], {**options, "tooltip": tooltip + (f" {DEFAULT}: the default." if optional else "")}
    return "STRING", {"default": setting.default or "", "multiline": True, "tooltip": tooltip}


def setting_values(names: Iterable[str], given: dict[str, Any]) -> dict[str, Any]:
    """The settings' values from the inputs' (by name): UNSET entries and DEFAULT numbers left
    unset (None), numbers typed as declared."""
    values = {}
    for setting in declared(names):
        value = given[setting.name]
        if value == UNSET.get(setting.name) or (setting.default is None and setting.cli_type in _NUMBERS and value == DEFAULT):
            value = None
        elif setting.cli_type in (int, int | None):
            value = int(value)
        elif setting.cli_type in (float, float | None):
            value = float(value)
        values[setting.name] = value
    return values

"""The data layer: sources -> tokenizer -> packed blocks -> batches.

`prepare_data(config, run_dir)` runs the whole chain and returns a `PreparedData`; the rooms
below it (`sources`, `tokenizer`, `packing`, `loader`) are usable on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from truthgpt.data.prepare import PreparedData, prepare_data

__all__ = ["PreparedData", "prepare_data"]


def __getattr__(name: str) -> Any:
    # Lazy: validating a config imports `truthgpt.data.sources` (to know the source names), and
    # that must not pull in torch and transformers through this package's __init__.
    if name in __all__:
        from truthgpt.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

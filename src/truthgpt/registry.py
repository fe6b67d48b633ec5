"""Name -> builder registries, filled by decorators and by the `truthgpt.plugins` entry points."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from truthgpt.errors import ConfigError, did_you_mean_sentence


class Registry(dict[str, Callable[..., Any]]):
    """A dict from name to builder; `@REG.register("name")` adds one.

    `builtins` lists the names `builtin_module` registers, so a config naming one of them is
    checked without importing that module (and torch with it); a test keeps the list honest.
    """

    def __init__(self, kind: str, builtin_module: str, builtins: tuple[str, ...]) -> None:
        super().__init__()
        self.kind = kind
        # Imported on first lookup: it registers the built-in names. Keeps `import
        # truthgpt.config` light and lets a lower layer name builders of an upper one.
        self.builtin_module = builtin_module
        self.builtins = builtins

    def knows(self, name: str) -> bool:
        """True for a built-in or a plugin's name, without importing the built-in builders."""
        if name in self.builtins:
            return True
        load_plugins()
        return name in self

    def names(self) -> list[str]:
        """Every known name, built-in or registered, sorted (for error messages)."""
        return sorted(set(self.builtins) | set(self))

    def load(self) -> Registry:
        """Import the built-in builders and the plugins once; returns self."""
        import_module(self.builtin_module)
        load_plugins()
        return self

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = builder
            return builder

        return add

    def get_builder(self, name: str, key_path: str = "") -> Callable[..., Any]:
        """The builder for `name`, or a ConfigError naming the key and the known names."""
        self.load()
        if name not in self:
            where = f"{key_path}: " if key_path else ""
            hint = did_you_mean_sentence(name, self)
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self))}."
            )
        return self[name]


_plugins_loaded = False


def load_plugins() -> None:
    """Import every `truthgpt.plugins` entry point once; each registers its own names."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group="truthgpt.plugins"):
        entry.load()


# The registries. Upper layers fill them with `@NAME.register(...)`.
SOURCES = Registry(
    "data source",
    "truthgpt.data.sources",
    ("python-stdlib", "text", "jsonl", "hf", "webdataset"),
)
# Image sources (task image-generation) share `data.source` with the text ones above.
IMAGE_SOURCES = Registry("image source", "truthgpt.data.images", ("digits", "imagefolder"))
ARCHS = Registry("model arch", "truthgpt.models.build", ("llama", "gpt2", "hf"))
OPTIMIZERS = Registry(
    "optimizer",
    "truthgpt.training.optim",
    ("adamw", "adamw8bit", "muon", "lion", "adafactor", "sgd"),
)
SCHEDULES = Registry("lr schedule", "truthgpt.training.optim", ("cosine", "linear", "constant"))
TASKS = Registry("task", "truthgpt.training.tasks", ("causal_lm", "sft", "image-generation"))
CALLBACKS = Registry(
    "callback",
    "truthgpt.training.callbacks",
    ("rich", "tqdm", "none", "jsonl", "images", "tensorboard", "plot", "histograms", "wandb"),
)

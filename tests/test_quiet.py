"""Quiet by default: no third-party progress bars on local loads/saves, notices dropped."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import transformers

from truthgpt.config import load
from truthgpt.models import load_model, save_model
from truthgpt.models.lora import apply_lora
from truthgpt.quiet import drop_torchvision_notices, no_load_save_bars, no_numpy_copy_notices
from truthgpt.registry import ARCHS

TINY_GPT_NEOX = {
    "model_type": "gpt_neox",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def test_hf_arch_save_and_load_show_no_bars(tmp_path: Path, capfd) -> None:
    config = load({"model": {"arch": "hf", "hf_config": TINY_GPT_NEOX}})
    model = ARCHS.load()["hf"](config.model, 100)
    save_model(model, tmp_path / "model")
    load_model(tmp_path / "model", native=False)
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err, err
    assert transformers.utils.logging.is_progress_bar_enabled()  # restored afterwards


def test_bars_stay_off_when_the_user_turned_them_off() -> None:
    transformers.utils.logging.disable_progress_bar()
    try:
        with no_load_save_bars():
            pass
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.utils.logging.enable_progress_bar()


def test_torchvision_notice_is_dropped_and_others_pass(caplog) -> None:
    drop_torchvision_notices()
    drop_torchvision_notices()  # idempotent: one filter
    logger = logging.getLogger("transformers.utils.import_utils")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


class _OldArray:
    """An array-like with numpy 1's `__array__(dtype)` signature, as torch tensors had."""

    def __array__(self, dtype=None):
        return np.zeros(2, dtype=dtype)


def test_numpy_copy_notice_is_silenced_inside_only() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with no_numpy_copy_notices():
            np.array(_OldArray())
        assert not caught
        np.array(_OldArray())
    assert any("copy keyword" in str(w.message) for w in caught)


def test_lora_on_an_hf_model_warns_nothing() -> None:
    config = load({"model": {"arch": "hf", "hf_config": TINY_GPT_NEOX, "lora": {"enabled": True}}})
    model = ARCHS.load()["hf"](config.model, 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, config.model.lora, "hf")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], caught

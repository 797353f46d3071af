"""quiet: known third-party notices are held (by logger and message start, nothing else), listed by held(), and
shown again with verbose; the datasets and transformers progress bars go off and come back."""

from __future__ import annotations

import logging

import pytest

from tam_hf.trainer import quiet


def _as_after_import():
    """The notices held as in a CLI run, the progress bars on as the other tests expect them."""
    from datasets.utils.tqdm import enable_progress_bars
    from transformers.utils.logging import enable_progress_bar

    quiet.install(verbose=True)
    quiet.install(verbose=False)
    enable_progress_bars()
    enable_progress_bar()


@pytest.fixture
def installed():
    quiet.install(verbose=True)  # forget what earlier tests held
    quiet.install(verbose=False)
    yield
    _as_after_import()


def _shown(caplog) -> str:
    text = "\n".join(r.getMessage() for r in caplog.records)
    caplog.clear()
    return text


def test_known_notices_are_held_narrowly_and_listed(installed, caplog):
    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    deepspeed.warning("Something else DeepSpeed says")  # same logger, another message: shown
    logging.getLogger("kernels._internals.hf_hub").warning(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub "
        "is in offline mode.")
    logging.getLogger("other").warning("Setting accelerator to CPU")  # same message, another logger: shown
    err = _shown(caplog)
    assert "Something else DeepSpeed says" in err and "Setting accelerator to CPU" in err
    assert "publisher trust" not in err
    lines = quiet.held()
    assert lines[:2] == ["DeepSpeed: Setting accelerator to CPU. If you have GPU or other accelerator, we were unable "
                         "to detect it.", "kernels._internals.hf_hub: Skipping publisher trust check for "
                         "'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode."]
    assert lines[2:] == ["datasets progress bars", "transformers progress bars"]


def test_progress_bars_go_off_and_verbose_brings_back_bars_and_held_notices(caplog):
    from datasets.utils.tqdm import are_progress_bars_disabled
    from transformers.utils.logging import is_progress_bar_enabled

    quiet.install(verbose=False)
    assert are_progress_bars_disabled() and not is_progress_bar_enabled()
    logging.getLogger("kernels._internals.hf_hub").warning(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")
    assert "publisher trust" not in _shown(caplog)
    quiet.install(verbose=True)
    assert not are_progress_bars_disabled() and is_progress_bar_enabled()
    assert "publisher trust" in _shown(caplog)  # what was held is shown after all
    assert quiet.held() == []
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(quiet.NOTICE)
    assert quiet.NOTICE in _shown(caplog)
    _as_after_import()

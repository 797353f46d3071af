"""Which ``report_to`` trackers can run here, asked before anything loads.

transformers finds out only when the Trainer is built (after the model has loaded) and then stops with
"TensorBoardCallback requires tensorboard to be installed". :func:`tracker_problems` says it up front, with the
command that installs the tracker. It imports nothing but :mod:`importlib.util` (recipe validation runs it).
"""

from __future__ import annotations

import difflib
import importlib.util

__all__ = ["TRACKERS", "tracker_problems"]

def _extra(name: str) -> str:
    return f'pip install "tam_hf[{name}]"   (from a checkout: pip install -e ".[{name}]")'


# report_to name -> (modules of which one must be importable, the install command). The names are transformers'
# INTEGRATION_TO_CALLBACK keys (tests/test_trackers.py keeps the two in step); the modules are the ones its
# is_*_available() functions look for. kubeflow needs no package (a server URL in the environment).
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), _extra("tensorboard")),
    "trackio": (("trackio",), _extra("trackio")),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "neptune": (("neptune",), "pip install neptune"),
    "clearml": (("clearml",), "pip install clearml"),
    "dagshub": (("dagshub",), "pip install dagshub mlflow"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
    "flyte": (("flytekit",), "pip install flytekit flytekitplugins-deck-standard"),
    "kubeflow": ((), ""),
}
NO_TRACKER = ("none", "all")  # "all": whichever are installed, so nothing can be missing


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package or a half-removed install
        return False


def tracker_problems(report_to: list[str]) -> list[str]:
    """One line per ``report_to`` entry that cannot work here: an unknown tracker (with a did-you-mean) or one
    whose package is not installed (with the command that installs it). Empty when all is well."""
    problems = []
    for name in report_to:
        if name in NO_TRACKER:
            continue
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS) + list(NO_TRACKER), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"report_to: unknown tracker {name!r}{hint}; known: {', '.join(TRACKERS)}, none, all")
            continue
        modules, install = TRACKERS[name]
        if modules and not any(_installed(m) for m in modules):
            problems.append(f"report_to: {name} is not installed; install it with: {install}")
    return problems

"""The package's layers, read from the source with ``ast`` (nothing is imported):

    optim  <-  trainer  <-  finetune  <-  compare  <-  cli

A module may import its own layer and the layers to its left, never one to its right, so the optimizers stay
usable with torch alone and a change to the recipe never reaches the Trainer glue. Imports inside functions
count too: a lazy import is still a dependency. ``tam_hf/__init__.py`` and ``tam_hf/run.py`` are shims over
optim and trainer. Also: every module lives in a package (its folder has ``__init__.py``, so the wheel ships
it), and the tracked files stand on their own (no pointers to notes outside the repository)."""

from __future__ import annotations

import ast
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("optim", "trainer", "finetune", "compare", "cli")
# The top-level package imports optim and trainer; importing it is as high as importing trainer.
ROOT_LAYER = "trainer"
SHIMS = {"tam_hf/__init__.py": ("optim", "trainer"), "tam_hf/run.py": ("optim", "trainer")}
# The optimizer layer is torch only: none of the Hugging Face stack.
HF_STACK = ("transformers", "peft", "accelerate", "datasets", "trl", "evaluate", "lm_eval", "huggingface_hub")


def _modules(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "tam_hf").rglob("*.py") if "__pycache__" not in p.parts)


def layer_of_file(rel: str) -> str | None:
    """tam_hf/<layer>/... -> layer; tam_hf/cli.py -> cli; shims and strays -> None."""
    parts = rel.split("/")
    if parts[1:] == ["cli.py"]:
        return "cli"
    if len(parts) > 2 and parts[1] in ORDER:
        return parts[1]
    return None


def _package_of(rel: str) -> list[str]:
    parts = rel[:-3].split("/")
    return parts if parts[-1] == "__init__" and parts.pop() else parts[:-1]


def imports(path: Path, rel: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import statement of ``path`` (``rel``: its repository path), relative
    ones resolved; ``from a import b`` yields ``a.b``, so ``from tam_hf import finetune`` is the finetune layer."""
    with warnings.catch_warnings():  # a module's own invalid escapes are not this test's business
        warnings.simplefilter("ignore")
        tree = ast.parse(path.read_text(), filename=rel)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(rel)
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return sorted(out)


def target_layer(module: str) -> str | None:
    """The tam_hf layer a dotted module name belongs to (None: not tam_hf)."""
    parts = module.split(".")
    if parts[0] != "tam_hf":
        return None
    if len(parts) > 1 and parts[1] in ORDER:
        return parts[1]
    return ROOT_LAYER  # tam_hf itself, tam_hf.__version__, tam_hf.register, the tam_hf.run shim...


def allowed(layer: str) -> tuple[str, ...]:
    return ORDER[: ORDER.index(layer) + 1]


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in _modules(root):
        rel = path.relative_to(root).as_posix()
        layer = layer_of_file(rel)
        if layer is None and rel not in SHIMS:
            found.append(f"{rel}: belongs to no layer (move it into one of tam_hf/{{{','.join(ORDER[:-1])}}}/)")
            continue
        ok = SHIMS.get(rel) or allowed(layer)
        for line, module in imports(path, rel):
            target = target_layer(module)
            if target is not None and target not in ok:
                found.append(f"{rel}:{line}: {layer or 'shim'} imports {module} ({target} layer)")
            if layer == "optim" and module.split(".")[0] in HF_STACK:
                found.append(f"{rel}:{line}: the optimizer layer imports {module} (torch only)")
    return found


def test_imports_go_one_way():
    found = violations()
    assert not found, "imports against the layer order " + " <- ".join(ORDER) + ":\n" + "\n".join(found)


def test_every_module_is_in_a_package():
    missing = sorted({p.parent.relative_to(ROOT).as_posix() for p in _modules() if not (p.parent / "__init__.py").is_file()})
    assert not missing, f"folders with modules but no __init__.py (not shipped as packages): {missing}"


def _tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def test_tracked_files_point_to_nothing_outside_the_repository():
    # Spelled in pieces so that this file does not match itself.
    needles = [("DESIGN" + ".md").encode(), (".." + "/shared").encode()]
    found = []
    for path in _tracked_files():
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if any(n in line for n in needles):
                found.append(f"{path.relative_to(ROOT).as_posix()}:{number}")
    assert not found, "references to a note outside the repository (the docs must stand alone):\n" + "\n".join(found)


# The checker itself, on made-up sources: it must see what the tests above rely on it to see.


def test_checker_sees_lazy_relative_and_from_imports(tmp_path):
    layer = tmp_path / "tam_hf" / "optim"
    layer.mkdir(parents=True)
    (layer / "__init__.py").write_text("")
    (layer / "bad.py").write_text(
        "import torch\n"
        "def f():\n"
        "    from ..finetune import recipe\n"
        "    import transformers\n"
        "from tam_hf import compare\n"
        "from . import tam\n"
    )
    (tmp_path / "tam_hf" / "stray.py").write_text("")
    assert violations(tmp_path) == [
        "tam_hf/optim/bad.py:3: optim imports tam_hf.finetune.recipe (finetune layer)",
        "tam_hf/optim/bad.py:4: the optimizer layer imports transformers (torch only)",
        "tam_hf/optim/bad.py:5: optim imports tam_hf.compare (compare layer)",
        "tam_hf/stray.py: belongs to no layer (move it into one of tam_hf/{optim,trainer,finetune,compare}/)",
    ]
    assert target_layer("tam_hf") == "trainer" and target_layer("yaml") is None

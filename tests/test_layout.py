"""The package's layers, read from the source with ``ast`` (nothing is imported):

    optim  <-  trainer  <-  integrations  <-  finetune  <-  compare  <-  commands (tam_hf/commands/, tam_hf/cli.py)

A module may import its own layer and the layers to its left, never one to its right, so the optimizers stay
usable with torch alone and a change to the recipe never reaches the Trainer glue. Imports inside functions
count too: a lazy import is still a dependency, and so is ``importlib.import_module("tam_hf....")``. A
package's ``__main__.py`` (``python -m tam_hf.compare``) is a command; ``tam_hf/__init__.py`` and
``tam_hf/run.py`` are shims over optim and trainer. No two modules of tam_hf import each other, directly or
round a longer cycle. The recipe package ``tam_hf/finetune/config/`` is a leaf of
finetune: of finetune it imports only ``errors``. Also: every module lives in a package (its folder has
``__init__.py``, so the wheel ships it), every source compiles without a warning, and the tracked files stand on
their own (no pointers to notes outside the repository)."""

from __future__ import annotations

import ast
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("optim", "trainer", "integrations", "finetune", "compare", "commands")
# The top-level package imports optim and trainer; importing it is as high as importing trainer.
ROOT_LAYER = "trainer"
SHIMS = {"tam_hf/__init__.py": ("optim", "trainer"), "tam_hf/run.py": ("optim", "trainer")}
# The optimizer layer is torch only: none of the Hugging Face stack.
HF_STACK = ("transformers", "peft", "accelerate", "datasets", "trl", "evaluate", "lm_eval", "huggingface_hub")


def _modules(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "tam_hf").rglob("*.py") if "__pycache__" not in p.parts)


def layer_of_file(rel: str) -> str | None:
    """tam_hf/<layer>/... -> layer; tam_hf/cli.py and ``python -m`` entry points (__main__.py) -> commands;
    shims and strays -> None."""
    parts = rel.split("/")
    if parts[1:] == ["cli.py"] or parts[-1] == "__main__.py":
        return "commands"
    if len(parts) > 2 and parts[1] in ORDER:
        return parts[1]
    return None


def _package_of(rel: str) -> list[str]:
    parts = rel[:-3].split("/")
    return parts if parts[-1] == "__init__" and parts.pop() else parts[:-1]


def imports(path: Path, rel: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every import statement of ``path`` (``rel``: its repository path), relative
    ones resolved; ``from a import b`` yields ``a.b``, so ``from tam_hf import finetune`` is the finetune layer.
    ``importlib.import_module("x")`` and ``__import__("x")`` with a string literal count as imports of x."""
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
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
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


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """tam_hf module -> {tam_hf module it imports: line}; ``from a import b`` is an import of module a.b when
    there is one, else of a (b is a name in it)."""
    files = {_module_name(p.relative_to(root).as_posix()): p for p in _modules(root)}
    graph = {}
    for name, path in files.items():
        edges = {}
        for line, module in imports(path, path.relative_to(root).as_posix()):
            while module and module not in files:
                module = module.rpartition(".")[0]
            if module and module != name:
                edges.setdefault(module, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import cycles of ``graph``: each strongly connected set of two or more modules, as one cycle through
    them (module, module it imports, ..., back to the first)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(start: str) -> None:  # Tarjan's algorithm, without recursion
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    found.append(_walk(graph, set(members), min(members)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _walk(graph, members: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``members``."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for child in sorted(graph[path[-1]]):
            if child == start:
                return path + [start]
            if child in members and child not in seen:
                seen.add(child)
                paths.append(path + [child])
    return [start]


def test_no_import_cycles():
    graph = import_graph()
    found = [" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(c, c[1:])) + f" -> {c[-1]}" for c in cycles(graph)]
    assert not found, "import cycles inside tam_hf:\n" + "\n".join(found)


CONFIG = "tam_hf.finetune.config"
CONFIG_MAY_IMPORT = ("tam_hf.finetune.config", "tam_hf.finetune.errors")


def config_violations(root: Path = ROOT) -> list[str]:
    """Imports of the rest of finetune (or of compare, commands) by the recipe package: it must stay a leaf."""
    found = []
    for name, edges in import_graph(root).items():
        if name == CONFIG or name.startswith(CONFIG + "."):
            for module, line in edges.items():
                # The optimizer registry, the switch rules and the tracker table are torch-free data the recipe is
                # checked against.
                if module.split(".")[0] == "tam_hf" and not (
                        module.startswith(("tam_hf.optim.registry", "tam_hf.optim.hyperparams",
                                           "tam_hf.optim.switch_rules", "tam_hf.integrations.trackers")) or target_layer(module) == "finetune") or (
                        target_layer(module) == "finetune"
                        and not any(module == m or module.startswith(m + ".") for m in CONFIG_MAY_IMPORT)):
                    found.append(f"{name.replace('.', '/')}.py:{line}: imports {module}")
    return sorted(found)


def test_config_is_a_leaf_of_finetune():
    found = config_violations()
    assert not found, "tam_hf/finetune/config imports nothing of tam_hf.finetune but errors:\n" + "\n".join(found)


def test_sources_compile_without_warnings():
    """An invalid escape sequence ('\\d' outside a raw string) is a warning today and an error in a later Python."""
    bad = []
    for path in _modules():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(), str(path), "exec")
            except SyntaxError as exc:
                bad.append(f"{path.relative_to(ROOT).as_posix()}:{exc.lineno}: {exc.msg}")
    assert not bad, "sources that compile with a warning:\n" + "\n".join(bad)
    with warnings.catch_warnings(), pytest.raises(SyntaxError):  # the check itself sees one
        warnings.simplefilter("error")
        compile('x = "\\d"\n', "check.py", "exec")


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
        "tam_hf/stray.py: belongs to no layer (move it into one of tam_hf/{optim,trainer,integrations,finetune,compare}/)",
    ]
    assert target_layer("tam_hf") == "trainer" and target_layer("yaml") is None


def test_checker_sees_cycles_lazy_and_importlib_imports_and_config_leaks(tmp_path):
    package = tmp_path / "tam_hf" / "finetune"
    (package / "config").mkdir(parents=True)
    for folder in (tmp_path / "tam_hf", package, package / "config"):
        (folder / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "a.py").write_text("def f():\n    from tam_hf.finetune import b\n")
    (package / "b.py").write_text("import importlib\nmodule = importlib.import_module('tam_hf.finetune.c')\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "config" / "load.py").write_text("from tam_hf.finetune.errors import X\nfrom ..data import load\n"
                                                "from tam_hf.finetune.config import schema\n")
    (package / "config" / "schema.py").write_text("import yaml\n")
    (package / "data.py").write_text("from tam_hf.finetune.config.load import x\n")
    assert cycles(import_graph(tmp_path)) == [
        ["tam_hf.finetune.a", "tam_hf.finetune.b", "tam_hf.finetune.c", "tam_hf.finetune.a"],
        ["tam_hf.finetune.config.load", "tam_hf.finetune.data", "tam_hf.finetune.config.load"]]
    assert config_violations(tmp_path) == ["tam_hf/finetune/config/load.py:2: imports tam_hf.finetune.data"]
    assert layer_of_file("tam_hf/cli.py") == layer_of_file("tam_hf/commands/run.py") == "commands"

"""The package's shape: no import circles, and data flows one way.

Every module under ``src/imgclf`` is parsed with ``ast`` (nothing is imported)
and every ``import`` of an imgclf module counts, wherever it is written: at the
top, inside a function, or under ``if TYPE_CHECKING``. An import inside a
function still makes the two modules depend on each other; it only hides the
circle from Python. (Names looked up by string, such as the ``_LAZY`` tables of
the package ``__init__`` files, are not seen; those files also import the same
names under ``TYPE_CHECKING``, which is.)

The layers, lowest first::

    errors, atomic, filetypes, version
    -> data -> nets -> inference -> training -> (insight | batch | serve)
    -> imgclf/__init__, cli, __main__, spark, testing, sample_data

A module may import from its own layer and the layers below, never from a later
one; insight, batch and serve are side by side and do not import one another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imgclf"

#: Layer of each top-level module or subpackage of imgclf; higher may import lower.
LAYERS = {
    "errors": 0, "atomic": 0, "filetypes": 0, "version": 0, "names": 0, "options": 0, "rows": 0,
    "data": 1,
    "nets": 2,
    "inference": 3,
    "training": 4,
    "insight": 5, "batch": 5, "serve": 5,
    "": 6, "cli": 6, "__main__": 6, "spark": 6, "testing": 6, "sample_data": 6,
}  # fmt: skip
#: Rooms of one layer that must not import one another.
SIDE_BY_SIDE = {"insight", "batch", "serve"}
#: Imports allowed against the rules above, each with its reason: (importer, imported) -> why.
#: None are needed today; a new one must say why the code cannot be fixed instead.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module's dotted name -> (file, whether it is a package's __init__)."""
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


MODULES = _modules()


def _known(name: str) -> str | None:
    """``name``, or the closest enclosing module that exists (``imgclf.x.func`` -> ``imgclf.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The imgclf modules that ``module`` imports, at any level of its code."""
    path, is_package = MODULES[module]
    package = module if is_package else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name) for alias in node.names if alias.name.split(".")[0] == "imgclf")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..data import y
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "imgclf":
                continue
            for alias in node.names:  # `from imgclf.insight import neardup` imports the module neardup
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else _known(source))
    return {m for m in found if m is not None and m != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _room(module: str) -> str:
    """The top-level module or subpackage ``module`` belongs to ("" for imgclf itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycle() -> list[str] | None:
    """One import circle, as the modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_graph_sees_imports_at_every_level():
    """The parser is not vacuous: a top-level import, one inside a function and one under
    TYPE_CHECKING are all edges."""
    assert "imgclf.inference.loading" in GRAPH["imgclf.serve.app"]  # at the top
    assert "imgclf.inference.export" in GRAPH["imgclf.inference.model"]  # inside a method
    assert "imgclf.training.trainer" in GRAPH["imgclf"]  # under TYPE_CHECKING
    assert "imgclf.insight.neardup" in GRAPH["imgclf.insight.audit"]  # from a package, a module
    assert len(MODULES) > 50


def test_no_import_circles():
    circle = _cycle()
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_every_module_has_a_layer():
    unplaced = sorted({_room(m) for m in MODULES} - set(LAYERS))
    assert not unplaced, f"give these a layer in tests/test_layout.py: {unplaced}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_point_down(module):
    room = _room(module)
    wrong = []
    for imported in sorted(GRAPH[module]):
        other = _room(imported)
        later = LAYERS[other] > LAYERS[room]
        sideways = other != room and {room, other} <= SIDE_BY_SIDE
        if (later or sideways) and (module, imported) not in EXCEPTIONS:
            wrong.append(f"{imported} ({'a later layer' if later else 'a room beside it'})")
    assert not wrong, f"{module} imports " + ", ".join(wrong)


def test_exceptions_are_still_needed_and_say_why():
    for (module, imported), reason in EXCEPTIONS.items():
        assert reason.strip(), (module, imported)
        assert imported in GRAPH.get(module, ()), f"{module} no longer imports {imported}: drop the exception"


def _error_classes() -> set[str]:
    tree = ast.parse((SRC / "errors.py").read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def test_errors_and_their_codes_are_decided_in_errors_py():
    """Every ImgclfError subclass is defined in errors.py, and no other module sets an
    ``exit_code`` or ``http_status``."""
    errors, wrong = _error_classes(), []
    for module, (path, _) in MODULES.items():
        if module == "imgclf.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & errors:
                    wrong.append(f"{module}: class {node.name}")
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) else []:
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
                if name in ("exit_code", "http_status"):
                    wrong.append(f"{module}:{node.lineno} sets {name}")
    assert not wrong, "decide these in imgclf/errors.py: " + "; ".join(wrong)


def test_moved_errors_keep_their_old_import_paths():
    pytest.importorskip("torch")
    from imgclf import errors
    from imgclf.training.checkpoint import TrainingInterrupted
    from imgclf.training.distributed import DistributedRunError

    assert TrainingInterrupted is errors.TrainingInterrupted and TrainingInterrupted("x").exit_code == 130
    assert DistributedRunError is errors.DistributedRunError
    # a failed rank's own code when it reported its error (2: bad input), else 1 (a signal's code is negative)
    assert [DistributedRunError("x", rank_exit_code=c).exit_code for c in (2, -15, 0, None)] == [2, 1, 1, 1]

"""The package's layers, read from the import statements: every folder imports only from the folders below it
(io, ops, data < nn < models < measures < experiments < bench < the package root < cli), nothing imports the
package root from inside, the import graph has no cycle, and pyproject lists every folder (docs/architecture.md)."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "itconv_fast"
CLI = ROOT / "cli"

# Rank of each layer: a module may import from its own layer and from lower ranks only.
RANKS = {
    "io": 0,
    "ops": 0,
    "data": 0,
    "nn": 1,
    "models": 2,
    "measures": 3,
    "objectives": 3,
    "experiments": 4,
    "bench": 5,
    "": 6,
    "cli": 7,
}


def _modules() -> dict:
    """{dotted module name: path} of every Python file of the package and of cli/ (itconv_fast.cli)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    for path in CLI.glob("*.py"):
        name = "itconv_fast.cli" if path.stem == "__init__" else f"itconv_fast.cli.{path.stem}"
        found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> set:
    """The package modules that `module` imports (module level and inside functions), as dotted names."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name.split(".")[0] == "itconv_fast"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "itconv_fast":
                continue
            # `from pkg import sub` imports the submodule when one exists by that name.
            subs = {f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES}
            targets |= subs or {source}
            if subs and len(subs) < len(node.names):
                targets.add(source)
    return {t for t in targets if t in MODULES or t.startswith("itconv_fast._")}


def test_every_module_is_in_a_known_layer():
    assert {_layer(m) for m in MODULES} <= set(RANKS), sorted({_layer(m) for m in MODULES} - set(RANKS))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_from_the_same_or_lower_layers(module):
    rank = RANKS[_layer(module)]
    upward = sorted(t for t in _imports(module) if RANKS[_layer(t)] > rank)
    assert not upward, f"{module} (layer {_layer(module) or 'root'}) imports from higher layers: {upward}"
    if module != "itconv_fast" and _layer(module) != "cli":
        assert "itconv_fast" not in _imports(module), f"{module} imports the package root (a cycle in the making)"


def test_the_import_graph_has_no_cycle():
    graph = {m: {t for t in _imports(m) if t in MODULES} for m in MODULES}
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is not vacuous: an import from models inside ops is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..models import IterResNet\n")
    monkeypatch.setitem(MODULES, "itconv_fast.ops.bad", bad)
    assert "itconv_fast.models" in _imports("itconv_fast.ops.bad")
    with pytest.raises(AssertionError, match="higher layers"):
        test_imports_only_from_the_same_or_lower_layers("itconv_fast.ops.bad")


def test_every_folder_states_its_job_and_is_packaged():
    pyproject = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(itconv_fast(?:\.\w+)?)"', re.search(r"packages = \[(.*?)\]", pyproject, re.S).group(1)))
    folders = {m for m in MODULES if _is_package(m)}
    assert listed == folders
    for folder in folders:
        doc = ast.get_docstring(ast.parse(MODULES[folder].read_text()))
        assert doc and len(doc) > 40, f"{folder}/__init__.py must say what the folder is for"


def test_no_module_past_400_lines_unless_it_says_it_is_one_thing():
    for module, path in MODULES.items():
        lines = path.read_text().count("\n")
        if lines > 400:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "one cohesive thing" in doc, f"{module}: {lines} lines; split it or say why it is one thing"


def test_no_exported_name_shadows_a_module():
    """`from itconv_fast.nn import geometry` must give the module: a folder may not export a function named
    like one of its files (the attribute would hide the module from `from pkg import module`)."""
    import importlib

    for module in sorted(MODULES):
        if module == "itconv_fast" or _is_package(module):
            continue
        parent, _, name = module.rpartition(".")
        loaded = importlib.import_module(module)
        assert getattr(importlib.import_module(parent), name) is loaded, f"{parent}.{name} is not the module"


# Modules named for internal use: their names may be imported by the folder that owns them.
INTERNAL_MODULES = {"_extension", "_reference"}


def _underscore_imports() -> list:
    """(module, imported name) for every private name (one leading underscore) imported from another module."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    name = alias.name
                    if name.startswith("_") and not name.startswith("__") and name not in INTERNAL_MODULES:
                        found.append((module, name))
    return found


def test_no_private_name_is_imported_across_modules():
    """What another module needs is public (or lives in a module named for internal use): zero."""
    assert _underscore_imports() == []


def test_the_private_import_counter_sees_one(tmp_path, monkeypatch):
    planted = tmp_path / "planted.py"
    planted.write_text("from itconv_fast.measures.indices import _phi\nfrom .ops import _extension\n")
    monkeypatch.setitem(MODULES, "itconv_fast.measures.planted", planted)
    assert _underscore_imports() == [("itconv_fast.measures.planted", "_phi")]


def _architecture_paragraphs() -> dict:
    """{folder: its paragraph in docs/architecture.md's "The layers"} (the paragraph opens with **`folder/`)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    layers = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    found = {}
    for paragraph in layers.split("\n\n"):
        heading = re.match(r"\*\*(.+?)\*\*", paragraph.strip())
        for folder in re.findall(r"`(?:itconv_fast/)?(\w+)/`", heading.group(1)) if heading else []:
            found[folder] = found.get(folder, "") + paragraph
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not MODULES[m].name == "__init__.py"))
def test_every_module_is_named_in_docs_architecture(module):
    """Each file of the package is named, as `name.py`, in its folder's paragraph of docs/architecture.md."""
    paragraphs = _architecture_paragraphs()
    folder = "cli" if module.startswith("itconv_fast.cli") else _layer(module)
    assert folder in paragraphs, f"docs/architecture.md has no paragraph for {folder}/"
    assert f"{MODULES[module].name}" in paragraphs[folder], f"docs/architecture.md does not name {module}"

"""The shape of the code, checked: the data flows one way through tiers, no module imports in a
cycle, no private name crosses a module boundary (tests included), and only the features package
opens the catalog. docs/architecture.md draws the same map."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).parent
TESTS = Path(__file__).parent

# The data flow, upstream first: a module imports only from tiers before its own (a package's own
# modules import each other freely, without cycles).
TIERS = [
    ("errors", "progress", "version", "globs"),
    ("filters", "fsutil"),  # filters: the --where language, stdlib, errors and globs only
    ("images",),  # finding and decoding image files
    ("decode_pool", "copies"),  # decoding in worker processes; local features and the geometric check of copies
    ("model",),  # package: info, weights, graph, whitening, runtime
    ("quantize",),
    ("features",),  # package: the shard file, the catalog, the folder as a whole
    ("synthetic",),  # synthetic features in real shards, for tests and benchmarks (the product never imports it)
    ("extract",),  # files -> model -> shards, as per-shard tasks
    ("index",),  # package: plan, tune, fill, build, update, versions, the id table, stores, codes
    ("search", "ingest"),  # ingest: images added and removed between builds (the journal, the ingest folder)
    ("duplicates", "evaluate", "verify"),
    ("sheet",),
    ("distributed",),  # runs extract's and index's per-task functions on Ray, handed in as a distributor
    ("serve",),  # package: batcher, service, HTTP app
    ("rebuild",),
    ("cli",),
    ("__init__", "__main__"),  # the front door and `python -m pipeline`
]
TIER = {name: t for t, names in enumerate(TIERS) for name in names}


def module_name(path: Path) -> str:
    """'index.build' for pipeline/index/build.py, 'features' for pipeline/features/__init__.py."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return (PACKAGE / name.replace(".", "/") / "__init__.py").exists()


def resolve(importer: str, node: ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The pipeline modules an import names: its module, or its names where they are submodules."""
    if node.level:
        base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
        if importer == "__init__":
            base = []
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    elif (node.module or "") == "pipeline" or (node.module or "").startswith("pipeline."):
        target = node.module[len("pipeline.") :] if node.module != "pipeline" else ""
    else:
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}" if target else alias.name
        found.append(sub if sub in known else (target or "__init__"))
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found += resolve(name, node, known)
        elif isinstance(node, ast.Import):
            found += [a.name[len("pipeline.") :] for a in node.names if a.name.startswith("pipeline.")]
    return [m for m in found if m != name]


def test_every_module_has_a_tier():
    tops = {name.split(".")[0] for name in modules()}
    assert tops <= set(TIER), f"place these modules of pipeline/ in TIERS: {sorted(tops - set(TIER))}"


def test_modules_import_one_way():
    known = modules()
    climbs = []
    for name, path in known.items():
        top = name.split(".")[0]
        for imported in imports(name, path, known):
            other = imported.split(".")[0]
            if other != top and TIER[other] >= TIER[top]:
                climbs.append(f"{name} imports {imported}")
    assert not climbs, "imports against the data flow: " + "; ".join(climbs)


def test_no_import_cycles():
    """Function-level imports count too: a cycle hidden in a function is still a cycle."""
    known = modules()
    graph = {name: set(imports(name, path, known)) & set(known) for name, path in known.items()}
    for name in known:  # a package's front imports its modules; a module that imports its own front is no cycle
        graph[name] -= {n for n in list(graph[name]) if name.startswith(n + ".")}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(
                    " -> ".join(trail[trail.index(nxt) :] + [node, nxt]) if nxt in trail else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def private_uses(path: Path) -> list[str]:
    """`from pipeline.x import _y`, `x._y` and setattr(x, "_y", ...) where x is a pipeline module."""
    tree = ast.parse(path.read_text())
    own = path.is_relative_to(PACKAGE)
    modules_bound: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("pipeline")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                modules_bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules_bound |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("pipeline")}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules_bound
            and not own
        ):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
        if (
            isinstance(node, ast.Call)
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value.startswith("_")
            and not node.args[1].value.startswith("__")
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in modules_bound
        ):
            found.append(f"{path.name}:{node.lineno} patches {node.args[0].id}.{node.args[1].value}")
    return found


def test_no_private_name_crosses_a_module():
    files = sorted(PACKAGE.rglob("*.py")) + sorted(TESTS.glob("*.py"))
    found = [use for path in files for use in private_uses(path)]
    assert not found, "private names used outside their module: " + "; ".join(found)


def test_only_the_features_package_opens_the_catalog():
    opened = [
        f"{name}:{node.lineno}"
        for name, path in modules().items()
        if name.split(".")[0] != "features"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Catalog"
    ]
    assert not opened, f"only pipeline/features opens the catalog: {opened}"

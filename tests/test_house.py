"""The shape of the code, checked: imports that only point down (no circle), no import inside a
function but of a documented optional dependency, no private name taken from another module, every
module and public function with a docstring, functions of at most 80 lines outside Triton kernels,
lines of at most 120 columns."""
from __future__ import annotations

import ast
import pathlib

import pytest

from cellmnn.optional import LAZY
from cellmnn_kernels.ops.utils import LAZY_IMPORTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("cellmnn", "cellmnn_kernels")
MAX_FUNCTION_LINES = 80
MAX_COLUMNS = 120


def modules(package: str) -> dict:
    """Dotted module name -> (path, AST) for every module of ``package``."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, from inside ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(package: str):
    """(importer, imported module, node, inside a function) for every import of the package's own
    modules (and, for ``from X import name``, the submodule X.name when it is one)."""
    mods = modules(package)
    for name, (path, tree) in mods.items():
        is_package = path.name == "__init__.py"
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, is_package, node)
                targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            else:
                continue
            for t in targets:
                yield name, t, node, id(node) in inner, mods


def graph(package: str) -> dict:
    """Module -> the package's modules it imports at module level.  Importing a.b.c also runs the
    packages a.b's __init__ (an edge), except the importer's own parents, which are already running
    (and the top package's __init__, the public facade above everything)."""
    edges = {}
    for importer, target, _, in_function, mods in imports(package):
        edges.setdefault(importer, set())
        if in_function or target.split(".")[0] != package:
            continue
        parts = target.split(".")
        for k in range(2, len(parts) + 1):
            mod = ".".join(parts[:k])
            if mod in mods and not (importer == mod or importer.startswith(mod + ".")) and mod != importer:
                edges[importer].add(mod)
    return edges


def cycle(edges: dict):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if not state.get(m):
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if not state.get(n):
            found = visit(n)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    edges = graph(package)
    assert edges, "no modules found"
    assert cycle(edges) is None, f"import circle: {' -> '.join(cycle(edges))}"


def test_the_circle_finder_finds_circles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _may_import_lazily(package: str, module: str) -> bool:
    """cellmnn: the optional dependencies of ``cellmnn.optional.LAZY``; cellmnn_kernels: those of
    ``cellmnn_kernels.ops.utils.LAZY_IMPORTS`` (by top-level name or last component)."""
    if package == "cellmnn":
        return module.split(".")[0] in LAZY
    return module.split(".")[0] in LAZY_IMPORTS or module.split(".")[-1] in LAZY_IMPORTS


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_inside_functions_are_optional_dependencies_only(package):
    bad = [f"{imp}: {t}" for imp, t, node, in_function, _ in imports(package)
           if in_function and not _may_import_lazily(package, t)]
    assert not bad, f"imports inside functions (move them to the top, or document the dependency in " \
                    f"cellmnn.optional.LAZY or cellmnn_kernels.ops.utils.LAZY_IMPORTS): {bad}"


def test_no_private_name_crosses_modules():
    bad = []
    for importer, target, node, _, mods in imports("cellmnn"):
        if isinstance(node, ast.ImportFrom) and target in mods:
            bad += [f"{importer} takes {target}.{a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def _definitions(tree):
    """Module-level functions and classes, and the methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef):
                        yield f"{node.name}.{sub.name}", sub


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_and_public_function_has_a_docstring(package):
    missing = []
    for name, (path, tree) in modules(package).items():
        if not ast.get_docstring(tree):
            missing.append(name)
        for qual, node in _definitions(tree):
            public = not any(p.startswith("_") for p in qual.split("."))
            if public and not ast.get_docstring(node):
                missing.append(f"{name}.{qual}")
    assert not missing, missing


def _is_kernel(node) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


@pytest.mark.parametrize("package", PACKAGES + ("bench", "tests"))
def test_functions_fit_on_a_screen(package):
    long = []
    for name, (path, tree) in modules(package).items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, long


def test_lines_fit_in_120_columns():
    wide = []
    for folder in PACKAGES + ("tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if len(line) > MAX_COLUMNS:
                    wide.append(f"{path.relative_to(ROOT)}:{k} ({len(line)})")
    assert not wide, wide


def _map_order() -> list:
    """The README's map of the tree: its cellmnn paths as module names, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("## Map of the tree"):]
    block = block[block.index("```text") + 7:]
    block = block[:block.index("```")]
    out = []
    for line in block.splitlines():
        path = line.split()[0] if line.split() else ""
        if path.startswith("cellmnn/") and (path.endswith(".py") or path.endswith("/")):
            mod = path.rstrip("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            out.append(mod)
    return out


def test_the_readme_map_lists_cellmnn_from_the_bottom_up():
    # "a module imports only those listed above it": the map is an order of the import graph.
    order = _map_order()
    position = {m: k for k, m in enumerate(order)}
    edges = graph("cellmnn")
    late = []
    for importer, targets in edges.items():
        is_package = (ROOT / importer.replace(".", "/") / "__init__.py").exists()
        if importer == "cellmnn" or is_package:
            continue  # a package's __init__ gathers what is listed below it
        assert importer in position, f"{importer} is not in the README's map"
        late += [f"{importer} imports {t}, listed below it" for t in targets
                 if t in position and position[t] > position[importer]]
    assert not late, late

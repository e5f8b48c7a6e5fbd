"""The house keeps its floors: every import inside the package runs down (or along) the table in CONTRIBUTING.md,
and no two modules import each other, directly or round a circle. Lazy imports inside functions count: they are how
a circle hides. The table is the one description of the layout; this test keeps it true."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mmebm"
GENERATED = {"_modidx"}            # nbdev's index of symbols: imports nothing of ours


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def package_of(path: Path) -> list:
    "The package a module's relative imports start from (`mmebm.baselines` for mmebm/baselines/x.py)."
    return ["mmebm", *path.relative_to(PKG).parent.parts]


def imports_in(source: str, me: str, package: list, modules: set) -> set:
    """Every mmebm module a module's source imports, at the top or inside a function, as names relative to the package
    (`from ..train import x` in mmebm/baselines/runner.py -> 'train'; `from mmebm import data` -> 'data')."""
    found = set()
    def add(dotted: str, names=()):
        if dotted != "mmebm" and not dotted.startswith("mmebm."): return
        rest = dotted[len("mmebm"):].lstrip(".")
        subs = [f"{rest}.{n}" if rest else n for n in names]
        found.update(m for m in subs if m in modules)      # `from mmebm import metrics`: the names are modules themselves
        if rest and not (subs and all(m in modules for m in subs)): found.add(rest)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names: add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level: dotted = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else: dotted = node.module or ""
            add(dotted, [a.name for a in node.names])
    return {m for m in found if m in modules and m != me}


def all_modules() -> set:
    return {module_name(p) for p in PKG.rglob("*.py")}


def imports_of(path: Path) -> set:
    return imports_in(path.read_text(), module_name(path), package_of(path), all_modules())


def layout_table() -> dict:
    "CONTRIBUTING.md's layout table: module -> the modules it may import."
    text = (ROOT / "CONTRIBUTING.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 4 and cells[1].startswith("`"):
            mod = cells[1].strip("`")
            rows[mod] = set(re.findall(r"`([\w.]+)`", cells[3]))
    return rows


def test_the_layout_table_names_every_module():
    table = layout_table()
    modules = {module_name(p) for p in PKG.rglob("*.py")} - GENERATED - {"__init__"}
    assert modules - set(table) == set(), f"modules missing from CONTRIBUTING.md's layout table: {sorted(modules - set(table))}"
    assert set(table) - modules == set(), f"the table names modules that do not exist: {sorted(set(table) - modules)}"


def test_every_import_runs_down_a_floor():
    table = layout_table()
    wrong = []
    for p in sorted(PKG.rglob("*.py")):
        me = module_name(p)
        if me in GENERATED | {"__init__"}: continue
        for m in sorted(imports_of(p) - table.get(me, set())):
            wrong.append(f"{me} imports {m}, which CONTRIBUTING.md does not let it")
    assert not wrong, "\n".join(wrong)


def test_no_circle():
    graph = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}
    state = {}
    def visit(m, path):
        if state.get(m) == "done": return
        assert state.get(m) != "open", "a circle of imports: " + " -> ".join(path[path.index(m):] + [m])
        state[m] = "open"
        for n in sorted(graph.get(m, ())): visit(n, path + [m])
        state[m] = "done"
    for m in sorted(graph): visit(m, [])


def test_the_reader_of_imports_finds_lazy_and_relative_imports():
    "The checks above are only as good as this reader: top-level, lazy, relative and `from mmebm import module` forms."
    modules = {"data", "train", "metrics", "cli", "baselines", "baselines.config", "baselines.runner"}
    src = ("from .data import PolyMNIST\n"
           "def f():\n    from mmebm.train import Trainer\n    from mmebm import cli\n    import numpy\n")
    assert imports_in(src, "metrics", ["mmebm"], modules) == {"data", "train", "cli"}
    src = "from ..train import Trainer\nfrom .config import BASELINES\nfrom . import runner\n"
    assert imports_in(src, "baselines.x", ["mmebm", "baselines"], modules) == {"train", "baselines.config", "baselines.runner"}
    assert "data" in imports_of(PKG / "metrics.py")

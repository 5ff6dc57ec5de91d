"""The repository's layout holds: every import goes down a floor (or stays in its folder),
no module imports closes a circle (imports inside function bodies count), and the README's
layout table names every top-level folder."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT_ROW = re.compile(r"^\| (\d|–) \| (.+?) \|")


def floors_from_readme(text: str) -> dict[str, int | None]:
    """{folder: floor} from README's layout table ('–' rows: folders outside the floors)."""
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    floors: dict[str, int | None] = {}
    for line in section.splitlines():
        row = LAYOUT_ROW.match(line)
        if row:
            floor = None if row.group(1) == "–" else int(row.group(1))
            for folder in re.findall(r"`([^`/]+)/`", row.group(2)):
                floors[folder] = floor
    return floors


def imports_of(path: Path) -> Iterable[tuple[str, int]]:
    """(imported module, line) for every absolute import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
            for alias in node.names:  # `from pkg import module` imports pkg.module
                yield f"{node.module}.{alias.name}", node.lineno


def module_graph(root: Path, folders: Iterable[str]) -> dict[str, dict[str, int]]:
    """{module: {imported module of these folders: line}} over the folders' .py files."""
    folders = set(folders)
    files = {".".join(p.relative_to(root).with_suffix("").parts): p
             for folder in folders for p in (root / folder).rglob("*.py")}
    modules = {m.removesuffix(".__init__") for m in files}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        edges = graph.setdefault(name.removesuffix(".__init__"), {})
        for target, line in imports_of(path):
            if target.split(".")[0] in folders and target in modules:
                edges.setdefault(target, line)
    return graph


def upward(graph: dict[str, dict[str, int]], floors: dict[str, int | None]) -> list[str]:
    """Imports from a folder to another on the same or a higher floor."""
    bad = []
    for source, edges in sorted(graph.items()):
        here = source.split(".")[0]
        for target, line in sorted(edges.items()):
            there = target.split(".")[0]
            if there != here and floors[there] >= floors[here]:
                bad.append(f"{source}:{line} imports {target} (floor {floors[here]} -> "
                           f"{floors[there]})")
    return bad


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
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
                    found.append(sorted(members))
    return found


def test_readme_layout_names_every_top_level_folder():
    floors = floors_from_readme((ROOT / "README.md").read_text())
    folders = {p.name for p in ROOT.iterdir()
               if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in
               {"runs", "build"} and not p.name.endswith(".egg-info")}
    missing = sorted(folders - set(floors))
    assert not missing, f"README's layout table does not name {missing}"


def test_every_import_goes_down_a_floor_and_none_closes_a_circle():
    floors = floors_from_readme((ROOT / "README.md").read_text())
    floored = {f for f, n in floors.items() if n is not None}
    assert {"svcbench", "kube", "dataplanes"} <= floored, floors
    graph = module_graph(ROOT, floored)
    assert sum(map(len, graph.values())) > 100, "the import graph came out nearly empty"
    assert upward(graph, floors) == []
    assert circles(graph) == []


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    for folder in ("low", "high"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "low" / "a.py").write_text("def f():\n    from low.b import y\n")
    (tmp_path / "low" / "b.py").write_text("import low.a\n")
    (tmp_path / "high" / "top.py").write_text("x = 1\n")
    (tmp_path / "low" / "c.py").write_text("from high.top import x\n")
    graph = module_graph(tmp_path, ["low", "high"])
    assert upward(graph, {"low": 1, "high": 2}) == [
        "low.c:1 imports high.top (floor 1 -> 2)"
    ]
    assert circles(graph) == [["low.a", "low.b"]]

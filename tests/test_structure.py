"""The package's shape: imports run one way (no cycles), and nothing imports the CLI."""

import ast
from pathlib import Path

import mtp_spec

ROOT = Path(mtp_spec.__file__).parent
KERNELS = ROOT.parent / "kernels"  # installed as mtp_spec.kernels


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT, "mtp_spec"), (KERNELS, "mtp_spec.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mtp_spec module this one imports, at the top or inside a function (lazy imports count:
    they hide cycles, they do not remove them). `from pkg import mod` counts as importing pkg.mod."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_import_graph_of_mtp_spec_has_no_cycle():
    graph = _graph()
    assert len(graph) > 20 and "mtp_spec.kernels" in graph  # the walk found the package
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["mtp_spec.config"] = graph["mtp_spec.config"] | {"mtp_spec.checkpoint"}  # checkpoint imports config
    assert _cycle(graph) is not None


def test_nothing_imports_the_cli():
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "mtp_spec.cli" in deps and m != "mtp_spec.__main__")
    assert users == []


def test_the_package_root_does_not_pull_in_the_front_ends():
    graph = _graph()
    seen, todo = set(), ["mtp_spec"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert not {m for m in seen if m.startswith(("mtp_spec.cli", "mtp_spec.experiment", "mtp_spec.train"))}

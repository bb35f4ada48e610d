"""The parts of hmtrain import only what docs/design.md ("Parts and what each may touch") lets them.

Every import statement of every module of hmtrain/ and kernels/ (hmtrain_kernels), at module level or
inside a function, is read with ast. A module's part is its package right under hmtrain/
(hmtrain/data/routing/tree.py -> data), or for the top-level modules (cli, demo, info, __main__) its own
name. The test fails on
  (a) an import cycle between parts,
  (b) an import of a part that MAY_USE does not give the importer,
  (c) a module whose part the contract does not name (a new room needs its row here and in design.md).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Layers from the bottom up, as in docs/design.md; a part may use only parts of lower layers, and
# MAY_USE below narrows that further.
LAYERS = (("util",), ("config",), ("data", "memory"), ("model",), ("parallel",), ("checkpoint",), ("train",),
          ("eval",), ("serve", "retention", "study"), ("bench",))
LOWER = {part: {p for below in LAYERS[:i] for p in below} for i, layer in enumerate(LAYERS) for part in layer}
MAY_USE = {
    "kernels": set(),  # hmtrain_kernels: torch and triton only, so it installs and tests on its own
    "util": set(),
    "config": {"util"},
    "data": {"util", "config"},
    # the memory FFN's kernels; memory: the block types its kind hands each layer (memory/kind.py), never the bank
    "model": {"util", "config", "kernels", "memory"},
    "memory": {"util", "config"},  # the bank holds tensors; it builds no model
    "parallel": {"util", "config", "model", "memory"},
    "checkpoint": {"util", "config", "data", "model", "memory", "parallel"},
    "train": {"util", "config", "data", "model", "memory", "parallel", "checkpoint"},
    # evaluation reads checkpoints; it never trains, so neither train nor parallel
    "eval": {"util", "config", "data", "model", "memory", "checkpoint"},
    "serve": {"util", "config", "data", "model", "memory", "checkpoint", "eval"},  # eval: loading a checkpoint
    # the retention probe trains a fresh decoder: the optimizer (parallel), schedule and loggers (train)
    "retention": {"util", "config", "data", "model", "memory", "parallel", "checkpoint", "train", "eval"},
    # a study prepares data, trains and evaluates each arm x seed, and summarises them
    "study": {"util", "config", "data", "train", "eval"},
    "bench": LOWER["bench"] | {"kernels", "info"},  # info: the parameter and traffic tables
}
# The top-level modules may use every part, and the top-level modules before them here.
TOP = ("info", "exits", "demo", "cli", "__main__")

# Imports the contract does not allow but the code still needs; empty: every part keeps to the table.
TEMPORARY: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """Dotted name -> file, for hmtrain and hmtrain_kernels (kernels/)."""
    found = {}
    for package, root in (("hmtrain", REPO / "hmtrain"), ("hmtrain_kernels", REPO / "kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The hmtrain / hmtrain_kernels modules that the module `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from hmtrain.serve import export` imports the module hmtrain.serve.export
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            targets.add(node.args[0].value)
    return {t for t in targets if t.split(".")[0] in ("hmtrain", "hmtrain_kernels")}


def part_of(module: str) -> str:
    """hmtrain.data.routing.tree -> data; hmtrain.cli -> cli; hmtrain_kernels.* -> kernels; hmtrain -> hmtrain."""
    names = module.split(".")
    if names[0] == "hmtrain_kernels":
        return "kernels"
    return names[1] if len(names) > 1 else "hmtrain"


def edges() -> set[tuple[str, str]]:
    known = modules()
    return {(name, target) for name, path in known.items() for target in imported(name, path, known)}


def may_use(source: str, target: str) -> bool:
    if source == target or target == "hmtrain":  # hmtrain/__init__.py holds the version alone
        return True
    if source in TOP:
        return target not in TOP or TOP.index(target) < TOP.index(source)
    return target in MAY_USE.get(source, set())


def violations(found: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in found if not may_use(part_of(a), part_of(b))}


def part_cycles(found: set[tuple[str, str]]) -> list[list[str]]:
    """Each cycle of the part graph once, as the parts along it (first part repeated at the end)."""
    graph = defaultdict(set)
    for a, b in found:
        if part_of(a) != part_of(b):
            graph[part_of(a)].add(part_of(b))
    cycles, seen = [], set()

    def walk(part: str, path: list[str]) -> None:
        for nxt in sorted(graph[part]):
            if nxt == path[0]:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    cycles.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:  # each cycle from its smallest part only
                walk(nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def test_the_contract_is_layered():
    parts = {p for layer in LAYERS for p in layer} | {"kernels"}
    assert set(MAY_USE) == parts
    for part, used in MAY_USE.items():
        assert used <= LOWER.get(part, set()) | {"kernels", "info"} and part not in used, part


def test_every_module_is_in_a_part_of_the_contract():
    unknown = sorted(m for m in modules() if part_of(m) not in MAY_USE and part_of(m) not in (*TOP, "hmtrain"))
    assert not unknown, f"modules in no part of docs/design.md (add the room to MAY_USE and the table): {unknown}"
    assert not imported("hmtrain", REPO / "hmtrain" / "__init__.py", modules())  # so anyone may import it


def test_no_part_imports_what_the_contract_places_above_it():
    found = edges()
    new = sorted(violations(found) - TEMPORARY)
    assert not new, "imports the contract does not allow (docs/design.md, Parts):\n" + "\n".join(
        f"  {a} -> {b}  ({part_of(a)} may not use {part_of(b)})" for a, b in new)
    stale = sorted(TEMPORARY - violations(found))
    assert not stale, f"TEMPORARY entries that no import needs any more: remove them: {stale}"


def test_parts_import_each_other_without_cycles():
    cycles = part_cycles(edges())
    assert not cycles, "import cycles between parts: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_function_level_imports_and_cycles():
    """The reader and the cycle finder on a known module and a made-up graph, so the tests above cannot
    pass by reading nothing."""
    known = modules()
    # cli imports its commands inside functions only
    assert "hmtrain.retention.probe" in imported("hmtrain.cli", known["hmtrain.cli"], known)
    assert part_cycles({("hmtrain.eval.a", "hmtrain.serve.b"), ("hmtrain.serve.b", "hmtrain.eval.c")}) == [
        ["eval", "serve", "eval"]]
    assert violations({("hmtrain.memory.bank", "hmtrain.model.transformer")}) == {
        ("hmtrain.memory.bank", "hmtrain.model.transformer")}
    assert not violations({("hmtrain.retention.probe", "hmtrain.train.schedule")})

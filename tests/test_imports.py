"""The package's imports point one way: cli -> train/evaluate/generate -> model and data -> audio.

Read from the source with `ast`, so imports inside functions count as much as those at the top.
"""

import ast
from pathlib import Path

import s4music

PACKAGE = Path(s4music.__file__).parent

# Each module's layer; a module may import only from layers below its own (or its own package).
LAYERS = [
    {"s4music.errors", "s4music.files", "s4music.options", "s4music.system", "s4music.extensions", "s4music.cuda",
     "s4music.hub", "s4music.addresses"},
    {"s4music.audio", "s4music.dsp", "s4music.measures", "s4music.sinks", "s4music.sources"},
    {"s4music.model", "s4music.data"},
    {"s4music.guidance", "s4music.doctor"},
    {"s4music.evaluate", "s4music.eval_options", "s4music.generate", "s4music.train", "s4music.train_config",
     "s4music.jam", "s4music.jam_options"},
    {"s4music.cli", "s4music.studio"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The s4music modules that `path` imports anywhere in its text."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("s4music"):
                while name not in known:
                    name = name.rpartition(".")[0]
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def layer(name: str) -> int | None:
    for i, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return i
    return None


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "s4music" and layer(m) is None] == []


def test_every_layer_names_modules_that_exist():
    # a stale name would make part of the layer check check nothing
    assert [m for members in LAYERS for m in members if m not in modules()] == []


def test_no_import_cycles():
    edges = {m: {d for d in deps if d != "s4music"} for m, deps in graph().items() if m != "s4music"}
    # package __init__ files re-export their submodules: an edge from a package to its own members is not a cycle
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_imports_point_down_the_layers():
    upward = []
    for name, deps in graph().items():
        if name == "s4music":
            continue
        for dep in deps:
            if dep != "s4music" and layer(dep) > layer(name):
                upward.append(f"{name} -> {dep}")
    assert upward == []


def test_model_and_data_do_not_import_each_other():
    crossing = [f"{m} -> {d}" for m, deps in graph().items() for d in deps
                if (m.startswith("s4music.model") and d.startswith("s4music.data"))
                or (m.startswith("s4music.data") and d.startswith("s4music.model"))]
    assert crossing == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    # the checks above are only worth something if they can fail: a module in the model layer that
    # imports the CLI is both an upward import and (with cli importing model) a cycle
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from s4music.cli.app import app\n")
    deps = imports_of(fake, set(modules()))
    assert deps == {"s4music.cli.app"} and layer("s4music.cli.app") > layer("s4music.model.fast")

"""The package's shape: imports go one way, and importing jaxsft changes nothing in its host."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import jaxsft

PACKAGE = Path(jaxsft.__file__).parent


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "jaxsft."))


def _module_path(name: str) -> Path:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(name: str, known: set[str]) -> set[str]:
    """The jaxsft modules `name` imports anywhere in its file (lazy imports count too)."""
    tree = ast.parse(_module_path(name).read_text())
    package = name if _module_path(name).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # `from a import b` imports a.b where b is a module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    known = set(_modules()) | {"jaxsft"}
    return {m: _imports(m, known) for m in known if _module_path(m).exists()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_model_needs_no_cpu_speed_code_and_the_library_no_cli():
    graph = _graph()
    model_side = _reachable(graph, "jaxsft.models") | {"jaxsft.models"}
    assert not {m for m in model_side if m.startswith("jaxsft.cpu")}, model_side
    library = ("jaxsft.models", "jaxsft.weights", "jaxsft.steps", "jaxsft.optim",
               "jaxsft.state", "jaxsft.checkpoint", "jaxsft.data", "jaxsft.trainer")
    clis = {"jaxsft.cli", "jaxsft.train", "jaxsft.evaluate", "jaxsft.predict", "jaxsft.demo"}
    for module in library:
        assert not _reachable(graph, module) & clis, module


# Run in a fresh interpreter: records what a host program could notice, imports every module
# of jaxsft, and records it again.
_SNAPSHOT = r"""
import json, logging, os, signal, sys, warnings, importlib
import jax

def snapshot():
    loggers = ["", "absl", "asyncio", "jax", "orbax", "tensorflow", "jaxsft"]
    return {
        "environ": dict(os.environ),
        "jax_config": {k: repr(v) for k, v in jax.config.values.items()},
        "hooks": [repr(h) for h in (sys.unraisablehook, sys.excepthook, sys.displayhook,
                                    sys.breakpointhook)],
        "warnings": [repr(f) for f in warnings.filters],
        "loggers": {n: [repr(logging.getLogger(n).filters), logging.getLogger(n).level,
                        len(logging.getLogger(n).handlers)] for n in loggers},
        "signals": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)},
    }

before = snapshot()
for name in sys.argv[1:]:
    importlib.import_module(name)
after = snapshot()
changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
print(json.dumps({"changed": changed, "tensorflow": "tensorflow" in sys.modules}))
"""


def _imports_tensorflow(name: str) -> bool:
    """Whether the module imports TensorFlow (or TFDS) at its top level: the data package's
    TensorFlow side, which only `jaxsft.data`'s readers import, when data is read. (Importing
    TensorFlow itself sets environment variables of its own.)"""
    tree = ast.parse(_module_path(name).read_text())
    names = [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names]
    names += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    return any(n.split(".")[0] in ("tensorflow", "tensorflow_datasets") for n in names)


def test_importing_any_module_of_jaxsft_changes_no_global_state():
    modules = ["jaxsft", *(m for m in _modules() if not _imports_tensorflow(m))]
    assert {"jaxsft.data", "jaxsft.cpu", "jaxsft.trainer", "jaxsft.train"} <= set(modules)
    out = subprocess.run([sys.executable, "-c", _SNAPSHOT, *modules], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    changed = result["changed"]
    if "environ" in changed:  # name the variables, not the whole environment
        old, new = changed["environ"]
        changed["environ"] = {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys()
                              if old.get(k) != new.get(k)}
    assert changed == {}


def test_importing_the_public_api_does_not_start_tensorflow():
    code = ("import sys, jaxsft, jaxsft.data, jaxsft.trainer\n"
            "jaxsft.train_step, jaxsft.create_model, jaxsft.fit\n"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip() == "False", out.stderr

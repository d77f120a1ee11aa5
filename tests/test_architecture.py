"""The structure the code promises: imports flow one way (no cycle among the package's modules, counting imports
inside functions; none of the package's own modules imported inside a function), the task kind is decided in tasks/
only, algorithm names are compared in the algorithm table only, modules read in one sitting, and each config option
lists only what it changes from its dataclass's defaults."""
import ast
from pathlib import Path

import yaml
from conftest import CONF, ROOT

from dualign.config import ALGORITHMS, AlgorithmConfig, OptimizerConfig, PolicyStepConfig, TrainerConfig
from dualign.config.schema import LoggerConfig

PACKAGE = ROOT / "src" / "dualign"
MODULES = {".".join(("dualign", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
           for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, module: str):
    """(imported module, line, at the top of the file?) for every import of a dualign module."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("dualign"):
                yield target, node.lineno, id(node) in top


def test_the_import_graph_of_the_package_has_no_cycle():
    graph = {module: {target for target, _, _ in _imports(path, module) if target in MODULES and target != module}
             for module, path in MODULES.items()}
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_package_imports_its_own_modules_at_the_top_of_files_only():
    """Except where a heavy import is deferred on purpose, said in a comment just above it."""
    local = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, at_top in _imports(path, module):
            if not at_top and "deferred on purpose" not in " ".join(lines[max(0, line - 4):line - 1]):
                local.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not local, local


def test_subpackages_import_one_way():
    """core is pure torch; util, config and core import no other layer above them; training never imports tasks,
    tracking or the run; tasks never import tracking or the run."""
    below = {"core": {"core"}, "util": {"util"}, "config": {"config", "errors"},
             "models": {"models", "config", "errors", "util"},
             "training": {"training", "core", "config", "errors", "util", "models"},
             "tasks": {"tasks", "training", "core", "config", "errors", "util", "models"},
             "tracking": {"tracking", "config", "errors", "util"}}
    wrong = []
    for module, path in MODULES.items():
        layer = module.split(".")[1] if module.count(".") else None
        if layer not in below:
            continue
        for target, line, _ in _imports(path, module):
            if target.count(".") and target.split(".")[1] not in below[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {target}")
    assert not wrong, wrong


def _outside(folder: str):
    for module, path in MODULES.items():
        if not module.startswith(f"dualign.{folder}"):
            yield path, ast.parse(path.read_text())


def test_no_module_outside_the_tasks_asks_which_kind_of_task_it_runs():
    kinds = {"ExactTask", "TextTask", "ExactProblem", "ExactTaskConfig", "TextDataConfig"}
    found = []
    for path, tree in _outside("tasks"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "type"):
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                if names & kinds:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "exact":  # the old `setup.exact` flag
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "exact"
                                                     for c in [node.left, *node.comparators]):
                if "kind" in ast.unparse(node):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_algorithm_names_are_compared_in_the_algorithm_table_only():
    found = []
    for module, path in MODULES.items():
        if module == "dualign.config.algorithms":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
                if constants & set(ALGORITHMS):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


def test_every_module_reads_in_one_sitting():
    long = {str(path.relative_to(ROOT)): n for path in MODULES.values() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_config_options_list_only_what_they_change():
    """A value equal to its dataclass default would be a second source of it (names and kinds identify the option)."""
    defaults = {"algorithm": AlgorithmConfig(), "policy_step": PolicyStepConfig(), "optimizer": OptimizerConfig(),
                "trainer": TrainerConfig(), "logger": LoggerConfig()}
    repeated = []
    for group, instance in defaults.items():
        for path in (CONF / group).glob("*.yaml"):
            values = yaml.safe_load(path.read_text()) or {}
            for key, value in values.items():
                if key in ("defaults", "name") or not hasattr(instance, key):
                    continue
                if value == getattr(instance, key):
                    repeated.append(f"{path.relative_to(ROOT)}: {key}: {value!r}")
    assert not repeated, repeated


def test_the_main_config_holds_no_values_of_its_own():
    """conf/train.yaml only lists the groups: every top-level default lives in TrainConfig."""
    assert set(yaml.safe_load((CONF / "train.yaml").read_text())) == {"defaults"}

"""The house's structure: no import cycle anywhere, layers point down, and the frameworks (OpenMMLab, Lightning)
are imported only by the modules that adapt them. Every import counts, at any depth (inside functions too)."""
import ast
from pathlib import Path

from integrations.config import ROOT

PACKAGES = ('common', 'runtime', 'evaluators', 'integrations')
# a layer never imports the ones listed for it
BELOW = {'runtime': {'integrations'}, 'evaluators': {'integrations'},
         'common': {'integrations', 'runtime', 'evaluators'}}
FRAMEWORKS = {'mmengine', 'mmdet', 'mmyolo', 'mmcv', 'lightning'}
# the modules that adapt a framework (path prefixes); everything else stays framework-free
ADAPTERS = ('evaluators/mm/',             # DeviceEvaluator, the streamed metrics, the batch preprocessor
            'integrations/engines/',      # mmengine's runner, Lightning's trainer, the plan of the mm config
            'integrations/models/',       # the families' detectors and the config's model
            'integrations/deploy/',       # export, build and calibration from the mm config and pipeline
            'integrations/assets/',       # TF.js weights converted into the mmyolo model
            'integrations/tasks/report.py')  # eval.explain's pictures, drawn by mmdet's DetLocalVisualizer


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, path): path for package in PACKAGES for path in (root / package).rglob('*.py')}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `path` imports: project modules by their own name (`from a import b` names `a.b` when that is
    a module), others by their top-level package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in known else node.module
                         for alias in node.names)
    return {name if name in known or name.split('.')[0] in PACKAGES else name.split('.')[0] for name in names}


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: {m for m in imported(path, known) if m in known and m != name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def upward_imports(root: Path) -> list[str]:
    known = modules(root)
    return sorted(f'{path.relative_to(root)}: {name}' for module, path in known.items()
                  for name in imported(path, known) if name.split('.')[0] in BELOW.get(module.split('.')[0], ()))


def framework_imports(root: Path) -> list[str]:
    """Framework imports outside the adapter modules."""
    known = modules(root)
    return sorted(f'{path.relative_to(root)}: {name}' for path in known.values()
                  if not path.relative_to(root).as_posix().startswith(ADAPTERS)
                  for name in imported(path, known) if name in FRAMEWORKS)


def test_no_import_cycles():
    assert not cycles(graph(ROOT))


def test_layers_point_down():
    assert not upward_imports(ROOT)


def test_frameworks_are_imported_only_by_their_adapters():
    assert not framework_imports(ROOT)


def test_each_adapter_named_exists():
    assert all((ROOT / adapter).exists() for adapter in ADAPTERS)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checks_find_a_cycle_an_upward_import_and_a_stray_framework(tmp_path):
    """A small tree with one of each fault (a circle through an import inside a function), and the same tree
    mended: the checks see exactly the faults."""
    base = {'common/__init__.py': '', 'runtime/__init__.py': '', 'evaluators/__init__.py': '',
            'integrations/__init__.py': '', 'integrations/a.py': 'from integrations import b\n',
            'integrations/b.py': 'def f():\n    from integrations.c import g\n'}
    faulty = write(tmp_path / 'faulty', {
        **base,
        'integrations/c.py': 'import integrations.a\n\ndef g():\n    pass\n',
        'runtime/r.py': 'def f():\n    from integrations.a import x\n',
        'evaluators/e.py': 'from mmengine.registry import METRICS\n',
        'integrations/engines/m.py': 'import mmengine\n'})
    assert cycles(graph(faulty)) == [['integrations.a', 'integrations.b', 'integrations.c']]
    assert upward_imports(faulty) == ['runtime/r.py: integrations.a']
    assert framework_imports(faulty) == ['evaluators/e.py: mmengine']

    mended = write(tmp_path / 'mended', {
        **base,
        'integrations/c.py': 'import runtime.r\n\ndef g():\n    pass\n',
        'runtime/r.py': 'import numpy\n',
        'evaluators/mm/e.py': 'from mmengine.registry import METRICS\n'})
    assert cycles(graph(mended)) == [] and upward_imports(mended) == [] and framework_imports(mended) == []

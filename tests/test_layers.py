"""Layers point down: the ground floor (runtime/, evaluators/) never imports the app (integrations/), and common/
imports none of the three."""
import ast

import pytest

from integrations.config import ROOT

ABOVE = {'runtime': {'integrations'}, 'evaluators': {'integrations'},
         'common': {'integrations', 'runtime', 'evaluators'}}


def imported_modules(path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize('layer', sorted(ABOVE))
def test_no_upward_imports(layer):
    upward = {f'{path.relative_to(ROOT)}: {module}' for path in (ROOT / layer).rglob('*.py')
              for module in imported_modules(path) if module.split('.')[0] in ABOVE[layer]}
    assert not upward, sorted(upward)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / 'm.py'
    source.write_text('def f():\n    from integrations.app import run\n')
    assert imported_modules(source) == {'integrations.app'}

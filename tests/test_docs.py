"""The front door stays short, every docs page starts with its commands, and every command marked runnable works:
each `python run.py …` line of a ```sh runnable block runs as a user types it, shrunk to an image or two."""
import re
import shlex
import subprocess
import sys

import pytest

from integrations.config import ROOT

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
TOPIC_PAGES = [p for p in PAGES if p.parent.name == 'docs' and p.name not in ('README.md', 'ARCHITECTURE.md')]
BLOCK = re.compile(r'^```sh runnable\n(.*?)^```', re.S | re.M)


def runnable_commands() -> list[tuple[str, str]]:
    """(page, command) for each `python run.py` line of the runnable blocks, continuation lines joined; each
    command once."""
    commands = {}
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            for line in block.replace('\\\n', ' ').splitlines():
                line = line.split('  #')[0].strip()
                if line.startswith('python run.py'):
                    commands.setdefault(line, page.relative_to(ROOT).as_posix())
    return [(page, command) for command, page in commands.items()]


def shrunk(args: list[str], out_dir) -> list[str]:
    """The same command on one or two images, with its outputs in `out_dir`."""
    given = {a.split('=', 1)[0] for a in args if '=' in a}
    extra = {'eval.num_images': '1', 'bench.iterations': '2', 'bench.warmup': '0',
             ('hydra.sweep.dir' if '-m' in args else 'hydra.run.dir'): str(out_dir)}
    if 'task=bench' not in args:
        extra = {k: v for k, v in extra.items() if not k.startswith('bench.')}
    if 'task=mlperf' in args:  # a short LoadGen run: INVALID by its query count, which is not the point here
        extra.update({'mlperf.min_duration_ms': '500', 'mlperf.min_query_count': '4'})
    if 'precision=int8' in args:
        extra['precision.calibration.num_images'] = '2'
    return [*args, *(f'{k}={v}' for k, v in extra.items() if k not in given)]


def test_readme_is_short_and_shows_the_two_commands():
    readme = (ROOT / 'README.md').read_text()
    assert len(readme) <= 12_000, len(readme)
    assert 'make demo' in readme and 'make test' in readme
    for page in TOPIC_PAGES:
        assert f'docs/{page.name}' in readme, page.name


@pytest.mark.parametrize('page', TOPIC_PAGES, ids=lambda p: p.name)
def test_each_page_starts_with_its_commands(page):
    text = page.read_text()
    first_section = text.split('\n## ', 1)[0]
    assert '```sh runnable' in first_section, page.name


def test_every_page_is_indexed():
    index = (ROOT / 'docs' / 'README.md').read_text()
    assert all(f'({page.name})' in index for page in PAGES if page.parent.name == 'docs' and page.name != 'README.md')


def test_there_are_runnable_commands():
    assert len(runnable_commands()) >= 10


@pytest.mark.slow
@pytest.mark.parametrize('page, command', runnable_commands(), ids=[c for _, c in runnable_commands()])
def test_runnable_command(page, command, tmp_path, coco128):
    args = shlex.split(command)[2:]
    proc = subprocess.run([sys.executable, str(ROOT / 'run.py'), *shrunk(args, tmp_path / 'out')], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f'{page}: {command}\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stderr

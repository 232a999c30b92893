"""`eval.flat_memory=true` fixes glibc's mmap threshold (common/memory.py): a large block freed and allocated again
comes from a fresh mapping, not from the heap, which would keep it after it is freed."""
import subprocess
import sys

import pytest

from integrations.config import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')

# prints how far the heap (the program break) grew for one large block allocated after another was freed
PROBE = '''
import ctypes, sys
{setup}
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_void_p], [ctypes.c_long]
size = 8 << 20
libc.free(libc.malloc(size))  # mmapped, then freed: glibc's dynamic threshold rises above 8 MB
before = libc.sbrk(0)
held = libc.malloc(size)
print(libc.sbrk(0) - before)
'''


def heap_growth(setup: str = '') -> int:
    out = subprocess.run([sys.executable, '-c', PROBE.format(setup=setup)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])  # the last line: a run logs before it


def test_without_the_fix_a_freed_large_block_returns_on_the_heap():
    """The probe sees glibc's behaviour: without a fixed threshold the second block comes from the heap."""
    assert heap_growth() >= 8 << 20


@pytest.mark.parametrize('engine, flat_memory', [('mmengine', True), ('lightning', True), ('mmengine', False)])
def test_a_run_with_flat_memory_keeps_large_blocks_mapped(assets, demo_subset_data, tmp_path, engine, flat_memory):
    overrides = [*demo_subset_data, f'engine={engine}', f'eval.flat_memory={str(flat_memory).lower()}',
                 'eval.compare_native=false', 'eval.num_images=1']
    setup = ('from integrations.app.main import run; from tests.conftest import compose_cfg; '
             f'run(compose_cfg(*{overrides!r}), {str(tmp_path)!r})')
    growth = heap_growth(setup)
    assert growth < 1 << 20 if flat_memory else growth >= 8 << 20


def test_a_users_own_threshold_is_left_alone(monkeypatch):
    from common.memory import keep_large_buffers_mapped
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '65536')
    assert not keep_large_buffers_mapped()

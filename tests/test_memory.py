"""`eval.flat_memory=true` fixes glibc's mmap threshold (common/memory.py): a large block freed and allocated again
comes from a fresh mapping, not from the heap, which would keep it after it is freed."""
import subprocess
import sys

import pytest

from integrations.config import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')

# prints whether a large block allocated after another was freed came from an arena (the heap, which keeps what
# is freed) or from a mapping of its own: glibc marks the latter in the chunk's size word (IS_MMAPPED, 0x2, the
# word before the pointer). The chunk, not how far the program break moved: a run may leave a hole large enough in
# the heap, or live threads may move the call to another arena.
PROBE = '''
import ctypes, sys
{setup}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
size = 8 << 20
libc.free(libc.malloc(size))  # mmapped, then freed: glibc's dynamic threshold rises above 8 MB
held = libc.malloc(size)
print(int(not ctypes.c_size_t.from_address(held - ctypes.sizeof(ctypes.c_size_t)).value & 2))
'''


def on_the_heap(setup: str = '') -> bool:
    out = subprocess.run([sys.executable, '-c', PROBE.format(setup=setup)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()[-1] == '1'  # the last line: a run logs before it


def test_without_the_fix_a_freed_large_block_returns_on_the_heap():
    """The probe sees glibc's behaviour: without a fixed threshold the second block comes from the heap."""
    assert on_the_heap()


@pytest.mark.parametrize('engine, flat_memory', [('mmengine', True), ('lightning', True), ('mmengine', False)])
def test_a_run_with_flat_memory_keeps_large_blocks_mapped(assets, demo_subset_data, tmp_path, engine, flat_memory):
    overrides = [*demo_subset_data, f'engine={engine}', f'eval.flat_memory={str(flat_memory).lower()}',
                 'eval.compare_native=false', 'eval.num_images=1']
    setup = ('from integrations.app.main import run; from tests.conftest import compose_cfg; '
             f'run(compose_cfg(*{overrides!r}), {str(tmp_path)!r})')
    assert on_the_heap(setup) != flat_memory


def test_a_users_own_threshold_is_left_alone(monkeypatch):
    from common.memory import keep_large_buffers_mapped
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '65536')
    assert not keep_large_buffers_mapped()

"""Option types are declared once (integrations/config.py): Hydra rejects a wrong type, a choice outside its list
or an unknown key while composing, and run.py prints it as one `error:` line with exit code 2."""
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from integrations.config import ROOT
from run import config_error_line
from tests.conftest import compose_cfg

# (overrides, what the one line says), one or more per option family
WRONG_TYPES = [
    ('task=fast', "task=fast: Invalid value 'fast', expected one of [eval, bench, export, npz, cache"),
    ('eval.batch_size=abc', "eval.batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ('eval.score_thr=high', "eval.score_thr=high: Value 'high' of type 'str' could not be converted to Float"),
    ('eval.overlap=maybe', "eval.overlap=maybe: Value 'maybe' is not a valid bool"),
    ('eval.reference=int8', "eval.reference=int8: Invalid value 'int8', expected one of [fp32, fp16]"),
    ('bench.scenario=fast', "bench.scenario=fast: Invalid value 'fast', expected one of [offline, single_stream]"),
    ('bench.batch_sizes=4', 'bench.batch_sizes=4: Invalid value assigned: int is not a ListConfig'),
    ('bench.replay_latency_ms=soon', "bench.replay_latency_ms=soon: Value 'soon' of type 'str' could not be converted"),
    ('export.opset=thirteen', "export.opset=thirteen: Value 'thirteen' of type 'str' could not be converted"),
    ('cache.enabled=maybe', "cache.enabled=maybe: Value 'maybe' is not a valid bool"),
    ('cache.clean=some', "cache.clean=some: Invalid value 'some', expected one of [all, invalid]"),
    ('model.trust_checkpoint=perhaps', "model.trust_checkpoint=perhaps: Value 'perhaps' is not a valid bool"),
    ('model=retinanet model.init_seed=x', "model.init_seed=x: Value 'x' of type 'str' could not be converted"),
    ('precision=int8 precision.per_channel=maybe', "precision.per_channel=maybe: Value 'maybe' is not a valid bool"),
    ('precision=int8 precision.exclude=neck', 'precision.exclude=neck: Invalid value assigned: str is not a ListConfig'),
    ('precision=int8 precision.format=qlinear', "precision.format=qlinear: Invalid value 'qlinear', expected one of"),
    ('precision=int8 precision.raw_map_convs=fp16', "precision.raw_map_convs=fp16: Invalid value 'fp16', expected"),
    ('precision=int8 precision.calibration.method=l2',
     "precision.calibration.method=l2: Invalid value 'l2', expected one of [max, kl_divergence, percentile, mse]"),
    ('precision=int8 precision.calibration.num_images=ten', "precision.calibration.num_images=ten: Value 'ten'"),
    ('precision=int8 precision.calibration.seed=abc', "precision.calibration.seed=abc: Value 'abc' of type 'str'"),
    ('precision=int8 precision.calibration.percentile=high', "precision.calibration.percentile=high: Value 'high'"),
    ('runtime.intra_op_threads=x', "runtime.intra_op_threads=x: Value 'x' of type 'str' could not be converted"),
    ('runtime.allow_spinning=maybe', "runtime.allow_spinning=maybe: Value 'maybe' is not a valid bool"),
    ('runtime.int8_space_to_depth=yess', "runtime.int8_space_to_depth=yess: Value 'yess' is not a valid bool"),
    ('runtime=vacc runtime.compile=perhaps', "runtime.compile=perhaps: Value 'perhaps' is not a valid bool"),
    ('runtime=vacc runtime.device_id=first', "runtime.device_id=first: Value 'first' of type 'str' could not be"),
    ('runtime=vacc runtime.vdsp.resize_type=AREA', "runtime.vdsp.resize_type=AREA: Invalid value 'AREA', expected"),
    ('engine.launcher=ssh', "engine.launcher=ssh: Invalid value 'ssh', expected one of [none, pytorch, slurm, mpi]"),
    ('engine.log_level=LOUD', "engine.log_level=LOUD: Invalid value 'LOUD', expected one of [DEBUG, INFO"),
    ('engine=lightning engine.num_nodes=two', "engine.num_nodes=two: Value 'two' of type 'str' could not be"),
    ('eval.scor_thr=0.1', "Could not override 'eval.scor_thr'"),
    ('model=nope', "Could not find 'model/nope' (available: mm, retinanet, yolov5)"),
]


@pytest.mark.parametrize('overrides, message', WRONG_TYPES)
def test_the_typed_config_rejects_wrong_types(overrides, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(*overrides.split())
    line = config_error_line(err.value)
    assert message in line and '\n' not in line, line


@pytest.mark.parametrize('overrides, message', [WRONG_TYPES[1], WRONG_TYPES[-2]])
def test_cli_prints_one_error_line_and_exits_2(tmp_path, overrides, message):
    run_dir = tmp_path / 'run'
    proc = subprocess.run([sys.executable, str(ROOT / 'run.py'), *overrides.split(), f'hydra.run.dir={run_dir}'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: ') and message in proc.stderr
    assert not run_dir.exists()


def test_values_of_the_right_type_compose():
    cfg = compose_cfg('precision=int8', 'precision.calibration.method=kl_divergence', 'precision.exclude=[a.b]',
                      'bench.batch_sizes=[2]', 'eval.reference=fp32', 'eval.score_thr=0.05', 'engine.launcher=pytorch')
    assert cfg.precision.calibration.method == 'kl_divergence' and list(cfg.precision.exclude) == ['a.b']
    assert cfg.eval.reference == 'fp32' and cfg.engine.launcher == 'pytorch' and cfg.eval.score_thr == 0.05

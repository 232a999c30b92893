"""fp16 and int8 for ONNX Runtime: valid models, reproducible calibration, bounded mAP cost, clear errors."""
import json

import numpy as np
import pytest

from common.errors import UserError
from evaluators.device import compare_maps
from integrations.app.main import run
from runtime import get_runtime
from runtime.calibration import CalibrationReader
from tests.conftest import DEMO_IMAGES, compose_cfg

INT8 = dict(name='int8', calibration=dict(method='max', percentile=99.999, num_images=2, seed=0, data=''),
            per_channel=True, format='qdq', activation_symmetric=False, raw_map_convs='float', exclude=[])


RAW_MAP_CONVS = [f'bbox_head.head_module.convs_pred.{i}' for i in range(3)]


def _int8(exported, tmp_dir, raw_maps=None, runtime_options=(), **changes):
    out, preprocess, _, _ = exported
    precision = json.loads(json.dumps(INT8))
    for key, value in changes.items():
        target = precision['calibration'] if key in precision['calibration'] else precision
        target[key] = value
    runtime = get_runtime('onnx', precision=precision, **dict(runtime_options))
    reader = CalibrationReader([DEMO_IMAGES / 'zidane.jpg', DEMO_IMAGES / 'horses.jpg'], preprocess)
    raw_maps = {'keep_float': RAW_MAP_CONVS} if raw_maps is None else raw_maps
    return runtime, runtime.build(out / 'model.onnx', tmp_dir, calibration=reader, **raw_maps)


@pytest.mark.parametrize('method', ['max', 'kl_divergence', 'percentile'])
def test_each_method_gives_a_model_close_to_fp32(exported, tmp_path, method):
    runtime, artifact = _int8(exported, tmp_path, method=method)
    maps = runtime.load(artifact).run(exported[2])
    assert [m.shape for m in maps] == [m.shape for m in exported[3]]
    assert compare_maps(exported[3], maps)['min_cosine'] > 0.99
    assert artifact.info['method'] == method and len(artifact.info['excluded_nodes']) == 3
    assert artifact.info['space_to_depth_convs'] == ['/backbone/stem/conv/Conv']


def test_equalized_raw_map_convs_are_int8_in_one_range_and_restored_in_float(exported, tmp_path):
    """Equalizing scales each raw-map channel to a largest magnitude of 1 on the calibration images, so the
    convs' quantized outputs share one range [-1, 1] that fits box offsets and logits alike; the float rescale
    that restores the raw maps ends up folded into a per-channel DequantizeLinear."""
    import onnx

    runtime, artifact = _int8(exported, tmp_path, raw_maps={'equalize': RAW_MAP_CONVS})
    assert artifact.info['equalized_convs'] == RAW_MAP_CONVS
    assert len(artifact.info['folded_rescales']) == 3
    graph = onnx.load(str(artifact.path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    assert not [n for n in graph.node if n.name.endswith('_rescale')]
    ranges = json.loads((tmp_path / 'calibration.json').read_text())['data']
    for raw_map in graph.output:
        # Conv -> Q (one range) -> per-channel DQ: the raw map in float
        dequantize = producers[raw_map.name]
        assert dequantize.op_type == 'DequantizeLinear' and dequantize.attribute[0].i == 1
        assert producers[dequantize.input[0]].op_type == 'QuantizeLinear'
        low, high = (np.asarray(ranges[f'{raw_map.name}_equalized'][k]['data']) for k in ('lowest', 'highest'))
        assert max(-low.min(), high.max()) == pytest.approx(1, abs=1e-5)
    assert compare_maps(exported[3], runtime.load(artifact).run(exported[2]))['min_cosine'] > 0.99


def test_calibration_is_reproducible(exported, tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    first = _int8(exported, tmp_path / 'a')[1].path.read_bytes()
    second = _int8(exported, tmp_path / 'b')[1].path.read_bytes()
    assert first == second


def test_calibration_is_fed_a_few_images_at_a_time(exported, tmp_path, monkeypatch):
    """onnxruntime's histogram calibrators keep every activation of the images of one collect_data call: they get
    CALIBRATION_CHUNK images per call (100 images at once ran out of memory); max ranges merge to the same model."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    import runtime.onnx

    per_call = []
    collect = HistogramCalibrater.collect_data

    def counting(self, reader):
        start = reader.position
        collect(self, reader)
        per_call.append(reader.position - start)

    monkeypatch.setattr(HistogramCalibrater, 'collect_data', counting)
    for name in ('whole', 'chunked'):
        (tmp_path / name).mkdir()
    whole = _int8(exported, tmp_path / 'whole')[1].path.read_bytes()
    monkeypatch.setattr(runtime.onnx, 'CALIBRATION_CHUNK', 1)
    assert _int8(exported, tmp_path / 'chunked')[1].path.read_bytes() == whole
    _int8(exported, tmp_path / 'chunked', method='percentile')
    assert per_call == [1, 1]


def test_fp16_model_runs_close_to_fp32(exported, tmp_path):
    out = exported[0]
    runtime = get_runtime('onnx', precision={'name': 'fp16'})
    maps = runtime.load(runtime.build(out / 'model.onnx', tmp_path)).run(exported[2])
    assert maps[0].dtype == np.float32
    assert compare_maps(exported[3], maps)['min_cosine'] > 0.9999


@pytest.mark.parametrize('changes,message', [
    (dict(method='mse'), 'runtime=onnx supports max, kl_divergence, percentile'),
    (dict(percentile=100.5), 'percentile=100.5'), (dict(percentile=0), 'percentile=0: must be in')])
def test_bad_int8_options(changes, message):
    precision = json.loads(json.dumps(INT8))
    for key, value in changes.items():
        (precision['calibration'] if key in precision['calibration'] else precision)[key] = value
    with pytest.raises(UserError, match=message):
        get_runtime('onnx', precision=precision)


def test_per_channel_int8_of_an_opset_11_export_is_an_error(tmp_path):
    """Per-axis QuantizeLinear is opset 13: refused before calibrating, not left as a model that cannot load."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), 'w')
    graph = helper.make_graph([helper.make_node('Conv', ['x', 'w'], ['y'])], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 11)], ir_version=7),
              str(tmp_path / 'model.onnx'))
    with pytest.raises(UserError, match='export.opset=11: per-channel int8'):
        get_runtime('onnx', precision=INT8).build(tmp_path / 'model.onnx', tmp_path, calibration=object())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']


def test_exclude_by_module_name_keeps_its_nodes_in_float(exported, tmp_path):
    """Module names as the model prints them, also inside containers whose export scope nests the index
    (`backbone.stage1.0` -> `/backbone/stage1/stage1.0/...`)."""
    import onnx

    from runtime.onnx import nodes_matching

    export = onnx.load(str(exported[0] / 'model.onnx'))
    assert nodes_matching(export, ['neck.reduce_layers.2']) == [
        '/neck/reduce_layers.2/conv/Conv', '/neck/reduce_layers.2/activate/Sigmoid',
        '/neck/reduce_layers.2/activate/Mul']
    stage = nodes_matching(export, ['backbone.stage1.0'])
    assert stage and all(name.startswith('/backbone/stage1/stage1.0/') for name in stage)
    _, artifact = _int8(exported, tmp_path, exclude=['neck.reduce_layers.2'])
    graph = onnx.load(str(artifact.path)).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    conv = next(n for n in graph.node if n.name == '/neck/reduce_layers.2/conv/Conv')
    assert conv.op_type == 'Conv' and conv.input[1] not in producers  # its float weight, not a DequantizeLinear
    assert '/neck/reduce_layers.2/conv/Conv' in artifact.info['excluded_nodes']


def test_space_to_depth_rewrites_only_even_stride_2_convs_on_few_channels_and_keeps_their_outputs(tmp_path):
    """A 6x6 stride-2 conv on 3 channels (YOLOv5's stem) becomes SpaceToDepth + a 3x3 conv with the same outputs;
    an odd kernel (RetinaNet's 7x7 stem), a stride-1 conv and a conv on 8 channels stay as they are."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from runtime.onnx import space_to_depth_convs

    rng = np.random.default_rng(0)
    weights = {'stem': (8, 3, 6, 6), 'odd': (4, 3, 7, 7), 'wide': (4, 8, 2, 2), 'flat': (4, 3, 2, 2)}
    convs = [helper.make_node('Conv', ['x', 'stem', 'bias'], ['a'], name='stem', strides=[2, 2], pads=[2, 2, 2, 2]),
             helper.make_node('Conv', ['x', 'odd'], ['b'], name='odd', strides=[2, 2], pads=[3, 3, 3, 3]),
             helper.make_node('Conv', ['a', 'wide'], ['c'], name='wide', strides=[2, 2]),
             helper.make_node('Conv', ['x', 'flat'], ['d'], name='flat', pads=[0, 0, 1, 1])]
    initializers = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                    for name, shape in weights.items()]
    initializers.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), 'bias'))
    graph = helper.make_graph(convs, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 32, 48])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in 'abcd'],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)], ir_version=8)
    x = rng.standard_normal((1, 3, 32, 48)).astype(np.float32)

    def outputs(m):
        return ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider']).run(None, {'x': x})

    before = outputs(model)
    assert space_to_depth_convs(model) == ['stem']
    assert [n.op_type for n in model.graph.node] == ['SpaceToDepth', 'Conv', 'Conv', 'Conv', 'Conv']
    assert [n.name for n in model.graph.node if n.op_type == 'Conv'] == ['stem', 'odd', 'wide', 'flat']
    for expected, got in zip(before, outputs(model)):  # the same sums in another order: float32 rounding only
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_space_to_depth_gives_the_same_int8_results(exported, tmp_path):
    """The stem is regrouped after calibration, so every range, and so every int8 output, is the one without it
    (calibrating the regrouped float model shifts the ranges a little and changes most outputs)."""
    import onnx

    (tmp_path / 'off').mkdir()
    (tmp_path / 'on').mkdir()
    off_runtime, off = _int8(exported, tmp_path / 'off', runtime_options={'int8_space_to_depth': False})
    on_runtime, on = _int8(exported, tmp_path / 'on')
    assert off.info['space_to_depth_convs'] == [] and on.info['space_to_depth_convs'] == ['/backbone/stem/conv/Conv']
    assert 'SpaceToDepth' not in {n.op_type for n in onnx.load(str(off.path)).graph.node}
    assert 'SpaceToDepth' in {n.op_type for n in onnx.load(str(on.path)).graph.node}
    for expected, got in zip(off_runtime.load(off).run(exported[2]), on_runtime.load(on).run(exported[2])):
        np.testing.assert_array_equal(got, expected)


def test_unknown_exclude_name_is_an_error(exported, tmp_path):
    with pytest.raises(UserError, match="'no.such.module' matches no node"):
        _int8(exported, tmp_path, exclude=['no.such.module'])


def test_fp16_and_int8_cost_on_coco128(coco128, tmp_path):
    """The accuracy goals measured in one run each against an fp32 reference of the same runtime."""
    data = ['data=coco', f'data.img_dir={coco128 / "images"}', f'data.ann_file={coco128 / "instances.json"}',
            'eval.compare_native=false', 'eval.reference=fp32']
    fp16 = run(compose_cfg('precision=fp16', *data), tmp_path / 'fp16')
    assert abs(fp16['delta']['device_minus_reference']) <= 0.002
    int8 = run(compose_cfg('precision=int8', *data), tmp_path / 'int8')
    assert int8['precision_details']['calibration_disjoint']
    assert int8['delta']['device_minus_reference'] >= -0.010, int8['delta']
    assert int8['reference']['bbox_mAP'] == fp16['reference']['bbox_mAP']


def test_rescale_folded_into_its_dequantize_gives_the_same_maps():
    """DQ (one scale) -> Mul by a per-channel constant becomes one per-channel DQ with the same outputs; a DQ read
    by anything else as well stays as it is."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from runtime.onnx import fold_rescales_into_dequantize

    constants = [numpy_helper.from_array(np.array(0.05, np.float32), 's'),
                 numpy_helper.from_array(np.array(128, np.uint8), 'z'),
                 numpy_helper.from_array(np.array([2, 0.5, 7], np.float32).reshape(1, 3, 1, 1), 'magnitude')]
    nodes = [helper.make_node('DequantizeLinear', ['q', 's', 'z'], ['a'], name='dq_a'),
             helper.make_node('Mul', ['a', 'magnitude'], ['map_a'], name='a_rescale'),
             helper.make_node('DequantizeLinear', ['q', 's', 'z'], ['b'], name='dq_b'),
             helper.make_node('Mul', ['b', 'magnitude'], ['map_b'], name='b_rescale')]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('q', TensorProto.UINT8, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                               for name in ('map_a', 'map_b', 'b')], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)], ir_version=8)
    q = np.random.default_rng(0).integers(0, 256, (1, 3, 2, 2), dtype=np.uint8)

    def outputs(m):
        return ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider']).run(None, {'q': q})

    before = outputs(model)
    assert fold_rescales_into_dequantize(model, ['a_rescale', 'b_rescale']) == ['a_rescale']
    assert [n.name for n in model.graph.node] == ['dq_a', 'dq_b', 'b_rescale']
    for expected, got in zip(before, outputs(model)):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_equalizing_a_conv_shared_by_levels_keeps_its_outputs(tmp_path):
    """A head conv that runs once per level (RetinaNet's) is one weight under several Convs: one set of channel
    scales, taken over all of its outputs, and every output restored by its own Mul."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from runtime.onnx import equalize_output_channels

    rng = np.random.default_rng(0)
    spread = np.array([1, 10, 0.1, 3]).reshape(4, 1, 1, 1)  # channels of very different magnitudes
    weight = numpy_helper.from_array((rng.normal(size=(4, 2, 1, 1)) * spread).astype(np.float32), 'head.cls.weight')
    bias = numpy_helper.from_array(np.array([0, 5, -1, 0], np.float32), 'head.cls.bias')
    convs = [helper.make_node('Conv', [x, 'head.cls.weight', 'head.cls.bias'], [y], name=f'/head/cls{s}/Conv')
             for x, y, s in (('p3', 'map_0', ''), ('p4', 'map_1', '_1'))]
    graph = helper.make_graph(convs, 'g', [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, h, h])
                                           for n, h in (('p3', 4), ('p4', 2))],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ('map_0', 'map_1')],
                              [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)], ir_version=8)
    path = tmp_path / 'head.onnx'
    onnx.save(model, str(path))
    inputs = [{'p3': rng.normal(size=(1, 2, 4, 4)).astype(np.float32),
               'p4': rng.normal(size=(1, 2, 2, 2)).astype(np.float32)} for _ in range(3)]

    class Reader:
        position = 0

        def get_next(self):
            self.position += 1
            return inputs[self.position - 1] if self.position <= len(inputs) else None

        def rewind(self):
            self.position = 0

    before = [ort.InferenceSession(str(path)).run(None, x) for x in inputs]
    rescales = equalize_output_channels(model, path, Reader(), ['head.cls'])
    assert rescales == ['/head/cls/Conv_rescale', '/head/cls_1/Conv_rescale']
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path))
    after = [session.run(None, x) for x in inputs]
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-5) for x, y in zip(before, after) for a, b in zip(x, y))
    # the scaled conv outputs reach a magnitude of exactly 1 per channel over both levels and all inputs
    probe = onnx.load(str(path))
    probe.graph.output.extend([helper.make_tensor_value_info(f'map_{i}_equalized', TensorProto.FLOAT, None)
                               for i in range(2)])
    onnx.save(probe, str(tmp_path / 'probe.onnx'))
    scaled = [ort.InferenceSession(str(tmp_path / 'probe.onnx')).run(['map_0_equalized', 'map_1_equalized'], x)
              for x in inputs]
    magnitude = np.max([np.abs(m).max(axis=(0, 2, 3)) for run in scaled for m in run], axis=0)
    assert np.allclose(magnitude, 1, atol=1e-6)


def test_weights_take_7_bits_on_a_cpu_without_vnni(exported, tmp_path, monkeypatch):
    """ONNX Runtime's uint8 x int8 kernels without VNNI saturate their int16 pair sums (YOLOv5s int8 lost 3.1
    points on coco128 that way): there the weights use 7 bits; with VNNI, or when told, 8."""
    import onnx
    from onnx import numpy_helper

    import runtime.onnx

    def weight_range(artifact):
        model = onnx.load(str(artifact.path))
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return max(int(np.abs(weights[n.input[0]].astype(np.int32)).max()) for n in model.graph.node
                   if n.op_type == 'DequantizeLinear' and weights.get(n.input[0], np.zeros(0)).dtype == np.int8)

    for name in ('avx2', 'vnni', 'told'):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(runtime.onnx, 'has_vnni', lambda: False)
    narrow_runtime, narrow = _int8(exported, tmp_path / 'avx2')
    assert narrow.info['reduce_range'] and narrow_runtime.resolved_options() == {'int8_reduce_range': True}
    assert weight_range(narrow) <= 64
    monkeypatch.setattr(runtime.onnx, 'has_vnni', lambda: True)
    assert weight_range(_int8(exported, tmp_path / 'vnni')[1]) == 127
    assert weight_range(_int8(exported, tmp_path / 'told', runtime_options={'int8_reduce_range': True})[1]) <= 64

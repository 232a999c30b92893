"""The device worker: runs VastAI's vaststreamx SDK in its own interpreter, for runtime=vacc.

VastAI builds each vaststreamx wheel for one Python (cp38 in VastStreamX-Samples' image, cp312 in
xinference_vacc's), so this file is valid Python 3.8 to 3.12 and imports only the standard library, numpy and the
SDK (tests check both). runtime/vacc.py starts it with `runtime.python`:

    python vacc_worker.py '<json settings>'

Images come in and raw maps go out through two shared-memory files the parent created (never through the pipe);
the pipes carry one JSON line per message. stdin: {"op": "run", "images": [[offset, width, height], ...]}
(settings "mode": "preprocess" starts the VDSP op alone, no model: "run" then returns its output tensors, in the
card's tiled fp16 layout),
{"op": "inputs", "path", "size"} (a larger input buffer) or {"op": "close"}. stdout: {"ready": ...} once the stream
is built, then one reply per message: {"sdk_s", "dtype"}, {"ok": true} or {"error": "..."}. stderr is the
parent's log (shown with a [vacc] prefix).
"""
import json
import mmap
import sys
import threading
import time
import traceback

import numpy as np

LOCAL = threading.local()


def reply(message):
    sys.stdout.write(json.dumps(message) + '\n')
    sys.stdout.flush()


def on_device(vsx, device_id):
    """set_device in the calling thread before it touches the card (VastAI's samples do it in every thread),
    its 0 return checked; once per thread."""
    if getattr(LOCAL, 'device', None) != device_id:
        code = vsx.set_device(device_id)
        if code != 0:
            raise RuntimeError('vsx.set_device({}) returned {}'.format(device_id, code))
        LOCAL.device = device_id


def mapped(path, size):
    with open(path, 'r+b') as handle:
        return mmap.mmap(handle.fileno(), size)


class Worker:
    def __init__(self, settings):
        import vaststreamx as vsx

        self.vsx = vsx
        self.device_id = settings['device_id']
        self.batch_size = settings['batch_size']
        self.shapes = [tuple(s) for s in settings['output_shapes']]
        self.preprocess_only = settings.get('mode') == 'preprocess'
        on_device(vsx, self.device_id)
        self.fusion_op = vsx.Operator.load_ops_from_json_file(settings['vdsp_params'])[0]
        if self.preprocess_only:  # as VastStreamX-Samples run a fusion op by itself (yolo_world_image.py)
            self.fusion_op = self.fusion_op.cast_to_buildin_operator()
            width, height = settings['op_output_size']
            attr = vsx.AttrKey
            self.fusion_op.set_attribute({attr.OIMAGE_WIDTH: width, attr.OIMAGE_HEIGHT: height})
        else:
            self.model = vsx.Model(settings['prefix'], self.batch_size)
            self.model_op = vsx.ModelOperator(self.model)
            self.graph = vsx.Graph()
            self.graph.add_operators(self.fusion_op, self.model_op)
            self.stream = vsx.Stream(self.graph, vsx.StreamBalanceMode.ONCE)
            self.stream.register_operator_output(self.model_op)
            self.stream.build()
        self.inputs = mapped(settings['input_buffer'], settings['input_size'])
        self.outputs = mapped(settings['output_buffer'], settings['output_size'])

    def preprocess(self, images):
        """The fusion op alone on each image, its output tensor read back (one per image) in the tiled shape
        `shapes` gives, as yolo_world_image.py asks for it."""
        vsx, attr = self.vsx, self.vsx.AttrKey
        tensors = []
        for image in images:
            self.fusion_op.set_attribute({attr.IIMAGE_WIDTH: image.width, attr.IIMAGE_WIDTH_PITCH: image.width,
                                          attr.IIMAGE_HEIGHT: image.height, attr.IIMAGE_HEIGHT_PITCH: image.height})
            out = self.fusion_op.execute(tensors=[image], output_info=[(list(self.shapes[0]), vsx.TypeFlag.FLOAT16)])
            tensors.append([np.asarray(vsx.as_numpy(out[0]))])
        return tensors

    def run(self, images):
        """One run_sync over the images placed in the input buffer (or the fusion op alone on each); the maps
        written to the output buffer, image by image, output by output, in the SDK's dtype."""
        vsx = self.vsx
        if len(images) > self.batch_size:
            raise ValueError('{} images for a stream of batch {}'.format(len(images), self.batch_size))
        on_device(vsx, self.device_id)
        start = time.perf_counter()
        inputs = []
        for offset, width, height in images:
            planar = np.frombuffer(self.inputs, np.uint8, 3 * height * width, offset).reshape(3, height, width)
            inputs.append(vsx.create_image(planar, vsx.ImageFormat.RGB_PLANAR, width, height, self.device_id))
        if self.preprocess_only:
            maps = self.preprocess(inputs)
        else:
            maps = [[np.asarray(vsx.as_numpy(tensor)) for tensor in per_image]
                    for per_image in self.stream.run_sync(inputs)]
        sdk_s = time.perf_counter() - start
        dtype = maps[0][0].dtype if maps and maps[0] else np.dtype(np.float16)
        sizes = [[int(m.size) for m in per_image] for per_image in maps]
        expected = [int(np.prod(s)) for s in self.shapes]
        if any(len(s) != len(expected) or s != expected for s in sizes):
            what = 'the VDSP op returned tensors' if self.preprocess_only else 'the model returned maps'
            return {'error': '{} of {} values per image, the export has {}'.format(what, sizes[0], expected),
                    'sizes': sizes[0]}
        view = np.frombuffer(self.outputs, dtype, len(images) * sum(expected))
        position = 0
        for per_image in maps:
            for m in per_image:
                view[position:position + m.size] = m.reshape(-1)
                position += m.size
        return {'sdk_s': sdk_s, 'dtype': dtype.name}


def main():
    settings = json.loads(sys.argv[1])
    worker = Worker(settings)
    reply({'ready': True, 'python': list(sys.version_info[:3]),
           'sdk_version': getattr(worker.vsx, '__version__', 'unknown')})
    for line in sys.stdin:
        message = json.loads(line)
        if message['op'] == 'close':
            break
        try:
            if message['op'] == 'inputs':
                worker.inputs = mapped(message['path'], message['size'])
                reply({'ok': True})
            else:
                reply(worker.run(message['images']))
        except Exception as err:  # a card error: reported, the parent stops the run
            traceback.print_exc(file=sys.stderr)
            reply({'error': '{}: {}'.format(type(err).__name__, err)})


if __name__ == '__main__':
    main()

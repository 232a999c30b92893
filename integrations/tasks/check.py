"""`task=check runtime=vacc`: the first command to run on a machine with a VastAI card. Each fact about VastAI's
SDK and compiler that inloop relies on and has only read in VastAI's code (docs/vacc.md's fact table) is checked
on the card: PASS, FAIL (the step could not run: why) or DIFF (it ran, and the card differs from what inloop
assumes: by how much), with its numbers, in a one-screen table and in check.json to send back. A step that needs
one that failed is SKIP."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from common.errors import UserError
from integrations.config import group_option, plain

CHECK_IMAGES = 4  # images of data.* the steps run on (the batch step needs 4)
RESIZE_KINDS = ('BILINEAR_CV', 'BILINEAR', 'BILINEAR_PILLOW', 'NEAREST', 'BICUBIC_PILLOW')
PREPROCESS_MEAN_ABS = 0.02  # the VDSP op against the host's pipeline (normalized units): resizers differ a little
MIN_COSINE = {'fp16': 0.999, 'int8': 0.95}  # the card's raw maps against ONNX Runtime fp32 on the same input
SKIP_CHECK_MAPS = 3  # raw maps whose conv the numbering check puts alone in int8 (one vamc build each)
THROUGHPUT_ITERATIONS = 20


@dataclass
class Step:
    """One row of the table (docs/vacc.md's fact table names the facts each step verifies)."""

    name: str
    result: str = 'SKIP'
    figures: dict = field(default_factory=dict)
    note: str = ''


def cosine_and_max_diff(reference: list[np.ndarray], candidate: list[np.ndarray]) -> list[dict]:
    """Per raw map: the lowest cosine over images and the largest absolute difference."""
    rows = []
    for ref, cand in zip(reference, candidate):
        ref, cand = (np.asarray(m, np.float64).reshape(len(m), -1) for m in (ref, cand))
        cosine = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12)
        rows.append({'min_cosine': round(float(cosine.min()), 6), 'max_abs_diff': float(np.abs(ref - cand).max())})
    return rows


def content_box(tensor: np.ndarray, pad: np.ndarray) -> list[int]:
    """[top, bottom, left, right] of the rows and columns that are not all padding, in one (C, H, W) input."""
    content = np.abs(tensor - pad[:, None, None]).max(0) > 1e-2
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    return [int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])] if len(rows) else [-1, -1, -1, -1]


class CardCheck:
    """The steps, in order, sharing what earlier ones built (the model, the builds, the op's tensors)."""

    def __init__(self, cfg: DictConfig, output_dir: Path):
        self.cfg, self.dir = cfg, output_dir / 'check'
        self.options = {**plain(cfg.runtime), 'compile': True, 'model_prefix': None}
        self.options.pop('name')
        int8 = cfg.precision if cfg.precision.name == 'int8' else group_option('precision', 'int8')
        self.precisions = {'fp16': {'name': 'fp16'}, 'int8': plain(int8)}
        self.steps: list[Step] = []
        self.engine = self.builds = self.images = self.tensors = None

    def run(self) -> list[Step]:
        self.dir.mkdir(parents=True, exist_ok=True)
        plan = [('sdk', self.sdk, ()), ('set_device', self.set_device, ('sdk',)), ('vamc', self.vamc, ()),
                ('compile_fp16', lambda: self.compile('fp16'), ('vamc',)),
                ('compile_int8', lambda: self.compile('int8'), ('vamc',)),
                ('vdsp_op', self.vdsp_op, ('set_device', 'compile_fp16')),
                ('raw_maps_fp16', lambda: self.raw_maps('fp16'), ('vdsp_op',)),
                ('raw_maps_int8', lambda: self.raw_maps('int8'), ('vdsp_op', 'compile_int8')),
                ('batch_4', self.batch, ('raw_maps_fp16',)), ('odd_size', self.odd_size, ('raw_maps_fp16',)),
                ('mixed_sizes', self.mixed_sizes, ('raw_maps_fp16',)),
                ('skip_conv_layers', self.skip_conv_layers, ('raw_maps_int8',)),
                ('throughput', self.throughput, ('raw_maps_int8',))]
        done = set()
        for name, action, needs in plan:
            step = Step(name)
            failed = [n for n in needs if n not in done]
            if failed:
                step.note = f'needs {", ".join(failed)}'
            else:
                try:
                    step.result, step.figures, step.note = action()
                except Exception as err:  # on a real card anything may differ: a row, not a crash
                    step.result, step.note = 'FAIL', str(err).splitlines()[0] if str(err) else type(err).__name__
                    (self.dir / f'{name}.traceback.txt').write_text(traceback.format_exc())
            if step.result in ('PASS', 'DIFF'):
                done.add(name)
            self.steps.append(step)
        return self.steps

    # ---- the software

    def sdk(self):
        from runtime.vacc import probe_sdk

        return 'PASS', {'sdk': probe_sdk(self.options.get('python'))}, ''

    def set_device(self):
        python = self.options.get('python') or sys.executable
        device = self.options['device_id']
        done = subprocess.run([python, '-c', f'import vaststreamx as vsx; print(vsx.set_device({device}))'],
                              capture_output=True, text=True, timeout=120)
        code = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-200:]
        return ('PASS' if code == '0' else 'FAIL'), {'device_id': device, 'returned': code}, ''

    def vamc(self):
        compiler = shutil.which(self.options['compiler'])
        if compiler is None:
            raise UserError(f"{self.options['compiler']} is not on PATH (runtime.compiler)")
        done = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=120)
        version = (done.stdout or done.stderr).strip().splitlines()
        return 'PASS', {'path': compiler, 'version': version[0] if version and done.returncode == 0 else
                        f'unknown (`vamc --version` exit {done.returncode})'}, ''

    def compile(self, precision: str):
        from integrations.deploy.build import DeviceBuild
        from runtime import Artifact

        if self.engine is None:
            from integrations.engines import open_engine
            from integrations.engines.plan import make_plan

            self.engine = open_engine(make_plan(self.cfg, self.dir, self.dir / 'export', compare_native=False))
            self.builds = {}
        build = DeviceBuild(**{**self.engine.plan.build, 'precision': self.precisions[precision],
                               'runtime': {'name': 'vacc', **self.options}, 'reference': None,
                               'own_decode': None, 'preprocessing_stage': False,
                               'out_dir': str(self.dir / f'export_{precision}')})
        start = time.perf_counter()
        entry, built, state, runtime, _ = build.build(self.engine.model, self.engine.mm_cfg, self.engine.dataset)
        self.builds[precision] = (runtime, Artifact(entry / built['device']['file'], built['device']['info'], entry),
                                  entry / built['files']['onnx'])
        return 'PASS', {'seconds': round(time.perf_counter() - start, 1), 'cache': state,
                        'model': str(self.builds[precision][1].path)}, ''

    # ---- the VDSP op

    def vdsp_op(self):
        """The op alone on the check's images, for every resize kind, against the host's pipeline."""
        from integrations.deploy.pipeline import loop_preprocessing
        from runtime.vacc import VaccSession, tiled_shape, untile, vdsp_params, write_json

        runtime, artifact, _ = self.builds['fp16']
        preprocessing = artifact.info['preprocessing']
        shape = (3, preprocessing['height'], preprocessing['width'])
        dataset = self.engine.dataset
        self.images = [dataset.get_data_info(i)['img_path'] for i in range(min(CHECK_IMAGES, len(dataset)))]
        host = np.concatenate([loop_preprocessing(self.engine.mm_cfg, self.engine.model)(Path(p)) for p in self.images])
        pad = self._pad_value(preprocessing)
        figures, configured = {}, artifact.info['resize_type']
        for kind in RESIZE_KINDS:
            spec = self.dir / f'vdsp_params_{kind}.json'
            write_json(spec, vdsp_params(preprocessing, kind))
            session = VaccSession(None, str(spec), self.options['device_id'], 1, [tiled_shape(*shape)], preprocessing,
                                  python=self.options.get('python'), mode='preprocess')
            try:
                (tiled,) = session.run_paths(self.images)
            finally:
                session.close()
            tensors = untile(tiled, *shape)
            if kind == configured:
                self.tensors = tensors
            diff = np.abs(tensors - host)
            boxes = [[content_box(t, pad), content_box(h, pad)] for t, h in zip(tensors, host)]
            figures[kind] = {'max_abs_diff': round(float(diff.max()), 4), 'mean_abs_diff': round(float(diff.mean()), 4),
                             'content_box_card_host': boxes}
        mine = figures[configured]
        geometry = all(max(abs(a - b) for a, b in zip(card, host)) <= 1 for card, host in mine['content_box_card_host'])
        good = mine['mean_abs_diff'] <= PREPROCESS_MEAN_ABS and geometry
        note = '' if good else (f'{configured}: mean |diff| {mine["mean_abs_diff"]} (> {PREPROCESS_MEAN_ABS})'
                                if geometry else f'{configured}: the image lies elsewhere in the input than the host '
                                                 'puts it (content boxes differ by more than 1 px)')
        return ('PASS' if good else 'DIFF'), {'configured': configured, 'by_kind': figures}, note

    @staticmethod
    def _pad_value(preprocessing: dict) -> np.ndarray:
        """The letterbox grey (114) in the model's input units, per channel."""
        mean, std = np.asarray(preprocessing['mean'], float), np.asarray(preprocessing['std'], float)
        return (114 - mean) / std

    # ---- the model on the card

    def _session(self, precision: str, batch_size: int = 1, artifact=None):
        from runtime import get_runtime

        runtime = get_runtime('vacc', precision=self.precisions[precision], **{**self.options,
                                                                              'batch_size': batch_size})
        return runtime.load(artifact or self.builds[precision][1])

    def _reference(self, precision: str) -> list[np.ndarray]:
        """ONNX Runtime fp32 on the tensors the card's own op made: the model's numerics and nothing else."""
        from runtime.onnx import OrtSession

        return OrtSession(self.builds[precision][2]).run(self.tensors.astype(np.float32))

    def raw_maps(self, precision: str):
        session = self._session(precision)
        try:
            maps = session.run_paths(self.images)
        finally:
            session.close()
        rows = cosine_and_max_diff(self._reference(precision), maps)
        worst = min(r['min_cosine'] for r in rows)
        good = worst >= MIN_COSINE[precision]
        return ('PASS' if good else 'DIFF'), {'per_map': rows, 'min_cosine': worst}, \
            '' if good else f'min cosine {worst} < {MIN_COSINE[precision]}'

    def batch(self):
        """Four images in one run_sync against four runs of one."""
        together = self._session('fp16', batch_size=CHECK_IMAGES)
        alone = self._session('fp16')
        try:
            four = together.run_paths(self.images)
            ones = [alone.run_paths([path]) for path in self.images]
        finally:
            together.close()
            alone.close()
        diff = max(float(np.abs(four[m][i] - ones[i][m][0]).max()) for i in range(len(self.images))
                   for m in range(len(four)))
        return ('PASS' if diff == 0 else 'DIFF'), {'images': len(self.images), 'max_abs_diff': diff}, \
            '' if diff == 0 else 'one run_sync of several images differs from the same images one by one'

    def odd_size(self):
        """An image with odd sides, which the host resizes to even first (as VastAI's scripts do): the card's maps
        are those of that even image."""
        import cv2

        image = cv2.imread(self.images[0])
        odd = image[:image.shape[0] // 2 * 2 - 1, :image.shape[1] // 2 * 2 - 1]
        even = cv2.resize(odd, (odd.shape[1] - 1, odd.shape[0] - 1))
        paths = [self.dir / 'odd.png', self.dir / 'even.png']
        for path, picture in zip(paths, (odd, even)):
            cv2.imwrite(str(path), picture)
        session = self._session('fp16')
        try:
            maps = [session.run_paths([str(p)]) for p in paths]
        finally:
            session.close()
        finite = all(np.isfinite(m).all() for m in maps[0])
        diff = max(float(np.abs(a - b).max()) for a, b in zip(*maps))
        good = finite and diff == 0
        return ('PASS' if good else 'DIFF'), {'odd_size': [int(odd.shape[1]), int(odd.shape[0])], 'finite': finite,
                                              'max_abs_diff_to_even': diff}, '' if good else 'odd image differs'

    def mixed_sizes(self):
        """Two images of different sizes in one run_sync against each alone."""
        import cv2

        first = cv2.imread(self.images[0])
        small = self.dir / 'small.png'
        cv2.imwrite(str(small), cv2.resize(first, (first.shape[1] // 4 * 2, first.shape[0] // 4 * 2)))
        paths = [self.images[0], str(small)]
        together = self._session('fp16', batch_size=2)
        alone = self._session('fp16')
        try:
            both = together.run_paths(paths)
            ones = [alone.run_paths([path]) for path in paths]
        finally:
            together.close()
            alone.close()
        diff = max(float(np.abs(both[m][i] - ones[i][m][0]).max()) for i in range(2) for m in range(len(both)))
        return ('PASS' if diff == 0 else 'DIFF'), {'max_abs_diff': diff}, \
            '' if diff == 0 else 'images of different sizes in one run_sync differ from each alone'

    def skip_conv_layers(self):
        """What float_layers.json's conv indices mean to vamc: each raw map is written by one Conv node (index i
        among the export's Conv nodes, in graph order); a build with every conv skipped but conv i must differ
        from the build with every conv skipped in that raw map only, as nothing else reads conv i's output. If
        vamc numbered its conv layers otherwise, int8 would land on another conv and change other maps."""
        import onnx
        import yaml

        from runtime import Artifact

        runtime, artifact, onnx_path = self.builds['int8']
        graph = onnx.load(str(onnx_path)).graph
        convs = {node.name: index for index, node in enumerate(n for n in graph.node if n.op_type == 'Conv')}
        producer = {output: node.name for node in graph.node for output in node.output}
        raw = [convs.get(producer.get(output.name)) for output in graph.output][:SKIP_CHECK_MAPS]
        if None in raw:
            raise UserError('a raw map is not the output of a Conv node: nothing to skip')
        every = list(range(len(convs)))
        maps = {}
        for name, skip in (('all', every), *((f'all_but_{i}', [c for c in every if c != i]) for i in raw)):
            build_dir = self.dir / f'int8_skip_{name}'
            shutil.rmtree(build_dir, ignore_errors=True)
            shutil.copytree(artifact.root, build_dir, ignore=shutil.ignore_patterns('deploy_weights'))
            config = yaml.safe_load((build_dir / 'vamc.yaml').read_text())
            config['backend']['quantize']['skip_conv_layers'] = skip
            (build_dir / 'vamc.yaml').write_text(yaml.safe_dump(config, sort_keys=False))
            runtime.run_vamc(build_dir)
            session = self._session('int8', artifact=Artifact(build_dir / artifact.path.relative_to(artifact.root),
                                                              artifact.info, build_dir))
            try:
                maps[name] = session.run_paths(self.images[:2])
            finally:
                session.close()
        # row k: how far each raw map moved when only the conv of raw map k went int8
        moved = [[float(np.abs(mine - base).max()) for mine, base in zip(maps[f'all_but_{i}'], maps['all'])]
                 for i in raw]
        good = all(row[k] > 0 and max(row[:k] + row[k + 1:], default=0) <= row[k] / 10 for k, row in enumerate(moved))
        return ('PASS' if good else 'DIFF'), {'conv_indices': raw, 'conv_count': len(convs), 'max_abs_moved': moved}, \
            '' if good else ('int8 on a raw map\'s conv, by its index, moved other raw maps (or not its own): vamc '
                             'numbers its conv layers otherwise, and float_layers.json\'s conv_indices do not apply')

    def throughput(self):
        from integrations.tasks.bench import measure, vamp_block

        session = self._session('int8')
        try:
            figures = measure([session], list, [[path] for path in self.images], THROUGHPUT_ITERATIONS)
        finally:
            session.close()
        block = vamp_block({'instances': 1, 'batch_size': 1}, figures)
        (self.dir / 'throughput.txt').write_text(block + '\n')
        return 'PASS', {'throughput_qps': round(figures['throughput_qps'], 2),
                        'p50_us': round(figures['e2e_latency_us']['p50'])}, 'int8, batch 1 (vamp block: throughput.txt)'


def run_check(cfg: DictConfig, output_dir: Path) -> dict:
    """check.json's content: each step's result, figures and note."""
    steps = CardCheck(cfg, output_dir).run()
    counts = {r: sum(s.result == r for s in steps) for r in ('PASS', 'FAIL', 'DIFF', 'SKIP')}
    return {'runtime': 'vacc', 'model': cfg.model.family, 'engine': cfg.engine.name, 'counts': counts,
            'steps': [vars(step) for step in steps]}

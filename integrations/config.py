"""Hydra/OmegaConf glue that must stay importable without torch (`run.py --help` is instant).

Every option's type is declared here once, as structured configs in Hydra's ConfigStore; the YAML files under
conf/ extend them (their defaults list starts with the schema) and hold the values and their comments. Hydra so rejects
a value of the wrong type, a choice outside its list or an unknown key while composing, before anything runs.
What code still checks is ranges and rules across options (integrations/app/checks.py, each runtime's constructor).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def yolov5_variant(config: str) -> str:
    """The size (and P6) of an mmyolo YOLOv5 config, from its name: `…/yolov5_n-p6-v62_….py` -> `n-p6`; the file
    name itself for a config named otherwise."""
    name = Path(str(config).split('::')[-1]).name
    match = re.match(r'yolov5_([nsmlx])(-p6)?-', name)
    return match.group(1) + (match.group(2) or '') if match else Path(name).stem


# ---- choices (StrEnum: the members compare equal to their names and print as them)

class Task(StrEnum):
    eval = 'eval'        # evaluate device and native side by side (results.json)
    bench = 'bench'      # speed figures (bench.json)
    export = 'export'    # the build files only, to carry to a machine with a card
    npz = 'npz'          # vamp's image -> npz datalist
    cache = 'cache'      # list or clean the artifact cache
    mlperf = 'mlperf'    # MLPerf LoadGen drives the runtime (mlperf_log_*, results.json)
    check = 'check'      # runtime=vacc: every unverified fact about the card checked on it (check.json)


class Scenario(StrEnum):
    offline = 'offline'
    single_stream = 'single_stream'


class LoadGenScenario(StrEnum):  # MLPerf LoadGen's TestScenario names
    SingleStream = 'SingleStream'
    MultiStream = 'MultiStream'
    Server = 'Server'
    Offline = 'Offline'


class LoadGenMode(StrEnum):
    accuracy = 'accuracy'        # every sample once, responses logged and scored
    performance = 'performance'  # LoadGen's timed run, VALID/INVALID


class ReferencePrecision(StrEnum):
    fp32 = 'fp32'
    fp16 = 'fp16'


class CacheClean(StrEnum):
    all = 'all'
    invalid = 'invalid'


class CalibrationMethod(StrEnum):  # VastAI's names (vamc's calibrate_mode)
    max = 'max'
    kl_divergence = 'kl_divergence'
    percentile = 'percentile'
    mse = 'mse'


class QuantFormat(StrEnum):
    qdq = 'qdq'
    qoperator = 'qoperator'


class RawMapConvs(StrEnum):
    equalized = 'equalized'
    float = 'float'
    int8 = 'int8'


class ResizeType(StrEnum):  # the VDSP op's ResizeType values VastModelZOO and VastStreamX-Samples use
    BILINEAR = 'BILINEAR'
    BILINEAR_CV = 'BILINEAR_CV'
    BILINEAR_PILLOW = 'BILINEAR_PILLOW'
    NEAREST = 'NEAREST'
    BICUBIC_PILLOW = 'BICUBIC_PILLOW'


class PerformanceHint(StrEnum):  # OpenVINO's ov::hint::PerformanceMode
    LATENCY = 'LATENCY'
    THROUGHPUT = 'THROUGHPUT'


class Launcher(StrEnum):  # mmengine's launchers
    none = 'none'
    pytorch = 'pytorch'
    slurm = 'slurm'
    mpi = 'mpi'


class LogLevel(StrEnum):
    DEBUG = 'DEBUG'
    INFO = 'INFO'
    WARNING = 'WARNING'
    ERROR = 'ERROR'


# ---- the root config (conf/config.yaml)

@dataclass
class EvalConf:
    score_thr: Optional[float] = MISSING
    nms_iou: Optional[float] = MISSING
    max_per_img: Optional[int] = MISSING
    nms_pre: Optional[int] = MISSING
    compare_native: bool = MISSING
    reference: Optional[ReferencePrecision] = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    prefetch: int = MISSING
    num_images: Optional[int] = MISSING
    overlap: bool = MISSING
    flat_memory: bool = MISSING
    host_threads: Optional[int] = MISSING
    multi_label: Optional[bool] = MISSING
    save_txt: bool = MISSING
    explain: bool = MISSING


@dataclass
class ExplainConf:
    resamples: int = MISSING
    seed: int = MISSING
    score_thr: float = MISSING
    iou_thr: float = MISSING
    images: int = MISSING
    draw_ground_truth: bool = MISSING


@dataclass
class BenchConf:
    scenario: Scenario = MISSING
    batch_sizes: list[int] = MISSING
    instances: list[int] = MISSING
    warmup: int = MISSING
    iterations: int = MISSING
    replay_latency_ms: Optional[float] = MISSING
    profile: bool = MISSING


@dataclass
class MlperfConf:
    scenario: LoadGenScenario = MISSING
    mode: LoadGenMode = MISSING
    official: bool = MISSING
    user_conf: Optional[str] = MISSING
    min_duration_ms: int = MISSING
    min_query_count: int = MISSING
    target_latency_ms: Optional[float] = MISSING
    target_qps: Optional[float] = MISSING
    samples_per_query: int = MISSING
    performance_sample_count: int = MISSING


@dataclass
class ExportConf:
    opset: int = MISSING
    simplify: bool = MISSING
    torchscript: bool = MISSING


@dataclass
class NpzTaskConf:
    relative_to: Optional[str] = MISSING


@dataclass
class CacheConf:
    enabled: bool = MISSING
    dir: str = MISSING
    clean: Optional[CacheClean] = MISSING


@dataclass
class InloopConf:
    task: Task = MISSING
    eval: EvalConf = field(default_factory=EvalConf)
    explain: ExplainConf = field(default_factory=ExplainConf)
    bench: BenchConf = field(default_factory=BenchConf)
    mlperf: MlperfConf = field(default_factory=MlperfConf)
    export: ExportConf = field(default_factory=ExportConf)
    npz: NpzTaskConf = field(default_factory=NpzTaskConf)
    cache: CacheConf = field(default_factory=CacheConf)
    # the groups: each option's YAML extends its own schema below
    model: Any = MISSING
    precision: Any = MISSING
    runtime: Any = MISSING
    data: Any = MISSING
    engine: Any = MISSING


# ---- the groups (conf/<group>/<option>.yaml)

@dataclass
class ModelConf:
    family: str = MISSING
    variant: str = MISSING
    label_space: str = MISSING
    config: str = MISSING
    checkpoint: Optional[str] = MISSING
    trust_checkpoint: bool = MISSING
    init_seed: Optional[int] = None  # without a checkpoint: the seed of the random weights
    input_size: Optional[list[int]] = None  # model=mm: [H, W] of the fixed export shape (null: the config's own)


@dataclass
class PrecisionConf:
    name: str = MISSING


@dataclass
class CalibrationConf:
    method: CalibrationMethod = MISSING
    percentile: float = MISSING
    num_images: int = MISSING
    data: str = MISSING
    seed: int = MISSING


@dataclass
class SelectionConf:
    img_dir: Optional[str] = MISSING
    ann_file: Optional[str] = MISSING
    num_images: Optional[int] = MISSING


@dataclass
class Int8Conf(PrecisionConf):
    calibration: CalibrationConf = field(default_factory=CalibrationConf)
    per_channel: bool = MISSING
    format: QuantFormat = MISSING
    activation_symmetric: bool = MISSING
    raw_map_convs: RawMapConvs = MISSING
    exclude: list[str] = MISSING
    max_drop: Optional[float] = MISSING
    selection: SelectionConf = field(default_factory=SelectionConf)
    layers_report: bool = MISSING
    layers_report_images: int = MISSING


@dataclass
class OnnxConf:
    name: str = MISSING
    intra_op_threads: int = MISSING
    allow_spinning: bool = MISSING
    int8_space_to_depth: bool = MISSING
    int8_reduce_range: Optional[bool] = MISSING


@dataclass
class OpenVinoConf:
    name: str = MISSING
    device: str = MISSING
    threads: int = MISSING
    performance_hint: PerformanceHint = MISSING


@dataclass
class VdspConf:
    resize_type: Optional[ResizeType] = MISSING
    even_size: bool = MISSING


@dataclass
class VaccConf:
    name: str = MISSING
    device_id: int = MISSING
    batch_size: int = MISSING
    model_prefix: Optional[str] = MISSING
    compiler: str = MISSING
    compile: bool = MISSING
    vdsp: VdspConf = field(default_factory=VdspConf)
    vamc_compile: Optional[dict[str, Any]] = MISSING
    python: Optional[str] = MISSING


@dataclass
class NpzConf:
    name: str = MISSING
    output_dir: str = MISSING
    datalist: str = MISSING


@dataclass
class DataConf:
    name: str = MISSING
    img_dir: str = MISSING
    ann_file: str = MISSING


@dataclass
class DemoDataConf(DataConf):
    ann_files: dict[str, str] = MISSING  # by the model's label space


@dataclass
class MMEngineConf:
    name: str = MISSING
    log_level: LogLevel = MISSING
    launcher: Launcher = MISSING
    dist_backend: str = MISSING


@dataclass
class LightningConf:
    name: str = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING  # Lightning's own: a count, a list of ids or 'auto'
    strategy: str = MISSING
    num_nodes: int = MISSING
    log_level: LogLevel = MISSING




# ConfigStore names (group schema/<group>): conf/<group>/<option>.yaml starts with `- /schema/<group>/<name>@_here_`
SCHEMAS = {
    'schema': {'config': InloopConf},
    'schema/model': {'model': ModelConf},
    'schema/precision': {'precision': PrecisionConf, 'int8': Int8Conf},
    'schema/runtime': {'onnx': OnnxConf, 'openvino': OpenVinoConf, 'vacc': VaccConf, 'npz': NpzConf},
    'schema/data': {'data': DataConf, 'demo': DemoDataConf},
    'schema/engine': {'mmengine': MMEngineConf, 'lightning': LightningConf},
}


def plain(node) -> Any:
    """A config node as plain Python values (dicts, lists, strings for choices), as the runtimes, the cache
    key and the build files (YAML, JSON) take them."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def group_option(group: str, option: str):
    """One config group's option as it composes by itself (conf/<group>/<option>.yaml on its schema): for a task
    that also builds at an option the user did not choose (task=check: int8 beside fp16)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the app: its own config search path
        return compose('config', overrides=[f'{group}={option}'])[group]
    with initialize_config_dir(str(ROOT / 'conf'), version_base='1.3'):
        return compose('config', overrides=[f'{group}={option}'])[group]


def register_resolvers() -> None:
    """The schemas in Hydra's ConfigStore, and the resolvers: `${inloop.root:rel/path}`, a path under the project
    root wherever the command is run from; `${inloop.yolov5_variant:${model.config}}`, the variant a YOLOv5
    config builds; `${inloop.config_name:${model.config}}`, a config file's name."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=group, name=name, node=node)
    if not OmegaConf.has_resolver('inloop.root'):
        OmegaConf.register_new_resolver('inloop.root', lambda rel='': str(ROOT / rel))
    if not OmegaConf.has_resolver('inloop.yolov5_variant'):
        OmegaConf.register_new_resolver('inloop.yolov5_variant', yolov5_variant)
    if not OmegaConf.has_resolver('inloop.config_name'):
        OmegaConf.register_new_resolver('inloop.config_name', lambda config: Path(str(config).split('::')[-1]).stem)

"""Inference engines for an Encoder: torch (fp32, bf16, fp16), ONNX Runtime (fp32, int8) or OpenVINO (fp32);
training stays in torch.

    spec = resolve_engine("int8")                         # EngineSpec("onnxruntime", "int8")
    runner = open_runner(encoder, EngineSpec("onnxruntime", "fp32"), device="cpu")
    embeddings = runner(images)                           # (N, 3, S, S) float32, normalised -> (N, dim) numpy

The ONNX graph (tower + head + L2 normalisation, dynamic batch axis) is a derived artefact of the encoder's
fingerprint: exported once into the engine cache (`engine_cache()`), written atomically, checked against torch
on a few images every time it is opened (max abs difference <= MAX_ABS_DIFF), and reused by every later command.
An int8 graph is made from it by retrieval.encoder.quantize and lives where the caller says (an index DB keeps its
own). Anything the engine cannot take raises EngineUnavailable with a one-line reason; `runner_or_torch` turns that
into torch fp32 and a warning.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from retrieval.errors import EncoderError

if TYPE_CHECKING:
    import torch

    from retrieval.encoder.model import Encoder

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DEFAULT_ENGINE = "onnxruntime"  # for fp32 on a CPU: the same vectors as torch, 3-5x faster (docs/engines.md)
CACHE_ENV = "CIRCLE_RETRIEVAL_ENGINE_CACHE"
OPSET = 17
MAX_ABS_DIFF = 1e-4  # an exported fp32 graph further than this from torch on any output value is not used
_CHECK_IMAGES = 2  # images the exported graph is checked on when opened (cheap: one small torch forward)


class EngineUnavailable(EncoderError):
    """The requested engine cannot run this encoder here (the message is the one-line reason)."""


@dataclass(frozen=True)
class EngineSpec:
    """How embeddings are computed: which engine, at which precision."""

    engine: str = "torch"
    precision: str = "fp32"

    def __str__(self) -> str:
        return f"{self.engine} {self.precision}"


def resolve_engine(precision: str, engine: str | None = None, device: str = "cpu") -> EngineSpec:
    """The EngineSpec for a --precision and an optional --engine: int8 runs on onnxruntime only, bf16 and fp16
    on torch only, fp32 on either (unless given: DEFAULT_ENGINE on the CPU, torch on a GPU, where this project's
    onnxruntime does not run). EncoderError for an impossible pair."""
    if precision not in PRECISIONS:
        raise EncoderError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if engine is not None and engine not in ENGINES:
        raise EncoderError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    fp32 = engine or (DEFAULT_ENGINE if str(device) == "cpu" else "torch")
    natural = {"int8": "onnxruntime", "bf16": "torch", "fp16": "torch"}.get(precision, fp32)
    if engine is not None and engine != natural:
        raise EncoderError(f"--precision {precision} runs on --engine {natural}, not {engine}")
    return EngineSpec(natural, precision)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), the ones that make
    an int8 graph faster than fp32, by the flags the Linux kernel lists; False where it lists none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def engine_cache() -> Path:
    """Where exported graphs are cached: $CIRCLE_RETRIEVAL_ENGINE_CACHE, else $XDG_CACHE_HOME/circle-retrieval/
    engines, else ~/.cache/circle-retrieval/engines."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "circle-retrieval" / "engines"


class Runner(Protocol):
    """Normalised images (N, 3, S, S) float32 -> (N, dim) float32 L2-normalised embeddings, as `spec` computes them."""

    spec: EngineSpec

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


class TorchRunner:
    """The encoder in torch at fp32, bf16 or fp16, channels-last (about 1.5x faster for EfficientNet on a CPU)."""

    def __init__(self, encoder: Encoder, precision: str = "fp32"):
        import torch

        self.spec = EngineSpec("torch", precision)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.encoder = copy.deepcopy(encoder).to(dtype).to(memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.encoder(images.contiguous(memory_format=torch.channels_last))
        return np.asarray(out.float().cpu().numpy())


class OrtRunner:
    """An ONNX graph in an ONNX Runtime CPU session with one intra-op thread per usable core, which spin during a
    run but stop when it ends (`session.force_spinning_stop`): left spinning after each forward (ONNX Runtime's
    default) they kept both cores busy, and serve's FAISS search right after took 39 ms instead of 16; never
    spinning made the batch-1 forward 15 ms instead of 7.5 (docs/engines.md)."""

    def __init__(self, path: Path, spec: EngineSpec, threads: int | None = None):
        ort = _import_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for a bad graph
            raise EngineUnavailable(f"onnxruntime cannot open {path.name}: {first_line(exc)}") from exc
        self.spec = spec
        self.path = path
        self._input = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        pixels = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return np.asarray(self.session.run(None, {self._input: pixels})[0], dtype=np.float32)


class OvRunner:
    """An ONNX graph compiled by OpenVINO for the CPU at fp32 inference precision (OpenVINO would otherwise compute
    in bf16 on a CPU with AVX512-BF16 or AMX), tuned for latency, one thread per usable core. One infer request,
    used by one caller at a time."""

    def __init__(self, path: Path, spec: EngineSpec, threads: int | None = None):
        import threading

        try:
            import openvino
        except ImportError:
            raise EngineUnavailable("openvino is not installed (pip install -e '.[openvino]')") from None
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads or usable_cores()}
        try:
            compiled = openvino.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own untyped errors for a graph it cannot take
            raise EngineUnavailable(f"openvino cannot compile {path.name}: {first_line(exc)}") from exc
        self.spec = spec
        self.path = path
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        pixels = np.ascontiguousarray(images.detach().float().cpu().numpy())
        with self._lock:
            return np.array(self._request.infer({0: pixels})[0], dtype=np.float32)


def open_runner(encoder: Encoder, spec: EngineSpec, *, device: str = "cpu", int8_path: Path | None = None) -> Runner:
    """A runner of `encoder` as `spec` says; EngineUnavailable when that engine cannot run it here.

    int8 needs `int8_path`, a graph made by retrieval.encoder.quantize for this encoder. OpenVINO compiles the
    same exported fp32 graph as ONNX Runtime and is checked against torch the same way."""
    if spec.engine == "torch":
        return TorchRunner(encoder, spec.precision)
    if str(device) != "cpu":
        raise EngineUnavailable(f"the {spec.engine} engine runs on the CPU, not {device}: use --engine torch there")
    if spec.precision == "int8":
        if int8_path is None or not int8_path.is_file():
            raise EngineUnavailable("no int8 graph for this encoder (it is made by `index --precision int8`)")
        return OrtRunner(int8_path, spec)
    if spec.engine == "openvino":
        runner = OvRunner(exported_fp32(encoder), spec)
        check_against_torch(encoder, runner)
        return runner
    return OrtRunner(exported_fp32(encoder), spec)


def runner_or_torch(encoder: Encoder, spec: EngineSpec, *, device: str = "cpu",
                    int8_path: Path | None = None) -> tuple[Runner, EngineSpec, str | None]:
    """(runner, what it runs, None) as `spec` asks, or (torch fp32, EngineSpec(), the reason) when it cannot be."""
    try:
        return open_runner(encoder, spec, device=device, int8_path=int8_path), spec, None
    except EngineUnavailable as exc:
        reason = f"{spec} unavailable ({exc}); using torch fp32"
        log.warning("%s", reason)
        return TorchRunner(encoder), EngineSpec(), reason


def exported_fp32(encoder: Encoder, cache: Path | None = None) -> Path:
    """The encoder's ONNX fp32 graph from the cache, exported there first if missing; checked against torch."""
    path = (cache or engine_cache()) / f"{encoder.fingerprint()}-fp32-opset{OPSET}.onnx"
    if not path.is_file():
        _import_ort()  # no export without the engine that would run it
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(encoder, path)
    check_against_torch(encoder, OrtRunner(path, EngineSpec("onnxruntime", "fp32")))
    return path


def export_onnx(encoder: Encoder, path: Path) -> None:
    """Write the encoder (tower + head + L2 norm, float32, batch axis dynamic) as ONNX to `path`, atomically."""
    import torch

    from retrieval.files import atomic_path

    model = copy.deepcopy(encoder).float().cpu().eval()
    example = torch.zeros(2, 3, encoder.image_size, encoder.image_size)
    try:
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's TracerWarnings about shape arithmetic
            torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["embeddings"],
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; every one means "cannot export"
        raise EngineUnavailable(f"cannot export {type(encoder.visual).__name__} to ONNX: {first_line(exc)}") from exc


def check_against_torch(encoder: Encoder, runner: Runner, images: torch.Tensor | None = None) -> float:
    """Max abs difference between `runner` and the torch encoder on `images` (default: a few fixed random ones);
    EngineUnavailable above MAX_ABS_DIFF."""
    import torch

    if images is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(_CHECK_IMAGES, 3, encoder.image_size, encoder.image_size, generator=generator)
    with torch.inference_mode():
        reference = encoder(images.to(next(encoder.parameters()).device)).cpu().numpy()
    diff = float(np.abs(runner(images) - reference).max())
    if not diff <= MAX_ABS_DIFF:
        raise EngineUnavailable(f"the exported graph differs from torch by {diff:.2g} (> {MAX_ABS_DIFF:g})")
    return diff


def _import_ort() -> Any:  # onnxruntime ships no type information
    try:
        import onnxruntime
    except ImportError:
        raise EngineUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
    return onnxruntime


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")

"""int8 encoders: ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on
the user's own images.

    key = calibration_key(encoder, "minmax", [content hashes of the calibration images])
    path = quantize_int8(encoder, batches, db_dir / f"encoder-int8-{key}.onnx", method="minmax")

Two choices make it keep the rankings and run fast (docs/engines.md has the figures): the nodes that compute only
from tensor shapes (the dynamic "same" padding of TF-ported towers such as EfficientNet-Lite: Shape -> Sub / Mul /
Ceil -> Pad sizes) stay in fp32, since quantizing them rounds the pad sizes and shifts every strided convolution;
and activations are uint8 (ONNX Runtime's fast x86 path is u8 activations x s8 weights).

The graph is a derived artefact of the encoder's fingerprint, the calibration method and the calibration images
(all three are in `calibration_key`); it is written atomically where the caller says (an index DB keeps the one
its vectors were made with, so every later query uses the very same graph). Whether it keeps the rankings is
decided by retrieval.encoder.gate, not here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.encoder.engine import EngineUnavailable, exported_fp32, first_line

if TYPE_CHECKING:
    import torch

    from retrieval.encoder.model import Encoder

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"  # see docs/engines.md: at parity on cub-birds-dev, and 10x quicker to calibrate
SCHEME = "qdq-u8s8-shapes-fp32"  # how the graph is made, part of its key: graphs made before are other graphs
CALIBRATION_IMAGES = 256  # images of the collection the activation ranges are measured on


def calibration_key(encoder: Encoder, method: str, sources: Sequence[bytes]) -> str:
    """16 hex digits naming an int8 graph: the encoder's fingerprint, the method and the calibration images'
    identities (content hashes), in order."""
    digest = hashlib.sha256(f"{encoder.fingerprint()}\0{method}\0{SCHEME}\0".encode())
    for source in sources:
        digest.update(source)
    return digest.hexdigest()[:16]


def quantize_int8(encoder: Encoder, batches: Iterable[torch.Tensor], out: Path, *,
                  method: str = DEFAULT_METHOD) -> Path:
    """Quantize the encoder's exported fp32 graph with activation ranges measured on `batches` (normalised
    images, as the encoder takes them) and write it to `out` atomically; EngineUnavailable if it cannot be."""
    if method not in CALIBRATION_METHODS:
        raise EngineUnavailable(f"unknown calibration method {method!r}: {', '.join(CALIBRATION_METHODS)}")
    source = exported_fp32(encoder)
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise EngineUnavailable(f"int8 needs onnxruntime's quantization tools and onnx ({exc})") from None
    from retrieval.files import atomic_path

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory(prefix="circle-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:  # shapes inferred and the graph simplified first, where onnxruntime's shape inference can
            quant_pre_process(str(source), str(prepared))
        except Exception as exc:  # noqa: BLE001 - e.g. an AssertionError inside symbolic shape inference
            log.info("int8: graph pre-processing skipped (%s)", first_line(exc))
            prepared = source
        model = onnx.load(str(prepared))
        for number, node in enumerate(model.graph.node):  # nodes_to_exclude names nodes: every one needs a name
            node.name = node.name or f"int8_node_{number}"
        named = Path(scratch) / "named.onnx"
        onnx.save(model, str(named))
        try:  # onnxruntime's calibrators print progress to stdout, which `index --json` owns
            with atomic_path(out, suffix=".onnx") as tmp, contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(named), str(tmp), _Reader(batches), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=calibrate, nodes_to_exclude=shape_only_nodes(model.graph),
                                extra_options={"CalibStridedMinMax": 1})
        except EngineUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's tools raise untyped errors
            raise EngineUnavailable(f"cannot quantize to int8: {first_line(exc)}") from exc
    return out


def shape_only_nodes(graph: Any) -> list[str]:
    """Names of the nodes of an onnx GraphProto whose inputs are only tensor shapes (Shape's outputs and what is
    computed from them) and constants: size arithmetic such as dynamic padding, which must not be quantized."""
    known = {tensor.name for tensor in graph.initializer}
    from_shapes: set[str] = set()
    names = []
    for node in graph.node:  # an ONNX graph lists its nodes in topological order
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant":
            known.update(node.output)
        elif node.op_type == "Shape" or (any(name in from_shapes for name in inputs)
                                         and all(name in from_shapes or name in known for name in inputs)):
            from_shapes.update(node.output)
            names.append(node.name)
    return names


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over batches of normalised images, handed over one batch per
    range: with CalibStridedMinMax=1 quantize_static collects (and for percentile / entropy, folds into its
    histograms) one batch of activations at a time, so memory stays at one batch's (all at once: about 32 MB per
    lite0 image, 8 GB for 256)."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self._batches = [batch.detach().float().cpu().numpy() for batch in batches]
        self._range = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = iter(self._batches[start_index:end_index])

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._range, None)
        return None if batch is None else {"images": batch}

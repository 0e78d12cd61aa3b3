"""OpenVINO beside ONNX Runtime and torch, and NNCF's post-training int8, on real photos: speed and rankings.

    python scripts/bench_openvino.py ../shared/datasets/cub-birds-dev --model lite0 --test-classes 25 \
        --settings torch-fp32,ort-fp32,ov-fp32,ort-int8-minmax,nncf-onnx+tail,nncf-ov+tail+minmax

Needs `pip install openvino nncf` beside the project. The last --test-classes class folders (sorted:
cub-birds-dev's unseen test half) are what every setting embeds; int8 is calibrated on --calibration-images of
the other (train) folders, never the test half, and the accuracy-aware mode (`+ac`) validates on
--validation-images more train images (MAP@R, leave-one-out within that sample). Per setting one JSON line:
images/s at --batch-size over every test image, ms per image at batch 1, and the gate's figures on the whole
test half against ONNX Runtime fp32 (identical to torch fp32), with `parity` = the issue's goal (Recall@1 within
0.003, MAP@R within 0.01). Settings: torch-fp32, ort-fp32, ov-fp32, ov-bf16, ort-int8-METHOD (the project's
retrieval.encoder.quantize), and nncf-onnx (QDQ graph run by ONNX Runtime) or nncf-ov (OpenVINO model run by
OpenVINO) with options joined by `+`: mixed (preset MIXED), fullbc (fast_bias_correction=False), nobc (no bias
correction), ss300 (subset_size 300), ends (stem conv, last conv and head kept fp32), tail (head and L2
normalisation kept fp32), minmax (global min/max activation ranges, not NNCF's mean of per-image min/max), nofix
(no overflow fix), ac (quantize_with_accuracy_control, max_drop 0.01 absolute on MAP@R). Figures: docs/engines.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_precision import Embed, class_folders, embed_timed, load_classes, single_ms, uptime

from indexer.build.encode import Embedder
from retrieval.encoder import load_encoder
from retrieval.encoder.engine import EngineSpec, OrtRunner, OvRunner, TorchRunner, exported_fp32
from retrieval.encoder.gate import agreement
from retrieval.metrics import rank_leave_one_out, ranking_metrics

ENDS = ["/visual/trunk/conv_stem/Conv", "/visual/trunk/conv_head/Conv", "/head/MatMul"]
TAIL = ["/head/MatMul", "/ReduceL2", "/Clip", "/Div", "embeddings"]  # head + L2 norm (OpenVINO names the Div so)
OPTIONS = {"mixed", "fullbc", "ss300", "ends", "tail", "minmax", "nofix", "nobc", "ac"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="lite0")
    parser.add_argument("--test-classes", type=int, default=25, help="the last N class folders (sorted)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--single", type=int, default=64, help="images timed one at a time (batch 1)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--validation-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="torch-fp32,ort-fp32,ov-fp32")
    parser.add_argument("--keep", type=Path, default=Path("/tmp/bench-openvino"), help="graphs and a data cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"uptime_before": uptime(), "threads": args.threads}), flush=True)
    args.keep.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(args.model)
    source = exported_fp32(encoder)
    test, test_labels, calib, valid, valid_labels = _data(args, Embedder(encoder, "cpu"))
    reference, _ = embed_timed(OrtRunner(source, EngineSpec("onnxruntime", "fp32"), threads=args.threads), test, 64)
    for name in args.settings.split(","):
        start = time.perf_counter()
        embed = _setting(name, encoder, source, args, calib, valid, valid_labels)
        made_s = time.perf_counter() - start
        embeddings, rate = embed_timed(embed, test, args.batch_size)
        ms = single_ms(embed, test[: args.single])
        gate = agreement(reference, embeddings, test_labels).to_json()
        parity = (gate["recall_at_1_fp32"] - gate["recall_at_1"] <= 0.003 + 1e-9
                  and gate["map_at_r_fp32"] - gate["map_at_r"] <= 0.01 + 1e-9)
        print(json.dumps({"setting": name, "images_per_s": round(rate, 1), "batch1_ms": round(ms, 2),
                          "recall@1": gate["recall_at_1"], "map@r": gate["map_at_r"], "overlap": gate["overlap"],
                          "recall@1_fp32": gate["recall_at_1_fp32"], "map@r_fp32": gate["map_at_r_fp32"],
                          "gate_passed": gate["passed"], "parity": parity, "made_s": round(made_s, 1),
                          "uptime": uptime()}), flush=True)
    print(json.dumps({"uptime_after": uptime()}), flush=True)


def _data(args: argparse.Namespace, embedder: Embedder) -> tuple[torch.Tensor, np.ndarray, torch.Tensor,
                                                                 torch.Tensor, np.ndarray]:
    """(test images, labels, calibration images, validation images, labels), cached in --keep."""
    cache = args.keep / f"data-{args.model}-{args.test_classes}-{args.calibration_images}-{args.validation_images}.pt"
    if cache.is_file():
        saved = torch.load(cache)
        return (saved["test"], saved["test_labels"].numpy(), saved["calib"], saved["valid"],
                saved["valid_labels"].numpy())
    classes = class_folders(args.folder)
    test, test_labels = load_classes(args.folder, classes[-args.test_classes:], embedder)
    train, train_labels = load_classes(args.folder, classes[: -args.test_classes], embedder)
    calib_rows = np.linspace(0, len(train) - 1, args.calibration_images).astype(int)
    rest = np.setdiff1d(np.arange(len(train)), calib_rows)
    valid_rows = rest[np.linspace(0, len(rest) - 1, args.validation_images).astype(int)]
    saved = {"test": test, "test_labels": torch.from_numpy(test_labels), "calib": train[calib_rows],
             "valid": train[valid_rows], "valid_labels": torch.from_numpy(train_labels[valid_rows])}
    torch.save(saved, cache)
    return test, test_labels, saved["calib"], saved["valid"], train_labels[valid_rows]


def _setting(name: str, encoder: Any, source: Path, args: argparse.Namespace, calib: torch.Tensor,
             valid: torch.Tensor, valid_labels: np.ndarray) -> Embed:
    if name == "torch-fp32":
        return TorchRunner(encoder)
    if name == "ort-fp32":
        return OrtRunner(source, EngineSpec("onnxruntime", "fp32"), threads=args.threads)
    if name.startswith("ort-int8-"):
        from retrieval.encoder.quantize import quantize_int8

        return OrtRunner(quantize_int8(encoder, (calib[i:i + 16] for i in range(0, len(calib), 16)),
                                       args.keep / f"{name}.onnx", method=name[9:]),
                         EngineSpec("onnxruntime", "int8"), threads=args.threads)
    if name == "ov-fp32":
        return OvRunner(source, EngineSpec("openvino", "fp32"), threads=args.threads)
    if name == "ov-bf16":
        return _ov_bf16(source, args.threads)
    backend, *options = name.split("+")
    if backend not in ("nncf-onnx", "nncf-ov") or not set(options) <= OPTIONS:
        raise SystemExit(f"unknown setting {name!r}")
    quantized = _nncf(backend, set(options), source, calib, valid, valid_labels, args.threads)
    if backend == "nncf-ov":
        import openvino as ov

        ov.save_model(quantized, str(args.keep / f"{name}.xml"))
        return OvRunner(args.keep / f"{name}.xml", EngineSpec("openvino", "int8"), threads=args.threads)
    import onnx

    path = args.keep / f"{name}.onnx"
    onnx.save(quantized, str(path))
    return OrtRunner(path, EngineSpec("onnxruntime", "int8"), threads=args.threads)


def _nncf(backend: str, options: set[str], source: Path, calib: torch.Tensor, valid: torch.Tensor,
          valid_labels: np.ndarray, threads: int) -> Any:
    """nncf.quantize (or quantize_with_accuracy_control) of the fp32 graph, one image per calibration item."""
    import nncf
    import onnx

    if backend == "nncf-ov":
        import openvino as ov

        model: Any = ov.Core().read_model(str(source))
    else:
        model = onnx.load(str(source))
    calibration = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))], lambda x: {"images": x})
    kwargs: dict[str, Any] = {
        "preset": nncf.QuantizationPreset.MIXED if "mixed" in options else nncf.QuantizationPreset.PERFORMANCE,
        "subset_size": 300 if "ss300" in options else len(calib),
        "fast_bias_correction": "fullbc" not in options,
    }
    ignored = (ENDS if "ends" in options else []) + (TAIL if "tail" in options else [])
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=sorted(set(ignored)), validate=False)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced: dict[str, Any] = {}
    if "minmax" in options:
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    if "nobc" in options:
        advanced["disable_bias_correction"] = True
    if "nofix" in options:
        advanced["overflow_fix"] = OverflowFix.DISABLE
    if advanced:
        kwargs["advanced_quantization_parameters" if "ac" in options else "advanced_parameters"] = (
            AdvancedQuantizationParameters(**advanced))
    if "ac" not in options:
        return nncf.quantize(model, calibration, **kwargs)
    items = [(valid[i:i + 1].numpy(), int(label)) for i, label in enumerate(valid_labels)]
    validation = nncf.Dataset(items, lambda item: {"images": item[0]})

    def validate(compiled: Any, data: Iterable[tuple[np.ndarray, int]]) -> tuple[float, None]:
        """MAP@R of the validation sample, leave-one-out (one image is no sample: nncf then compares outputs)."""
        pairs = list(data)
        if len(pairs) < 2:
            raise ValueError("MAP@R needs a sample")
        infer = _infer_fn(compiled, threads)
        embeddings = np.concatenate([infer(image) for image, _ in pairs])
        labels = np.array([label for _, label in pairs])
        queries, _, neighbours = rank_leave_one_out(embeddings, labels, (1,))
        return float(ranking_metrics(labels, queries, neighbours, (1,))["map@r"]), None

    return nncf.quantize_with_accuracy_control(model, calibration, validation, validate, max_drop=0.01,
                                               drop_type=nncf.DropType.ABSOLUTE, **kwargs)


def _infer_fn(model: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function image batch -> embeddings for what nncf's validation hands over (ONNX proto or OV compiled)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda x: np.asarray(session.run(None, {"images": x})[0])
    request = model.create_infer_request()
    return lambda x: np.array(request.infer({0: x})[0])


def _ov_bf16(source: Path, threads: int) -> Embed:
    """The fp32 graph in OpenVINO at bf16 inference precision (the engine's OvRunner pins f32)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(source), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                            "INFERENCE_PRECISION_HINT": "bf16",
                                                            "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda images: np.array(request.infer({0: np.ascontiguousarray(images.numpy())})[0], dtype=np.float32)


if __name__ == "__main__":
    main()

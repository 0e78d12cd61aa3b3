"""Inference engines (retrieval.encoder.engine, quantize, gate) and how index / query choose and record them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from indexer.build.pipeline import IndexConfig, run_index
from indexer.store.layout import EncoderInfo, Header
from indexer.store.search import SearchIndex
from retrieval.encoder.engine import (
    CACHE_ENV,
    ENGINES,
    EngineSpec,
    EngineUnavailable,
    exported_fp32,
    open_runner,
    resolve_engine,
    runner_or_torch,
)
from retrieval.encoder.gate import agreement
from retrieval.errors import EncoderError, IndexStoreError
from tests.index_support import make_folder


@pytest.fixture(autouse=True)
def engine_cache(tmp_path, monkeypatch) -> Path:
    """Every test exports into its own cache (never the user's)."""
    cache = tmp_path / "engine-cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def encoder(tiny_run_dir):
    from retrieval.encoder import load_encoder

    return load_encoder(str(tiny_run_dir))


def _images(n: int, size: int = 32, seed: int = 0):
    import torch

    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _torch(encoder, images) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return encoder(images).numpy()


def test_precision_and_engine_resolve_to_one_spec():
    assert resolve_engine("int8") == EngineSpec("onnxruntime", "int8")
    assert resolve_engine("fp32") == EngineSpec("onnxruntime", "fp32")   # the default on a CPU
    assert resolve_engine("fp32", device="cuda:0") == EngineSpec("torch", "fp32")
    assert resolve_engine("fp32", "torch") == EngineSpec("torch", "fp32")
    assert resolve_engine("fp32", "onnxruntime") == EngineSpec("onnxruntime", "fp32")
    assert resolve_engine("bf16") == EngineSpec("torch", "bf16")
    with pytest.raises(EncoderError, match="runs on --engine onnxruntime"):
        resolve_engine("int8", "torch")
    with pytest.raises(EncoderError, match="runs on --engine torch"):
        resolve_engine("bf16", "onnxruntime")
    with pytest.raises(EncoderError, match="unknown precision"):
        resolve_engine("int4")
    assert cli.ENGINE_CHOICES == ENGINES   # the CLI's choices, written out so that --help stays light


def test_exported_graph_matches_torch_at_any_batch_and_is_reused(encoder, engine_cache, monkeypatch):
    from retrieval.encoder import engine

    runner = open_runner(encoder, EngineSpec("onnxruntime", "fp32"))
    path = exported_fp32(encoder)
    assert path.parent == engine_cache and encoder.fingerprint() in path.name
    for n in (1, 5):  # the batch axis is dynamic
        images = _images(n, seed=n)
        np.testing.assert_allclose(runner(images), _torch(encoder, images), atol=1e-5)
    assert not [p for p in engine_cache.iterdir() if p.name.startswith(".")]  # no temporary left behind

    def no_export(*_a, **_k):
        raise AssertionError("exported again")

    monkeypatch.setattr(engine, "export_onnx", no_export)
    images = _images(3)
    np.testing.assert_allclose(open_runner(encoder, EngineSpec("onnxruntime", "fp32"))(images),
                               _torch(encoder, images), atol=1e-5)


def test_a_tower_that_cannot_export_falls_back_to_torch_with_a_reason(encoder, monkeypatch, caplog):
    import torch

    def refuse(*_a, **_k):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::mystery", 17, "")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    runner, used, reason = runner_or_torch(encoder, EngineSpec("onnxruntime", "fp32"))
    assert used == EngineSpec("torch", "fp32") and reason is not None
    assert "cannot export VisionTransformer to ONNX" in reason and "\n" not in reason
    assert reason in caplog.text
    images = _images(2)
    np.testing.assert_allclose(runner(images), _torch(encoder, images), atol=1e-6)


def test_a_graph_that_differs_from_torch_is_refused(encoder):
    import torch

    from retrieval.encoder.engine import check_against_torch

    runner = open_runner(encoder, EngineSpec("onnxruntime", "fp32"))
    other = encoder.__class__(encoder.config, encoder.visual, torch.nn.Linear(encoder.config.feature_dim,
                              encoder.embed_dim, bias=False), spec="other", origin="test")
    with pytest.raises(EngineUnavailable, match="differs from torch"):
        check_against_torch(other, runner)


def test_missing_onnxruntime_falls_back_to_torch(encoder, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    _, used, reason = runner_or_torch(encoder, resolve_engine("int8"), int8_path=Path("absent.onnx"))
    assert used == EngineSpec() and reason is not None and "no int8 graph" in reason
    _, used, reason = runner_or_torch(encoder, resolve_engine("fp32", "onnxruntime"))
    assert used == EngineSpec() and reason is not None and "onnxruntime is not installed" in reason


def test_int8_graph_from_calibration_images(encoder, tmp_path):
    from retrieval.encoder.quantize import calibration_key, quantize_int8

    key = calibration_key(encoder, "percentile", [b"a", b"b"])
    assert key != calibration_key(encoder, "minmax", [b"a", b"b"]) != calibration_key(encoder, "percentile", [b"a"])
    out = quantize_int8(encoder, [_images(8, seed=s) for s in range(3)], tmp_path / f"{key}.onnx", method="entropy")
    import onnx

    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    images = _images(6, seed=9)
    int8 = open_runner(encoder, resolve_engine("int8"), int8_path=out)(images)
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    assert int8.shape == (6, encoder.embed_dim)
    assert not np.allclose(int8, _torch(encoder, images), atol=1e-6)  # it is not the fp32 graph


@pytest.fixture(scope="module")
def padded_encoder(encoder):
    """The tiny encoder with a conv tower in TF's dynamic "same" padding (as EfficientNet-Lite's export has):
    the exported graph computes every pad size from the input's shape at run time."""
    import copy

    import torch
    from timm.layers import create_conv2d

    torch.manual_seed(0)
    padded = copy.deepcopy(encoder)
    padded.visual = torch.nn.Sequential(create_conv2d(3, 8, 3, stride=2, padding="same"), torch.nn.ReLU6(),
                                        create_conv2d(8, 8, 3, stride=2, padding="same", depthwise=True),
                                        torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    padded.head = torch.nn.Linear(8, encoder.embed_dim, bias=False)
    return padded.eval()


def test_shape_arithmetic_is_found_by_value_and_left_in_fp32(padded_encoder, tmp_path):
    import onnx
    import onnxruntime as ort

    from retrieval.encoder.quantize import quantize_int8, shape_only_nodes

    model = onnx.load(str(exported_fp32(padded_encoder)))
    found = set(shape_only_nodes(model.graph))
    # brute force: a node computes from shapes alone iff its outputs are the same for two different images
    nodes = [node for node in model.graph.node if node.op_type != "Constant"]
    model.graph.output.extend(onnx.ValueInfoProto(name=out) for node in nodes for out in node.output)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    first, second = (dict(zip(names, session.run(None, {"images": _images(2, seed=s).numpy()}), strict=True))
                     for s in (1, 2))
    same = {node.name for node in nodes if all(np.array_equal(first[o], second[o]) for o in node.output)}
    assert found == same and {"Shape", "Pad"} & {n.op_type for n in nodes if n.name in found} == {"Shape"}

    out = quantize_int8(padded_encoder, [_images(8, seed=s) for s in range(4)], tmp_path / "int8.onnx")
    int8_graph = onnx.load(str(out)).graph
    quantized = {node.input[0] for node in int8_graph.node if node.op_type == "QuantizeLinear"}
    assert not quantized & {o for node in model.graph.node if node.name in found for o in node.output}
    assert any(node.op_type == "Conv" for node in int8_graph.node)
    images = _images(6, seed=9)
    int8 = open_runner(padded_encoder, resolve_engine("int8"), int8_path=out)(images)
    cosines = (int8 * _torch(padded_encoder, images)).sum(axis=1)
    assert cosines.min() > 0.99 and not np.allclose(cosines, 1.0, atol=1e-7)  # close to fp32, and not fp32


def test_gate_overlap_and_deltas_against_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    noisy = ref + rng.normal(scale=0.2, size=ref.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)

    def top10(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row, kind="stable")[:10]) for row in s]

    expected = np.mean([len(a & b) / 10 for a, b in zip(top10(ref), top10(noisy), strict=True)])
    got = agreement(ref, noisy)
    assert got.overlap == pytest.approx(expected) and got.recall_at_1 is None
    assert got.passed == (expected >= 0.9)
    assert agreement(ref, ref).overlap == 1.0 and agreement(ref, ref).passed
    labels = np.repeat(np.arange(8), 5)
    same = agreement(ref, ref, labels)
    assert same.passed and same.recall_at_1 == same.recall_at_1_fp32
    shuffled = agreement(ref, ref[rng.permutation(40)], labels)
    assert shuffled.map_at_r is not None and not shuffled.passed


def test_header_without_engine_fields_reads_as_torch_fp32():
    header = Header(EncoderInfo("lite0", "f" * 64, 512, 224), "/data")
    fields = json.loads(header.to_bytes())
    for name in ("engine", "precision", "graph"):
        del fields["encoder"][name]
    old = Header.from_bytes(json.dumps(fields).encode())
    assert (old.encoder.engine, old.encoder.precision, old.encoder.graph) == ("torch", "fp32", "")


def _cfg(folder: Path, db: Path, model: Path, **kw) -> IndexConfig:
    return IndexConfig(folder=folder, db_dir=db, model=str(model), **{"batch_size": 4, "workers": 0, **kw})


def test_index_int8_records_its_engine_and_query_uses_the_same_graph(tmp_path, tiny_run_dir, monkeypatch):
    monkeypatch.setattr("indexer.build.choose.cpu_has_vnni", lambda: True)  # whatever this machine's CPU
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=6)
    out = CliRunner().invoke(cli.cli, ["index", str(folder), "--model", str(tiny_run_dir), "--db", str(db),
                                       "--workers", "0", "--precision", "int8", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)  # only the summary on stdout (onnxruntime's calibrators print there)
    gate = summary["gate"]
    figures = gate["candidates"]["onnxruntime int8"]
    assert figures["images"] == 24 and 0.0 <= figures["overlap"] <= 1.0
    with SearchIndex.open(db) as index:
        info = index.header.encoder
    if figures["passed"]:
        assert (summary["engine"], summary["precision"], info.precision) == ("onnxruntime", "int8", "int8")
        assert info.graph and (db / info.graph).is_file() and gate["fallback"] is None
    else:  # the fallback is recorded too, with its reason
        assert (summary["precision"], info.precision, info.graph) == ("fp32", "fp32", "")
        assert "fails the ranking gate" in gate["fallback"]
    # a query embeds as the DB's vectors were made: an indexed image finds itself first
    out = CliRunner().invoke(cli.cli, ["query", str(folder / "class1/img002.jpg"), "--db", str(db), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["results"][0]["path"].endswith("class1/img002.jpg")
    # later runs add with the same engine; asking for another precision is refused
    make_folder(folder, classes=5, per_class=6)
    again = run_index(_cfg(folder, db, tiny_run_dir))
    assert (again.encoded, again.precision) == (6, info.precision)
    make_folder(folder, classes=6, per_class=6)
    other = "bf16" if info.precision != "bf16" else "fp32"
    with pytest.raises(IndexStoreError, match="--reembed"):
        run_index(_cfg(folder, db, tiny_run_dir, precision=other))


def test_too_few_images_to_gate_stay_fp32_with_a_reason(tmp_path, tiny_run_dir):
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=2, per_class=3)
    out = CliRunner().invoke(cli.cli, ["index", str(folder), "--model", str(tiny_run_dir), "--db", str(db),
                                       "--workers", "0", "--precision", "int8", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert (summary["engine"], summary["precision"]) == ("onnxruntime", "fp32")
    assert "6 images are too few to check int8" in summary["gate"]["fallback"]
    with SearchIndex.open(db) as index:
        assert (index.header.encoder.engine, index.header.encoder.precision) == ("onnxruntime", "fp32")


@pytest.mark.parametrize(("precision", "reason"), [
    ("int8", "no int8 dot-product instructions (AVX512-VNNI"),
    ("auto", "nor native bf16 (AVX512-BF16 or AMX)"),
])
def test_reduced_precision_on_a_cpu_without_its_instructions_stays_fp32_with_a_reason(tmp_path, tiny_run_dir,
                                                                                        monkeypatch, precision, reason):
    monkeypatch.setattr("indexer.build.choose.cpu_has_vnni", lambda: False)
    monkeypatch.setattr("indexer.build.choose.cpu_has_bf16", lambda: False)
    folder, db = tmp_path / "images", tmp_path / "db"
    make_folder(folder, classes=4, per_class=6)
    out = CliRunner().invoke(cli.cli, ["index", str(folder), "--model", str(tiny_run_dir), "--db", str(db),
                                       "--workers", "0", "--precision", precision, "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert (summary["engine"], summary["precision"]) == ("onnxruntime", "fp32")
    fallback = summary["gate"]["fallback"]
    assert reason in fallback and "\n" not in fallback
    assert fallback.endswith("using onnxruntime fp32") and not summary["gate"]["candidates"]
    assert not list(db.glob("encoder-int8-*.onnx"))   # nothing calibrated


def test_auto_tries_only_what_the_cpu_runs_natively(tmp_path, tiny_run_dir, monkeypatch):
    monkeypatch.setattr("indexer.build.choose.cpu_has_vnni", lambda: False)
    monkeypatch.setattr("indexer.build.choose.cpu_has_bf16", lambda: True)
    monkeypatch.setattr("indexer.build.encode.cpu_has_bf16", lambda: True)   # emulated bf16 is still bf16
    folder = tmp_path / "images"
    make_folder(folder, classes=4, per_class=6)
    summary = run_index(_cfg(folder, tmp_path / "db", tiny_run_dir, precision="auto"))
    assert list(summary.gate["candidates"]) == ["torch bf16"]   # int8 not even calibrated
    assert not list((tmp_path / "db").glob("encoder-int8-*.onnx"))


def test_cpu_has_vnni_reads_the_kernels_cpu_flags(tmp_path):
    from retrieval.encoder.engine import cpu_has_vnni

    info = tmp_path / "cpuinfo"
    for flags, expected in (("fpu sse2 avx2 fma", False), ("avx2 avx512f avx512_vnni", True), ("avx2 avx_vnni", True),
                            ("avx512f amx_tile amx_int8", True), ("avx512f avx512_bf16", False)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert cpu_has_vnni(info) is expected, flags
    assert cpu_has_vnni(tmp_path / "absent") is False


def test_a_new_db_encodes_on_onnxruntime_fp32_by_default_and_on_torch_without_it(tmp_path, tiny_run_dir,
                                                                                   monkeypatch):
    folder = tmp_path / "images"
    make_folder(folder, classes=2, per_class=4)
    default = run_index(_cfg(folder, tmp_path / "default", tiny_run_dir))
    assert (default.engine, default.precision) == ("onnxruntime", "fp32")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    out = CliRunner().invoke(cli.cli, ["index", str(folder), "--model", str(tiny_run_dir), "--db",
                                       str(tmp_path / "without"), "--workers", "0", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert (summary["engine"], summary["precision"]) == ("torch", "fp32")
    assert "onnxruntime is not installed" in summary["gate"]["fallback"]
    with SearchIndex.open(tmp_path / "default") as a, SearchIndex.open(tmp_path / "without") as b:
        assert (a.header.encoder.engine, b.header.encoder.engine) == ("onnxruntime", "torch")
        np.testing.assert_allclose(a.vectors(a.ids()), b.vectors(b.ids()), atol=1e-5)


def test_openvino_runs_the_exported_graph_with_torch_vectors(encoder, monkeypatch):
    pytest.importorskip("openvino")   # the openvino extra (CI installs it)
    runner = open_runner(encoder, EngineSpec("openvino", "fp32"))
    for n in (1, 5):  # the batch axis is dynamic
        images = _images(n, seed=n)
        np.testing.assert_allclose(runner(images), _torch(encoder, images), atol=1e-5)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    _, used, reason = runner_or_torch(encoder, EngineSpec("openvino", "fp32"))
    assert used == EngineSpec() and reason is not None and "openvino is not installed" in reason


def test_index_onnxruntime_and_openvino_fp32_give_torch_vectors(tmp_path, tiny_run_dir):
    pytest.importorskip("openvino")
    folder = tmp_path / "images"
    make_folder(folder, classes=2, per_class=4)
    runs = {engine: run_index(_cfg(folder, tmp_path / engine, tiny_run_dir, engine=engine))
            for engine in ("torch", "onnxruntime", "openvino")}
    assert [runs[e].engine for e in runs] == ["torch", "onnxruntime", "openvino"]
    vectors = {}
    for engine in runs:
        with SearchIndex.open(tmp_path / engine) as index:
            assert index.header.encoder.engine == engine
            ids = np.array(sorted(it.id for it in index.iter_items()))
            vectors[engine] = index.vectors(ids)
    np.testing.assert_allclose(vectors["onnxruntime"], vectors["torch"], atol=1e-5)
    np.testing.assert_allclose(vectors["openvino"], vectors["torch"], atol=1e-5)

"""retrieval.compat: one test per private dependency API, each failing loudly when the dependency changes it."""

from __future__ import annotations

import asyncio
import inspect
import platform
from pathlib import Path

import pytest
import torch

from retrieval import compat


def test_vision_tower_is_the_tower_open_clip_builds_for_the_whole_model(tiny_model_name):
    import open_clip

    cfg = open_clip.get_model_config(tiny_model_name)
    tower = compat.vision_tower(cfg["embed_dim"], cfg["vision_cfg"], False)
    public = open_clip.create_model(tiny_model_name, pretrained=None).visual
    ours = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in public.state_dict().items()}
    assert type(tower) is type(public)


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = compat.tensor_version(t)
    t.add_(1)
    assert compat.tensor_version(t) == before + 1
    t + 1  # noqa: B018 - not in place: no bump
    assert compat.tensor_version(t) == before + 1


def test_cpu_has_bf16_agrees_with_the_cpu_flags():
    flags_file = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not flags_file.is_file():
        pytest.skip("the flags are read from Linux x86_64's /proc/cpuinfo")
    flags = set(next(line for line in flags_file.read_text().splitlines() if line.startswith("flags")).split())
    assert compat.cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        return i


def test_loader_workers_are_the_processes_and_shutdown_stops_them():
    loader = torch.utils.data.DataLoader(_Slow(), batch_size=2, num_workers=2)
    batches = iter(loader)
    next(batches)
    workers = compat.loader_workers(batches)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    compat.shutdown_loader(batches)
    for w in workers:
        w.join(10)
    assert not any(w.is_alive() for w in workers)
    assert compat.loader_workers(iter(torch.utils.data.DataLoader(_Slow(), num_workers=0))) == []


def test_parse_multipart_reads_a_capped_stream():
    from starlette.datastructures import Headers, UploadFile

    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8 bytes" + f"\r\n--{boundary}--\r\n".encode()
    headers = Headers({"content-type": f"multipart/form-data; boundary={boundary}"})

    async def stream():
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    async def parse() -> tuple[str | None, bytes]:
        form = await compat.parse_multipart(headers, stream(), max_files=1, max_fields=8)
        upload = form.get("image")
        assert isinstance(upload, UploadFile)
        data = await upload.read()
        await form.close()
        return upload.filename, data

    assert asyncio.run(parse()) == ("a.jpg", b"\xff\xd8 bytes")


def test_ray_init_still_takes_a_system_config():
    """ray.init takes it from **kwargs (and refuses unknown keywords), so its source is what can be checked
    without starting a Ray; the Ray tests start one with it."""
    ray = pytest.importorskip("ray")
    (name,) = compat.ray_init_private({"x": 1})
    assert f'kwargs.pop("{name}"' in inspect.getsource(ray.init)

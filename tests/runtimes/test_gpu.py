"""GPU suite: runs where an NVIDIA GPU with TensorRT is present (the `device` machine), skips elsewhere."""

import numpy as np
import pytest

from gemx.exporter.manifest import read_export_dir
from gemx.model.lr import downsample
from gemx.runtimes.build import BuildOptions, build
from gemx.runtimes.registry import open_session, runtime_available
from tests.conftest import frames

trt_ok, trt_why = runtime_available("tensorrt")
cuda_ok, cuda_why = runtime_available("ort-cuda")
pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not trt_ok, reason=f"needs an NVIDIA GPU with TensorRT: {trt_why}")
@pytest.mark.parametrize("fp16", [False, True])
def test_engines_build_and_match_ort_at_refs_1_to_10(tiny_export, tmp_path, fp16):
    import shutil

    copy = tmp_path / "e.export"
    shutil.copytree(tiny_export.path, copy)
    result = build(copy, BuildOptions(fp16=fp16, refs_min=1, refs_opt=5, refs_max=10))
    assert result.accuracy.psnr_db > (50 if fp16 else 80)
    cfg = read_export_dir(copy).config
    target = downsample(frames(1, cfg.size, seed=9), cfg.scale).numpy()
    trt, ort = open_session("tensorrt", copy, precision="fp16" if fp16 else "fp32"), open_session("ort", copy)
    for refs in range(1, 11):
        r = frames(refs, cfg.size, seed=refs).numpy()
        trt.set_references(r)
        ort.set_references(r)
        np.testing.assert_allclose(trt(target), ort(target), atol=2e-2 if fp16 else 1e-3)


@pytest.mark.skipif(not cuda_ok, reason=f"needs onnxruntime-gpu with CUDA: {cuda_why}")
def test_ort_cuda_keeps_kv_on_device_and_matches_cpu(tiny_export):
    cfg = read_export_dir(tiny_export.path).config
    refs, target = frames(3, cfg.size).numpy(), downsample(frames(1, cfg.size, 2), cfg.scale).numpy()
    outs = []
    for runtime in ("ort-cuda", "ort"):
        s = open_session(runtime, tiny_export.path)
        s.set_references(refs)
        outs.append(s(target))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-3)


torch_cuda_ok, torch_cuda_why = runtime_available("torch-cuda")


@pytest.mark.skipif(not torch_cuda_ok, reason=f"needs an NVIDIA GPU with a CUDA build of PyTorch: {torch_cuda_why}")
def test_torch_cuda_fp32_matches_the_cpu_and_graph_replay_matches_eager(tiny_ckpt):
    from gemx.model import load_checkpoint
    from gemx.runtimes.torch_cuda_session import TorchCudaSession
    from gemx.runtimes.torch_session import TorchSession

    model = load_checkpoint(tiny_ckpt).model
    cfg = model.config
    cpu = TorchSession(load_checkpoint(tiny_ckpt).model)
    graphs, eager = TorchCudaSession(model, "fp32"), TorchCudaSession(model, "fp32", cuda_graphs=False)
    for refs in (1, 2, 5, 10):
        r = frames(refs, cfg.size, seed=refs).numpy()
        for s in (cpu, graphs, eager):
            s.set_references(r)
        for seed in (3, 4):  # replays with new inputs, not the captured one
            target = downsample(frames(1, cfg.size, seed=seed), cfg.scale).numpy()
            want = cpu(target)
            np.testing.assert_allclose(eager(target), want, atol=1e-4)
            np.testing.assert_allclose(graphs(target), want, atol=1e-4)


@pytest.mark.skipif(not torch_cuda_ok, reason=f"needs an NVIDIA GPU with a CUDA build of PyTorch: {torch_cuda_why}")
def test_torch_cuda_fp16_keeps_the_fp16_graph_dtypes_and_stays_close(tiny_ckpt):
    from gemx.metrics import psnr_db
    from gemx.model import load_checkpoint
    from gemx.runtimes.torch_cuda_session import TorchCudaSession

    model = load_checkpoint(tiny_ckpt).model
    cfg = model.config
    half, full = TorchCudaSession(model, "fp16"), TorchCudaSession(model, "fp32")
    r = frames(5, cfg.size, seed=1).numpy()
    kv = half.encode(r).kv
    assert [str(t.dtype).removeprefix("torch.") for t in kv] == [s.dtype for s in half.contract.kv]
    half.set_references(r)
    full.set_references(r)
    target = downsample(frames(1, cfg.size, seed=2), cfg.scale).numpy()
    assert psnr_db(half(target), full(target)) > 45


@pytest.mark.skipif(not torch_cuda_ok, reason=f"needs an NVIDIA GPU with a CUDA build of PyTorch: {torch_cuda_why}")
def test_torch_cuda_bf16_keeps_float32_caches_and_stays_close_eager_and_replayed(tiny_ckpt):
    import torch

    from gemx.metrics import psnr_db
    from gemx.model import load_checkpoint
    from gemx.runtimes.torch_cuda_session import TorchCudaSession

    model = load_checkpoint(tiny_ckpt).model
    cfg = model.config
    full = TorchCudaSession(model, "fp32")
    sessions = TorchCudaSession(model, "bf16"), TorchCudaSession(model, "bf16", cuda_graphs=False)
    for refs in (1, 5):
        r = frames(refs, cfg.size, seed=refs).numpy()
        for s in (full, *sessions):
            s.set_references(r)
        assert all(t.dtype == torch.float32 for t in sessions[0]._kv.kv)  # the FP32 contract's cache
        for seed in (3, 4):
            target = downsample(frames(1, cfg.size, seed=seed), cfg.scale).numpy()
            want = full(target)
            for s in sessions:
                got = s(target)
                assert got.dtype == np.float32 and psnr_db(got, want) > 35
                assert not np.array_equal(got, want)  # it did compute in bf16

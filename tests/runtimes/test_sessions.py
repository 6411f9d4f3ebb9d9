import numpy as np
import pytest

from gemx import GemxError
from gemx.exporter.manifest import read_export_dir
from gemx.model import load_checkpoint
from gemx.model.lr import downsample
from gemx.runtimes.base import Session
from gemx.runtimes.build import BuildOptions, build
from gemx.runtimes.registry import open_session, runtime_available
from gemx.runtimes.torch_session import TorchSession
from tests.conftest import frames


@pytest.fixture
def model(tiny_export):
    return load_checkpoint(tiny_export.path.parent / "tiny.pt").model


def inputs(size, scale, refs=3):
    return frames(refs, size, seed=3).numpy(), downsample(frames(1, size, seed=4), scale).numpy()


def test_torch_and_ort_sessions_agree(tiny_export, model):
    cfg = model.config
    refs, target = inputs(cfg.size, cfg.scale)
    outs = []
    for runtime in ("torch", "ort"):
        with open_session(runtime, tiny_export.path, model=model) as s:
            s.set_references(refs)
            outs.append(s(target))
    assert outs[0].shape == (1, 3, cfg.size, cfg.size)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


class CountingSession(TorchSession):
    """Counts what actually runs, independently of the base class's own counter."""

    encodes = 0

    def _encode(self, references):
        CountingSession.encodes += 1
        return super()._encode(references)


def test_frames_reuse_cached_references_without_re_encoding(model):
    cfg = model.config
    refs, target = inputs(cfg.size, cfg.scale)
    s = CountingSession(model)
    s.set_references(refs)
    first = s(target)
    for _ in range(4):
        np.testing.assert_array_equal(s(target), first)
    assert CountingSession.encodes == 1 and s.encoder_runs == 1
    s.set_references(refs[:1])  # new references re-encode, and change the result
    assert CountingSession.encodes == 2
    assert np.abs(s(target) - first).max() > 1e-5


def test_ort_session_counts_one_encoder_run_per_reference_set(tiny_export):
    cfg = read_export_dir(tiny_export.path).config
    refs, target = inputs(cfg.size, cfg.scale)
    s = open_session("ort", tiny_export.path)
    calls = []
    run = s.encoder.run
    s.encoder = type("Spy", (), {"run": lambda self, *a: calls.append(1) or run(*a)})()
    s.set_references(refs)
    for _ in range(3):
        s(target)
    assert len(calls) == 1


def test_refs_above_validated_maximum_is_a_clear_error(tiny_export):
    cfg = read_export_dir(tiny_export.path).config
    s = open_session("ort", tiny_export.path)
    with pytest.raises(GemxError, match="13 references exceed the 12"):
        s.set_references(frames(13, cfg.size).numpy())


def test_bad_calls_are_clear_errors(tiny_export):
    cfg = read_export_dir(tiny_export.path).config
    s = open_session("ort", tiny_export.path)
    with pytest.raises(GemxError, match="no references set"):
        s(np.zeros((1, 3, cfg.lr_size, cfg.lr_size), np.float32))
    with pytest.raises(GemxError, match="no references given"):
        s.set_references(np.zeros((0, 3, cfg.size, cfg.size), np.float32))
    s.set_references(frames(1, cfg.size).numpy())
    with pytest.raises(GemxError, match="target_lr is 64x64 but its references are 64x64: send frames of the references' size "
                                        "over the scale 4 \\(16x16\\)"):
        s(np.zeros((1, 3, cfg.size, cfg.size), np.float32))
    with pytest.raises(GemxError, match=r"target_lr must be float32 \[1, 3, h, w\] \(RGB\), got shape \[2, 3, 16, 16\]"):
        s(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(GemxError, match="width and height must be multiples of the scale 4"):
        s.set_references(frames(1, 66).numpy())


def test_fp16_graphs_run_in_ort_close_to_fp32(tiny_export):
    cfg = read_export_dir(tiny_export.path).config
    refs, target = inputs(cfg.size, cfg.scale)
    outs = []
    for precision in ("fp32", "fp16"):
        s = open_session("ort", tiny_export.path, precision=precision)
        s.set_references(refs)
        outs.append(s(target))
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-3)


def test_cpu_build_writes_optimized_graphs_that_sessions_use(tiny_export, tmp_path):
    import shutil

    copy = tmp_path / "b.export"
    shutil.copytree(tiny_export.path, copy)
    result = build(copy, BuildOptions())
    assert result.target == "ort-cpu" and result.accuracy.max_abs_error <= 1e-5
    assert (copy / "ort_cpu" / "build.json").exists()
    s = open_session("ort", copy)
    assert str(s.encoder._model_path).startswith(str(copy / "ort_cpu"))
    with pytest.raises(GemxError, match="already holds a build; pass --force"):
        build(copy, BuildOptions())


@pytest.mark.skipif(runtime_available("tensorrt")[0], reason="this machine has TensorRT and a GPU")
def test_fp16_build_without_gpu_names_what_is_missing(tiny_export):
    with pytest.raises(GemxError, match="FP16 engines need an NVIDIA GPU and TensorRT"):
        build(tiny_export.path, BuildOptions(fp16=True))


@pytest.mark.skipif(runtime_available("ort-cuda")[0], reason="this machine has a CUDA GPU")
def test_gpu_runtimes_without_gpu_are_clear_errors(tiny_export):
    for runtime in ("ort-cuda", "tensorrt"):
        with pytest.raises(GemxError, match=f"runtime {runtime} is not available"):
            open_session(runtime, tiny_export.path)


def test_every_session_is_a_session(tiny_export, model):
    assert isinstance(open_session("ort", tiny_export.path), Session)
    assert isinstance(open_session("torch", tiny_export.path, model=model), Session)


def test_runtimes_command_lists_every_runtime_its_precisions_here_and_the_cpu(monkeypatch):
    from typer.testing import CliRunner

    import gemx.runtimes.cpu
    from gemx.cli import app
    from gemx.runtimes.registry import RUNTIMES

    res = CliRunner().invoke(app, ["runtimes"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert all(r in res.output for r in RUNTIMES) and "--runtime auto measures" in res.output
    assert f"CPU: {gemx.runtimes.cpu.cpu_model()}; instruction sets: {' '.join(gemx.runtimes.cpu.cpu_flags())}" in res.output
    monkeypatch.setattr(gemx.runtimes.cpu, "_cpuinfo", lambda: ("Old CPU", frozenset({"avx2"})))
    res = CliRunner().invoke(app, ["runtimes"], env={"COLUMNS": "200"})
    assert "CPU: Old CPU; instruction sets: avx2" in res.output
    if runtime_available("openvino")[0]:
        assert "bf16: no bf16 instructions on this CPU" in res.output and "int8: no VNNI/AMX here" in res.output


def test_bf16_is_refused_in_one_line_on_a_gpu_without_bf16_tensor_cores():
    """The capability check torch-cuda's bf16 makes before it loads anything."""
    from gemx.runtimes.torch_cuda_session import bf16_on_gpu

    assert bf16_on_gpu("NVIDIA H200", (9, 0)) == (True, "") and bf16_on_gpu("NVIDIA A10G", (8, 6))[0]
    ok, why = bf16_on_gpu("Tesla V100-SXM2-16GB", (7, 0))
    assert not ok and why == ("this GPU (Tesla V100-SXM2-16GB, sm 7.0) has no bf16 tensor cores (sm 8.0 or newer has them); "
                              "use fp16 or fp32")


"""The checks that stand between a user and TensorRT's own errors, exercised without a GPU."""

import pytest

import gemx.runtimes.build_record as br
from gemx import GemxError
from gemx.exporter.manifest import read_export_dir
from gemx.runtimes.gpu import GpuInfo
from gemx.runtimes.ort_session import profile_shapes


@pytest.fixture
def record(tiny_export):
    export = read_export_dir(tiny_export.path)
    shas = {g: export.graph(g).sha256 for g in ("reference_encoder", "frame")}
    return export, br.TensorRTBuild(
        precision="fp32", tensorrt_version="10.13.0", strongly_typed=False, contract_precision="fp32",
        gpu=br.Gpu(name="NVIDIA H100", compute_capability="9.0"),
        profile=br.TrtProfile(min=1, opt=5, max=10, sizes={}, max_batch=1), onnx_sha256=shas,
        engines={"reference_encoder": "reference_encoder.engine", "frame": "frame.engine"})


@pytest.fixture
def on_h100_with_trt_10(monkeypatch):
    monkeypatch.setattr(br, "tensorrt_version", lambda: ("10.13.0", ""))
    monkeypatch.setattr(br, "detect_gpu", lambda: (GpuInfo("NVIDIA H100", "9.0"), ""))


def test_matching_record_passes(record, on_h100_with_trt_10):
    export, rec = record
    br.check_engine_record(rec, export)


def test_other_tensorrt_version_says_rebuild(record, on_h100_with_trt_10, monkeypatch):
    export, rec = record
    monkeypatch.setattr(br, "tensorrt_version", lambda: ("11.0.0", ""))
    with pytest.raises(GemxError, match=r"built with TensorRT 10\.13\.0, this is 11\.0\.0; rebuild with `gemx build"):
        br.check_engine_record(rec, export)


def test_other_gpu_says_rebuild(record, on_h100_with_trt_10, monkeypatch):
    export, rec = record
    monkeypatch.setattr(br, "detect_gpu", lambda: (GpuInfo("NVIDIA A10G", "8.6"), ""))
    with pytest.raises(GemxError, match=r"built for NVIDIA H100 \(sm 9\.0\), this GPU is NVIDIA A10G \(sm 8\.6\)"):
        br.check_engine_record(rec, export)


def test_engine_from_another_export_is_refused(record, on_h100_with_trt_10):
    export, rec = record
    rec.onnx_sha256["frame"] = "0" * 64
    with pytest.raises(GemxError, match="built from another export"):
        br.check_engine_record(rec, export)


def test_missing_engines_say_how_to_build(tiny_export):
    with pytest.raises(GemxError, match=r"no fp16 TensorRT engines .* build them with `gemx build .* --fp16`"):
        br.read_engine_record(read_export_dir(tiny_export.path), "fp16")


def test_ort_tensorrt_profile_shapes_cover_the_refs_and_size_axes(tiny_export):
    contract = read_export_dir(tiny_export.path).contract()
    encoder = dict(item.split(":") for item in profile_shapes(contract, contract.reference_encoder, 7, (96, 160)).split(","))
    assert encoder == {"references": "7x3x96x160"}
    shapes = dict(item.split(":") for item in profile_shapes(contract, contract.frame, 7, (96, 160)).split(","))
    assert shapes["target_lr"] == "1x3x24x40" and len(shapes) == 7
    # tiny: level 0 is 48x80 in 4x4 blocks (12 x 20 = 240 blocks); 8 channels, 16 tokens per block
    assert shapes["key_0"] == "240x8x7x16" and shapes["value_0"] == "240x7x16x8" and "7" in shapes["value_2"].split("x")
    default = dict(item.split(":") for item in profile_shapes(contract, contract.frame, 1, None).split(","))
    assert default["target_lr"] == "1x3x16x16"  # the training size when none is named
    batch = dict(item.split(":") for item in profile_shapes(contract, contract.frame, 7, (96, 160), batch=4).split(","))
    assert batch["target_lr"] == "4x3x24x40" and batch["key_0"] == "960x8x7x16"  # four streams' caches stacked

from pathlib import Path

import pytest
import torch

from gemx.exporter.export import ExportOptions, export
from gemx.model import build_model, preset, save_checkpoint

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


SERVER_FIXTURES = {"server", "batched_server", "cluster"}  # each starts real tritonservers (cluster: and nginx)


def pytest_collection_modifyitems(items):
    """A test that uses a server fixture is marked `server`, like those that start one themselves."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


def pytest_runtest_setup(item):
    """A test marked `data` is skipped before its fixtures run (some export a model) when the videos are missing."""
    if item.get_closest_marker("data") and not SHARED_VIDEOS.is_dir():
        pytest.skip(f"needs the shared test videos at {SHARED_VIDEOS}")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Exports and frame caches go to a temporary directory, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GEMX_CACHE", str(tmp_path_factory.mktemp("gemx-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    return build_model(preset("tiny")).eval()


@pytest.fixture
def tiny_ckpt(tmp_path_factory):
    """A tiny checkpoint with non-trivial temperatures (so folding them into the keys is tested)."""
    torch.manual_seed(1)
    model = build_model(preset("tiny"))
    with torch.no_grad():
        model.log_temperature.copy_(torch.tensor([0.3, -0.2, 0.5]))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, {"note": "test"})
    return path


def frames(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def videos_or_skip() -> Path:
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"needs the shared test videos at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


INT8_CALIB = "retalk5_woman_glasses.mp4"


@pytest.fixture(scope="session")
def int8_export(tmp_path_factory):
    """A tiny checkpoint exported with --int8, calibrated on one real video, shared by the INT8 exporter and serving
    tests. Its deepest level has 64 channels, so that level's keys are int8 and its logits an int8 product; the other
    levels' keys stay float32. Tests read it (or copy its checkpoint and table); one builds an ORT CPU build
    into it, which every later session of it then uses."""
    video = videos_or_skip() / INT8_CALIB
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("int8")
    save_checkpoint(root / "tiny.pt", build_model(preset("tiny", channels=(8, 16, 64))))
    result = export(root / "tiny.pt", ExportOptions(out=root / "tiny.export", max_refs=5, int8=True, calib=[video]))
    return root, result


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """One FP32+FP16 export of a tiny checkpoint, shared by the exporter and runtime tests."""
    torch.manual_seed(1)
    model = build_model(preset("tiny"))
    with torch.no_grad():
        model.log_temperature.copy_(torch.tensor([0.3, -0.2, 0.5]))
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(root / "tiny.pt", model)
    return export(root / "tiny.pt", ExportOptions(out=root / "tiny.export", fp16=True, max_refs=12))

"""Any frame size on the block grid, and frames off it padded and cropped back in the session layer.

The tiny model's grid is 32 pixels (4x4 blocks at a level an eighth of the frame); frames here are landscape,
portrait and off the grid, compared with the PyTorch model on the same (padded) pixels.
"""

import numpy as np
import pytest
import torch

from gemx import GemxError
from gemx.exporter.manifest import read_export_dir
from gemx.model import load_checkpoint
from gemx.runtimes.registry import open_session
from tests.conftest import frames


def rect(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return torch.nn.functional.interpolate(frames(n, 64, seed=seed), size=(h, w), mode="bilinear").clamp(0, 1).numpy()


def torch_frame(model, refs: np.ndarray, lr: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(lr), torch.from_numpy(refs)[None]).numpy()


def edge_pad(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (0, h - x.shape[2]), (0, w - x.shape[3])), mode="edge")


@pytest.mark.parametrize("runtime", ["ort", "torch"])
@pytest.mark.parametrize("size", [(64, 96), (96, 64), (128, 160)])
def test_any_size_on_the_grid_matches_pytorch(tiny_export, runtime, size):
    export = read_export_dir(tiny_export.path)
    torch_model = load_checkpoint(tiny_export.path.parent / "tiny.pt").model
    h, w = size
    refs, lr = rect(3, h, w, seed=1), rect(1, h // 4, w // 4, seed=2)
    with open_session(runtime, tiny_export.path, model=torch_model) as s:
        s.set_references(refs)
        out = s(lr)
        assert out.shape == (1, 3, h, w) and s.kv_nbytes() == export.contract().kv_bytes(3, size)
    np.testing.assert_allclose(out, torch_frame(torch_model, refs, lr), atol=1e-4)


@pytest.mark.parametrize("runtime", ["ort", "torch"])
def test_frames_off_the_grid_are_edge_padded_and_cropped_back_exactly(tiny_export, runtime):
    """72x100 is on no 32-pixel grid: the session pads references to 96x128 and the LR target to 24x32 by repeating
    their last row and column, runs the graphs there, and returns exactly the 72x100 the input asked for."""
    torch_model = load_checkpoint(tiny_export.path.parent / "tiny.pt").model
    refs, lr = rect(2, 72, 100, seed=3), rect(1, 18, 25, seed=4)
    with open_session(runtime, tiny_export.path, model=torch_model) as s:
        s.set_references(refs)
        out = s(lr)
    assert out.shape == (1, 3, 72, 100)
    want = torch_frame(torch_model, edge_pad(refs, 96, 128), edge_pad(lr, 24, 32))[..., :72, :100]
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_a_session_refuses_a_frame_of_another_size_and_a_size_above_the_export(tiny_export):
    with open_session("ort", tiny_export.path) as s:
        s.set_references(rect(2, 64, 96, seed=5))
        with pytest.raises(GemxError, match=r"target_lr is 16x16 but its references are 96x64: send frames of the "
                                            r"references' size over the scale 4 \(24x16\)"):
            s(rect(1, 16, 16, seed=6))
        with pytest.raises(GemxError, match=r"exceed the largest size this export was validated at, 1920x1088 \(either "
                                            r"orientation\); re-export with --max-size 1984x64"):
            s.set_references(rect(1, 64, 1984, seed=7))
        with pytest.raises(GemxError, match="re-export with --max-size 64x1984"):  # portrait: its long side is too long
            s.set_references(rect(1, 1984, 64, seed=7))
        with pytest.raises(GemxError, match="re-export with --max-size 1152x1152"):  # both sides fit alone, not together
            s.kv_bytes(1, (1152, 1152))
        assert s.kv_bytes(1, (1920, 1088)) == s.kv_bytes(1, (1088, 1920))  # a phone's portrait 1080p is validated too
        assert s(rect(1, 16, 24, seed=8)).shape == (1, 3, 64, 96)  # the stream goes on at its own size

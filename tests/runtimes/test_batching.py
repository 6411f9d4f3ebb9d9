"""Frames of several streams in one execution: each stream's frame attends only to its own references.

`Session.decode_batch` must give exactly what `decode` gives frame by frame, whatever mix of frame sizes and
reference counts it is handed (it groups them), for every runtime that runs here.
"""

import time

import numpy as np
import pytest

from gemx import GemxError
from gemx.model import load_checkpoint
from gemx.runtimes.registry import open_session, runtime_available
from tests.runtimes.test_geometry import rect

RUNTIMES = ["torch", "ort", "openvino"]


def streams(session, specs, seed=0):
    """(target_lr, cache) of one stream per (refs, height, width), each with its own references."""
    out = []
    for k, (refs, h, w) in enumerate(specs):
        out.append((rect(1, h // 4, w // 4, seed=seed + 2 * k), session.encode(rect(refs, h, w, seed=seed + 2 * k + 1))))
    return out


def open_runtime(runtime, export, precision="fp32"):
    if not runtime_available(runtime)[0]:
        pytest.skip(runtime_available(runtime)[1])
    model = load_checkpoint(export.parent / "tiny.pt").model if runtime == "torch" else None
    return open_session(runtime, export, precision, model=model, threads=1)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_batch_of_streams_equals_each_stream_alone(tiny_export, runtime):
    with open_runtime(runtime, tiny_export.path) as s:
        calls = streams(s, [(2, 64, 96)] * 4)
        alone = [s.decode(lr, cache) for lr, cache in calls]
        before = s.executions
        together = s.decode_batch([lr for lr, _ in calls], [cache for _, cache in calls])
        assert s.executions - before == 1  # one execution for the four frames
        for a, b in zip(alone, together, strict=True):
            assert b.shape == (1, 3, 64, 96)
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
        # the batch does not mix streams: another stream's references would give another frame
        assert np.abs(together[0] - s.decode(calls[0][0], calls[1][1])).max() > 1e-4


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_mixed_sizes_and_reference_counts_run_in_groups(tiny_export, runtime):
    # 52x72 pads to the grid's 64x96, so it runs with the 64x96 frames of 2 references and is cropped back on its
    # own; 3 references and the portrait frame run alone: three executions
    specs = [(2, 64, 96), (2, 52, 72), (3, 64, 96), (2, 64, 96), (2, 96, 64), (2, 52, 72)]
    with open_runtime(runtime, tiny_export.path) as s:
        calls = streams(s, specs, seed=10)
        alone = [s.decode(lr, cache) for lr, cache in calls]
        before = s.executions
        together = s.decode_batch([lr for lr, _ in calls], [cache for _, cache in calls])
        assert s.executions - before == 3
        for (_, h, w), a, b in zip(specs, alone, together, strict=True):
            assert b.shape == (1, 3, h, w)
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_a_batch_runs_in_parts_of_at_most_max_batch(tiny_export):
    with open_runtime("ort", tiny_export.path) as s:
        calls = streams(s, [(1, 64, 64)] * 5)
        alone = [s.decode(lr, cache) for lr, cache in calls]
        s.max_batch, before = 2, s.executions
        together = s.decode_batch([lr for lr, _ in calls], [cache for _, cache in calls])
        assert s.executions - before == 3
        for a, b in zip(alone, together, strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_a_bad_frame_in_a_batch_is_named(tiny_export):
    with open_runtime("ort", tiny_export.path) as s:
        (lr, cache), (lr2, cache2) = streams(s, [(2, 64, 96), (2, 64, 64)])
        with pytest.raises(GemxError, match=r"^frame 1 of the batch: target_lr is 24x16 but its references are 64x64"):
            s.decode_batch([lr, lr], [cache, cache2])
        with pytest.raises(GemxError, match="one cache per frame, got 2 frames and 1 caches"):
            s.decode_batch([lr, lr2], [cache])


def test_openvino_compiles_a_batch_geometry_in_the_background_and_then_runs_it(tiny_export):
    with open_runtime("openvino", tiny_export.path) as s:
        calls = streams(s, [(2, 64, 96)] * 3)
        alone = [s.decode(lr, cache) for lr, cache in calls]
        compiled = len(s.fixed)
        first = s.decode_batch([lr for lr, _ in calls], [cache for _, cache in calls])  # the symbolic graph
        deadline = time.monotonic() + 60
        while len(s.fixed) == compiled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(s.fixed) == compiled + 1 and next(reversed(s.fixed))[0] == (3, 3, 16, 24)  # compiled for the batch
        again = s.decode_batch([lr for lr, _ in calls], [cache for _, cache in calls])
        for a, b, c in zip(alone, first, again, strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
            np.testing.assert_allclose(c, a, rtol=0, atol=1e-5)

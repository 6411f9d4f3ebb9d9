"""The per-stream cache on its own, with a controlled clock: eviction order and timing exactly."""

import numpy as np
import pytest

from gemx import GemxError
from gemx.model.lr import downsample
from gemx.runtimes.registry import open_session
from gemx.serving.streams import RESEND, ReferencesNeeded, StreamTable
from tests.conftest import frames


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def table(tiny_export):
    session = open_session("ort", tiny_export.path)
    clock = Clock()
    t = StreamTable(session, budget_bytes=5 * session.kv_bytes(1), idle_timeout_s=10, clock=clock)
    t.clock_ = clock
    return t


def refs_and_frame(seed, refs=2):
    return frames(refs, 64, seed=seed).numpy(), downsample(frames(1, 64, seed=seed + 50), 4).numpy()


def test_least_recently_used_goes_first_when_the_budget_is_reached(table):
    data = {sid: refs_and_frame(sid) for sid in (1, 2, 3)}
    table.step(1, data[1][1], data[1][0], start=True)
    table.step(2, data[2][1], data[2][0], start=True)
    table.step(1, data[1][1])  # 1 is now more recent than 2
    table.step(3, data[3][1], data[3][0], start=True)
    assert 2 not in table and 1 in table and 3 in table and table.evictions["budget"] == 1
    with pytest.raises(ReferencesNeeded, match=f"budget.*{RESEND}"):
        table.step(2, data[2][1])
    assert table.nbytes == 4 * table.session.kv_bytes(1)


def test_idle_streams_expire_and_ended_ones_are_freed(table):
    refs, lr = refs_and_frame(7)
    table.step(1, lr, refs, start=True)
    table.clock_.now = 5
    table.step(2, lr, refs, start=True)
    table.clock_.now = 12
    assert table.expire() == 1 and 1 not in table and 2 in table
    with pytest.raises(ReferencesNeeded, match="10 s without frames"):
        table.step(1, lr)
    table.step(2, lr, end=True)
    assert len(table) == 0 and table.nbytes == 0 and table.evictions == {"ended": 1, "idle": 1, "budget": 0}


def test_what_cannot_be_held_is_refused_without_evicting_anyone(table):
    refs, lr = refs_and_frame(9)
    table.step(1, lr, refs, start=True)
    with pytest.raises(GemxError, match="over this server's budget"):
        table.step(2, lr, frames(6, 64).numpy(), start=True)
    with pytest.raises(GemxError, match="must carry `references`"):
        table.step(3, lr, start=True)
    assert 1 in table and len(table) == 1
    np.testing.assert_allclose(table.step(1, lr), table.session.decode(lr, table.session.encode(refs)), atol=1e-6)

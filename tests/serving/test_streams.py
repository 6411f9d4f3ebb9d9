"""The per-stream cache on its own, with a controlled clock: eviction order and timing exactly."""

import numpy as np
import pytest

from gemx import GemxError
from gemx.model.lr import downsample
from gemx.runtimes.registry import open_session
from gemx.serving.streams import RESEND, ReferencesNeeded, Request, StreamTable
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


def test_one_execution_answers_each_request_on_its_own(table):
    """A batch of requests: frames of several streams run together and equal each stream alone; a bad request
    fails alone; new references and an end inside the batch take effect in order."""
    session = table.session
    data = {sid: refs_and_frame(20 + sid, refs=1 if sid == 3 else 2) for sid in (1, 2, 3)}  # within the budget
    want = {sid: session.decode(lr, session.encode(refs)) for sid, (refs, lr) in data.items()}
    for sid in (1, 2):
        table.step(sid, None, data[sid][0], start=True)
    before = session.executions
    out = table.step_batch([
        Request(1, data[1][1]),
        Request(2, data[2][1][..., :8, :8]),  # the wrong size for its references
        Request(3, data[3][1], data[3][0], start=True),  # a new stream in the same execution
        Request(2, data[2][1], end=True),  # ended: its frame is still answered, then its cache freed
        Request(4, data[1][1]),  # never started
    ])
    assert session.executions - before == 2  # streams 1 and 2 (2 references) in one batch, 3 (1 reference) alone
    np.testing.assert_allclose(out[0], want[1], rtol=0, atol=1e-5)
    assert isinstance(out[1], GemxError) and "target_lr is 8x8 but its references are 64x64" in str(out[1])
    np.testing.assert_allclose(out[2], want[3], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[3], want[2], rtol=0, atol=1e-5)
    assert isinstance(out[4], ReferencesNeeded) and RESEND in str(out[4])
    assert 2 not in table and 1 in table and 3 in table


def test_a_stream_evicted_while_its_frame_waits_in_the_batch_is_still_answered(table):
    """The budget holds five references. Stream 3's four evict streams 2 and 1 (two each), though 1 just sent a
    frame: a frame read before the eviction keeps the cache it was read with; a frame of that stream read after it
    is told to send references again."""
    session = table.session
    data = {sid: refs_and_frame(30 + sid, refs=4 if sid == 3 else 2) for sid in (1, 2, 3)}
    want = {sid: session.decode(lr, session.encode(refs)) for sid, (refs, lr) in data.items()}
    table.step(1, None, data[1][0], start=True)
    table.step(2, None, data[2][0], start=True)
    out = table.step_batch([Request(1, data[1][1]), Request(3, data[3][1], data[3][0], start=True), Request(1, data[1][1])])
    assert table.evictions["budget"] == 2 and 1 not in table and 2 not in table
    np.testing.assert_allclose(out[0], want[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[1], want[3], rtol=0, atol=1e-5)
    assert isinstance(out[2], ReferencesNeeded) and "budget" in str(out[2])


def test_references_replaced_inside_a_batch_serve_that_frame(table):
    session = table.session
    (old, lr), (new, _) = refs_and_frame(40), refs_and_frame(41)
    table.step(1, None, old, start=True)
    out, = table.step_batch([Request(1, lr, new)])
    np.testing.assert_allclose(out, session.decode(lr, session.encode(new)), rtol=0, atol=1e-5)

"""The Triton Python backend model of a gemx repository: one gemx Session, one cache per stream.

Triton's sequence batcher gives every request its stream's correlation id and start/end flags; the
StreamTable keeps each stream's keys/values. With `max_batch_size` > 0 (`gemx triton --max-batch`) the batcher
hands one execute the requests of several streams (never two of one stream), and their frames run together,
grouped by frame size and reference count. Every request is answered on its own: a bad one gets its error (one
line, as gemx words it) while the other requests of the same batch go on.
This module runs inside Triton's stub process, where `triton_python_backend_utils` is importable.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from gemx.errors import GemxError
from gemx.serving.repository import KV_BYTES_OUTPUT, STREAMS_OUTPUT, Repository, read_repository
from gemx.serving.streams import Request, StreamTable
from gemx.serving.stub_env import check_stub_numpy


def open_stream_table(repo: Repository, params: dict[str, str]) -> StreamTable:
    """The session and stream table a repository's parameters describe (also used in-process by the load test)."""
    from gemx.runtimes.registry import open_session

    threads = int(params.get("threads", "0")) or None
    session = open_session(repo.manifest.runtime, repo.export_path, repo.manifest.precision, threads=threads)
    session.max_refs = min(session.max_refs or np.inf, repo.manifest.limits.max_refs)
    return StreamTable(session, int(params["kv_budget_bytes"]), float(params["idle_timeout_s"]))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        check_stub_numpy()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.batched = int(config.get("max_batch_size", 0)) > 0  # every tensor then has a leading batch axis of 1
        repo = read_repository(Path(args["model_repository"]).parent)  # verified before anything is loaded
        self.table = open_stream_table(repo, params)
        self._stop = threading.Event()
        # Triton drops an idle sequence without calling the model: free its cache on a timer as well.
        self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="gemx-idle-sweep")
        self._sweeper.start()

    def _sweep(self) -> None:
        period = min(1.0, self.table.idle_timeout_s / 4)
        while not self._stop.wait(period):
            self.table.expire()

    def execute(self, requests: list) -> list:
        pb = self.pb
        parsed = []
        for request in requests:
            try:
                parsed.append(self._request(request))
            except GemxError as e:
                parsed.append(e)
        stepped = iter(self.table.step_batch([r for r in parsed if not isinstance(r, GemxError)]))
        results = [r if isinstance(r, GemxError) else next(stepped) for r in parsed]
        batch = (1,) if self.batched else ()
        responses = []
        for result in results:
            if isinstance(result, GemxError):
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(result))))
                continue
            outputs = [pb.Tensor(KV_BYTES_OUTPUT, np.full((*batch, 1), self.table.nbytes, np.uint64)),
                       pb.Tensor(STREAMS_OUTPUT, np.full((*batch, 1), len(self.table), np.uint32))]
            if result is not None:
                outputs.insert(0, pb.Tensor("frame_hr", np.ascontiguousarray(result, np.float32)))
            responses.append(pb.InferenceResponse(output_tensors=outputs))
        return responses

    def _request(self, request) -> Request:
        def value(name: str):
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        stream_id = int(value("CORRID").reshape(-1)[0])
        start, end = bool(value("START").reshape(-1)[0]), bool(value("END").reshape(-1)[0])
        references = value("references")
        if self.batched and references is not None:  # [1, refs, 3, H, W]: the batch axis Triton adds
            if references.shape[0] != 1:
                raise GemxError(f"stream {stream_id}: send one stream's references per request, got a batch of "
                                f"{references.shape[0]}")
            references = references[0]
        return Request(stream_id, value("target_lr"), references, start, end)

    def finalize(self) -> None:
        self._stop.set()
        self.table.clear()
        self.table.session.close()


"""The Triton Python backend model of a gemx repository: one gemx Session, one cache per stream.

Triton's sequence batcher gives every request its stream's correlation id and start/end flags; the
StreamTable keeps each stream's keys/values. Every request is answered on its own: a bad one gets its
error (one line, as gemx words it) while the other requests of the same batch go on.
This module runs inside Triton's stub process, where `triton_python_backend_utils` is importable.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from gemx.errors import GemxError
from gemx.serving.repository import KV_BYTES_OUTPUT, STREAMS_OUTPUT, Repository, read_repository
from gemx.serving.streams import StreamTable
from gemx.serving.stub_env import check_stub_numpy


def open_stream_table(repo: Repository, params: dict[str, str]) -> StreamTable:
    """The session and stream table a repository's parameters describe (also used in-process by the load test)."""
    from gemx.runtimes.registry import open_session

    threads = int(params.get("threads", "0")) or None
    session = open_session(repo.manifest["runtime"], repo.export_path, repo.manifest["precision"], threads=threads)
    session.max_refs = min(session.max_refs or np.inf, int(repo.manifest["limits"]["max_refs"]))
    return StreamTable(session, int(params["kv_budget_bytes"]), float(params["idle_timeout_s"]))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        check_stub_numpy()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
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
        responses = []
        for request in requests:
            try:
                frame = self._handle(request)
                outputs = [pb.Tensor(KV_BYTES_OUTPUT, np.array([self.table.nbytes], np.uint64)),
                           pb.Tensor(STREAMS_OUTPUT, np.array([len(self.table)], np.uint32))]
                if frame is not None:
                    outputs.insert(0, pb.Tensor("frame_hr", np.ascontiguousarray(frame, np.float32)))
                responses.append(pb.InferenceResponse(output_tensors=outputs))
            except GemxError as e:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e))))
        return responses

    def _handle(self, request) -> np.ndarray | None:
        def value(name: str):
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        stream_id = int(value("CORRID").reshape(-1)[0])
        start, end = bool(value("START").reshape(-1)[0]), bool(value("END").reshape(-1)[0])
        return self.table.step(stream_id, value("target_lr"), references=value("references"), start=start, end=end)

    def finalize(self) -> None:
        self._stop.set()
        self.table.clear()
        self.table.session.close()


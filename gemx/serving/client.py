"""A stream on a gemx Triton server, used like a local Session (tritonclient, gRPC streaming).

    with RemoteStream("127.0.0.1:8001") as stream:
        stream.set_references(refs)          # sent once, with the next frame
        for lr in frames:
            hr = stream(lr)                  # one request per frame; the server keeps the keys/values

The references stay on the client too, so the stream heals itself: when the server no longer holds the
stream's cache (evicted after an idle pause or by the byte budget, or the server restarted), the client
starts the sequence again with its references and re-sends the frame, reconnecting first if the
connection was lost.
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import time

import numpy as np

from gemx.contract import Contract
from gemx.errors import GemxError
from gemx.frames import as_array
from gemx.model.config import ModelConfig
from gemx.serving.repository import KV_BYTES_OUTPUT, MODEL_NAME, STREAMS_OUTPUT
from gemx.serving.streams import RESEND

_RESTART = ("must specify the START flag",)  # Triton dropped the sequence itself (its idle timeout)
_LOST = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "StatusCode.UNKNOWN", "Socket closed", "Connection reset")
# A proxy (nginx `grpc_pass`) resets the HTTP/2 stream when the replica behind it dies mid-stream, which gRPC
# reports as INTERNAL; the model's own refusals (bad input) never carry an RST_STREAM.
_RESET = ("RST_STREAM", "Stream removed")


def _connection_lost(text: str) -> bool:
    return any(m in text for m in _LOST) or ("StatusCode.INTERNAL" in text and any(m in text for m in _RESET))


class _ConnectionLost(Exception):
    pass


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise GemxError("the stream client needs tritonclient; install it with: pip install 'gemx[serve]'") from None
    return grpcclient


class RemoteStream:
    """One call: a Triton sequence with its own references, healed after eviction or a server restart."""

    def __init__(self, url: str, stream_id: int | None = None, model: str = MODEL_NAME, timeout_s: float = 60.0,
                 reconnect_s: float = 60.0):
        self.url, self.model = url, model
        self.stream_id = stream_id or secrets.randbits(62) + 1
        self.timeout_s, self.reconnect_s = timeout_s, reconnect_s
        self.name = f"triton {url}"
        self.encoder_runs = 0  # how often the server was sent references for this stream
        self.recoveries = 0  # how often it had to be sent them again (eviction, restart)
        self.server_kv_bytes = 0
        self.server_streams = 0
        self._client = None
        self._responses: queue.Queue = queue.Queue()
        self._references: np.ndarray | None = None
        self._send_references = False
        self._started = False
        self._request = 0
        self._connect(deadline=time.monotonic() + reconnect_s)
        self.contract, self.max_refs, self.max_batch = self._read_config()

    @property
    def batched(self) -> bool:
        """Whether the model takes frames of several streams per execution (its tensors lead with a batch axis)."""
        return self.max_batch > 0

    # -- Session-like interface ------------------------------------------------------------------
    def set_references(self, references: np.ndarray) -> None:
        references = as_array(references, "references")
        if references.ndim != 4 or references.shape[1] != 3 or not len(references):
            raise GemxError(f"references must be float32 [refs, 3, H, W] (RGB), got shape {list(references.shape)}")
        if len(references) > self.max_refs:
            raise GemxError(f"{len(references)} references exceed the {self.max_refs} this server allows; send at most {self.max_refs}")
        self._references = np.ascontiguousarray(references, np.float32)
        self._send_references = True

    def __call__(self, target_lr: np.ndarray) -> np.ndarray:
        if self._references is None:
            raise GemxError("no references set: call set_references(frames) before running frames")
        target_lr = np.ascontiguousarray(as_array(target_lr, "target_lr"), np.float32)
        for _ in range(3):
            start, refs = not self._started, self._send_references or not self._started
            try:
                response = self._infer(target_lr, self._references if refs else None, start=start)
            except _ConnectionLost:
                self._reconnect()
                continue
            except GemxError as e:
                if RESEND in str(e) or any(m in str(e) for m in _RESTART):
                    self._started = False  # the server lost this stream: start it again with its references
                    self.recoveries += 1
                    continue
                raise
            self._started, self._send_references = True, False
            self.encoder_runs += refs
            return response.as_numpy("frame_hr").copy()  # an owned array, as a local Session returns
        raise GemxError(f"stream {self.stream_id}: the server at {self.url} kept losing this stream; giving up")

    def end(self) -> None:
        """End the sequence: the server frees this stream's cache now rather than after its idle timeout."""
        if self._started and self._client is not None:
            with contextlib.suppress(GemxError, _ConnectionLost):  # a server that lost the stream has nothing to free
                self._infer(None, None, start=False, end=True)
            self._started = False

    def close(self) -> None:
        self.end()
        if self._client is not None:
            self._client.stop_stream(cancel_requests=True)
            self._client.close()
            self._client = None

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the wire --------------------------------------------------------------------------------
    def _infer(self, target_lr: np.ndarray | None, references: np.ndarray | None, start: bool, end: bool = False):
        grpc = _grpc()
        inputs = []
        if references is not None and self.batched:
            references = references[None]  # a batching model's tensors lead with Triton's batch axis
        for name, value in (("references", references), ("target_lr", target_lr)):
            if value is not None:
                tensor = grpc.InferInput(name, list(value.shape), "FP32")
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
        self._request += 1
        request_id = str(self._request)
        try:
            self._client.async_stream_infer(self.model, inputs, request_id=request_id, sequence_id=self.stream_id,
                                            sequence_start=start, sequence_end=end)
        except Exception as e:  # the stream is closed: the server went away
            raise _ConnectionLost(str(e)) from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                result, error = self._responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise _ConnectionLost(f"no answer within {self.timeout_s:.0f} s") from None
            if error is not None:
                text = str(error)
                if _connection_lost(text):
                    raise _ConnectionLost(text)
                raise GemxError(f"server refused a frame of stream {self.stream_id}: {_message(error)}")
            if result.get_response().id != request_id:
                continue  # an answer to a request abandoned before a reconnect
            self.server_kv_bytes = int(result.as_numpy(KV_BYTES_OUTPUT).reshape(-1)[0])
            self.server_streams = int(result.as_numpy(STREAMS_OUTPUT).reshape(-1)[0])
            return result

    def _connect(self, deadline: float) -> None:
        grpc = _grpc()
        while True:
            try:
                client = grpc.InferenceServerClient(self.url)
                if client.is_model_ready(self.model):
                    break
                client.close()
                why = f"model {self.model!r} is not ready"
            except Exception as e:  # tritonclient raises its own exception for an unreachable server
                why = _message(e)
            if time.monotonic() > deadline:
                raise GemxError(f"cannot reach a gemx server at {self.url} ({why}); start one with `gemx serve REPO`")
            time.sleep(0.25)
        self._client = client
        self._responses = queue.Queue()
        responses = self._responses
        client.start_stream(callback=lambda result, error: responses.put((result, error)))

    def _reconnect(self) -> None:
        if self._client is not None:
            try:
                self._client.stop_stream(cancel_requests=True)
                self._client.close()
            except Exception:  # the old connection is already gone
                pass
            self._client = None
        self._connect(deadline=time.monotonic() + self.reconnect_s)
        self._started = False
        self.recoveries += 1

    def _read_config(self) -> tuple[Contract, int, int]:
        config = self._client.get_model_config(self.model, as_json=True)["config"]
        try:
            params = {k: v["string_value"] for k, v in config["parameters"].items()}
            model_config = ModelConfig.from_dict(json.loads(params["model_config"]))
            return Contract(model_config), int(params["max_refs"]), int(config.get("max_batch_size", 0))
        except (KeyError, ValueError) as e:
            raise GemxError(f"model {self.model!r} at {self.url} is not a gemx stream model ({e}); serve a repository "
                            "written by `gemx triton`") from None


def executions(url: str, model: str = MODEL_NAME) -> tuple[int, int]:
    """(model executions, requests) a server has run so far: Triton's inference statistics of the model. Their
    ratio over an interval is the mean batch Triton formed."""
    client = _grpc().InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    except Exception as e:  # tritonclient raises its own exception for an unreachable server
        raise GemxError(f"cannot read the statistics of {url} ({_message(e)})") from None
    finally:
        client.close()
    return sum(int(m.get("execution_count", 0)) for m in stats), sum(int(m.get("inference_count", 0)) for m in stats)


def _message(error) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return text.replace("[request id: <id_unknown>] ", "").strip()

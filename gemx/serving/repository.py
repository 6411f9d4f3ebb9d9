"""`gemx triton`: an export directory -> a Triton model repository holding one stateful model, `gemx`.

    REPO/
      gemx/
        config.pbtxt      Python backend, sequence batcher; tensor names and shapes from the graph contract
        serving.json      gemx version, export sha256, runtime, precision, limits (the repository's manifest)
        1/model.py        loads gemx's TritonPythonModel (gemx must be installed where the server runs)
        1/export/         a verified copy of the export directory (graphs, manifest, builds)

A stream is a Triton sequence: its first request carries `references` and `target_lr`, later ones only
`target_lr`, and any request may carry new `references`. Each stream's keys/values stay inside the server
(see gemx.serving.streams). The config is built as Triton's own ModelConfig protobuf and printed with
protobuf's text format, so what Triton parses is what gemx wrote.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import PositiveInt

import gemx
from gemx.contract import BATCH, Contract, TensorSpec, graph_precision
from gemx.errors import GemxError, check_positive
from gemx.exporter.manifest import MANIFEST, WRITTEN_LATER, CheckpointFile, ExportDir, read_export_dir, sha256
from gemx.fs import atomic_dir, check_target, json_field
from gemx.records import Part, Record
from gemx.runtimes.cpu import bf16_native
from gemx.runtimes.registry import check_precision

MODEL_NAME = "gemx"
SERVING_MANIFEST = "serving.json"
RUNTIMES = ("ort", "openvino", "ort-cuda", "ort-tensorrt", "tensorrt")
# Responses carry the server's cache size with every frame, so a client (the load test) can watch it.
KV_BYTES_OUTPUT, STREAMS_OUTPUT = "kv_cache_bytes", "streams_open"
MODEL_PY = '''"""Triton Python backend entry point: gemx's stream model (gemx must be installed in the server's environment)."""

from gemx.serving.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass
class TritonOptions:
    runtime: str = "ort"
    precision: str = "fp32"
    max_refs: int | None = None  # default: the export's
    max_streams: int = 16  # sequences the batcher holds open at once; later ones wait for a free slot
    kv_budget_mb: float = 1024.0  # least-recently-used streams are evicted above this many MB of keys/values
    idle_timeout_s: float = 60.0  # a stream silent this long is dropped (by Triton and by gemx's cache)
    threads: int | None = None  # intra-op threads of the model's session (default: the runtime's)
    instances: int = 1
    max_batch: int = 1  # frames of different streams per model execution; 1: one request at a time
    queue_delay_us: int | None = None  # how long a batch may wait to fill (default: 0 on a CPU, 2000 on a GPU)
    force: bool = False

    @property
    def gpu(self) -> bool:
        return self.runtime not in ("ort", "openvino")

    @property
    def batch_delay_us(self) -> int:
        """How long a batch waits to fill: never without batching. A CPU runs frames one after another: a frame
        waiting for company only adds its wait, so batches form from what queued while the model was busy. A GPU
        runs a batch in about the time of one frame, so a short wait to fill it pays."""
        if self.max_batch == 1:
            return 0
        if self.queue_delay_us is not None:
            return self.queue_delay_us
        return 2000 if self.gpu else 0


class ExportCopy(Part):
    name: str
    sha256: str  # of the export's manifest
    checkpoint: CheckpointFile


class Limits(Part):
    max_refs: PositiveInt
    max_streams: PositiveInt
    kv_budget_mb: float
    idle_timeout_s: float


class Batching(Part):
    max_batch: PositiveInt
    queue_delay_us: int


class ServingManifest(Record):
    """serving.json: what the repository serves (its export's manifest sha256, runtime, precision) and its limits."""

    format: Literal["gemx-triton"] = "gemx-triton"
    version: Literal[1] = 1
    gemx_version: str = gemx.__version__
    export: ExportCopy
    runtime: str
    precision: str
    limits: Limits
    batching: Batching
    kv_bytes_per_reference: int


@dataclass
class Repository:
    path: Path
    manifest: ServingManifest

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_NAME

    @property
    def export_path(self) -> Path:
        return self.model_dir / "1" / "export"

    def parameters(self) -> dict[str, str]:
        """The model's parameters as Triton reads them from config.pbtxt."""
        from google.protobuf import text_format

        config = text_format.Parse((self.model_dir / "config.pbtxt").read_text(), _model_config_pb2().ModelConfig())
        return {k: v.string_value for k, v in config.parameters.items()}

    def export(self) -> ExportDir:
        export = read_export_dir(self.export_path)
        if sha256(self.export_path / MANIFEST) != self.manifest.export.sha256:
            raise GemxError(f"{self.export_path} is not the export {self.path} was written for; re-run `gemx triton --force`")
        return export


def write_repository(export_path: Path, out: Path, opts: TritonOptions) -> Repository:
    export = read_export_dir(export_path)  # refuses a tampered export (sha256 of every graph)
    _check_options(export, opts)
    check_target(Path(out), opts.force, is_repository, "a gemx Triton repository")
    max_refs = opts.max_refs or export.max_refs
    contract = export.contract(opts.precision)
    manifest = ServingManifest(
        export=ExportCopy(name=Path(export_path).resolve().name, sha256=sha256(export.path / MANIFEST),
                          checkpoint=export.manifest.model.checkpoint),
        runtime=opts.runtime, precision=opts.precision,
        limits=Limits(max_refs=max_refs, max_streams=opts.max_streams, kv_budget_mb=float(opts.kv_budget_mb),
                      idle_timeout_s=float(opts.idle_timeout_s)),
        batching=Batching(max_batch=opts.max_batch, queue_delay_us=opts.batch_delay_us),
        kv_bytes_per_reference=contract.kv_bytes(1))
    with atomic_dir(Path(out), replaceable=lambda p: opts.force and is_repository(p)) as tmp:
        model = tmp / MODEL_NAME
        shutil.copytree(export.path, model / "1" / "export", ignore=shutil.ignore_patterns(*WRITTEN_LATER, ".*"))
        (model / "1" / "model.py").write_text(MODEL_PY)
        (model / "config.pbtxt").write_text(model_config_text(contract, opts, max_refs))
        manifest.write(model / SERVING_MANIFEST)
        read_export_dir(model / "1" / "export")  # the copy is verified like any export
    return Repository(Path(out), manifest)


def is_repository(path: Path) -> bool:
    return json_field(Path(path) / MODEL_NAME / SERVING_MANIFEST, "format") == ServingManifest.kind()[0]


def read_repository(path: Path) -> Repository:
    """Open a repository written by `gemx triton`, checking its manifest and its copy of the export."""
    path = Path(path)
    mpath = path / MODEL_NAME / SERVING_MANIFEST
    if not mpath.exists():
        raise GemxError(f"{path} is not a gemx Triton repository (no {MODEL_NAME}/{SERVING_MANIFEST}); create one with `gemx triton`")
    repo = Repository(path, ServingManifest.read(mpath, "re-run `gemx triton --force`"))
    repo.export()
    return repo


def model_config_text(contract: Contract, opts: TritonOptions, max_refs: int) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(model_config(contract, opts, max_refs))


def model_config(contract: Contract, opts: TritonOptions, max_refs: int):
    """Triton's ModelConfig for the stream model: inputs/outputs from the contract, a sequence batcher, limits."""
    mc = _model_config_pb2()
    batched = opts.max_batch > 1
    # Batched, Triton owns the first axis of every tensor: the frames' batch axis is that axis, and a request's
    # references get one in front of theirs. Requests of different sizes may share an execute (ragged): the model
    # groups them by size and reference count.
    cfg = mc.ModelConfig(name=MODEL_NAME, backend="python", max_batch_size=opts.max_batch if batched else 0)
    references = contract.reference_encoder.inputs[0]
    target, = (s for s in contract.frame.inputs if s.name == "target_lr")
    frame_hr = contract.frame.outputs[0]
    cfg.input.append(_tensor(mc.ModelInput, references, batched, optional=True))
    cfg.input.append(_tensor(mc.ModelInput, target, batched, optional=True))  # absent on a request that only ends a stream
    cfg.output.append(_tensor(mc.ModelOutput, frame_hr, batched))
    cfg.output.append(mc.ModelOutput(name=KV_BYTES_OUTPUT, data_type=mc.TYPE_UINT64, dims=[1]))
    cfg.output.append(mc.ModelOutput(name=STREAMS_OUTPUT, data_type=mc.TYPE_UINT32, dims=[1]))
    seq = cfg.sequence_batching
    seq.max_sequence_idle_microseconds = int(opts.idle_timeout_s * 1e6)
    kinds = mc.ModelSequenceBatching.Control
    for name, kind in (("START", kinds.CONTROL_SEQUENCE_START), ("END", kinds.CONTROL_SEQUENCE_END)):
        seq.control_input.append(mc.ModelSequenceBatching.ControlInput(
            name=name, control=[kinds(kind=kind, int32_false_true=[0, 1])]))
    seq.control_input.append(mc.ModelSequenceBatching.ControlInput(
        name="CORRID", control=[kinds(kind=kinds.CONTROL_SEQUENCE_CORRID, data_type=mc.TYPE_UINT64)]))
    seq.oldest.max_candidate_sequences = opts.max_streams
    if batched:
        seq.oldest.preferred_batch_size.append(opts.max_batch)
    seq.oldest.max_queue_delay_microseconds = opts.batch_delay_us
    cfg.instance_group.append(mc.ModelInstanceGroup(
        count=opts.instances, kind=mc.ModelInstanceGroup.KIND_MODEL if opts.gpu else mc.ModelInstanceGroup.KIND_CPU))
    params = {"runtime": opts.runtime, "precision": opts.precision, "max_refs": str(max_refs),
              "kv_budget_bytes": str(int(opts.kv_budget_mb * 2**20)), "idle_timeout_s": str(opts.idle_timeout_s),
              "threads": str(opts.threads or 0), "model_config": json.dumps(contract.config.to_dict()),
              # The stub keeps its numpy tensors in shared memory; a frame of references can be large.
              "shm-default-byte-size": str(64 * 2**20)}
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def _tensor(message, spec: TensorSpec, batched: bool, optional: bool = False):
    """A config tensor of a contract spec. The contract's batch axis is Triton's when the model batches (dropped
    from the dims), else one frame per request."""
    mc = _model_config_pb2()
    dtype = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16}[spec.dtype]
    dims = [-1 if isinstance(d, str) else d for d in spec.shape]
    if spec.shape[0] == BATCH:
        dims = dims[1:] if batched else [1, *dims[1:]]
    extra = {"optional": True} if optional else {}
    if batched and message is mc.ModelInput:  # requests of other sizes share an execute: the model groups them
        extra["allow_ragged_batch"] = True
    return message(name=spec.name, data_type=dtype, dims=dims, **extra)


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise GemxError("writing a Triton repository needs Triton's protobufs; install them with: pip install 'gemx[serve]'") from None
    return model_config_pb2


def _check_options(export: ExportDir, opts: TritonOptions) -> None:
    if opts.runtime not in RUNTIMES:
        raise GemxError(f"unknown serving runtime {opts.runtime!r}; choose one of {', '.join(RUNTIMES)}")
    check_precision(opts.runtime, opts.precision)
    if graph_precision(opts.precision) not in export.precisions:
        raise GemxError(f"{export.path} has no {graph_precision(opts.precision)} graphs; "
                        f"re-export with `gemx export --{graph_precision(opts.precision)}`")
    if opts.precision == "bf16" and not bf16_native()[0]:
        raise GemxError(bf16_native()[1])
    if opts.max_refs is not None and not 1 <= opts.max_refs <= export.max_refs:
        raise GemxError(f"--max-refs must be between 1 and the export's {export.max_refs}, got {opts.max_refs}")
    check_positive(max_streams=opts.max_streams, instances=opts.instances, threads=opts.threads, max_batch=opts.max_batch)
    if opts.max_batch > opts.max_streams:
        raise GemxError(f"--max-batch {opts.max_batch} exceeds --max-streams {opts.max_streams}: a batch holds one frame "
                        "of each stream; raise --max-streams or lower --max-batch")
    if opts.queue_delay_us is not None and opts.queue_delay_us < 0:
        raise GemxError(f"--queue-delay-us must be 0 or more, got {opts.queue_delay_us}")
    if not opts.kv_budget_mb > 0:
        raise GemxError(f"--kv-budget-mb must be positive, got {opts.kv_budget_mb}")
    if not opts.idle_timeout_s > 0:
        raise GemxError(f"--idle-timeout must be positive seconds, got {opts.idle_timeout_s}")

"""OpenVINO behind the one Session (fp32 parity, bf16 where the CPU has it, its compiled build verified like every
build), and `--runtime auto`, which measures the runtimes here and records its choice."""

import json
import shutil

import numpy as np
import pytest

import gemx.runtimes.cpu
from gemx import GemxError
from gemx.exporter.manifest import AUTO_RECORD, read_export_dir
from gemx.metrics import psnr_db
from gemx.model import load_checkpoint
from gemx.runtimes.build import BuildOptions, build, openvino_dir
from gemx.runtimes.registry import open_session, runtime_available
from tests.runtimes.test_sessions import inputs

pytestmark = pytest.mark.skipif(not runtime_available("openvino")[0], reason="OpenVINO is not installed (pip install openvino)")


@pytest.fixture
def own_export(tiny_export, tmp_path):
    """A copy of the shared tiny export, for tests that build into it or record in it."""
    return shutil.copytree(tiny_export.path, tmp_path / "tiny.export")


def _cpu(monkeypatch, model: str, flags: list[str]) -> None:
    """This process sees another CPU (how a build moved to another machine, or a CPU without bf16, looks)."""
    monkeypatch.setattr(gemx.runtimes.cpu, "_cpuinfo", lambda: (model, frozenset(flags)))


def test_openvino_fp32_matches_pytorch_at_the_training_size_and_off_the_grid(tiny_export):
    model = load_checkpoint(tiny_export.path.parent / "tiny.pt").model
    cfg = model.config
    for size in ((cfg.size, cfg.size), (cfg.size + 2 * cfg.scale, 2 * cfg.size - cfg.scale)):
        refs, target = inputs(max(size), cfg.scale)
        refs, target = refs[..., :size[0], :size[1]], target[..., :size[0] // cfg.scale, :size[1] // cfg.scale]
        outs = []
        for runtime in ("torch", "openvino"):
            with open_session(runtime, tiny_export.path, "fp32", threads=2, model=model) as s:
                s.set_references(refs)
                outs.append(s(target))
                if runtime == "openvino" and s.padded(size) == size:  # the references were encoded, and frames ran,
                    assert list(s.encoders) == [refs.shape] and len(s.fixed) == 1  # by graphs compiled for their
                    # shapes, with the numbers of the symbolic ones
                    s.frame.infer({"target_lr": target, **s._kv.kv})
                    np.testing.assert_allclose(outs[-1], s.frame.get_tensor("frame_hr").data, atol=1e-5)
        assert outs[1].shape == (1, 3, *size)
        np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)


def test_bf16_runs_the_fp32_graphs_close_to_fp32_where_the_cpu_has_it(tiny_export, monkeypatch):
    cfg = load_checkpoint(tiny_export.path.parent / "tiny.pt").config
    refs, target = inputs(cfg.size, cfg.scale)
    with open_session("openvino", tiny_export.path, "fp32") as s:
        s.set_references(refs)
        want = s(target)
    if gemx.runtimes.cpu.bf16_native()[0]:
        with open_session("openvino", tiny_export.path, "bf16") as s:
            s.set_references(refs)
            got = s(target)
            assert s.precision == "bf16" and s.contract.precision == "fp32"  # float32 frames and caches at the edges
        assert 35 < psnr_db(got, want) < 100, psnr_db(got, want)  # computed in bf16: close, and not the same numbers
    _cpu(monkeypatch, "Some CPU", ["avx2", "avx512f", "avx512_vnni"])
    for refuse in (lambda: open_session("openvino", tiny_export.path, "bf16"),
                   lambda: build(tiny_export.path, BuildOptions(bf16=True, runtime="openvino"))):
        with pytest.raises(GemxError, match=r"this CPU \(Some CPU\) has no bf16 instructions .*use fp32 or int8"):
            refuse()


def test_an_openvino_build_is_imported_and_refused_after_tampering_or_on_another_cpu_or_version(own_export, monkeypatch):
    result = build(own_export, BuildOptions(runtime="openvino"))
    out = own_export / openvino_dir("fp32")
    record = result.record
    assert result.target == "openvino" and record.cpu == gemx.runtimes.cpu.cpu_model()
    assert set(record.graphs.values()) == set(record.artifacts_sha256) and record.accuracy_vs_fp32_onnx.psnr_db > 100
    cfg = read_export_dir(own_export).config
    refs, target = inputs(cfg.size, cfg.scale)
    outs = []
    for runtime in ("ort", "openvino"):  # openvino: imported from the build (tampering with it below is refused)
        with open_session(runtime, own_export, "fp32") as s:
            s.set_references(refs)
            outs.append(s(target))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4)
    blob = out / record.graphs["frame"]
    good = blob.read_bytes()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(GemxError, match="does not match the sha256 in its build record"):
        open_session("openvino", own_export, "fp32")
    blob.write_bytes(good)
    with monkeypatch.context() as m:
        _cpu(m, "Another CPU", ["avx2"])
        with pytest.raises(GemxError, match=r"compiled for .* this CPU is Another CPU \(avx2\); "
                                            r"rebuild with `gemx build .* --runtime openvino --force`"):
            open_session("openvino", own_export, "fp32")
    with monkeypatch.context() as m:
        m.setattr("gemx.runtimes.openvino_session.openvino_version", lambda: ("1999.0.0", ""))
        with pytest.raises(GemxError, match=r"compiled by OpenVINO .*, this is 1999.0.0"):
            open_session("openvino", own_export, "fp32")
    with pytest.raises(GemxError, match="already holds a build; pass --force"):
        build(own_export, BuildOptions(runtime="openvino"))


def test_auto_measures_once_records_its_choice_and_reuses_it_until_the_machine_changes(own_export, monkeypatch):
    with open_session("auto", own_export, "fp32", threads=2) as s:
        first = s.choice
    assert not first.reused and {"ort fp32", "openvino fp32"} <= set(first.measured)
    assert "ort int8" not in first.measured and "openvino bf16" not in first.measured  # less precise than asked: not candidates
    timed = {k: v for k, v in first.measured.items() if isinstance(v, float)}
    assert (f"{first.runtime} {first.precision}") == min(timed, key=timed.get)
    assert s.precision == first.precision and str(first).startswith(f"{first.runtime} {first.precision}: fastest of")
    recorded = json.loads((own_export / AUTO_RECORD).read_text())["choices"]
    assert len(recorded) == 1 and recorded[0]["choice"]["runtime"] == first.runtime
    with open_session("auto", own_export, "fp32", threads=2) as s:
        assert s.choice.reused and (s.choice.runtime, s.choice.measured) == (first.runtime, first.measured)
    _cpu(monkeypatch, "Another CPU", ["avx2"])
    with open_session("auto", own_export, "fp32", threads=2) as s:  # another machine: measured again, both kept
        assert not s.choice.reused
    assert len(json.loads((own_export / AUTO_RECORD).read_text())["choices"]) == 2
    (own_export / AUTO_RECORD).write_text("{not json")  # a damaged record is measured over, never trusted
    with open_session("auto", own_export, "fp32", threads=2) as s:
        assert not s.choice.reused


def test_graphs_compiled_for_exact_shapes_are_bounded_and_keep_their_numbers(tiny_export, monkeypatch):
    """Each reference count compiles its own encoder and frame graph; a session keeps the most recent few (not one per
    shape it ever saw), and a shape evicted and seen again is compiled again, to the same numbers."""
    monkeypatch.setattr("gemx.runtimes.openvino_session.FIXED_GEOMETRIES", 2)
    cfg = load_checkpoint(tiny_export.path.parent / "tiny.pt").config
    refs, target = inputs(cfg.size, cfg.scale, refs=3)
    with open_session("openvino", tiny_export.path, "fp32", threads=1) as s:
        first = {}
        for n in (1, 2, 3, 1):
            s.set_references(refs[:n])
            first.setdefault(n, s(target))
            np.testing.assert_array_equal(s(target), first[n])
        assert [shape[0] for shape in s.encoders] == [3, 1] and len(s.fixed) == 2  # 2 (then 1) evicted, 1 made again


def assert_keys_blocked_from_nhwc_to_the_same_bits(export, precision: str, refs: np.ndarray) -> None:
    """The session's encoder, whose keys are blocked from NHWC, against the export's graph compiled as it is."""
    from gemx.runtimes.openvino_session import keys_blocked_from_nhwc

    with open_session("openvino", export, precision, threads=1) as s:
        cache = s.encode(refs)
        keys = [spec.name for spec in s.contract.keys]
        models = [s.core.read_model(str(s.graphs["reference_encoder"])) for _ in range(2)]
        for model in models:
            model.reshape({"references": list(refs.shape)})
        assert keys_blocked_from_nhwc(models[0], keys) == len(keys) > 0  # every key is found in the export's form
        request = s.core.compile_model(models[1], "CPU", s.config).create_infer_request()
        request.infer({"references": refs})
        for name in s.kv_names:
            np.testing.assert_array_equal(cache.kv[name], request.get_tensor(name).data, err_msg=name)


def test_the_encoder_blocks_keys_from_nhwc_to_the_same_bits(tiny_export):
    cfg = load_checkpoint(tiny_export.path.parent / "tiny.pt").config
    refs, _ = inputs(cfg.size, cfg.scale)
    assert_keys_blocked_from_nhwc_to_the_same_bits(tiny_export.path, "fp32", refs)

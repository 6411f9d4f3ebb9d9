"""The four JSON records gemx writes (export manifest, build record, serving manifest, INT8 range table) are read back
through one typed loader: what gemx wrote reads back to the same bytes, and a record of another kind, of a newer
version, or with a field of the wrong type is refused in one line that names it and says what to do."""

import json
import shutil
from pathlib import Path

import pytest

from gemx import GemxError
from gemx.exporter.manifest import MANIFEST, ExportManifest, content_sha256, read_export_dir
from gemx.int8.ranges import RangeTable, load_ranges
from gemx.runtimes.build import BuildOptions, build
from gemx.runtimes.build_record import RECORD, OrtCpuBuild, read_record
from gemx.serving.repository import MODEL_NAME, SERVING_MANIFEST, ServingManifest, TritonOptions, read_repository, write_repository

SHIPPED_TABLE = Path(__file__).parents[1] / "gemx" / "checkpoints" / "small_x4.int8.json"


@pytest.fixture(scope="module")
def written(tiny_export, tmp_path_factory):
    """One of each record, as gemx writes it: (record class, its file, how gemx reads it)."""
    root = tmp_path_factory.mktemp("records")
    export = Path(shutil.copytree(tiny_export.path, root / "tiny.export"))
    build(export, BuildOptions(refs_opt=2))
    repo = write_repository(export, root / "repo", TritonOptions(max_refs=3))
    table = Path(shutil.copy(SHIPPED_TABLE, root / SHIPPED_TABLE.name))
    checkpoint_sha = RangeTable.read(table, "").checkpoint_sha256
    return {
        "export manifest": (ExportManifest, export / MANIFEST, lambda: read_export_dir(export)),
        "build record": (OrtCpuBuild, export / "ort_cpu" / RECORD,
                         lambda: read_record(export / "ort_cpu", read_export_dir(export), OrtCpuBuild)),
        "serving manifest": (ServingManifest, repo.path / MODEL_NAME / SERVING_MANIFEST, lambda: read_repository(repo.path)),
        "range table": (RangeTable, table, lambda: load_ranges(table, checkpoint_sha)),
    }


# what a wrong field is, per record, and how the loader names it
WRONG_FIELD = {
    "export manifest": (lambda d: d["refs"].update(max="3"), "refs.max: Input should be a valid integer"),
    "build record": (lambda d: d["accuracy_vs_fp32_onnx"].update(refs=2.5), "accuracy_vs_fp32_onnx.refs: Input should be a valid integer"),
    "serving manifest": (lambda d: d["limits"].update(max_refs=0), "limits.max_refs: Input should be greater than 0"),
    "range table": (lambda d: d["graphs"]["frame"].update(x=["low", 0.5]), "graphs.frame.x.0: Input should be a valid number"),
}
REDO = {"export manifest": "re-run `gemx export --force`", "build record": "rebuild with `gemx build",
        "serving manifest": "re-run `gemx triton --force`", "range table": "calibrate again with --calib"}
KINDS = list(WRONG_FIELD)


def rewrite(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    if path.name == MANIFEST:  # edited by someone who knows the format: its own hash made again
        d["content_sha256"] = content_sha256(d)
    path.write_text(json.dumps(d))


@pytest.fixture
def damaged(written, request):
    """A record of `request.param` kind to damage, restored after the test."""
    cls, path, read = written[request.param]
    good = path.read_bytes()
    yield request.param, cls, path, read
    path.write_bytes(good)


@pytest.mark.parametrize("kind", KINDS)
def test_what_gemx_wrote_reads_back_to_the_same_bytes(written, kind):
    cls, path, read = written[kind]
    read()
    assert cls.read(path, "").to_json() == path.read_text()


@pytest.mark.parametrize("damaged", KINDS, indirect=True)
def test_a_wrongly_typed_field_is_named_in_one_line(damaged):
    kind, _, path, read = damaged
    edit, message = WRONG_FIELD[kind]
    rewrite(path, edit)
    with pytest.raises(GemxError) as e:
        read()
    assert f"{path} is malformed ({message}" in str(e.value) and REDO[kind] in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damaged", KINDS, indirect=True)
def test_a_newer_version_asks_for_a_newer_gemx(damaged):
    _, cls, path, read = damaged
    fmt, version = cls.kind()
    rewrite(path, lambda d: d.update(version=version + 1))
    with pytest.raises(GemxError, match=f"has format version {version + 1}; this gemx reads {fmt} up to version {version}: "
                                        "upgrade gemx"):
        read()


@pytest.mark.parametrize("damaged", KINDS, indirect=True)
def test_a_record_of_another_kind_is_named(damaged, written):
    kind, cls, path, read = damaged
    other = written[KINDS[(KINDS.index(kind) + 1) % len(KINDS)]][1]
    path.write_bytes(other.read_bytes())
    with pytest.raises(GemxError, match=f"is not a {cls.kind()[0]} file; .*{REDO[kind][:12]}"):
        read()

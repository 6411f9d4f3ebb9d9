"""Nothing a user had is lost, every artifact is verified before use, every bad input is one line.

Real files on disk throughout; races are made deterministic through gemx.fs.before_replace, the hook
between the last check of a target and the move into it.
"""

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import gemx
import gemx.fs
from gemx import GemxError
from gemx.cli import app
from gemx.exporter.cache import cached_export
from gemx.exporter.export import ExportOptions, export
from gemx.exporter.manifest import MANIFEST, read_export_dir, sha256
from gemx.fs import atomic_dir, atomic_write, clean_stale
from gemx.model import build_model, load_checkpoint, preset, save_checkpoint
from gemx.runtimes.build import BuildOptions, build
from gemx.runtimes.registry import open_session
from tests.conftest import frames


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


# -- 1. user data is never deleted or overwritten ---------------------------------------------------------
def test_a_folder_appearing_at_out_during_an_export_is_left_alone(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out.export"

    def user_creates_folder(path):
        if path == out:
            out.mkdir()
            (out / "thesis.txt").write_text("mine")

    monkeypatch.setattr(gemx.fs, "before_replace", user_creates_folder)
    with pytest.raises(GemxError, match="appeared"):
        export(tiny_ckpt, ExportOptions(out=out, max_refs=2, force=True))
    assert (out / "thesis.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["thesis.txt"]
    assert siblings(out) == []  # no temporary left behind


def test_a_folder_with_someone_elses_manifest_is_not_an_export(tiny_ckpt, tmp_path):
    web = tmp_path / "webapp"
    web.mkdir()
    (web / MANIFEST).write_text(json.dumps({"name": "my web app", "icons": []}))
    (web / "index.html").write_text("<html>")
    res = cli("export", tiny_ckpt, "--out", web, "--force", "--max-refs", 2)
    assert res.exit_code == 1 and "not a gemx export" in res.output
    assert sorted(os.listdir(web)) == ["index.html", MANIFEST]


def test_files_are_not_replaced_without_force_even_if_they_appear_mid_write(tmp_path, monkeypatch):
    target = tmp_path / "profile.json"
    monkeypatch.setattr(gemx.fs, "before_replace", lambda p: p == target and p.write_text("user's"))
    with pytest.raises(GemxError, match="appeared"):
        atomic_write(target, lambda tmp: tmp.write_text("gemx's"), overwrite=False)
    assert target.read_text() == "user's" and siblings(target) == []
    monkeypatch.setattr(gemx.fs, "before_replace", lambda p: None)
    atomic_write(target, lambda tmp: tmp.write_text("gemx's"), overwrite=True)  # --force
    assert target.read_text() == "gemx's"


def test_profile_refuses_existing_outputs_before_measuring(tmp_path, tiny_ckpt):
    existing = tmp_path / "p.json"
    existing.write_text("keep")
    res = cli("profile", tiny_ckpt, "--refs", 1, "--json", existing)
    assert res.exit_code == 1 and "--force" in res.output and existing.read_text() == "keep"


def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / f".out{gemx.fs.TMP_MARK}{dead.pid}-abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "half.onnx").write_bytes(b"half")
    alive = tmp_path / f".out{gemx.fs.TMP_MARK}{os.getpid()}-live.tmp"  # a run still going: kept
    alive.mkdir()
    user = tmp_path / ".out.backup"  # not gemx's naming: kept
    user.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("x")
    assert not stale_dir.exists() and alive.exists() and user.exists() and (out / "x").exists()
    assert clean_stale(out) == []


def test_sigterm_during_an_export_leaves_nothing_half_written(tiny_ckpt, tmp_path):
    """SIGTERM while the export writes: exit 130, one line, nothing left. An export that finished in the instant
    between seeing its temporary directory and the signal is whole and exits 0 (the signal is ignored once the
    command has ended); then the test tries again."""
    for attempt in range(5):
        out = tmp_path / f"killed{attempt}.export"
        proc = subprocess.Popen([sys.executable, "-m", "gemx", "export", str(tiny_ckpt), "--out", str(out), "--max-refs", "10"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 120
        while not siblings(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until the export is writing its temporary directory
        assert proc.poll() is None, "the export ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert siblings(out) == [] and "Traceback" not in err
        if proc.returncode == 0:  # finished before the signal landed: whole, and verified like any export
            read_export_dir(out)
            continue
        assert proc.returncode == 130 and "interrupted" in err and not out.exists()
        return
    pytest.fail("every export finished before SIGTERM reached it")


def test_upscale_to_frames_is_whole_or_nothing(tmp_path, tiny_ckpt):
    from gemx.video.io import write_video
    from gemx.video.upscale import UpscaleOptions, upscale

    video = tmp_path / "hr.mp4"
    clip = (frames(20, 64, seed=5).numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    write_video(video, iter(clip), fps=25)
    out = tmp_path / "frames"
    upscale(video, out, UpscaleOptions(refs=2, runtime="ort", simulate=True), tiny_ckpt)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 21  # 20 frames and gemx's record

    def killed(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upscale(video, out, UpscaleOptions(refs=2, runtime="ort", simulate=True, force=True), tiny_ckpt, progress=killed)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and siblings(out) == []
    user = tmp_path / "holiday"
    user.mkdir()
    (user / "photo.png").write_bytes(b"png")
    with pytest.raises(GemxError, match="not a folder of gemx frames"):
        upscale(video, user, UpscaleOptions(refs=2, runtime="ort", simulate=True, force=True), tiny_ckpt)
    assert os.listdir(user) == ["photo.png"]


def test_train_with_zero_steps_is_refused(tmp_path):
    res = cli("train", "--out", tmp_path / "m.pt", "--steps", 0, "--videos", tmp_path)
    assert res.exit_code == 1 and "--steps must be a positive integer" in res.output
    assert not (tmp_path / "m.pt").exists()


# -- 2. artifacts are verified before use -------------------------------------------------------------------
@pytest.fixture
def own_export(tiny_ckpt, tmp_path):
    return export(tiny_ckpt, ExportOptions(out=tmp_path / "own.export", max_refs=3)).path


def test_flipped_bytes_in_built_graphs_are_caught(own_export):
    build(own_export, BuildOptions(refs_opt=2))
    with open_session("ort", own_export):
        pass
    flip_byte(own_export / "ort_cpu" / "frame.onnx")
    with pytest.raises(GemxError, match="does not match the sha256 in its build record"):
        open_session("ort", own_export)


def test_a_corrupt_build_record_is_one_error(own_export):
    build(own_export, BuildOptions(refs_opt=2))
    (own_export / "ort_cpu" / "build.json").write_text("{not json")
    with pytest.raises(GemxError, match=r"build record .* is corrupt"):
        open_session("ort", own_export)


def test_a_damaged_cached_export_is_exported_again(tiny_ckpt, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    path, fresh = cached_export(ckpt, 4, 2, cache_dir=tmp_path)
    assert fresh
    flip_byte(path / "frame.onnx")
    path, fresh = cached_export(ckpt, 4, 2, cache_dir=tmp_path)
    assert fresh and read_export_dir(path)


def test_a_cached_export_from_older_graphs_is_exported_again(tiny_ckpt, tmp_path, monkeypatch):
    """After an upgrade that changes the graphs, profile/upscale must not measure the old ones from the cache."""
    import gemx.exporter.manifest as manifest

    ckpt = load_checkpoint(tiny_ckpt)
    monkeypatch.setattr(manifest, "GRAPHS_REVISION", manifest.GRAPHS_REVISION - 1)  # an export made by an older gemx
    path, fresh = cached_export(ckpt, 4, 2, cache_dir=tmp_path)
    assert fresh and read_export_dir(path).manifest["graphs_revision"] == manifest.GRAPHS_REVISION
    monkeypatch.undo()
    messages = []
    path, fresh = cached_export(ckpt, 4, 2, cache_dir=tmp_path, progress=messages.append)
    assert fresh and read_export_dir(path).manifest["graphs_revision"] == manifest.GRAPHS_REVISION
    assert any("older gemx" in m for m in messages)
    assert not cached_export(ckpt, 4, 2, cache_dir=tmp_path)[1]  # and kept from then on


def test_non_finite_weights_are_refused(tmp_path):
    model = build_model(preset("tiny"))
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", model)
    with pytest.raises(GemxError, match="non-finite weights"):
        load_checkpoint(tmp_path / "nan.pt")


def test_a_hand_raised_reference_limit_is_refused(own_export):
    m = json.loads((own_export / MANIFEST).read_text())
    m["refs"]["max"] = 50
    (own_export / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(GemxError, match="changed after export"):
        open_session("ort", own_export)


def test_an_export_with_another_cache_layout_is_refused_in_one_line(own_export):
    """An export by a gemx that laid the reference cache out differently (keys token-major, before this release) is
    refused by name instead of failing inside a runtime."""
    from gemx.exporter.manifest import content_sha256

    m = json.loads((own_export / MANIFEST).read_text())
    key = next(s for s in m["precisions"]["fp32"]["graphs"]["frame"]["inputs"] if s["name"] == "key_0")
    m_, c, refs, bb = key["shape"]
    key["shape"] = [m_, refs, bb, c]
    m["content_sha256"] = content_sha256(m)
    (own_export / MANIFEST).write_text(json.dumps(m))
    res = CliRunner().invoke(app, ["build", str(own_export)])
    assert res.exit_code == 1 and "exported by an older gemx" in res.output and "gemx export --force" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


# -- 3. bad values stop at the boundary ----------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda p: p["config"].update(block_size=0), "block_size must be a positive integer"),
    (lambda p: p["config"].update(block_size=-4), "block_size must be a positive integer"),
    (lambda p: p["config"].update(size="big"), "size must be a positive integer"),
    (lambda p: p["config"].update(size=0), "size must be a positive integer"),
    (lambda p: p.update(config=[1, 2]), "model config must be a mapping"),
    (lambda p: p.update(state_dict=[1, 2]), "no state dict of tensors"),
    (lambda p: p["state_dict"].update({k: torch.zeros(7, 7) for k in list(p["state_dict"])[-1:]}), "does not match its own config"),
])
def test_bad_checkpoints_are_one_line(tmp_path, tiny_ckpt, change, message):
    payload = torch.load(tiny_ckpt, weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / "bad.pt")
    res = cli("info", tmp_path / "bad.pt")
    assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("precisions"), "missing 'precisions'"),
    (lambda m: m["refs"].update(validated="1,2"), "positive integers"),
    (lambda m: m["model"].update(config={"size": "x"}), "size must be a positive integer"),
    (lambda m: m["precisions"]["fp32"]["graphs"].pop("frame"), "missing 'frame'"),
])
def test_hand_edited_manifests_are_one_line(own_export, edit, message):
    m = json.loads((own_export / MANIFEST).read_text())
    edit(m)
    m["content_sha256"] = gemx.exporter.manifest.content_sha256(m)  # edited by someone who knows the format
    (own_export / MANIFEST).write_text(json.dumps(m))
    res = cli("build", own_export)
    assert res.exit_code == 1 and message in res.output


@pytest.mark.parametrize("args, message", [
    (["export", "--block-size", "0"], "--block-size must be a positive integer"),
    (["profile", "--iters", "0"], "--iters must be a positive integer"),
    (["profile", "--threads", "-2"], "--threads must be a positive integer"),
    (["train", "--out", "x.pt", "--checkpoint-every", "0", "--videos", "."], "--checkpoint-every must be a positive integer"),
    (["train", "--out", "x.pt", "--batch-size", "0", "--videos", "."], "--batch-size must be a positive integer"),
    (["eval", "x.pt"], "--videos"),
])
def test_bad_options_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli(*args)
    assert res.exit_code == 1 and message in res.output


def test_eval_on_videos_shorter_than_its_protocol(tmp_path, tiny_ckpt):
    from gemx.video.io import write_video

    videos = tmp_path / "clips"
    for name in ("retalk5_woman_glasses", "other"):
        clip = (frames(30, 64, seed=1).numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
        write_video(videos / f"{name}.mp4", iter(clip), fps=25)
    res = cli("eval", tiny_ckpt, "--videos", videos)
    assert res.exit_code == 1 and "needs clips of at least 65 frames" in res.output


def test_the_session_api_refuses_nan_and_8_bit_frames(tiny_export):
    with open_session("ort", tiny_export.path) as s:
        refs = frames(2, 64).numpy()
        with pytest.raises(GemxError, match="NaN or Inf"):
            s.set_references(np.where(refs > 0.5, np.inf, refs))
        with pytest.raises(GemxError, match="divide 8-bit pixels by 255"):
            s.set_references((refs * 255).astype(np.uint8))
        with pytest.raises(GemxError, match=r"in \[0, 1\]"):
            s.set_references(refs * 255)
        s.set_references(refs)
        with pytest.raises(GemxError, match="NaN"):
            s(np.full((1, 3, 16, 16), np.nan, np.float32))


# -- 4. the operating system says no -------------------------------------------------------------------------
def test_output_paths_the_os_refuses_are_one_line(tmp_path, tiny_ckpt):
    (tmp_path / "file").write_text("x")
    res = cli("export", tiny_ckpt, "--out", tmp_path / "file" / "sub.export", "--max-refs", 2)
    assert res.exit_code == 1 and "cannot write" in res.output and "is a file, not a directory" in res.output
    (tmp_path / "out.mp4").mkdir()
    res = cli("upscale", tmp_path / "in.mp4", tmp_path / "out.mp4", "--simulate", "--ckpt", tiny_ckpt)
    assert res.exit_code == 1 and "it is a directory" in res.output


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_ckpt, tmp_path):
    """The file-size limit makes the kernel refuse writes (EFBIG) as a full disk would (ENOSPC)."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "from gemx.cli import main; sys.argv = ['gemx'] + sys.argv[1:]; main()")
    out = tmp_path / "big.export"
    res = subprocess.run([sys.executable, "-c", code, "export", str(tiny_ckpt), "--out", str(out), "--max-refs", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "cannot write" in res.stderr and "file too large" in res.stderr
    assert not out.exists() and siblings(out) == []
    assert resource.getrlimit(resource.RLIMIT_FSIZE)  # the limit applied to the child only


def test_an_image_claiming_40000_pixels_square_is_one_line(tmp_path, tiny_ckpt):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "huge.png").write_bytes(png)
    from gemx.video.io import write_video

    clip = (frames(4, 16, seed=1).numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    write_video(tmp_path / "lr.mp4", iter(clip), fps=25)
    res = cli("upscale", tmp_path / "lr.mp4", tmp_path / "o.mp4", "--references", refs, "--ckpt", tiny_ckpt, "--runtime", "ort")
    assert res.exit_code == 1 and "cannot read reference image" in res.output and "huge.png" in res.output
    assert not (tmp_path / "o.mp4").exists()


# -- 5. messages keep their words ----------------------------------------------------------------------------
def test_messages_are_printed_literally(tmp_path):
    res = cli("info", tmp_path / "run[final].pt")
    assert res.exit_code == 1 and "run[final].pt" in res.output


def test_a_pickled_file_says_it_is_not_a_weights_only_file(tmp_path):
    torch.save({"format": "gemx-checkpoint", "model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    res = cli("info", tmp_path / "pickled.pt")
    assert res.exit_code == 1 and "not a weights-only PyTorch file" in res.output


# -- 6. exports carry nothing of the exporting machine -------------------------------------------------------
def test_exports_are_reproducible_and_carry_no_machine_paths(tiny_ckpt, tmp_path):
    outs = []
    for where in ("a", "b/deeper"):
        ckpt = tmp_path / where / "tiny.pt"
        ckpt.parent.mkdir(parents=True)
        shutil.copy(tiny_ckpt, ckpt)
        outs.append(export(ckpt, ExportOptions(out=ckpt.parent / "x.export", max_refs=2)).path)
    for graph in ("reference_encoder.onnx", "frame.onnx"):
        a, b = (o / graph for o in outs)
        assert sha256(a) == sha256(b)
        data = a.read_bytes()
        assert str(Path(gemx.__file__).parent).encode() not in data and str(tmp_path).encode() not in data
        assert not any(n.metadata_props for n in onnx.load(str(a)).graph.node)
    ma, mb = (json.loads((o / MANIFEST).read_text()) for o in outs)
    assert ma["precisions"] == mb["precisions"] and ma["content_sha256"] == mb["content_sha256"]


def test_a_stop_request_refuses_every_later_commit(tmp_path):
    """The signal handler's KeyboardInterrupt can be lost (raised inside a finalizer); the flag is not."""
    gemx.fs.request_stop()
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / "f.json", lambda tmp: tmp.write_text("{}"))
        with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
        assert sorted(os.listdir(tmp_path)) == []
    finally:
        gemx.fs.stop_handled()
    atomic_write(tmp_path / "f.json", lambda tmp: tmp.write_text("{}"))
    assert (tmp_path / "f.json").exists()

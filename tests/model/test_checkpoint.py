import json
import pickle

import pytest
import torch

from gemx import GemxError
from gemx.model import load_checkpoint


def test_roundtrip_keeps_weights_config_and_meta(tiny_ckpt, tiny_model):
    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt.config == tiny_model.config
    assert ckpt.meta == {"note": "test"}
    torch.testing.assert_close(ckpt.model.log_temperature, torch.tensor([0.3, -0.2, 0.5]))


def test_missing_file(tmp_path):
    with pytest.raises(GemxError, match=r"nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tiny_ckpt, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_ckpt.read_bytes()[:2000])
    with pytest.raises(GemxError, match=r"cut\.pt is truncated or corrupt"):
        load_checkpoint(cut)


def test_garbage_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(GemxError, match=r"bad\.pt"):
        load_checkpoint(bad)


def test_foreign_torch_file(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(GemxError, match="not a gemx checkpoint"):
        load_checkpoint(foreign)


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_refused_not_run(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "gemx-checkpoint", "x": Payload()}, evil, pickle_module=pickle)
    with pytest.raises(GemxError, match=r"evil\.pt is not a gemx checkpoint"):
        load_checkpoint(evil)
    assert "code ran" not in capsys.readouterr().out


def test_info_cli_describes_preset_and_checkpoint(tiny_ckpt):
    from typer.testing import CliRunner

    from gemx.cli import app

    res = CliRunner().invoke(app, ["info", "--preset", "tiny", "--refs", "2", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["refs"] == 2 and d["parameters"]["total"] > 0
    assert d["flops"]["attend_and_decode"] > 0 and d["flops"]["encode_references"] > 0
    res = CliRunner().invoke(app, ["info", str(tiny_ckpt), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["config"]["preset"] == "tiny"


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from gemx.cli import app

    res = CliRunner().invoke(app, ["info", str(tmp_path / "missing.pt")])
    assert res.exit_code == 1
    assert "does not exist" in res.output and "Traceback" not in res.output

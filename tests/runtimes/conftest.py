import pytest

from gemx.exporter.export import ExportOptions, export


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """One FP32+FP16 export of a tiny checkpoint, shared by the exporter and runtime tests."""
    import torch

    from gemx.model import build_model, preset, save_checkpoint

    torch.manual_seed(1)
    model = build_model(preset("tiny"))
    with torch.no_grad():
        model.log_temperature.copy_(torch.tensor([0.3, -0.2, 0.5]))
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(root / "tiny.pt", model)
    return export(root / "tiny.pt", ExportOptions(out=root / "tiny.export", fp16=True, max_refs=12))

"""The ONNX export of eps_theta and the schedule JSON the browser demo reads."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from ddpm_tutorial import export
from ddpm_tutorial.checkpoint import model_from_checkpoint
from ddpm_tutorial.sampling import ddim_timesteps

pytest.importorskip("onnx", reason="torch's ONNX exporter needs the onnx package (the book extra)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test-only dependency (the test extra)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped checkpoint exported once for the module: (model, schedule, info, ONNX session)."""
    out = tmp_path_factory.mktemp("export")
    info = export.export_demo(out)
    model, schedule, _ = model_from_checkpoint(None)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return model, schedule, info, session, out


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_matches_pytorch(exported, batch):
    """Random x_t and random timesteps (the ends 0 and T-1 included): ONNX Runtime and PyTorch
    agree to 1e-4 at several batch sizes, so the batch axis really is dynamic."""
    model, schedule, _, session, _ = exported
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.randint(0, schedule.T, (batch,), generator=g)
    t[0] = schedule.T - 1 if batch > 1 else t[0]
    t[-1] = 0
    eps_onnx = session.run(["eps"], {"x_t": x.numpy(), "t": t.numpy()})[0]
    with torch.no_grad():
        eps_torch = model(x, t).numpy()
    assert eps_onnx.shape == (batch, 1, 28, 28)
    np.testing.assert_allclose(eps_onnx, eps_torch, rtol=0, atol=1e-4)


def test_attention_network_keeps_batch_dynamic(tmp_path):
    """Self-attention reshapes by the batch size (B, HW, C): the traced graph must read B
    from its input, not keep the example's 2."""
    from ddpm_tutorial.unet import UNet
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention=True).eval()
    export.export_onnx(model, tmp_path / "attn.onnx")
    session = ort.InferenceSession(str(tmp_path / "attn.onnx"), providers=["CPUExecutionProvider"])
    x, t = torch.randn(5, 1, 28, 28), torch.tensor([0, 10, 500, 998, 999])
    with torch.no_grad():
        expected = model(x, t).numpy()
    np.testing.assert_allclose(session.run(["eps"], {"x_t": x.numpy(), "t": t.numpy()})[0],
                               expected, rtol=0, atol=1e-4)


def test_graph_inputs_and_dynamic_batch(exported):
    _, _, _, session, _ = exported
    inputs = {i.name: i for i in session.get_inputs()}
    assert set(inputs) == {"x_t", "t"}
    assert inputs["x_t"].type == "tensor(float)" and inputs["t"].type == "tensor(int64)"
    assert isinstance(inputs["x_t"].shape[0], str), "the batch axis must be symbolic"
    assert inputs["x_t"].shape[1:] == [1, 28, 28]


def test_schedule_json(exported):
    """The JSON holds the sampler's own numbers: bar-alpha_t exactly as float32, and tau from
    ddim_timesteps for every step count the page offers."""
    _, schedule, info, _, out = exported
    on_disk = json.loads((out / "schedule.json").read_text())
    assert on_disk["T"] == schedule.T == len(on_disk["alpha_bar"])
    np.testing.assert_array_equal(np.asarray(on_disk["alpha_bar"], dtype=np.float32),
                                  schedule.alpha_bar.numpy())
    lo, hi = on_disk["steps_range"]
    assert (lo, hi) == export.STEPS_RANGE
    for n in (lo, 7 if lo <= 7 <= hi else lo, 50, hi):
        assert on_disk["ddim_timesteps"][str(n)] == ddim_timesteps(schedule.T, n)
    assert on_disk["export_key"] == export.export_key()


def test_export_demo_reuses_files(exported):
    """A second call with the same checkpoint exports nothing (the book build relies on it)."""
    *_, out = exported
    before = (out / "model.onnx").stat().st_mtime_ns
    export.export_demo(out)
    assert (out / "model.onnx").stat().st_mtime_ns == before


def test_schedule_coefficients_rejects_bad_range(exported):
    _, schedule, *_ = exported
    with pytest.raises(ValueError, match="steps_range"):
        export.schedule_coefficients(schedule, steps_range=(0, 10))
    with pytest.raises(ValueError, match="steps_range"):
        export.schedule_coefficients(schedule, steps_range=(10, schedule.T + 1))


def test_cli_subcommand(tmp_path, capsys):
    """``export-onnx`` as the CLI registers it: --out and --schedule-json are written."""
    parser = argparse.ArgumentParser()
    export.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export-onnx", "--out", str(tmp_path / "m.onnx"),
                              "--schedule-json", str(tmp_path / "s" / "sched.json")])
    args.func(args)
    assert (tmp_path / "m.onnx").stat().st_size > 100_000
    assert json.loads((tmp_path / "s" / "sched.json").read_text())["T"] == 1000
    assert "m.onnx" in capsys.readouterr().out


def test_conditional_network_takes_the_class(tmp_path):
    """The page's network (chapter 8's conditional one): a third input y, the null class K
    included, agrees with PyTorch; schedule.json names the classes and the null class."""
    from ddpm_tutorial.checkpoint import shipped_checkpoint_path
    from ddpm_tutorial.data import CLASSES
    ckpt = shipped_checkpoint_path(export.DEMO_CHECKPOINT)
    info = export.export_demo(tmp_path, checkpoint=ckpt)
    model, _, _ = model_from_checkpoint(ckpt)
    K = model.config.num_classes
    assert (info["num_classes"], info["null_class"], info["class_names"]) == (K, K, list(CLASSES))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x_t", "t", "y"]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 28, 28, generator=g), torch.tensor([999, 500, 20, 0])
    y = torch.tensor([7, K, 0, K])                     # classes and the null class, mixed in one batch
    with torch.no_grad():
        expected = model(x, t, y).numpy()
    got = session.run(["eps"], {"x_t": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # the class changes the output: the input is wired, not folded into a constant
    other = session.run(["eps"], {"x_t": x.numpy(), "t": t.numpy(), "y": np.full(4, 3, np.int64)})[0]
    assert np.abs(other - got).max() > 1e-3


def test_class_names_must_match_the_network():
    from ddpm_tutorial.config import ModelConfig
    assert export.class_info(ModelConfig()) == {}
    three = ModelConfig(num_classes=3)
    assert export.class_info(three)["class_names"] == ["class 0", "class 1", "class 2"]
    with pytest.raises(ValueError, match="3 classes"):
        export.class_info(three, ["a", "b"])

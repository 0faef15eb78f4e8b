"""Tests for model.py: AttentionResUNet, AttentionGate, prediction and save/load."""
import re

import pytest
import torch

from model import (AttentionGate, AttentionResUNet, fuse_for_inference, load_model, save_model,
                   select_device)

torch.set_num_threads(1)


def small_net(**kwargs):
    params = dict(in_channels=3, depth=2, base_filters=4, dropout_rate=0.1)
    params.update(kwargs)
    torch.manual_seed(0)
    return AttentionResUNet(**params)


# --------------------------------------------------------------------------- #
# Shapes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("size", [(37, 53), (16, 16), (9, 8)])
@pytest.mark.parametrize("in_channels", [3, 5])
def test_output_shape(depth, size, in_channels):
    net = small_net(in_channels=in_channels, depth=depth).eval()
    x = torch.rand(2, in_channels, *size)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 1, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_output_shape_several_classes_train_mode():
    net = small_net(n_classes=2, depth=3).train()
    out = net(torch.rand(2, 3, 21, 19))
    assert out.shape == (2, 2, 21, 19)


def test_depth_below_one_raises():
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        AttentionResUNet(depth=0)


def test_architecture_recorded():
    net = AttentionResUNet(in_channels=5, n_classes=1, depth=2, base_filters=8, dropout_rate=0.2, input_skip=False)
    assert net.architecture == dict(in_channels=5, n_classes=1, depth=2, base_filters=8, dropout_rate=0.2,
                                    input_skip=False, output="logits", skip_merge="add", shortcut_norm=False)
    assert net.input_skip_gain is None


@pytest.mark.parametrize("skip_merge, shortcut_norm", [("add", False), ("concat", True), ("add", True)])
def test_skip_merge_and_shortcut_norm_build_the_network_they_name(skip_merge, shortcut_norm):
    """'concat' decoders see twice the level's width (upsampled + gated skip), 'add' decoders the width
    itself (so their shortcut is the identity); a projection shortcut has BatchNorm only when asked."""
    net = small_net(in_channels=5, depth=2, base_filters=4, skip_merge=skip_merge, shortcut_norm=shortcut_norm)
    widths = [4, 8, 16]
    for decoder, width in zip(net.decoders, reversed(widths[:-1])):
        assert decoder.conv1.in_channels == (2 * width if skip_merge == "concat" else width)
        assert isinstance(decoder.shortcut, torch.nn.Identity) == (skip_merge == "add")
    projection = net.encoders[0].shortcut  # 5 -> 4 channels: always a projection
    if shortcut_norm:
        assert isinstance(projection, torch.nn.Sequential) and isinstance(projection[1], torch.nn.BatchNorm2d)
    else:
        assert isinstance(projection, torch.nn.Conv2d) and projection.bias is not None
    net.train()
    out = net(torch.rand(2, 5, 20, 12))
    out.mean().backward()
    assert out.shape == (2, 1, 20, 12)
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("skip_merge, shortcut_norm", [("add", False), ("concat", True)])
def test_fused_network_has_no_batchnorm_and_the_same_outputs(skip_merge, shortcut_norm):
    net = small_net(in_channels=5, skip_merge=skip_merge, shortcut_norm=shortcut_norm).train()
    for _ in range(3):  # BatchNorm running statistics and affine terms off their defaults
        net(torch.rand(4, 5, 16, 16) * 2)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias)
    net.eval()
    fused = fuse_for_inference(net)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in fused.modules())
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in net.modules())  # the model is untouched
    x = torch.rand(3, 5, 21, 18)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)


def test_unknown_skip_merge_raises():
    with pytest.raises(ValueError, match="skip_merge must be one of add, concat, got 'sum'"):
        AttentionResUNet(skip_merge="sum")


def test_input_skip_adds_gain_times_centre_plane():
    """With a zeroed head, the logits are exactly gain * (2 * centre - 1) of the centre channel."""
    net = small_net(in_channels=5).eval()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    x = torch.rand(2, 5, 12, 10)
    with torch.no_grad():
        out = net(x)
    assert net.input_skip_gain.item() == pytest.approx(4.0)
    assert torch.allclose(out, 4.0 * (2.0 * x[:, 2:3] - 1.0))


def test_input_skip_disabled_ignores_centre_when_head_zero():
    net = small_net(input_skip=False).eval()
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(0.25)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 8, 8))
    assert torch.all(out == 0.25)


# --------------------------------------------------------------------------- #
# AttentionGate
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("x_size,g_size", [((10, 12), (5, 6)), ((11, 13), (6, 7)), ((8, 8), (3, 3))])
def test_attention_gate_mask(x_size, g_size):
    torch.manual_seed(0)
    gate = AttentionGate(skip_channels=6, gate_channels=10, inter_channels=3).train()
    x = torch.randn(2, 6, *x_size)
    g = torch.randn(2, 10, *g_size)
    with torch.no_grad():
        gated, mask = gate(x, g)
    assert mask.shape == (2, 1, *x_size)
    assert gated.shape == x.shape
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    assert float(mask.max() - mask.min()) > 0  # not a constant mask
    assert torch.allclose(gated, x * mask)


# --------------------------------------------------------------------------- #
# Gradients
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("depth", [1, 3])
def test_gradients_reach_every_parameter(depth):
    net = small_net(depth=depth).train()
    x = torch.rand(2, 3, 16, 16)
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), target)
    loss.backward()
    names = [name for name, _ in net.named_parameters()]
    assert "input_skip_gain" in names
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        # The bias of the 1x1 conv right before psi's BatchNorm is cancelled by the
        # batch mean in train mode: its gradient is (numerically) zero by design.
        if not name.endswith("psi.0.bias"):
            assert param.grad.abs().max() > 0, name


# --------------------------------------------------------------------------- #
# select_device
# --------------------------------------------------------------------------- #
def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected


# --------------------------------------------------------------------------- #
# save_model / load_model
# --------------------------------------------------------------------------- #
def test_save_load_round_trip(tmp_path):
    net = small_net(in_channels=5, depth=2)
    net.train()
    net(torch.rand(4, 5, 16, 16))  # move BatchNorm running statistics off their defaults
    net.eval()
    config = {"factor": 4, "train_z_size": 5, "train_xy_size": 64, "upscale_method": "linear",
              "orientations": ["y", "x"], "tta_flips": True, "probability_threshold": 0.5}
    path = save_model(tmp_path / "models" / "net.pt", net, config)
    assert path.is_file()
    loaded, loaded_config = load_model(path, device="cpu")
    assert isinstance(loaded, AttentionResUNet)
    assert not loaded.training
    assert loaded.architecture == net.architecture
    assert loaded_config == config
    x = torch.rand(2, 5, 19, 23)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_saved_before_the_architecture_keys_loads_as_the_network_it_was(tmp_path):
    """Checkpoints written before SKIP_MERGE / SHORTCUT_NORM existed hold a concatenating network with
    BatchNorm on its shortcuts and no such keys: they must load as that network, with the same outputs."""
    old_net = small_net(in_channels=5, skip_merge="concat", shortcut_norm=True)
    old_net.train()
    old_net(torch.rand(4, 5, 16, 16))  # BatchNorm running statistics off their defaults
    old_net.eval()
    architecture = {key: value for key, value in old_net.architecture.items()
                    if key not in ("skip_merge", "shortcut_norm")}
    path = tmp_path / "old.pt"
    torch.save({"format": "axial-sr-model/1", "architecture": architecture, "config": {"factor": 4},
                "state_dict": old_net.state_dict()}, path)
    loaded, _ = load_model(path, device="cpu")
    assert loaded.architecture["skip_merge"] == "concat" and loaded.architecture["shortcut_norm"] is True
    x = torch.rand(2, 5, 19, 23)
    with torch.no_grad():
        assert torch.equal(old_net(x), loaded(x))


def test_save_refuses_to_overwrite(tmp_path):
    net = small_net()
    path = save_model(tmp_path / "net.pt", net, {"factor": 2})
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(path, net, {"factor": 3})
    assert load_model(path)[1] == {"factor": 2}
    save_model(path, net, {"factor": 3}, overwrite=True)
    assert load_model(path)[1] == {"factor": 3}


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(missing)


@pytest.mark.parametrize("content", [{"weights": 1}, torch.zeros(3), {"format": "other/1", "state_dict": {}}])
def test_load_torch_file_that_is_not_a_model(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match="is not a model saved by this project"):
        load_model(path)


def test_load_non_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, not a model")
    with pytest.raises(ValueError, match="is not a model saved by this project"):
        load_model(path)

"""rRCM network: EDM grid, N(k) schedule, RRCMNet shapes and round trip, SigmaConditioned."""

import math

import pytest
import torch

from rcm.checkpoint import save_checkpoint
from rcm.errors import CheckpointError, ConfigError
from rcm.models import load_model
from rcm.models.vit import (RRCMNet, SigmaConditioned, classifier_from_encoder, edm_grid,
                            nearest_grid_index, num_grid_points)

TINY = dict(image_size=8, in_channels=1, patch_size=4, dim=16, depth=1, heads=2, mlp_ratio=2.0,
            proj_dim=8, proj_hidden=16)


def tiny(**kw) -> RRCMNet:
    torch.manual_seed(0)
    return RRCMNet(**{**TINY, **kw})


def test_edm_grid_endpoints_and_monotonic():
    for n in (21, 41, 81):
        g = edm_grid(n)
        assert g.shape == (n,)
        assert g[0].item() == 80.0 and g[-1].item() == 0.002
        assert bool((g[1:] < g[:-1]).all())
    # interior points follow the rho = 7 formula
    g = edm_grid(21)
    expected = (80 ** (1 / 7) + 10 / 20 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert g[10].item() == pytest.approx(expected, rel=1e-12)


def test_num_grid_points_schedule():
    total = 100
    k_prime = math.ceil(total / math.log2(5))          # 44
    assert k_prime == 44
    assert num_grid_points(0, total) == 21
    assert num_grid_points(1, total) == 41
    assert num_grid_points(k_prime, total) == 41
    assert num_grid_points(k_prime + 1, total) == 81
    assert num_grid_points(total - 1, total) == 81
    values = [num_grid_points(k, total) for k in range(total)]
    assert sorted(set(values)) == [21, 41, 81] and values == sorted(values)


def test_shapes_and_missing_parts():
    net = tiny(num_classes=10)
    x = torch.randn(5, 1, 8, 8)
    h = net.representation(x, 0.5)
    assert h.shape == (5, 16)
    assert net.project(h).shape == (5, 8)
    assert net(x, torch.full((5,), 0.5)).shape == (5, 10)
    with pytest.raises(ConfigError):
        tiny()(x, 0.5)                       # no head
    with pytest.raises(ConfigError):
        tiny(proj_dim=0).project(h)          # no projector
    with pytest.raises(ConfigError):
        RRCMNet(**{**TINY, "patch_size": 3})


def test_noise_level_conditions_the_output():
    net = tiny().eval()
    x = torch.randn(3, 1, 8, 8)
    assert not torch.allclose(net.representation(x, 0.5), net.representation(x, 1.0))
    # per-sample levels equal the scalar call sample by sample
    levels = torch.tensor([0.5, 1.0, 0.5])
    h = net.representation(x, levels)
    torch.testing.assert_close(h[1], net.representation(x[1:2], 1.0)[0])
    torch.testing.assert_close(h[0], net.representation(x[:1], 0.5)[0])


def test_save_load_identical_logits(tmp_path):
    net = tiny(num_classes=10, proj_dim=0).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, kind="rrcm", model_config=net.config, model_state=net.state_dict(), step=3)
    loaded, payload = load_model(path)
    assert isinstance(loaded, RRCMNet) and payload["step"] == 3 and loaded.config == net.config
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(SigmaConditioned(loaded, 0.5)(x), SigmaConditioned(net, 0.5)(x),
                                   rtol=0, atol=0)


def test_checkpoint_errors_name_the_file(tmp_path):
    net = tiny()
    wrong = tmp_path / "classifier.pt"
    save_checkpoint(wrong, kind="classifier", model_config={}, model_state={}, step=0)
    with pytest.raises(CheckpointError, match="classifier.pt.*expected a rrcm"):
        load_model(wrong, kind="rrcm")
    good = tmp_path / "rrcm.pt"
    save_checkpoint(good, kind="rrcm", model_config=net.config, model_state=net.state_dict(), step=0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_model(truncated, kind="rrcm")
    # a config/state mismatch (another depth) is also named
    other = tmp_path / "other.pt"
    save_checkpoint(other, kind="rrcm", model_config={**net.config, "depth": 2},
                    model_state=net.state_dict(), step=0)
    with pytest.raises(CheckpointError, match="other.pt"):
        load_model(other)


def test_sigma_conditioned_picks_nearest_grid_level():
    net = tiny(num_classes=4).eval()
    grid = edm_grid(81)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        f = SigmaConditioned(net, sigma)
        gaps = (grid - 2 * sigma).abs()
        assert f.grid_index == int(gaps.argmin()) == nearest_grid_index(2 * sigma)
        assert gaps[f.grid_index] <= gaps.min() + 1e-12
        assert f.grid_sigma == pytest.approx(grid[f.grid_index].item())
        # both neighbours are farther from 2 sigma
        assert abs(grid[f.grid_index - 1] - 2 * sigma) >= abs(f.grid_sigma - 2 * sigma)
        assert abs(grid[f.grid_index + 1] - 2 * sigma) >= abs(f.grid_sigma - 2 * sigma)
    assert SigmaConditioned(net, 0.0).grid_sigma == pytest.approx(0.002)
    # it maps [0, 1] pixels to [-1, 1] and calls the net at that level
    x = torch.rand(4, 1, 8, 8)
    f = SigmaConditioned(net, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(f(x), net(2 * x - 1, f.grid_sigma))


def test_classifier_from_encoder_keeps_the_representation():
    enc = tiny().eval()
    clf = classifier_from_encoder(enc, 10).eval()
    assert clf.projector is None and clf.head.out_features == 10
    assert clf.config["proj_dim"] == 0 and clf.config["num_classes"] == 10
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(clf.representation(x, 0.3), enc.representation(x, 0.3))

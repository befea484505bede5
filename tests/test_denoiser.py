"""Denoiser: schedule, t*, one-shot denoising, checkpoints, diffusers import, and the train-denoiser stage."""

from __future__ import annotations

import json

import pytest
import torch

from crafted import RunsCode
from rcm import cli, paths
from rcm.checkpoint import save_checkpoint
from rcm.data import prepare
from rcm.errors import CheckpointError, ConfigError
from rcm.models import load_model
from rcm.models.classifier import Classifier
from rcm.models.denoiser import DenoisedClassifier, Denoiser, load_pretrained, make_betas

TINY = dict(block_out_channels=[8, 16], norm_num_groups=4)


def tiny(**kw) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(**{**TINY, **kw}).eval()


def test_shapes():
    model = tiny(in_channels=3, image_size=16)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 999])
    assert model.q_sample(x0, t, torch.randn_like(x0)).shape == (2, 3, 16, 16)
    assert model.eps(x0, t).shape == (2, 3, 16, 16)
    out = model.denoise_one_shot(torch.rand(2, 3, 16, 16) + 0.5 * torch.randn(2, 3, 16, 16), 0.5)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_q_sample_is_the_forward_process():
    model = tiny()
    x0, noise = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 10, 500])
    a = model.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(model.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


@pytest.mark.parametrize("schedule, T, expected", [("squaredcos_cap_v2", 4000, [1158, 1984, 2809]),
                                                   ("linear", 1000, [145, 259, 396])])
def test_t_star_reproduces_the_reference_values(schedule, T, expected):
    model = tiny(beta_schedule=schedule, num_train_timesteps=T)
    assert [model.t_star(s) for s in (0.25, 0.5, 1.0)] == expected
    assert model.t_star(0.0) == 0
    with pytest.raises(ConfigError, match="beyond"):
        model.t_star(1e6)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(schedule):
    from diffusers import DDPMScheduler

    ours = torch.cumprod(1 - make_betas(1000, schedule, 1e-4, 0.02), 0)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule).alphas_cumprod.double()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
def test_one_shot_returns_the_clean_image_when_eps_is_the_true_noise(sigma):
    model = tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.rand((4, 1, 8, 8), generator=g) * 0.8 + 0.1
    delta = torch.randn((4, 1, 8, 8), generator=g)
    t = model.t_star(sigma)
    a = model.alphas_cumprod[t]
    # x_t = sqrt(a) (2x - 1 + 2 sigma delta) = sqrt(a) x0 + sqrt(1 - a) eps  =>  eps = sqrt(a/(1-a)) 2 sigma delta
    true_eps = (a / (1 - a)).sqrt() * 2 * sigma * delta
    seen = []
    model.eps = lambda x_t, tt: seen.append(tt) or true_eps
    torch.testing.assert_close(model.denoise_one_shot(x + sigma * delta, sigma), x, atol=1e-5, rtol=0)
    assert seen == [t]


def test_learned_variance_output_uses_the_first_channels():
    model = tiny(in_channels=3, out_channels=6, image_size=8)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    torch.testing.assert_close(model.eps(x, t), model.unet(x, t).sample[:, :3])


def test_v_prediction_is_converted_to_eps():
    model = tiny(prediction_type="v_prediction")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 700])
    v = model.unet(x, t).sample
    a = model.alphas_cumprod[t].view(2, 1, 1, 1)
    torch.testing.assert_close(model.eps(x, t), a.sqrt() * v + (1 - a).sqrt() * x)


def test_save_load_gives_identical_eps(tmp_path):
    model = tiny(beta_schedule="squaredcos_cap_v2", num_train_timesteps=4000)
    path = tmp_path / "den.pt"
    save_checkpoint(path, kind="denoiser", model_config=model.config, model_state=model.state_dict(), step=3)
    loaded, _ = load_model(path, kind="denoiser")
    assert loaded.config == model.config
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 1158, 3999])
    assert torch.equal(loaded.eps(x, t), model.eps(x, t))
    assert loaded.t_star(0.5) == 1984


def test_other_architecture_or_truncated_file_names_the_file(tmp_path):
    model = tiny()
    path = tmp_path / "wider.pt"
    save_checkpoint(path, kind="denoiser", model_config={**model.config, "block_out_channels": [16, 32]},
                    model_state=model.state_dict(), step=0)
    with pytest.raises(CheckpointError, match="wider.pt"):
        load_model(path)
    good = tmp_path / "den.pt"
    save_checkpoint(good, kind="denoiser", model_config=model.config, model_state=model.state_dict(), step=0)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_model(cut)


def test_a_few_steps_lower_the_ddpm_loss():
    model = tiny().train()
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def fixed_loss():  # same t and noise every time, so the comparison is not noise
        return model.loss(x0, torch.Generator().manual_seed(0))
    first = fixed_loss().item()
    for step in range(15):
        loss = model.loss(x0, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss().item() < 0.8 * first


def test_denoised_classifier_resizes_to_the_classifier():
    den = tiny()
    clf = Classifier(image_size=16, width=8).eval()
    net = DenoisedClassifier(den, clf, 0.25).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        logits = net(x)
        expected = clf(torch.nn.functional.interpolate(den.denoise_one_shot(x, 0.25), size=(16, 16),
                                                       mode="bicubic", align_corners=False, antialias=True))
    assert logits.shape == (5, 10)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ConfigError):
        DenoisedClassifier(den, clf, 500.0)


# ----------------------------------------------------------------------------- diffusers import

def _reference_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=4).eval()


def _assert_same_eps(model: Denoiser, unet):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 300])
    with torch.no_grad():
        torch.testing.assert_close(model.eps(x, t), unet(x, t).sample, atol=0, rtol=0)


def test_import_a_unet_folder_with_and_without_scheduler(tmp_path):
    from diffusers import DDPMScheduler

    unet = _reference_unet()
    unet.save_pretrained(tmp_path / "bare")
    model = load_pretrained(tmp_path / "bare", schedule={"num_train_timesteps": 1000})
    _assert_same_eps(model, unet)
    assert model.config["beta_schedule"] == "linear" and model.t_star(0.25) == 145
    assert model.config["unet_extra"]["attention_head_dim"] == 4

    unet.save_pretrained(tmp_path / "with_sched")
    DDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        tmp_path / "with_sched")
    model = load_pretrained(tmp_path / "with_sched")
    _assert_same_eps(model, unet)
    assert model.num_timesteps == 4000 and model.t_star(1.0) == 2809


def test_import_a_pipeline_folder_and_round_trip_the_checkpoint(tmp_path):
    from diffusers import DDPMScheduler

    unet = _reference_unet()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(tmp_path / "pipe" / "scheduler")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    model = load_pretrained(tmp_path / "pipe")
    _assert_same_eps(model, unet)
    path = tmp_path / "den.pt"
    save_checkpoint(path, kind="denoiser", model_config=model.config, model_state=model.state_dict(), step=0)
    loaded, _ = load_model(path)
    _assert_same_eps(loaded, unet)


def test_import_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        load_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bad"):
        load_pretrained(bad)
    noweights = tmp_path / "noweights"
    _reference_unet().save_pretrained(noweights)
    for f in noweights.glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="noweights"):
        load_pretrained(noweights)
    cond = tmp_path / "cond"
    cond.mkdir()
    (cond / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="UNet2DConditionModel"):
        load_pretrained(cond)


def test_a_diffusers_folder_with_a_crafted_bin_is_refused_before_anything_runs(tmp_path):
    """diffusers reads a .bin with torch.load(weights_only=True) (and never looks for code in a folder
    loaded with local_files_only): a crafted weights file is refused in one line, unrun."""
    folder, marker = tmp_path / "unet", tmp_path / "ran"
    _reference_unet().save_pretrained(folder)
    for f in folder.glob("diffusion_pytorch_model*"):
        f.unlink()
    torch.save({"x": RunsCode(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unet holds weights with Python objects besides tensors: refused"):
        load_pretrained(folder)
    assert not marker.exists()
    torch.load(folder / "diffusion_pytorch_model.bin", weights_only=False)  # the control: the file is live
    assert marker.exists()


# ----------------------------------------------------------------------------- the stage

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    prepare("digits", root)
    return root


def test_cli_train_denoiser(digits):
    argv = ["train-denoiser", "--dataset", "digits", "--results", str(digits), "--steps", "3",
            "--batch_size", "16", "--block_out_channels", "8", "16", "--norm_num_groups", "4",
            "--eval_every", "2", "--checkpoint_every", "2", "--eval_sigmas", "0.5"]
    assert cli.main(argv) == 0
    out = paths.denoiser(digits, "digits")
    model, payload = load_model(out, kind="denoiser", use_ema=True)
    assert payload["step"] == 3 and payload["ema"] is not None
    assert model.config["block_out_channels"] == [8, 16] and payload["config"]["pretrained"] == ""
    rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and "mse_sigma_0.5" in rows[-1]


def test_cli_import_pretrained(digits, tmp_path):
    unet = _reference_unet()
    unet.save_pretrained(tmp_path / "ddpm" / "unet")
    argv = ["train-denoiser", "--dataset", "digits", "--results", str(digits), "--pretrained",
            str(tmp_path / "ddpm"), "--num_train_timesteps", "4000", "--beta_schedule", "squaredcos_cap_v2"]
    assert cli.main(argv) == 0  # no scheduler/ folder: the schedule flags apply
    model, payload = load_model(paths.denoiser(digits, "digits"), use_ema=True)
    _assert_same_eps(model, unet)
    assert model.t_star(0.25) == 1158 and payload["origin"]["format"] == "diffusers"
    assert payload["origin"]["source"] == "ddpm" and payload["config"] == {"imported": True}


def test_cli_import_missing_path_fails_cleanly(digits, tmp_path, capsys):
    argv = ["train-denoiser", "--dataset", "digits", "--results", str(digits),
            "--pretrained", str(tmp_path / "absent")]
    assert cli.main(argv) == 2
    assert "absent" in capsys.readouterr().err


def test_a_256_px_guided_unet_denoises_224_px_crops_and_the_pipeline_is_described():
    """As Carlini et al.'s ImageNet code does: the 224 px centre crop goes into the 256 px guided-diffusion
    UNet unchanged (convolutional, attention by downsampling rate), then 224 -> 512 for the classifier."""
    from rcm.importers.openai import GUIDED_DEFAULTS, denoiser_config, parse_flags
    from rcm.models.denoiser import DenoisedClassifier, Denoiser

    flags = parse_flags("--attention_resolutions 32,16,8 --image_size 256 --learn_sigma True --num_channels 32 "
                        "--num_head_channels 16 --num_res_blocks 1 --resblock_updown True "
                        "--use_scale_shift_norm True", GUIDED_DEFAULTS, "guided-diffusion")
    denoiser = Denoiser(**denoiser_config(flags, "guided-diffusion")).eval()
    classifier = Classifier(in_channels=3, num_classes=5, image_size=64, width=4, blocks=1, stages=2)
    model = DenoisedClassifier(denoiser, classifier, 0.5).eval()
    text = model.describe(224)
    assert "at 224 px (a 256 px model, run at the input's size)" in text
    assert "resize 224 -> 64 px, bicubic with antialiasing" in text and text.endswith("classify at 64 px")
    with torch.no_grad():
        assert model(torch.rand(2, 3, 224, 224)).shape == (2, 5)
    assert denoiser.downsampling == 32
    with pytest.raises(ConfigError, match="side must be a multiple of 32"):
        model.describe(200)


def test_t_star_is_computed_once_not_per_forward_pass(monkeypatch):
    """t* is a data-dependent search (nonzero + a host read): per forward pass it would break a compiled
    graph and synchronise a GPU once per batch. It is computed when the classifier is built, then kept."""
    calls = []
    nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or nonzero(*a, **k))
    den = tiny()
    net = DenoisedClassifier(den, Classifier(image_size=8, width=8).eval(), 0.25).eval()
    assert len(calls) == 1
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(2, 1, 8, 8))
    assert len(calls) == 1 and den.t_star(0.25) == 145 and den.t_star(0.5) == 259 and len(calls) == 2


def test_denoised_classifier_compiles_as_one_graph():
    """No graph break in the denoise-classify forward pass (fullgraph=True raises at the first one)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    net = DenoisedClassifier(tiny(), Classifier(image_size=8, width=8).eval(), 0.25).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(torch.compile(net, backend=counter, fullgraph=True)(x), expected)
    assert counter.frame_count == 1
    torch._dynamo.reset()

"""`rcm import-model`: the papers' checkpoints, written here in their real on-disk layouts, become rcm
checkpoints that compute the original function; bad input is one clear error and writes nothing."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from rcm.cli import main as cli
from rcm.errors import CheckpointError, ConfigError
from rcm.importers import import_model
from rcm.importers.openai import GUIDED_DEFAULTS, IMPROVED_DEFAULTS, denoiser_config, parse_flags
from rcm.models import load_model
from rcm.models.cohen import NORMALIZATION, CohenClassifier
from rcm.models.denoiser import DenoisedClassifier, Denoiser

FIXTURES = Path(__file__).parent / "fixtures"
CIFAR_MEAN, CIFAR_STD = NORMALIZATION["cifar10"]


class NormalizeLayer(torch.nn.Module):
    """As in Cohen et al.'s datasets.py: mean and std are plain attributes, so not in the state dict."""

    def __init__(self, means, sds):
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x):
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


def _randomise(module, seed=0):
    """Random weights and BN statistics, so that every parameter matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not torch.is_floating_point(t):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.1 if t.dim() > 1 else 0.2))
    return module


def _cohen_file(path, arch, net, wrap=False):
    """A checkpoint.pth.tar as their train.py writes it."""
    model = torch.nn.Sequential(NormalizeLayer(*NORMALIZATION["imagenet" if arch == "resnet50" else "cifar10"]),
                                torch.nn.DataParallel(net) if wrap else net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 90, "arch": arch, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return model.eval()


# ----------------------------------------------------------------------------- Cohen et al.

def test_cohen_resnet50_equals_torchvision_behind_their_normalisation(tmp_path):
    from torchvision.models import resnet50

    original = _cohen_file(tmp_path / "checkpoint.pth.tar", "resnet50", _randomise(resnet50(weights=None)), wrap=True)
    assert next(iter(original.state_dict())).startswith("1.module.")
    import_model("cohen", tmp_path / "checkpoint.pth.tar", tmp_path / "rn50.pt")
    model, payload = load_model(tmp_path / "rn50.pt", kind="classifier")
    x = torch.rand(2, 3, 64, 64) + 0.5 * torch.randn(2, 3, 64, 64)   # noisy, unclipped, as in certification
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), rtol=1e-5, atol=1e-5)
    assert payload["kind"] == "cohen_resnet" and model.config["image_size"] == 224
    assert payload["origin"]["details"]["dataset"] == "imagenet"


def _reference_cifar_resnet(state, x, n):
    """The bearpaw/Cohen CIFAR ResNet written out functionally from the state dict: conv-BN-ReLU, then
    3 stages of n post-activation basic blocks, 8x8 average pool, linear."""
    def bn(h, p):
        return F.batch_norm(h, state[p + ".running_mean"], state[p + ".running_var"],
                            state[p + ".weight"], state[p + ".bias"], False, 0.0, 1e-5)

    h = F.relu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"))
    for stage in (1, 2, 3):
        for b in range(n):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            out = F.relu(bn(F.conv2d(h, state[p + ".conv1.weight"], stride=stride, padding=1), p + ".bn1"))
            out = bn(F.conv2d(out, state[p + ".conv2.weight"], padding=1), p + ".bn2")
            if p + ".downsample.0.weight" in state:
                h = bn(F.conv2d(h, state[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
            h = F.relu(out + h)
    return F.linear(F.avg_pool2d(h, 8).flatten(1), state["fc.weight"], state["fc.bias"])


@pytest.mark.parametrize("arch,n,params", [("cifar_resnet20", 3, 272_474), ("cifar_resnet110", 18, 1_730_714)])
def test_cohen_cifar_resnets(tmp_path, arch, n, params):
    """Their ResNet-20/110 (0.27M/1.7M parameters, He et al. 2016's CIFAR table); logits equal the
    functional reference on the file's own weights, after their normalisation."""
    net = _randomise(CohenClassifier(arch=arch).net)
    _cohen_file(tmp_path / "checkpoint.pth.tar", arch, net)
    state = {k[2:]: v for k, v in torch.load(tmp_path / "checkpoint.pth.tar")["state_dict"].items()}
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == params
    import_model("cohen", tmp_path / "checkpoint.pth.tar", tmp_path / "c.pt")
    model, _ = load_model(tmp_path / "c.pt", kind="classifier")
    x = torch.rand(3, 3, 32, 32) + 0.25 * torch.randn(3, 3, 32, 32)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = _reference_cifar_resnet(state, (x - mean) / std, n)
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-4)


def test_cohen_errors_name_the_file_and_write_nothing(tmp_path):
    out = tmp_path / "out.pt"
    net = CohenClassifier(arch="cifar_resnet20").net
    _cohen_file(tmp_path / "rn20.pth.tar", "cifar_resnet20", net)
    # a ResNet-20 file that claims to be a ResNet-110: the missing blocks are named
    payload = torch.load(tmp_path / "rn20.pth.tar")
    torch.save({**payload, "arch": "cifar_resnet110"}, tmp_path / "liar.pth.tar")
    with pytest.raises(CheckpointError, match=r"liar.pth.tar does not fit.*missing keys \(layer1.3"):
        import_model("cohen", tmp_path / "liar.pth.tar", out)
    torch.save({**payload, "arch": "wide_resnet"}, tmp_path / "wide.pth.tar")
    with pytest.raises(CheckpointError, match="wide.pth.tar: unknown architecture 'wide_resnet'"):
        import_model("cohen", tmp_path / "wide.pth.tar", out)
    torch.save(payload["state_dict"], tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt is not a Cohen et al. checkpoint"):
        import_model("cohen", tmp_path / "bare.pt", out)
    with pytest.raises(ConfigError, match="--flags does not apply"):
        import_model("cohen", tmp_path / "rn20.pth.tar", out, flags="--image_size 32")
    with pytest.raises(CheckpointError, match="model file not found: .*nope.pth.tar"):
        import_model("cohen", tmp_path / "nope.pth.tar", out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- OpenAI diffusion

LAYOUTS = json.loads((FIXTURES / "openai_unet_layouts.json").read_text())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_papers_denoisers_have_the_original_parameter_names_and_shapes(name):
    """Carlini et al.'s CIFAR-10 and ImageNet denoisers: the flags of the READMEs rebuild exactly the
    state-dict layout (every key, in order, and its shape) of the original code's network."""
    entry = LAYOUTS[name]
    defaults = IMPROVED_DEFAULTS if entry["format"] == "improved-diffusion" else GUIDED_DEFAULTS
    config = denoiser_config(parse_flags(entry["flags"], defaults, entry["format"]), entry["format"])
    with torch.device("meta"):
        unet = Denoiser(**config).unet
    assert [[k, list(v.shape)] for k, v in unet.state_dict().items()] == entry["state_dict"]


OUTPUTS = json.loads((FIXTURES / "openai_unet_outputs.json").read_text())


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_eps_equals_the_original_codes_output(tmp_path, name):
    """The fixture holds outputs of the original improved-/guided-diffusion code (its network and its
    timestep handling) for weights drawn as below, in its state-dict order; the imported model,
    given the same file, reproduces them. Covers the legacy and the new attention order, scale-shift
    norm, resblock up/down sampling, head channels, a custom channel_mult and timestep rescaling."""
    entry = OUTPUTS[name]
    fmt = entry["format"]
    defaults = IMPROVED_DEFAULTS if fmt == "improved-diffusion" else GUIDED_DEFAULTS
    flags = parse_flags(entry["flags"], defaults, fmt)
    with torch.device("meta"):
        layout = Denoiser(**denoiser_config(flags, fmt)).unet.state_dict()
    g = torch.Generator().manual_seed(0)
    torch.save({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in layout.items()}, tmp_path / "model.pt")
    import_model(fmt, tmp_path / "model.pt", tmp_path / "d.pt", flags=entry["flags"])
    den, _ = load_model(tmp_path / "d.pt", kind="denoiser")
    size = flags["image_size"]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    for ref in entry["outputs"]:
        with torch.no_grad():
            eps = den.eps(x, ref["t"]).flatten()
        assert torch.allclose(eps[::37], torch.tensor(ref["every_37th"]), atol=1e-4), ref["t"]
        assert eps.abs().mean().item() == pytest.approx(ref["mean_abs"], rel=1e-5)


SMALL_IMPROVED = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True --dropout 0.3 "
                  "--diffusion_steps 4000 --noise_schedule cosine --attention_resolutions 16,8")


def _openai_file(path, flags, fmt, seed=0, half=False, prefix=""):
    defaults = IMPROVED_DEFAULTS if fmt == "improved-diffusion" else GUIDED_DEFAULTS
    unet = _randomise(Denoiser(**denoiser_config(parse_flags(flags, defaults, fmt), fmt)).unet, seed)
    state = {prefix + k: (v.half() if half else v) for k, v in unet.state_dict().items()}
    torch.save(state, path)
    return unet.eval()


def test_improved_diffusion_eps_rescales_timesteps_and_keeps_the_noise_channels(tmp_path):
    unet = _openai_file(tmp_path / "model.pt", SMALL_IMPROVED, "improved-diffusion")
    import_model("improved-diffusion", tmp_path / "model.pt", tmp_path / "d.pt", flags=SMALL_IMPROVED)
    den, payload = load_model(tmp_path / "d.pt", kind="denoiser")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t in (0, 1158, 3999):
            # improved-diffusion's default rescale_timesteps: the network saw t * 1000 / T
            expected = unet(x, torch.full((2,), t * 1000.0 / 4000))[:, :3]
            assert torch.allclose(den.eps(x, t), expected, atol=1e-6)
    assert payload["origin"]["options"]["flags"] == SMALL_IMPROVED
    assert payload["origin"]["details"]["flags"]["noise_schedule"] == "cosine"
    # Carlini et al.'s CIFAR-10 t*: cosine schedule, T = 4000
    assert [den.t_star(s) for s in (0.25, 0.5, 1.0)] == [1158, 1984, 2809]


def test_guided_diffusion_fp16_and_module_prefixed_weights_load_as_float32(tmp_path):
    flags = ("--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 64 --learn_sigma True "
             "--noise_schedule linear --num_channels 32 --num_head_channels 16 --num_res_blocks 1 "
             "--resblock_updown True --use_fp16 True --use_scale_shift_norm True")
    unet = _openai_file(tmp_path / "g.pt", flags, "guided-diffusion", half=True, prefix="module.")
    import_model("guided-diffusion", tmp_path / "g.pt", tmp_path / "d.pt", flags=flags)
    den, _ = load_model(tmp_path / "d.pt", kind="denoiser")
    assert all(p.dtype == torch.float32 for p in den.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # the file holds the weights rounded to fp16; guided-diffusion feeds t unscaled
        expected = unet.half().float()(x, torch.tensor([145]))[:, :3]
        assert torch.allclose(den.eps(x, 145), expected, atol=1e-6)
    # Ho et al.'s linear schedule at T = 1000: the t* of Carlini et al.'s ImageNet runs
    assert [den.t_star(s) for s in (0.25, 0.5, 1.0)] == [145, 259, 396]


def test_linear_schedule_is_stretched_to_T():
    config = denoiser_config(parse_flags("--image_size 32 --diffusion_steps 4000", IMPROVED_DEFAULTS,
                                         "improved-diffusion"), "improved-diffusion")
    assert config["beta_start"] == pytest.approx(2.5e-5) and config["beta_end"] == pytest.approx(5e-3)
    assert config["timestep_scale"] == 0.25


def test_imported_models_serve_as_the_dds_base_classifier(tmp_path):
    _openai_file(tmp_path / "model.pt", SMALL_IMPROVED, "improved-diffusion")
    import_model("improved-diffusion", tmp_path / "model.pt", tmp_path / "d.pt", flags=SMALL_IMPROVED)
    _cohen_file(tmp_path / "c.pth.tar", "cifar_resnet20", _randomise(CohenClassifier(arch="cifar_resnet20").net))
    import_model("cohen", tmp_path / "c.pth.tar", tmp_path / "c.pt")
    den, _ = load_model(tmp_path / "d.pt", kind="denoiser", use_ema=True)   # no EMA: the one set of weights
    clf, _ = load_model(tmp_path / "c.pt", kind="classifier")
    with torch.no_grad():
        logits = DenoisedClassifier(den, clf, 0.25)(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("flags,message", [
    ("", "needs --flags"),
    ("--image_size 32 --num_chanels 64", "--num_chanels is not a flag of improved-diffusion"),
    ("--image_size 32 --learn_sigma maybe", "--learn_sigma takes a boolean"),
    ("--image_size 48", "no channel_mult for --image_size 48"),
    ("--image_size 32 --class_cond True", "class-conditional"),
    ("--image_size 32 --noise_schedule sqrt", "unknown --noise_schedule 'sqrt'"),
    ("--image_size", "--image_size has no value"),
])
def test_bad_flags_are_one_clear_error(tmp_path, flags, message):
    _openai_file(tmp_path / "model.pt", SMALL_IMPROVED, "improved-diffusion")
    with pytest.raises(ConfigError, match=message):
        import_model("improved-diffusion", tmp_path / "model.pt", tmp_path / "d.pt", flags=flags)
    assert not (tmp_path / "d.pt").exists()


def test_flags_that_do_not_fit_the_file_name_it_and_the_key(tmp_path):
    _openai_file(tmp_path / "model.pt", SMALL_IMPROVED, "improved-diffusion")
    wrong = SMALL_IMPROVED.replace("--num_channels 32", "--num_channels 64")
    with pytest.raises(CheckpointError, match=r"model.pt does not fit the network: .*shape mismatches "
                                              r"\(time_embed.0.weight.*do --flags describe"):
        import_model("improved-diffusion", tmp_path / "model.pt", tmp_path / "d.pt", flags=wrong)
    # a Cohen checkpoint given as a diffusion model
    _cohen_file(tmp_path / "c.pth.tar", "cifar_resnet20", CohenClassifier(arch="cifar_resnet20").net)
    with pytest.raises(CheckpointError, match="c.pth.tar is not a state dict of tensors"):
        import_model("improved-diffusion", tmp_path / "c.pth.tar", tmp_path / "d.pt", flags=SMALL_IMPROVED)
    assert not (tmp_path / "d.pt").exists()


# ----------------------------------------------------------------------------- safety and the CLI

class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt,options", [("cohen", {}), ("improved-diffusion", {"flags": SMALL_IMPROVED}),
                                         ("timm", {"model": "resnet18"}), ("rrcm", {})])
def test_a_crafted_source_file_is_refused_before_anything_runs(tmp_path, fmt, options):
    marker = tmp_path / "ran"
    torch.save({"arch": "cifar_resnet20", "state_dict": {}, "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": _RunsCode(marker)}, f)
    for src in ("evil.pt", "evil.pkl"):
        with pytest.raises(CheckpointError, match=src):
            import_model(fmt, tmp_path / src, tmp_path / "out.pt", **options)
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_the_parse_time_check_of_a_source_never_runs_it(tmp_path):
    """The workflow checks each pretrained source while it parses (check_source): a zip is opened with
    torch.load(weights_only=True), a .safetensors with safetensors, and a legacy pickle not at all."""
    from rcm.importers import check_source

    marker = tmp_path / "ran"
    torch.save({"conv1.weight": torch.zeros(1), "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": _RunsCode(marker)}, f)
    (tmp_path / "evil.safetensors").write_bytes((tmp_path / "evil.pkl").read_bytes())
    assert "cannot be read safely" in check_source(str(tmp_path / "evil.pt"), "cohen")[0]
    assert check_source(str(tmp_path / "evil.pkl"), "cohen") == []  # left to the import job, which refuses it
    assert "not a readable safetensors file" in check_source(str(tmp_path / "evil.safetensors"), "timm",
                                                              "--model resnet18")[0]
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        import_model("timm", tmp_path / "evil.safetensors", tmp_path / "out.pt", model="resnet18")
    assert not marker.exists()
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)  # the control: the files are live
    assert marker.exists()


def test_cli_imports_and_reports_errors_in_one_line(tmp_path, capsys):
    _cohen_file(tmp_path / "checkpoint.pth.tar", "cifar_resnet20", CohenClassifier(arch="cifar_resnet20").net)
    assert cli(["import-model", "--format", "cohen", str(tmp_path / "checkpoint.pth.tar"),
                "--out", str(tmp_path / "c.pt")]) == 0
    assert "a classifier of kind 'cohen_resnet'" in capsys.readouterr().err
    assert cli(["import-model", "--format", "cohen", str(tmp_path / "nope.tar"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model file not found" in err[0] and "nope.tar" in err[0]


@pytest.mark.parametrize("role, sigma, has_head, method, at", [
    ("classifier", 0.25, True, "gaussian", "0.25"),     # Cohen et al.'s classifier, at its sigma
    ("classifier", None, True, "dds", "SIGMA"),         # a clean classifier: behind the denoiser
    ("classifier", 0.0, True, "dds", "SIGMA"),
    ("denoiser", None, True, "dds", "SIGMA"),
    ("denoiser", 0.5, True, "dds", "SIGMA"),            # one denoiser serves every sigma
    ("rrcm", 1.0, True, "rrcm", "1"),
    ("rrcm", None, True, "rrcm", "SIGMA"),
    ("rrcm", None, False, "", ""),                      # an encoder before fine-tuning: not certified
    ("unknown_role", 0.25, True, "", ""),
])
def test_the_printed_certify_command_follows_the_method_registry(role, sigma, has_head, method, at):
    from rcm.importers import certify_command

    command = certify_command(role, "m.pt", "cifar10", sigma, has_head)
    expected = (f"rcm certify --dataset cifar10 --method {method} --sigma {at} --model {role}=m.pt"
                if method else "")
    assert command == expected


# ----------------------------------------------------------------------------- rRCM

RRCM = json.loads((FIXTURES / "rrcm_reference_outputs.json").read_text())


def _reference_state(keys, prefix=""):
    """A state dict with the authors' parameter names and shapes, filled as the fixture's was."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[prefix + key] = torch.tensor(0)
        else:
            state[prefix + key] = torch.randn(shape, generator=g) * 0.05 + (1.0 if key.endswith("running_var") else 0.0)
    return state


def test_rrcm_pretraining_state_gives_the_reference_representation_and_projection(tmp_path):
    """nnet.pth as their TrainState.save writes it (here behind accelerate's module. prefix): h (the
    normalised CLS output) and z (the bias-free projector) at three grid levels equal the reference
    network's outputs, recorded in the fixture."""
    from rcm.models.vit import edm_grid

    torch.save(_reference_state(RRCM["pretrain"]["keys"], "module."), tmp_path / "nnet.pth")
    import_model("rrcm", tmp_path / "nnet.pth", tmp_path / "enc.pt", heads=RRCM["config"]["num_heads"])
    enc, payload = load_model(tmp_path / "enc.pt", kind="rrcm")
    assert enc.config["qkv_bias"] is False and enc.config["time_mlp"] == 0 and enc.config["proj_bias"] is False
    assert enc.head is None and payload["origin"]["details"]["kind"] == "pretrained encoder"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    s = edm_grid(81)[RRCM["pretrain"]["grid_indices"]].float()
    with torch.no_grad():
        h = enc.representation(x, s)
        z = enc.project(h)
    assert torch.allclose(h[:, :8], torch.tensor(RRCM["pretrain"]["h"]), atol=1e-5)
    assert torch.allclose(z[:, :8], torch.tensor(RRCM["pretrain"]["z"]), atol=1e-5)


def test_rrcm_finetuned_classifier_gives_the_reference_logits(tmp_path):
    """Their FinetuneModel state (base_model.* + linear_head), CIFAR-10 style (the head reads the CLS
    output without the final LayerNorm): `SigmaConditioned` on [0, 1] images gives the logits of
    their certification path ((x - 0.5) / 0.5, grid level nearest 2 sigma)."""
    from rcm.models.vit import SigmaConditioned

    torch.save(_reference_state(RRCM["finetuned"]["keys"]), tmp_path / "ft.pth")
    import_model("rrcm", tmp_path / "ft.pth", tmp_path / "clf.pt", heads=RRCM["config"]["num_heads"])
    clf, payload = load_model(tmp_path / "clf.pt", kind="rrcm")
    assert clf.config["head_norm"] is False and clf.config["num_classes"] == 10 and clf.projector is None
    assert "projection_head" in payload["origin"]["details"]["dropped"]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for sigma, expected in RRCM["finetuned"]["logits"].items():
        with torch.no_grad():
            logits = SigmaConditioned(clf, float(sigma))(x)
        assert torch.allclose(logits, torch.tensor(expected), atol=1e-5), sigma
    # the other choice of head_norm is a different function: the option matters
    import_model("rrcm", tmp_path / "ft.pth", tmp_path / "clf2.pt", heads=2, head_norm="true")
    other, _ = load_model(tmp_path / "clf2.pt", kind="rrcm")
    with torch.no_grad():
        assert not torch.allclose(SigmaConditioned(other, 0.25)(x), torch.tensor(RRCM["finetuned"]["logits"]["0.25"]),
                                  atol=1e-3)


def test_rrcm_errors(tmp_path):
    state = _reference_state(RRCM["pretrain"]["keys"])
    torch.save(state, tmp_path / "nnet.pth")
    with pytest.raises(ConfigError, match="--heads 3 does not divide the width 64"):
        import_model("rrcm", tmp_path / "nnet.pth", tmp_path / "o.pt", heads=3)
    with pytest.raises(ConfigError, match="--head_norm applies to a fine-tuned classifier"):
        import_model("rrcm", tmp_path / "nnet.pth", tmp_path / "o.pt", head_norm="true")
    torch.save({k: v for k, v in state.items() if k != "pos_embed"}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="broken.pth is not an rRCM network: it has no 'pos_embed'"):
        import_model("rrcm", tmp_path / "broken.pth", tmp_path / "o.pt")
    torch.save({k: v for k, v in state.items() if "blocks.1.norm2" not in k}, tmp_path / "holey.pth")
    with pytest.raises(CheckpointError, match=r"holey.pth does not fit the network: 2 missing keys \(blocks.1.norm2"):
        import_model("rrcm", tmp_path / "holey.pth", tmp_path / "o.pt", heads=2)
    assert not (tmp_path / "o.pt").exists()


# ----------------------------------------------------------------------------- timm and transformers

def _timm_reference(name, x, **kw):
    import timm

    net = _randomise(timm.create_model(name, pretrained=False, **kw), seed=3).eval()
    return net


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_logits_equal_timms_own_forward_with_its_preprocessing(tmp_path, suffix):
    """resnet18's pretrained config: 224 px, bicubic, ImageNet mean/std; 32 px inputs are resized."""
    import timm
    from safetensors.torch import save_file

    net = _randomise(timm.create_model("resnet18", pretrained=False, num_classes=10), seed=3).eval()
    src = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(net.state_dict(), str(src))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, src)
    import_model("timm", src, tmp_path / "t.pt", model="resnet18", num_classes=10)
    model, payload = load_model(tmp_path / "t.pt", kind="classifier")
    assert model.config["image_size"] == 224 and model.config["interpolation"] == "bicubic"
    x = torch.rand(2, 3, 32, 32) + 0.25 * torch.randn(2, 3, 32, 32)
    cfg = timm.data.resolve_model_data_config(net)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        up = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
        assert torch.allclose(model(x), net((up - mean) / std), rtol=1e-5, atol=1e-5)
        # at the network's own size there is no resize
        x224 = torch.rand(1, 3, 224, 224)
        assert torch.allclose(model(x224), net((x224 - mean) / std), rtol=1e-5, atol=1e-5)
    assert payload["origin"]["details"]["pretrained_cfg"]["input_size"] == [3, 224, 224] or \
        tuple(payload["origin"]["details"]["pretrained_cfg"]["input_size"]) == (3, 224, 224)


def test_timm_vit_at_another_size_and_overridden_normalisation(tmp_path):
    import timm
    from safetensors.torch import save_file

    net = _randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)).eval()
    save_file(net.state_dict(), str(tmp_path / "vit.safetensors"))
    import_model("timm", tmp_path / "vit.safetensors", tmp_path / "v.pt", model="vit_tiny_patch16_224",
                 num_classes=10, image_size=64, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    model, _ = load_model(tmp_path / "v.pt", kind="classifier")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - 0.5) / 0.5), rtol=1e-4, atol=1e-5)


def test_timm_errors(tmp_path):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict(), str(tmp_path / "r.safetensors"))
    with pytest.raises(ConfigError, match="needs --model"):
        import_model("timm", tmp_path / "r.safetensors", tmp_path / "o.pt")
    with pytest.raises(ConfigError, match="--model resnet1000: timm has no such architecture"):
        import_model("timm", tmp_path / "r.safetensors", tmp_path / "o.pt", model="resnet1000")
    with pytest.raises(CheckpointError, match=r"r.safetensors does not fit the network: .*are these the weights of 'resnet34'"):
        import_model("timm", tmp_path / "r.safetensors", tmp_path / "o.pt", model="resnet34", num_classes=10)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="junk.safetensors is not a readable safetensors file"):
        import_model("timm", tmp_path / "junk.safetensors", tmp_path / "o.pt", model="resnet18")
    assert not (tmp_path / "o.pt").exists()


def _hf_folder(path, image_size=32, processor_size=32):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=8, num_labels=10)
    net = _randomise(ViTForImageClassification(config), seed=5).eval()
    net.save_pretrained(path)
    ViTImageProcessor(size={"height": processor_size, "width": processor_size}, image_mean=[0.5, 0.4, 0.3],
                      image_std=[0.2, 0.25, 0.3], resample=2).save_pretrained(path)
    return net


def test_hf_logits_equal_transformers_forward_with_its_processor_settings(tmp_path):
    """A ViT at 64 px behind CIFAR-size inputs: bicubic antialiased upsampling (Carlini et al.), then the
    processor's mean/std; the result is the library's own forward on those pixels."""
    net = _hf_folder(tmp_path / "vit", image_size=64, processor_size=64)
    import_model("hf", tmp_path / "vit", tmp_path / "h.pt")
    model, payload = load_model(tmp_path / "h.pt", kind="classifier")
    assert model.config["image_size"] == 64 and model.config["interpolation"] == "bicubic"
    assert payload["origin"]["details"]["processor_resample"] == "bilinear"     # recorded, not used
    x = torch.rand(2, 3, 32, 32) + 0.1 * torch.randn(2, 3, 32, 32)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        up = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
        assert torch.allclose(model(x), net(pixel_values=(up - mean) / std).logits, rtol=1e-5, atol=1e-5)


def test_hf_folder_with_a_crafted_bin_is_refused_before_anything_runs(tmp_path):
    _hf_folder(tmp_path / "vit")
    (tmp_path / "vit" / "model.safetensors").unlink()
    torch.save({"x": _RunsCode(tmp_path / "ran")}, tmp_path / "vit" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="vit holds weights with Python objects besides tensors"):
        import_model("hf", tmp_path / "vit", tmp_path / "o.pt")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "o.pt").exists()


def test_hf_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nothere is not a transformers model folder"):
        import_model("hf", tmp_path / "nothere", tmp_path / "o.pt")
    _hf_folder(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="vit has no readable image processor"):
        import_model("hf", tmp_path / "vit", tmp_path / "o.pt")
    with pytest.raises(ConfigError, match="--format hf takes .*; --model does not apply"):
        import_model("hf", tmp_path / "vit", tmp_path / "o.pt", model="resnet18")
    assert not (tmp_path / "o.pt").exists()

"""The method registry (rcm.methods): the built-ins as entries, a user's method by config or register(),
its validation, and certification of both through the same core."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import rcm.certify as certify_mod
from rcm import methods, paths
from rcm.certificate import read_certificate
from rcm.certify import CertifyOptions, certify_shard
from rcm.cli import main as cli
from rcm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry():
    """The registry as it was, after the test (a test's registrations do not leak)."""
    saved = dict(methods._REGISTRY)
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(saved)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module `usermethod` with good and bad builders."""
    (tmp_path / "usermethod.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, classes, pixels=64):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.lin = nn.Linear(pixels, classes)
                with torch.no_grad():
                    self.lin.weight.copy_(torch.randn(classes, pixels, generator=g))
                    self.lin.bias.copy_(torch.randn(classes, generator=g))
            def forward(self, x):
                return self.lin(x.flatten(1))

        def build(sigma, models, device):
            return Net(10)

        def five_classes(sigma, models, device):
            return Net(5)

        def wrong_size(sigma, models, device):
            return Net(10, pixels=3 * 32 * 32)

        def two_args(sigma, models):
            return Net(10)

        not_callable = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermethod", None)
    yield "usermethod"
    sys.modules.pop("usermethod", None)


def test_the_registry_imports_without_torch():
    """Snakemake parses the workflow with rcm.methods: its data part must not pull torch in."""
    code = "import sys, rcm.methods; sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_builtins_are_the_four_methods_with_their_files():
    assert methods.names()[:4] == paths.METHODS == ("gaussian", "dds", "mdds", "rrcm")
    files = lambda m, s: {k: str(v) for k, v in methods.files(m, s, "R", "digits").items()}  # noqa: E731
    assert files("gaussian", 0.25) == {"classifier": "R/digits/models/classifier_sigma_0.25.pt"}
    assert files("dds", 0.25) == {"denoiser": "R/digits/models/denoiser.pt",
                                  "classifier": "R/digits/models/classifier_sigma_0.0.pt"}
    assert files("mdds", 0.5) == {"denoiser": "R/digits/models/denoiser_finetuned.pt",
                                  "classifier": "R/digits/models/classifier_sigma_0.0.pt"}
    assert files("rrcm", 0.5) == {"rrcm": "R/digits/models/rrcm_sigma_0.5.pt"}
    assert [m.sigma_conditioned for m in methods.BUILTIN] == [False, True, True, False]
    assert all(m.stream == m.name for m in methods.BUILTIN)  # each keeps its own noise streams
    assert [methods.rank(m) for m in (*paths.METHODS, "mine")] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------ bit-identity

def _old_base_classifier(method, sigma, results, dataset, device="cpu", files=None):
    """The base classifiers as rcm built them before the registry (the if-chain of models/factory.py)."""
    from rcm.models import load_model
    from rcm.models.denoiser import DenoisedClassifier
    from rcm.models.vit import SigmaConditioned

    if method == "gaussian":
        model, _ = load_model(paths.classifier(results, dataset, sigma), kind="classifier")
    elif method in ("dds", "mdds"):
        denoiser, _ = load_model(paths.denoiser(results, dataset, finetuned=method == "mdds"), kind="denoiser",
                                 use_ema=True)
        classifier, _ = load_model(paths.classifier(results, dataset, 0.0), kind="classifier")
        model = DenoisedClassifier(denoiser, classifier, sigma)
    else:
        net, _ = load_model(paths.rrcm_finetuned(results, dataset, sigma), kind="rrcm")
        model = SigmaConditioned(net, sigma)
    return model.to(device).eval()


@pytest.fixture
def random_models(digits_results):
    """Checkpoints with fixed random weights for every built-in method at sigma 0.25 and 0.5."""
    from rcm.checkpoint import save_checkpoint
    from rcm.models.classifier import Classifier
    from rcm.models.vit import RRCMNet
    from rcm.train.denoiser import DenoiserOptions, build

    torch.manual_seed(0)

    def save(model, kind, path):
        save_checkpoint(path, kind=kind, model_config=model.config, model_state=model.state_dict(), step=0)

    paths.model_dir(digits_results, "digits").mkdir(parents=True, exist_ok=True)
    for s in (0.0, 0.25, 0.5):
        save(Classifier(in_channels=1, num_classes=10, image_size=8, width=8, blocks=1, stages=2, mean=[0.5],
                        std=[0.25]), "classifier", paths.classifier(digits_results, "digits", s))
    for finetuned in (False, True):
        save(build(DenoiserOptions(block_out_channels=[8, 16], layers_per_block=1, attention=False,
                                   norm_num_groups=4, num_train_timesteps=200), 8, 1),
             "denoiser", paths.denoiser(digits_results, "digits", finetuned))
    for s in (0.25, 0.5):
        save(RRCMNet(image_size=8, in_channels=1, patch_size=2, dim=16, depth=1, heads=2, mlp_ratio=2.0, proj_dim=0,
                     num_classes=10), "rrcm", paths.rrcm_finetuned(digits_results, "digits", s))
    return digits_results


def _rows(path):
    # time differs by nature, the model files (the `models` column) by the method compared
    return read_certificate(path).drop(columns=["time", "models"]).fillna(-999.0).to_dict("records")


@pytest.mark.parametrize("method, sigma", [("gaussian", "0.5"), ("dds", "0.25"), ("mdds", "cascade"),
                                           ("rrcm", "0.5")])
def test_builtins_certify_bit_identically_through_the_registry(random_models, monkeypatch, method, sigma):
    """The same checkpoints certified through the registry and through the pre-registry if-chain give
    the same rows, bit for bit (noise, counts, bounds, radii, FLOPs)."""
    o = CertifyOptions(n0=10, n=30, batch_size=20, skip=60, max_images=0, device="cpu")
    common = dict(dataset="digits", results=str(random_models), method=method, sigma=sigma, shard=0, o=o,
                  sigmas=[0.5, 0.25] if sigma == "cascade" else None, progress=False)
    new = _rows(certify_shard(**common))
    monkeypatch.setattr(certify_mod, "base_classifier", _old_base_classifier)
    old = _rows(certify_shard(**common))
    assert len(new) == 6 and new == old


# ------------------------------------------------------------------------------ a user's method

def test_a_registered_method_certifies_and_its_noise_option_is_real(digits_results, user_module, registry):
    """register(): a user's method certifies through the same core; noise='gaussian' draws exactly
    gaussian's streams (its rows equal those of the same network certified as gaussian), its own
    streams give other rows."""
    o = CertifyOptions(n0=10, n=40, batch_size=25, skip=40, device="cpu")
    common = dict(dataset="digits", results=str(digits_results), sigma="0.25", shard=0, o=o, progress=False)
    methods.register("mine", base_classifier=f"{user_module}:build", models={"net": "{results}/mine_{sigma}.pt"})
    methods.register("paired", base_classifier=f"{user_module}:build", models={"net": "{results}/mine_{sigma}.pt"},
                     noise="gaussian")
    own, paired = _rows(certify_shard(method="mine", **common)), _rows(certify_shard(method="paired", **common))
    from usermethod import Net

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(certify_mod, "base_classifier", lambda *args, **kwargs: Net(10).eval())
        gaussian = _rows(certify_shard(method="gaussian", **common))
    assert paired == gaussian and own != gaussian
    assert (digits_results / "digits/certify/mine/sigma_0.25/shard_0-of-1.tsv").is_file()


@pytest.mark.parametrize("builder, message", [
    ("five_classes", "method 'mine' at sigma 0.25: its base classifier returns (1, 5) for one 1x8x8 image; "
                     "expected logits of shape (1, 10)"),
    ("wrong_size", "method 'mine' at sigma 0.25: its base classifier fails on a 1x8x8 image (RuntimeError"),
])
def test_a_wrong_model_fails_on_the_first_image_naming_the_method(digits_results, user_module, registry,
                                                                  builder, message):
    methods.register("mine", base_classifier=f"{user_module}:{builder}", models={"net": "m_{sigma}.pt"})
    o = CertifyOptions(n0=10, n=40, batch_size=25, skip=40, device="cpu")
    with pytest.raises(ConfigError) as err:
        certify_shard(dataset="digits", results=str(digits_results), method="mine", sigma="0.25", shard=0, o=o,
                      progress=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (digits_results / "digits/certify/mine").exists()


BAD_SPECS = {
    "unknown module": (dict(base_classifier="no_such_pkg.mod:build"),
                       "custom_methods.mine.base_classifier: cannot import module 'no_such_pkg.mod'"),
    "unknown attribute": (dict(base_classifier="{mod}:nothing_here"),
                          "custom_methods.mine.base_classifier: module '{mod}' has no attribute 'nothing_here'"),
    "not MODULE:ATTR": (dict(base_classifier="{mod}.build"),
                        "custom_methods.mine.base_classifier: '{mod}.build' is not MODULE:ATTRIBUTE"),
    "not callable": (dict(base_classifier="{mod}:not_callable"),
                     "custom_methods.mine.base_classifier: '{mod}:not_callable' is not callable"),
    "wrong signature": (dict(base_classifier="{mod}:two_args"),
                        "custom_methods.mine.base_classifier: two_args(sigma, models) must take (sigma, models, "
                        "device)"),
    "per-sigma path without {sigma}": (dict(models={"net": "models/mine.pt"}),
                                       "custom_methods.mine.models.net: 'models/mine.pt' has no {sigma}"),
    "unknown placeholder": (dict(models={"net": "models/{seed}_{sigma}.pt"}),
                            "custom_methods.mine.models.net: 'models/{seed}_{sigma}.pt' names {seed}"),
    "train without {output}": (dict(train="python train.py --sigma {sigma}"),
                               "custom_methods.mine.train: 'python train.py --sigma {sigma}' has no {output}"),
    "train of an unknown role": (dict(train={"other": "make {output}"}),
                                 "custom_methods.mine.train.other: no model of role 'other'"),
    "noise of no method": (dict(noise="ddpm"), "custom_methods.mine.noise: 'ddpm' is no built-in method"),
    "unknown key": (dict(trian="make {output}"), "custom_methods.mine.trian: unknown key"),
    "built-in name": (dict(name="gaussian"), "custom_methods.gaussian: 'gaussian' is a built-in method's name"),
    "bad name": (dict(name="My-Method"), "custom_methods.My-Method: a method name is lower-case letters"),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_a_bad_custom_method_is_one_line_naming_the_key(user_module, registry, case):
    change, message = BAD_SPECS[case]
    spec = {"base_classifier": f"{user_module}:build", "models": {"net": "models/mine_sigma_{sigma}.pt"},
            **{k: v.replace("{mod}", user_module) if k == "base_classifier" else v for k, v in change.items()}}
    name = spec.pop("name", "mine")
    with pytest.raises(ConfigError) as err:
        methods.from_config({name: spec})
    assert str(err.value).startswith(message.replace("{mod}", user_module)), str(err.value)
    assert "\n" not in str(err.value)
    # the Python API says the same, naming the method
    if case not in ("unknown key",):
        spec.pop("trian", None)
        with pytest.raises(ConfigError) as api:
            methods.register(name, **spec)
        assert api.value.args[0].split(": ", 1)[1] == str(err.value).split(": ", 1)[1]


def test_a_sigma_conditioned_method_needs_no_sigma_in_its_paths(user_module, registry):
    m = methods.from_config({"mine": {"base_classifier": f"{user_module}:build", "sigma_conditioned": True,
                                      "models": {"net": "{results}/{dataset}/models/mine.pt"}}})["mine"]
    assert m.files(0.25, "R", "digits") == m.files(0.5, "R", "digits") == {"net": Path("R/digits/models/mine.pt")}
    assert methods.names()[-1] != "mine"   # from_config validates; registering is the workflow's or the caller's


def test_register_refuses_a_second_registration_unless_replaced(user_module, registry):
    methods.register("mine", base_classifier=f"{user_module}:build", models={"net": "m_{sigma}.pt"})
    with pytest.raises(ConfigError, match="registered already"):
        methods.register("mine", base_classifier=f"{user_module}:build", models={"net": "m_{sigma}.pt"})
    methods.register("mine", base_classifier=f"{user_module}:build", models={"net": "n_{sigma}.pt"}, replace=True)
    assert methods.files("mine", 0.5, "R", "d") == {"net": Path("n_0.5.pt")}
    with pytest.raises(ConfigError, match="built-in"):
        methods.unregister("dds")


def test_the_cli_registers_a_method_from_its_flags_and_names_a_bad_one(digits_results, user_module, registry,
                                                                       capsys):
    common = ["certify", "--dataset", "digits", "--results", str(digits_results), "--method", "mine", "--sigma",
              "0.5", "--n0", "5", "--n", "20", "--batch_size", "25", "--skip", "90", "--device", "cpu"]
    assert cli(common + ["--custom_base_classifier", f"{user_module}:nope", "--custom_models", "net=m_{sigma}.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rcm certify: error: method 'mine'.base_classifier: module '{user_module}' has no attribute 'nope'"
    assert cli(common + ["--custom_base_classifier", f"{user_module}:build", "--custom_models", "net=m_{sigma}.pt"]) == 0
    assert len(_rows(digits_results / "digits/certify/mine/sigma_0.5/shard_0-of-1.tsv")) == 4
    assert cli(common[:6] + ["gaussian"] + common[7:] + ["--custom_models", "net=m.pt"]) == 2
    assert "need --custom_base_classifier" in capsys.readouterr().err


def test_the_example_method_filters_then_classifies():
    """examples/custom_method: a real median filter (checked against a direct computation) in front of
    the classifier, its width growing with sigma."""
    sys.path.insert(0, str(REPO))
    try:
        from examples.custom_method.median_filter import MedianFiltered, median_filter
        from examples.custom_method.method import kernel_size
    finally:
        sys.path.remove(str(REPO))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    direct = torch.stack([torch.stack([padded[b, 0, i:i + 3, j:j + 3].flatten().sort().values[4]
                                       for j in range(8)]) for b in range(2) for i in range(8)]).reshape(2, 1, 8, 8)
    assert torch.equal(median_filter(x, 3), direct)
    assert (kernel_size(0.25), kernel_size(0.5), kernel_size(1.0)) == (3, 5, 5)
    class Recorder(nn.Module):
        def forward(self, y):
            self.seen = y
            return y.flatten(1)

    model = MedianFiltered(Recorder(), 3)
    model(x)
    assert torch.equal(model.classifier.seen, direct)


def test_register_takes_a_callable_with_the_same_checks(digits_results, user_module, registry):
    """The Python API accepts the builder itself; its signature is checked as a MODULE:ATTR's is, and a
    builder that returns no module is named on the first image."""
    from usermethod import Net

    with pytest.raises(ConfigError, match=r"^method 'cb'.base_classifier: <lambda>\(sigma\) must take "
                                          r"\(sigma, models, device\)$"):
        methods.register("cb", base_classifier=lambda sigma: Net(10), models={"net": "n_{sigma}.pt"})
    o = CertifyOptions(n0=5, n=20, batch_size=25, skip=90, device="cpu")
    common = dict(dataset="digits", results=str(digits_results), sigma="0.5", shard=0, o=o, progress=False)
    methods.register("cb", base_classifier=lambda sigma, models, device: Net(10), models={"net": "n_{sigma}.pt"})
    assert len(_rows(certify_shard(method="cb", **common))) == 4
    methods.register("bad", base_classifier=lambda sigma, models, device: "a model", models={"net": "n_{sigma}.pt"})
    with pytest.raises(ConfigError, match=r"^method 'bad': its base_classifier returned str, not an nn.Module$"):
        certify_shard(method="bad", **common)


# ------------------------------------------------------------------------------ names only in the registry

# Where a built-in method's name may stand as a string literal in rcm/: the registry itself, and, for
# "rrcm" only, the places where it names something else that rRCM brought: the checkpoint kind and
# import format of its networks, the file role its entry reads, the headerless log format of the
# authors' certify script, and rRCM's own training and import modules.
NAME_LITERALS_ALLOWED = {
    "rcm/methods.py": {"gaussian", "dds", "mdds", "rrcm"},
    "rcm/models/__init__.py": {"rrcm"},        # model kind and its role
    "rcm/models/factory.py": {"rrcm"},         # the role rrcm's builder reads (files["rrcm"])
    "rcm/importers/__init__.py": {"rrcm"},     # import format, and the role of what it writes
    "rcm/importers/stage.py": {"rrcm"},        # the role of an imported encoder
    "rcm/bench.py": {"rrcm"},                  # a checkpoint of kind rrcm
    "rcm/certificate.py": {"rrcm"},            # the rRCM authors' headerless log format
    "rcm/train/rrcm_pretrain.py": {"rrcm"},
    "rcm/train/rrcm_finetune.py": {"rrcm"},
}


def test_no_code_outside_the_registry_branches_on_a_built_in_methods_name():
    """`grep '"gaussian"\\|"rrcm"\\|"mdds"\\|"dds"'` over rcm/ finds the names in the registry and, for
    rrcm, only as a checkpoint kind, format or role (NAME_LITERALS_ALLOWED says which files and why):
    the planner, the GPU check, the workflow's helpers and the factory read the registry instead."""
    import re

    found = {}
    for path in sorted((REPO / "rcm").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"[\"'](gaussian|dds|mdds|rrcm)[\"']", line):
                if name not in NAME_LITERALS_ALLOWED.get(rel, set()):
                    found.setdefault(rel, []).append(f"{lineno}: {line.strip()}")
    assert not found, found

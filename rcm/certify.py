"""The `certify` stage: one shard of one method at one sigma, or one shard of a cascade.

Images are every ``skip``-th test image (at most ``max_images``); shard K of N takes every N-th of
them starting at K. The noise for image ``idx`` comes from a generator seeded by
(seed, method, sigma, idx), so any sharding gives identical rows (time aside). The certificate is
written atomically once the shard is done: an interrupted shard leaves no certificate, only its
partial file (rcm.partial), from which a rerun resumes at the first unfinished image.

On CUDA the noise streams and the rounding depend on the GPU model and the software (docs/methods.md,
"What holds on GPUs"): every row records them (PROVENANCE_COLUMNS), the partial file's fingerprint holds
them, and ``tf32`` (default off: IEEE float32) is set before any model runs.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from rcm import methods, paths
from rcm.cascade import ALPHA_SPLITS, certify_cascade, guaranteed_alpha
from rcm.certificate import write_certificate
from rcm.data import load_split
from rcm.errors import ConfigError
from rcm.flops import flops_per_sample
from rcm.importers import sha256
from rcm.models.factory import METHODS, base_classifier, checkpoints
from rcm.options import add_options, add_stage_options, from_args, option, resolve_device
from rcm.partial import PartialRows, file_stamp
from rcm.precision import amp_dtype, arithmetic_provenance, set_float32, warn_if_emulated, wrap
from rcm.report import DEFAULT_RADII
from rcm.smoothing import Smooth, noise_generator

# batch_size is provenance: the noise of image idx is one stream keyed by (seed, method, sigma, idx),
# drawn n0 then n samples at a time in batches of batch_size (on some devices the batching shifts it)
# amp: the precision the base classifier ran in (rcm.precision); the certificate is about that function
EXTRA_COLUMNS = ("sigma", "n0", "n", "alpha", "count_a", "p_a_lower", "seed", "batch_size", "flops", "samples",
                 "amp")
# --sequential: n is n_max, samples the draws used (n0 + estimation), radii the targets it stopped on
SEQUENTIAL_COLUMNS = EXTRA_COLUMNS + ("sequential", "radii")
# alpha_guaranteed: the level the union bound guarantees (alpha unless the split is 'harmonic')
CASCADE_COLUMNS = ("sigma", "stage", "n0", "n", "alpha", "alpha_split", "alpha_guaranteed", "p0", "count_a",
                   "p_a_lower", "seed", "batch_size", "flops", "amp", "samples")
# a sequential cascade: n is each stage's n_max, samples the draws of every stage tried
SEQUENTIAL_CASCADE_COLUMNS = CASCADE_COLUMNS + ("sequential", "radii")
# the arithmetic the rows depend on beyond the protocol (rcm.precision.arithmetic_provenance), last in
# every certificate: device type and model, compute capability (empty on a CPU), torch / CUDA / cuDNN
# versions, and whether float32 matmuls and cuDNN convolutions ran in TF32 (1) or IEEE float32 (0)
PROVENANCE_COLUMNS = ("device_type", "device_name", "capability", "torch", "cuda", "cudnn", "tf32_matmul",
                      "tf32_cudnn")
# and the model files the base classifier was built from: ROLE=PATH@SHA256 entries, space-separated
MODELS_COLUMN = "models"


@dataclass
class CertifyOptions:
    """Certification protocol (the `certify` section of the config)."""

    n0: int = option(100, "selection draws per image")
    n: int = option(1000, "estimation draws per image")
    alpha: float = option(0.001, "failure probability of each certificate")
    batch_size: int = option(1000, "noise draws per forward pass")
    batch_sizes: list[str] = option([], "per-method batch sizes overriding batch_size, METHOD=N entries "
                                        "(a 550M-parameter denoiser takes far fewer draws per pass than a ResNet)")
    amp: str = option("off", "off | bf16 | fp16: autocast around the base classifier only; the noise is drawn "
                             "and added in float32 (docs/methods.md, 'Mixed precision')")
    channels_last: bool = option(False, "run the base classifier's convolutions in channels-last layout")
    compile: bool = option(False, "torch.compile the base classifier (compiles once per shard job: batches "
                                  "shorter than the batch size are padded to it, the padding never counted)")
    tf32: bool = option(False, "CUDA: float32 matmuls and convolutions in TF32 (10-bit mantissa); off: IEEE "
                               "float32, whatever torch's defaults (rcm.precision.set_float32)")
    skip: int = option(1, "certify every skip-th test image")
    max_images: int = option(0, "at most this many images (0: all)")
    seed: int = option(0, "noise seed; image idx uses (seed, method, sigma, idx)")
    shards: int = option(1, "number of shards the images are split into")
    device: str = option("auto", "cpu, cuda, cuda:1, ... or auto")


@dataclass
class SequentialOptions:
    """Sequential certification (the `sequential` section of the config; used with --sequential)."""

    radii: list[float] = option(list(DEFAULT_RADII), "the target radii each image's sampling stops on "
                                                     "(the report's radii)")


def validate(method: str, sigma: str, shard: int, o: CertifyOptions, sigmas: list[float],
             p0: float = 0.5, alpha_split: str = "uniform") -> None:
    """Reject bad input before any model is loaded, naming the argument."""
    methods.get(method)                          # ConfigError: unknown method, naming the known ones
    if sigma == paths.CASCADE:
        if len(sigmas) < 1 or any(s <= 0 for s in sigmas):
            raise ConfigError(f"a cascade needs --sigmas, all > 0; got {sigmas}")
        if len(set(sigmas)) != len(sigmas):
            raise ConfigError(f"--sigmas lists a scale twice: {sigmas}")
        if not 0.5 <= p0 < 1:
            raise ConfigError(f"--p0 must be in [0.5, 1), got {p0}: below 1/2 two classes can pass it "
                              "and the cascade's radius is not certified")
        if alpha_split not in ALPHA_SPLITS:
            raise ConfigError(f"--alpha_split must be one of {', '.join(ALPHA_SPLITS)}, got '{alpha_split}'")
    else:
        try:
            value = float(sigma)
        except ValueError:
            raise ConfigError(f"--sigma must be a number or '{paths.CASCADE}', got '{sigma}'") from None
        if not value > 0 or not math.isfinite(value):
            raise ConfigError(f"--sigma must be > 0, got {sigma}")
    if o.n0 < 1 or o.n < 1:
        raise ConfigError(f"n0 and n must be >= 1, got n0={o.n0}, n={o.n}")
    if not 0 < o.alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {o.alpha}")
    if o.batch_size < 1 or o.skip < 1 or o.max_images < 0:
        raise ConfigError("batch_size and skip must be >= 1 and max_images >= 0")
    batch_sizes(o)
    amp_dtype(o.amp)
    if not 0 <= shard < o.shards:
        raise ConfigError(f"--shard must be in [0, {o.shards}), got {shard}")


def batch_sizes(o: CertifyOptions) -> dict[str, int]:
    """``o.batch_sizes`` as {method: batch size}; ConfigError names a malformed entry. An entry may name
    a method this process has not registered (the workflow passes every job the whole list, and a
    built-in's job does not know a user's method: the workflow checks the names against its config
    before any job); :func:`batch_size_of` says so when it reads the list."""
    out = {}
    for entry in o.batch_sizes:
        method, _, value = entry.partition("=")
        if not methods.NAME.match(method) or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"batch_sizes entry '{entry}': expected METHOD=N with METHOD a method's name "
                              f"({', '.join(methods.names())}, or a method of your own) and N >= 1")
        if method in out:
            raise ConfigError(f"batch_sizes names '{method}' twice")
        out[method] = int(value)
    return out


def batch_size_of(method: str, o: CertifyOptions, say=None) -> int:
    """The batch size ``method`` certifies with: its batch_sizes entry, else batch_size. ``say``
    (a print function) is told of the entries that name no registered method."""
    sizes = batch_sizes(o)
    unknown = [m for m in sizes if m not in methods.names()]
    if unknown and say is not None:
        say(f"batch_sizes: {', '.join(unknown)}: {'no method' if len(unknown) == 1 else 'no methods'} registered "
            f"in this process (a user's method is registered only in its own jobs); {method} certifies with "
            f"{'its entry' if method in sizes else 'batch_size'}, {sizes.get(method, o.batch_size)}")
    return sizes.get(method, o.batch_size)


def certify_shard(*, dataset: str, results: str, method: str, sigma: str, shard: int,
                  o: CertifyOptions, sigmas: list[float] | None = None, p0: float = 0.5,
                  alpha_split: str = "uniform", progress: bool = True, sequential: bool = False,
                  radii: list[float] | None = None, models: dict[str, str] | None = None):
    """Certify shard ``shard`` and write its certificate; returns the certificate path.

    ``models``: {role: file} to certify with instead of the results root's files of those roles
    (``rcm certify --model ROLE=FILE``; the roles are ``checkpoints``' keys, e.g. classifier, denoiser,
    rrcm). Every model file used is recorded, with its sha256, in the certificate's ``models`` column.

    ``sequential``: Smooth.certify_sequential with n_max = o.n, stopping on the target ``radii``
    (default: the report's radii); a cascade stops each stage's sampling so (docs/methods.md)."""
    sigmas = sorted(sigmas or [], reverse=True)
    validate(method, sigma, shard, o, sigmas, p0, alpha_split)
    radii = sorted(DEFAULT_RADII if radii is None else radii)
    if sequential and (not radii or min(radii) < 0):
        raise ConfigError(f"--radii must list radii >= 0 for --sequential, got {radii}")
    device = resolve_device(o.device)
    set_float32(device, o.tf32)                 # before any model runs (FLOPs are counted on one)
    arithmetic = arithmetic_provenance(device)
    split = load_split(paths.prepared(results, dataset, "test"))
    rows = split.certification_rows(o.skip, o.max_images or None)[shard::o.shards]
    cascade = sigma == paths.CASCADE
    files = {s: model_files(method, s, results, dataset, models or {}, cascade)
             for s in (sigmas if cascade else [float(sigma)])}
    members = [(s, base_classifier(method, s, results, dataset, device, files=f)) for s, f in files.items()]
    example = split.float_images(rows[:1])[0].to(device) if len(rows) else None
    if example is not None and not methods.get(method).builtin:
        for s, m in members:                     # a user's model fails here in one line, not inside torch
            check_output(method, s, m, example, split.num_classes)
    flops = [flops_per_sample(m, example) for _, m in members] if example is not None else [0.0]
    for s, m in members:  # the resolutions each image passes through, into the job's log
        if hasattr(m, "describe"):
            print(f"certify: {method} at sigma {s}: {m.describe(split.images.shape[-1])}", file=sys.stderr)
    warn_if_emulated(o.amp, device, "certify")
    batch_size = batch_size_of(method, o, say=lambda line: print(f"certify: {line}", file=sys.stderr))
    members = [(s, wrap(m, o.amp, o.channels_last, o.compile, batch_size)) for s, m in members]
    out = paths.certificate(results, dataset, method, sigma, shard, o.shards, sequential=sequential)

    stream = methods.get(method).stream        # the name keying the noise: the method's own unless shared
    smooth = None if cascade else Smooth(members[0][1], split.num_classes, members[0][0])
    alpha_guaranteed = guaranteed_alpha(o.alpha, len(members), alpha_split) if cascade else None
    used = sorted({(role, str(f)) for f_s in files.values() for role, f in f_s.items()})
    models_used = " ".join(f"{role}={f}@{sha256(f) if Path(f).is_file() else 'absent'}" for role, f in used)
    model_paths = sorted({f for _, f in used})
    fingerprint = dict(protocol=asdict(o) | {"device": device.type}, method=method, sigma=sigma, shard=shard,
                       sigmas=sigmas, p0=p0, alpha_split=alpha_split, sequential=sequential,
                       radii=radii if sequential else None,
                       # a user's method: its builder and noise stream too (a resume after editing either
                       # must not mix two methods in one shard); the built-ins' fingerprints are unchanged
                       **({} if methods.get(method).builtin else {"builder": _spec(methods.get(method).builder),
                                                                  "noise": stream}),
                       # CUDA's noise (Philox) and rounding depend on the GPU model, the versions, TF32: a
                       # resume on another GPU model or software must not mix two noise streams in one shard
                       arithmetic=arithmetic,
                       files=[file_stamp(f) for f in model_paths + [str(paths.prepared(results, dataset, "test"))]
                              if Path(f).exists()])
    partial = PartialRows(out, fingerprint)
    records = []
    bar = tqdm(rows.tolist(), desc=f"certify {method} sigma={sigma} shard {shard}/{o.shards}",
               unit="img", disable=not progress, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for row in bar:
        idx, label = int(split.indices[row]), int(split.labels[row])
        if idx in partial.done:                  # certified before an interruption
            records.append(partial.done[idx])
            continue
        x = split.float_images(row).to(device)  # (C, H, W)
        start = time.perf_counter()
        if cascade:
            gens = [noise_generator(o.seed, stream, s, idx, device) for s, _ in members]
            r = certify_cascade(members, x, split.num_classes, o.n0, o.n, o.alpha, batch_size, p0, gens,
                                alpha_split, radii=radii if sequential else None)
            prediction, radius = r.prediction, r.radius
            extra = dict(sigma=r.sigma, stage=r.stage, p0=p0, alpha_split=alpha_split,
                         alpha_guaranteed=alpha_guaranteed,
                         count_a=r.count_a, p_a_lower=r.p_a_lower, samples=r.samples,
                         flops=sum(f * s for f, s in zip(flops, r.stage_samples)))
            if sequential:
                extra.update(sequential=1, radii=" ".join(f"{t:g}" for t in radii))
        elif sequential:
            gen = noise_generator(o.seed, stream, sigma, idx, device)
            try:
                prediction, radius, count_a, p_a, used = smooth.certify_sequential_with_details(
                    x, o.n0, o.n, o.alpha, batch_size, radii, gen)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            extra = dict(sigma=members[0][0], count_a=count_a, p_a_lower=p_a, samples=used,
                         flops=flops[0] * used, sequential=1, radii=" ".join(f"{r:g}" for r in radii))
        else:
            gen = noise_generator(o.seed, stream, sigma, idx, device)
            prediction, radius, count_a, p_a = smooth.certify_with_details(x, o.n0, o.n, o.alpha,
                                                                         batch_size, gen)
            extra = dict(sigma=members[0][0], count_a=count_a, p_a_lower=p_a, samples=o.n0 + o.n,
                         flops=flops[0] * (o.n0 + o.n))
        elapsed = time.perf_counter() - start
        records.append(dict(idx=idx, label=label, predict=prediction, radius=radius,
                            correct=int(prediction == label), time=elapsed,
                            n0=o.n0, n=o.n, alpha=o.alpha, seed=o.seed, batch_size=batch_size, amp=o.amp, **extra,
                            **{c: arithmetic[c] for c in PROVENANCE_COLUMNS}, **{MODELS_COLUMN: models_used}))
        partial.append(records[-1])
    bar.close()
    finished = False
    try:
        columns = ((SEQUENTIAL_CASCADE_COLUMNS if sequential else CASCADE_COLUMNS) if cascade else
                   SEQUENTIAL_COLUMNS if sequential else EXTRA_COLUMNS)
        write_certificate(out, records, columns + PROVENANCE_COLUMNS + (MODELS_COLUMN,))
        finished = True
    finally:
        partial.close(finished=finished)
    return out


def parse_models(entries: list[str]) -> dict[str, str]:
    """``--model ROLE=FILE`` entries as {role: file}; ConfigError names a malformed or repeated entry."""
    out = {}
    for entry in entries:
        role, sep, path = entry.partition("=")
        if not sep or not role or not path:
            raise ConfigError(f"--model '{entry}': expected ROLE=FILE (e.g. classifier=cohen_0.25.pt)")
        if role in out:
            raise ConfigError(f"--model names the role '{role}' twice")
        out[role] = path
    return out


def model_files(method: str, sigma: float, results: str, dataset: str, models: dict[str, str],
                cascade: bool = False) -> dict[str, Path]:
    """The files ``method``'s base classifier at ``sigma`` is built from: the results root's, with
    ``models`` (role -> file) in place of those roles. ConfigError for a role the method does not have,
    a file that does not exist, or a file given for a cascade (whose stages need one per sigma)."""
    files = checkpoints(method, sigma, results, dataset)
    unknown = sorted(set(models) - set(files))
    if unknown:
        raise ConfigError(f"--model {unknown[0]}=...: {method} has no model of that role (its roles: "
                          f"{', '.join(files)})")
    if models and cascade:
        raise ConfigError("--model is for one sigma: a cascade reads each sigma's models from the results root")
    for role, f in models.items():
        if not Path(f).is_file():
            raise ConfigError(f"--model {role}={f}: no such file")
    return {**files, **{role: Path(f) for role, f in models.items()}}


def _spec(builder) -> str:
    return builder if isinstance(builder, str) else f"{builder.__module__}:{builder.__qualname__}"


def check_output(method: str, sigma: float, model, example, num_classes: int) -> None:
    """A user's base classifier must map a batch of images like ``example`` (C, H, W) to (batch,
    num_classes) logits; anything else is one ConfigError naming the method."""
    import torch

    shape = "x".join(map(str, example.shape))
    try:
        with torch.inference_mode():
            out = model(example.unsqueeze(0))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's code on a well-formed image
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"method '{method}' at sigma {sigma}: its base classifier fails on a {shape} image "
                          f"({type(exc).__name__}: {first})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"method '{method}' at sigma {sigma}: its base classifier returns {got} for one "
                          f"{shape} image; expected logits of shape (1, {num_classes})")


def register_custom(args) -> None:
    """``--custom_*`` flags: register ``args.method`` as a user's method (rcm.methods.register)."""
    if not args.custom_base_classifier:
        if args.custom_models or args.custom_noise or args.custom_sigma_conditioned:
            raise ConfigError("--custom_models, --custom_noise and --custom_sigma_conditioned need "
                              "--custom_base_classifier")
        return
    models = {}
    for entry in args.custom_models:
        role, sep, template = entry.partition("=")
        if not sep or not role or not template:
            raise ConfigError(f"--custom_models entry '{entry}': expected ROLE=PATH_TEMPLATE")
        models[role] = template
    methods.register(args.method, base_classifier=args.custom_base_classifier, models=models,
                     sigma_conditioned=args.custom_sigma_conditioned, noise=args.custom_noise, replace=True)


def add_arguments(p) -> None:
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}, or a user's method "
                                                   "described by the --custom_* flags")
    p.add_argument("--sigma", required=True, help=f"noise level in [0, 1] pixel units, or '{paths.CASCADE}'")
    p.add_argument("--shard", type=int, default=0, help="which shard, 0-based")
    p.add_argument("--sigmas", type=float, nargs="+", default=[], help="cascade scales")
    p.add_argument("--p0", type=float, default=0.5, help="cascade threshold p0, in [0.5, 1)")
    p.add_argument("--alpha_split", choices=ALPHA_SPLITS, default="uniform",
                   help="cascade: how alpha is split over the bounds (see rcm/cascade.py)")
    p.add_argument("--model", action="append", default=[], metavar="ROLE=FILE",
                   help="certify with FILE as the method's model ROLE (classifier, denoiser, rrcm) instead of the "
                        "results root's; repeatable; recorded with its sha256 in the certificate")
    p.add_argument("--sequential", action="store_true",
                   help="stop each image's sampling early (Smooth.certify_sequential); n is then n_max")
    add_stage_options(p, CertifyOptions)
    add_options(p, SequentialOptions)
    custom = p.add_argument_group("a user's method (the workflow's custom_methods; rcm.methods.register)")
    custom.add_argument("--custom_base_classifier", default="", metavar="MODULE:ATTR",
                        help="callable(sigma, models: dict[str, Path], device) -> nn.Module")
    custom.add_argument("--custom_models", nargs="+", default=[], metavar="ROLE=TEMPLATE",
                        help="the files it reads, as path templates ({sigma}, {results}, {dataset})")
    custom.add_argument("--custom_sigma_conditioned", action="store_true",
                        help="one model for every sigma (templates need no {sigma})")
    custom.add_argument("--custom_noise", default="", metavar="METHOD",
                        help="draw the noise streams of METHOD (default: the method's own)")


def main(args) -> None:
    o = from_args(CertifyOptions, args)
    register_custom(args)
    out = certify_shard(dataset=args.dataset, results=args.results, method=args.method,
                        sigma=args.sigma, shard=args.shard, o=o, sigmas=args.sigmas, p0=args.p0,
                        alpha_split=args.alpha_split, sequential=args.sequential, radii=args.radii,
                        models=parse_models(args.model))
    print(f"wrote {out}  ({asdict(o)})")

"""The `rcm` command: one subcommand per pipeline stage.

Each stage lives in its own module exposing ``add_arguments(parser)`` and ``main(args)``; modules are
imported only when their subcommand runs, so `rcm --help` stays fast. Snakemake rules, DVC stages,
tests and users at the shell all run the same subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rcm.errors import RcmError

COMMANDS = {
    "prepare": ("rcm.data", "write the prepared dataset splits and their manifest"),
    "train-denoiser": ("rcm.train.denoiser", "train a DDPM denoiser from scratch, or import a pretrained one"),
    "train-classifier": ("rcm.train.classifier", "train a classifier on clean (sigma=0) or noisy inputs"),
    "finetune-denoiser": ("rcm.train.mdds", "multi-scale fine-tuning of the denoiser (Jeong & Shin 2023)"),
    "pretrain-rrcm": ("rcm.train.rrcm_pretrain", "rRCM contrastive consistency pretraining"),
    "finetune-rrcm": ("rcm.train.rrcm_finetune", "rRCM fine-tuning at one sigma"),
    "import-model": ("rcm.importers", "import a checkpoint written by the papers' code (Cohen et al., OpenAI diffusion, ...)"),
    "certify": ("rcm.certify", "certify one shard of one method at one sigma (or a cascade)"),
    "report": ("rcm.report", "tables, plot and metrics from certificate files"),
    "plan": ("rcm.plan", "what a configured run costs and whether it fits, before any job starts"),
    "bench": ("rcm.bench", "benchmarks that print numbers (speed, FLOPs)"),
    "bench-sequential": ("rcm.bench_sequential", "fixed-n vs sequential certification on the same images"),
    "dvc": ("rcm.dvcgen", "write the DVC stages of the config's custom_methods into dvc.yaml"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s own arguments are added (importing just its module)."""
    parser = argparse.ArgumentParser(prog="rcm", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the job (the workflow passes each job's thread count); "
                             "under torchrun shared by the node's processes")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding a streamed data set (ImageNet) for training and evaluation "
                             "(default: this process's CPUs less one, at most 8; 0: decode in the main process)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="torch intra-op threads")
        p.add_argument("--workers", type=int, default=argparse.SUPPRESS, help="decoding processes (see rcm --help)")
        p.set_defaults(_module=module, _name=name)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


# the stages that run data-parallel under torchrun (rcm.distributed); the rest run in one process
DISTRIBUTED = ("train-denoiser", "train-classifier", "finetune-denoiser", "pretrain-rrcm", "finetune-rrcm")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    if args.threads:
        import torch

        # the job's threads, shared by the processes torchrun starts on this node
        torch.set_num_threads(max(1, args.threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if args.workers is not None:
        if args.workers < 0:
            print(f"rcm: error: --workers must be >= 0, got {args.workers}", file=sys.stderr)
            return 2
        from rcm import loader

        loader.WORKERS = args.workers
    from rcm import distributed

    if distributed.launched() and args._name not in DISTRIBUTED:
        print(f"rcm {args._name}: error: started as one of several processes (WORLD_SIZE="
              f"{os.environ['WORLD_SIZE']}); only the training stages run under torchrun "
              f"({', '.join(DISTRIBUTED)})", file=sys.stderr)
        return 2
    try:
        distributed.init()
        importlib.import_module(args._module).main(args)
    except BaseException as exc:
        if distributed.world_size() > 1:
            distributed.abandon(exc, f"rcm {args._name}")          # exits this process now
        distributed.shutdown(clean=False)
        if isinstance(exc, RcmError):
            print(f"rcm {args._name}: error: {exc}", file=sys.stderr)
            return 2
        raise
    distributed.shutdown()
    return 0

if __name__ == "__main__":
    sys.exit(main())

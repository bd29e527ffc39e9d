"""``python -m instantfamily_nodes.train {prepare,fit,export} ...``: one entry point, one module per command.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; imports are lazy so
``--help`` is fast and ``prepare`` does not load the diffusion model code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "prepare": ("prepare", "photos (+ captions, poses) -> WebDataset training shards"),
    "fit": ("fit", "train the ID projection and the ControlNet (torchrun for several GPUs/machines)"),
    "export": ("export", "a checkpoint -> the pack's weight file + a ComfyUI ControlNet file"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instantfamily_nodes.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"{__package__}.{module}")
        mod.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    mod = importlib.import_module(f"{__package__}.{COMMANDS[args.command][0]}")
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

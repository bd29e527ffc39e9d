"""``python -m instantfamily_nodes.synthetic COMMAND``: the synthetic world's commands.

- ``recognizer``: train the world's recognition net and write the insightface-shaped face pack
  (``<out>/models/<name>/``) that ``train prepare``, the nodes and the benchmark load as
  ``insightface/<name>`` with ``--models-root <out>``.
- ``scenes``: write world scenes as a ``train prepare`` input folder (image + caption + pose JSON).
- ``experiment``: all of it through the pack's tools: recognizer -> scenes -> ``train prepare`` ->
  ``train fit`` on ``--base`` -> ``train export`` -> ``bench/synthetic.py`` (see :mod:`.experiment`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _recognizer(args: argparse.Namespace) -> int:
    from .recognizer import DEFAULT_PACK, export_pack, train_recognizer
    from .world import World

    world = World(args.identities, args.seed)
    trained = train_recognizer(world, steps=args.steps, train_size=args.train_size, test_size=args.test_size,
                               seed=args.seed, threads=args.threads)
    folder = export_pack(trained, world, args.out, args.name or DEFAULT_PACK)
    print(json.dumps({"pack": str(folder), "identities": len(world), "heldout_accuracy": trained.heldout_accuracy,
                      "seconds": round(trained.seconds, 1)}))
    return 0


def _scenes(args: argparse.Namespace) -> int:
    from .dataset import write_prepare_input
    from .world import World

    people = [int(p) for p in args.people.split(",")]
    n = write_prepare_input(World(args.identities, args.seed), args.out, args.count, (args.size, args.size),
                            split=args.split, people=people)
    print(json.dumps({"folder": str(Path(args.out)), "scenes": n}))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiment import run_experiment

    path = run_experiment(args.out, args.base, scenes=args.scenes, size=args.size, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, ns=args.ns, bench_scenes=args.bench_scenes,
                          sample_steps=args.sample_steps, identities=args.identities, seed=args.seed,
                          comfyui=args.comfyui, force=args.force)
    print(f"results: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m instantfamily_nodes.synthetic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recognizer", help="train the world's recognition net and write its face pack")
    r.add_argument("--out", required=True, help="models root: the pack goes to OUT/models/NAME/")
    r.add_argument("--name", default=None, help="pack name (default synthetic_world)")
    r.add_argument("--identities", type=int, default=24)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--train-size", type=int, default=12000, help="training crops")
    r.add_argument("--test-size", type=int, default=2000, help="held-out crops for the reported accuracy")
    r.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    r.set_defaults(func=_recognizer)
    s = sub.add_parser("scenes", help="write world scenes as a `train prepare` input folder")
    s.add_argument("--out", required=True)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--people", default="1,2,3,4", help="people per scene, cycled")
    s.add_argument("--split", default="train")
    s.add_argument("--identities", type=int, default=24)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_scenes)
    e = sub.add_parser("experiment", help="recognizer -> scenes -> train prepare -> fit -> export -> bench")
    e.add_argument("--out", required=True, help="experiment folder (rerun to resume; --force to redo)")
    e.add_argument("--base", required=True,
                   help="SD1.5-shaped base checkpoint that draws the world, or 'tiny' (random: plumbing only)")
    e.add_argument("--scenes", type=int, default=2000)
    e.add_argument("--size", type=int, default=128)
    e.add_argument("--steps", type=int, default=500, help="train fit steps")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--lr", type=float, default=1e-4, help="projection and ControlNet learning rate")
    e.add_argument("--ns", default="1,2,3,4,7")
    e.add_argument("--bench-scenes", type=int, default=8)
    e.add_argument("--sample-steps", type=int, default=20)
    e.add_argument("--identities", type=int, default=24)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--comfyui", default=None)
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=_experiment)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`featurebank embed ... --ray [auto|local|ADDRESS]`: the cluster options of the embed command.

``featurebank.cli.embed_cmds`` adds these options with :func:`register_ray_options` and hands
the run to :func:`embed_on_ray` when :func:`uses_ray` says ``--ray`` is given; the options
carry the parameter names of :func:`featurebank.distributed.embed_images_ray`, which does the
work. Nothing here imports Ray.
"""

from __future__ import annotations

import argparse

__all__ = ["register_ray_options", "uses_ray", "embed_on_ray"]

_RAY_ONLY = (("num_actors", "--num-actors"), ("num_cpus_per_actor", "--cpus-per-actor"),
             ("num_gpus_per_actor", "--gpus-per-actor"))


def register_ray_options(p: argparse.ArgumentParser) -> None:
    """Add ``--ray`` and the actor options to the ``embed`` parser."""
    g = p.add_argument_group("cluster (Ray; needs `pip install 'featurebank[ray]'`)")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|local|ADDRESS",
                   help="embed on a Ray cluster: auto (the one `ray start --head` runs here; the default when --ray "
                   "has no value), local (a private Ray instance on this machine), or ADDRESS (host:6379, "
                   "ray://host:10001). The store must be on a filesystem every node mounts at the same path")
    g.add_argument("--num-actors", type=int, default=None, metavar="N",
                   help="inference actors (default: one per GPU, or half the cluster's CPUs)")
    g.add_argument("--cpus-per-actor", dest="num_cpus_per_actor", type=float, default=None, metavar="N",
                   help="CPUs (and onnxruntime threads) per actor (default: 1)")
    g.add_argument("--gpus-per-actor", dest="num_gpus_per_actor", type=float, default=None, metavar="N",
                   help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)")
    # contradictory options are usage errors (exit 2 with the usage line), found after parsing
    p.set_defaults(ray_parser=p)


def uses_ray(args: argparse.Namespace) -> bool:
    """True with --ray; the actor options without --ray are an error, not ignored."""
    if getattr(args, "ray", None) is not None:
        return True
    given = [flag for dest, flag in _RAY_ONLY if getattr(args, dest, None) is not None]
    if given:
        args.ray_parser.error(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --ray")
    return False


def embed_on_ray(args: argparse.Namespace, model: str):
    """Run ``featurebank embed`` with the ONNX file ``model`` on a cluster; returns the run's
    EmbedReport."""
    if args.workers is not None:
        args.ray_parser.error("--workers sets the local embedder's decode threads; with --ray, decoding runs in "
                              "Ray tasks (one CPU each): leave --workers out")
    from featurebank.artifact import DEFAULT_DECODE_MODE
    from featurebank.distributed import embed_images_ray

    gpus = args.num_gpus_per_actor
    if args.device == "cpu":
        if gpus:
            args.ray_parser.error(f"--device cpu contradicts --gpus-per-actor {gpus:g}")
        gpus = 0
    elif args.device == "cuda":
        if gpus == 0:
            args.ray_parser.error("--device cuda contradicts --gpus-per-actor 0")
        gpus = gpus or 1  # fails with a clear ClusterError where the cluster has no GPU
    return embed_images_ray(
        args.sources, model, store=args.store,
        address=None if args.ray == "local" else args.ray,
        decode_mode=args.decode_mode or DEFAULT_DECODE_MODE, batch_size=args.batch_size or 16,
        num_actors=args.num_actors, num_cpus_per_actor=args.num_cpus_per_actor or 1, num_gpus_per_actor=gpus,
        retry_failed=args.retry_failed, progress=args.progress,
    )

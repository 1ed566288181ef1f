"""The Ray session a job runs on: start one if needed, know whether it can grow, read its resources.

Jobs call plain ``ray.init()`` (never with ``num_cpus``): under ``ray job submit`` or with ``RAY_ADDRESS`` set it
attaches to the cluster, otherwise it starts a local single-node Ray with Ray 2.60's token authentication on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from chexseg_dist.core.console import begin_quiet


def cluster_resources() -> dict[str, float]:
    """``ray.cluster_resources()`` as floats (Ray must be running)."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def ray_can_grow() -> bool:
    """Whether the Ray this job runs on (or will attach to with ``ray.init()``) is a cluster that may still grow.

    False for a single-node Ray started by this process (``ray.init()`` with no cluster to attach to, or an earlier
    ``ray.init(num_cpus=...)`` here): resources missing now will never come. True when ``ray.init()`` attaches to a
    cluster (``RAY_ADDRESS``, e.g. under ``ray job submit``, or one started with ``ray start``), and whenever Ray's
    private helpers used here change (then the job warns rather than refuses).
    """
    import ray

    try:
        if ray.is_initialized():
            from ray._private import worker

            node = worker._global_node
            return not (node is not None and node.head)
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None  # type: ignore[arg-type]
    except Exception:
        return True


def ensure_ray() -> bool:
    """``ray.init()`` unless Ray is running; returns whether this call started it.

    Noisy work starts here: inside a command's quiet session, Ray's output goes to the command's log from now on.
    """
    import ray
    import ray.data

    begin_quiet()
    # Progress bars would only fill the log: commands print their own progress lines with rates and ETAs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return False
    ray.init()
    return True


@contextlib.contextmanager
def ray_session() -> Iterator[bool]:
    """Run the block with Ray up: started here (and shut down after) unless it already runs. Yields whether it was."""
    started = ensure_ray()
    try:
        yield started
    finally:
        if started:
            import ray

            ray.shutdown()


def pool_problem(
    section: str,
    num_actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    decode_cpus: float,
    resources: dict[str, float],
) -> str | None:
    """Why a fixed actor pool plus CPU tasks cannot run on a cluster with these resources, or None.

    The model actors hold their CPUs and GPUs for the whole job, so at least ``decode_cpus`` must be left over for
    the CPU tasks, and the GPUs must cover every actor; otherwise Ray Data waits forever.

    Args:
        section: the config section holding the settings (named in the message).
        resources: ``ray.cluster_resources()``.
    """
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    actor_cpus, actor_gpus = num_actors * cpus_per_actor, num_actors * gpus_per_actor
    if actor_gpus > gpus + 1e-9:
        return (
            f"{section}.num_actors={num_actors} x gpus_per_actor={gpus_per_actor} need {actor_gpus:g} GPU(s) "
            f"but the Ray cluster has {gpus:g}; lower them, or set gpus_per_actor=0 to run on CPUs"
        )
    if cpus - actor_cpus < decode_cpus - 1e-9:
        return (
            f"{section}.num_actors={num_actors} x cpus_per_actor={cpus_per_actor} hold {actor_cpus:g} of the "
            f"Ray cluster's {cpus:g} CPUs, leaving less than decode_cpus={decode_cpus} for decoding; lower "
            "num_actors or cpus_per_actor"
        )
    return None


def actor_gpus(section: str, num_actors: int, gpus_per_actor: float | str, resources: dict[str, float]) -> float:
    """``gpus_per_actor`` with ``"auto"`` resolved against the cluster (said on the console); numbers are kept.

    ``auto``: one GPU per actor when the cluster has that many, an equal share each when it has fewer (actors then
    share a card), none when it has no GPU. Explicit values are checked later by :func:`pool_problem`.
    """
    if gpus_per_actor != "auto":
        return float(gpus_per_actor)
    from chexseg_dist.core.console import say

    gpus = float(resources.get("GPU", 0.0))
    if gpus <= 0:
        say(f"{section}: gpus_per_actor=auto: the Ray cluster has no GPU; {num_actors} model actor(s) on CPUs")
        return 0.0
    share = min(1.0, gpus / max(1, num_actors))
    say(f"{section}: gpus_per_actor=auto: the Ray cluster has {gpus:g} GPU(s); {num_actors} actor(s), {share:g} each")
    return share


def worker_gpus(
    section: str, num_workers: int, use_gpu: bool | str, resources: dict[str, float], can_grow: bool
) -> bool:
    """``use_gpu`` with ``"auto"`` resolved against the cluster (said on the console): GPUs when it has one per
    worker. An explicit ``true`` on a cluster without enough GPUs that cannot grow is refused (Ray Train would wait
    for them forever).

    Raises:
        InputError: naming the section, the GPUs needed and the cluster's, and the fix.
    """
    from chexseg_dist.core.console import say
    from chexseg_dist.errors import InputError

    gpus = float(resources.get("GPU", 0.0))
    if use_gpu == "auto":
        use = gpus >= num_workers
        if use:
            say(f"{section}: use_gpu=auto: the Ray cluster has {gpus:g} GPU(s); {num_workers} worker(s) on GPUs")
        elif gpus > 0:
            say(
                f"{section}: use_gpu=auto: the Ray cluster has {gpus:g} GPU(s) for {num_workers} worker(s); training "
                f"on CPUs (set {section}.num_workers={int(gpus)} to use the GPUs)"
            )
        else:
            say(f"{section}: use_gpu=auto: the Ray cluster has no GPU; {num_workers} worker(s) on CPUs")
        return use
    if use_gpu and gpus < num_workers and not can_grow:
        raise InputError(
            f"{section}.use_gpu=true with num_workers={num_workers} needs {num_workers} GPU(s) but the Ray cluster "
            f"has {gpus:g}; set {section}.use_gpu=false (or auto), or fewer workers"
        )
    return bool(use_gpu)

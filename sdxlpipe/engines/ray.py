"""The Ray engine (`--engine ray`): the same encode on Ray Data.

Jobs become a Ray dataset; a pool of long-lived actors (one per GPU, or
`workers` CPU slots when the cluster has no GPU) each loads the model once,
decodes its batches and encodes them. Results come back to the driver in
job order, and the driver writes the shards itself, so shard names stay
content-addressed (Ray's own writers use random names). Connects to the
cluster in RAY_ADDRESS, or starts a local one. `pip install 'sdxlpipe[ray]'`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

from sdxlpipe.engines import Result
from sdxlpipe.errors import UserError

COLUMNS = ("key", "payload", "note", "chunk", "source")


class _Actor:
    """Lives in a Ray actor: one model for the actor's lifetime."""

    def __init__(self, prepare, make_worker):
        self.prepare = prepare
        self.worker = make_worker()

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"]) if "key" in batch else len(next(iter(batch.values())))
        jobs = [{k: _plain(v[i]) for k, v in batch.items()} for i in range(n)]
        prepared = [self.prepare(j) for j in jobs] if self.prepare is not None else [None] * n
        results = self.worker(jobs, prepared)
        return {name: [r[i] for r in results] for i, name in enumerate(COLUMNS)}


def _plain(value):
    """numpy scalars from a Ray batch as Python values (the jobs are plain dicts)."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


class RayEngine:
    name = "ray"

    def __init__(self, workers: int):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("--engine ray needs Ray, which is not installed",
                            "pip install 'sdxlpipe[ray]' (or run with --engine local)") from None
        self.workers = max(1, workers)

    def _pool(self) -> tuple[int, dict]:
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            return gpus, {"num_gpus": 1}
        return self.workers, {"num_cpus": 1}

    def run(self, jobs: Sequence[dict], prepare: Callable[[dict], Any] | None,
            make_worker: Callable[[], Callable[[list[dict], list[Any]], list[Result]]],
            batch_size: int) -> Iterator[list[Result]]:
        if not jobs:
            return
        import ray

        size, resources = self._pool()
        ds = ray.data.from_items(list(jobs))
        # Results in job order: the driver cuts shards at chunk boundaries.
        ds.context.execution_options.preserve_order = True
        out = ds.map_batches(_Actor, fn_constructor_args=(prepare, make_worker), batch_size=batch_size,
                             compute=ray.data.ActorPoolStrategy(size=size), batch_format="numpy", **resources)
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            cols = {name: batch.column(name).to_pylist() for name in COLUMNS}
            yield list(zip(*(cols[name] for name in COLUMNS)))

    def close(self) -> None:
        pass  # the Ray cluster outlives the run; the actors end with their dataset

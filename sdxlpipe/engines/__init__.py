"""Encode engines: where the model workers of the encode stages run.

An engine takes jobs (plain dicts), prepares each one (decode, resize: CPU
work) and feeds batches of prepared jobs to a long-lived model worker,
yielding the worker's results in job order. The stage writes the results
into the store itself, so shard names stay content-addressed whatever the
engine. `local` (this process plus decode worker processes) and `ray`
(Ray Data, one model actor per GPU or CPU slot) share that one interface.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

ENGINES = ("local", "ray")

# A result: (item_key, payload bytes or None if the job failed, a note to log or "").
Result = tuple[str, "bytes | None", str]


class Engine(Protocol):
    name: str

    def run(self, jobs: Sequence[dict], prepare: Callable[[dict], Any] | None,
            make_worker: Callable[[], Callable[[list[dict], list[Any]], list[Result]]],
            batch_size: int) -> Iterator[list[Result]]:
        """Results of batches of `jobs`, in job order; prepare runs on CPU workers."""
        ...

    def close(self) -> None: ...


def open_engine(name: str, workers: int) -> Engine:
    if name == "local":
        from sdxlpipe.engines.local import LocalEngine

        return LocalEngine(workers)
    if name == "ray":
        from sdxlpipe.engines.ray import RayEngine

        return RayEngine(workers)
    from sdxlpipe.errors import UserError

    raise UserError(f"--engine {name!r} is not known", f"use one of: {', '.join(ENGINES)}")


def run_engine(ctx, workers: int) -> Engine:
    """The run's engine (`--engine`) with `workers` decode workers: one per run, kept in the stage context,
    so models and worker pools live on between the encode stages."""
    return ctx.keep(f"engine/{ctx.engine_name}/{workers}", lambda: open_engine(ctx.engine_name, workers))

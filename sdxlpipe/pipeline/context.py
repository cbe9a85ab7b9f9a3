"""What a stage gets besides its table and params: `ctx`.

The store, the workspace, the content-hash memo, progress, lazily loaded
models and the counters the run reports. Models load on first use, so a
stage with nothing to compute never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from sdxlpipe.cache_format import Store
from sdxlpipe.config import Config
from sdxlpipe.pipeline.hashing import ContentMemo
from sdxlpipe.pipeline.progress import Reporter
from sdxlpipe.pipeline.workspace import Workspace


@dataclass
class StageStats:
    items: int = 0
    computed: int = 0
    reused: int = 0
    failed: int = 0
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)
    reported: bool = False  # the stage counted itself; the runner must not diff


class Models:
    """Loads each model component once per process, on first use."""

    def __init__(self, config: Config, memo: ContentMemo) -> None:
        self.config = config
        self.memo = memo
        self._loaded: dict[str, Any] = {}
        self._fingerprints: dict[str, str] | None = None

    def fingerprints(self) -> dict[str, str]:
        """xxh3 of each component's weights (models/fingerprints.py); needs no torch."""
        if self._fingerprints is None:
            from sdxlpipe.models.fingerprints import model_fingerprints

            self._fingerprints = model_fingerprints(
                self.config.model, self.config.vae, self.memo.hash_file, self.config.base_dir,
                allow_pickle=self.config.allow_pickle,
            )
        return self._fingerprints

    def _get(self, name: str, build) -> Any:
        if name not in self._loaded:
            self._loaded[name] = build()
        return self._loaded[name]

    def vae(self, dtype: str = "float32"):
        from sdxlpipe.models import loading

        return self._get(f"vae/{dtype}", lambda: loading.load_vae(
            self.config.model, self.config.vae, dtype=dtype, device=self.config.device,
            allow_pickle=self.config.allow_pickle))

    def text_stack(self, dtype: str = "float32"):
        from sdxlpipe.models import loading

        return self._get(f"text/{dtype}", lambda: loading.load_text_stack(
            self.config.model, dtype=dtype, device=self.config.device,
            allow_pickle=self.config.allow_pickle))

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    def loader(self, component: str, portable: bool = False):
        """`load(dtype)` for "vae" or "text"; portable = picklable, for workers in other processes."""
        if not portable:
            return self.vae if component == "vae" else self.text_stack
        return ComponentLoader(component, self.config.model, self.config.vae, self.config.device,
                               self.config.allow_pickle)


@dataclass(frozen=True)
class ComponentLoader:
    """Loads one component from the config's model spec; small and picklable (Ray actors)."""

    component: str  # "vae" or "text"
    model: str
    vae: str | None
    device: str
    allow_pickle: bool

    def __call__(self, dtype: str = "float32"):
        from sdxlpipe.models import loading

        if self.component == "vae":
            return loading.load_vae(self.model, self.vae, dtype=dtype, device=self.device,
                                    allow_pickle=self.allow_pickle)
        return loading.load_text_stack(self.model, dtype=dtype, device=self.device, allow_pickle=self.allow_pickle)


@dataclass
class Context:
    config: Config
    store: Store
    workspace: Workspace
    memo: ContentMemo
    reporter: Reporter
    models: Models
    dry_run: bool = False
    # (k, n): compute only items whose key falls in partition k of n.
    partition: tuple[int, int] | None = None
    stage: str = ""
    # Where the encode stages run their model workers: "local" or "ray".
    engine_name: str = "local"
    stats: dict[str, StageStats] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    # Store items found damaged during this run, per stage (recomputed; reported in --json).
    damaged: dict[str, set[str]] = field(default_factory=dict)
    # The config's dataset sources (pipeline/sources.py), opened: their rows join the table at the publish point.
    datasets: list = field(default_factory=list)
    # What stages keep for the whole run, by name (`keep`); each is closed when the run ends.
    kept: dict[str, Any] = field(default_factory=dict)

    def keep(self, name: str, make: Callable[[], Any]) -> Any:
        """`make()` once per run for `name`, then the same object for later stages (the encode engines:
        models and worker pools are kept between stages); its `close()` is called when the run ends."""
        if name not in self.kept:
            self.kept[name] = make()
        return self.kept[name]

    @property
    def train_store(self):
        """What training reads items through: the datasets' snapshots, then the config's store."""
        from sdxlpipe.pipeline.sources import layered

        return layered(self.datasets, self.store)

    def close(self) -> None:
        for thing in self.kept.values():
            thing.close()
        self.kept.clear()

    @property
    def log(self):
        import logging

        return logging.getLogger(f"sdxlpipe.{self.stage or 'run'}")

    def report(self, *, items: int, computed: int, reused: int, failed: int = 0,
               reasons: list[str] | None = None) -> None:
        s = self.stats.setdefault(self.stage, StageStats())
        s.items, s.computed, s.reused, s.failed = items, computed, reused, failed
        s.reasons = list(reasons or [])
        s.reported = True

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": path, "reason": reason})
        self.log.warning("skipped %s: %s", path, reason)

    def previous_table(self, stage: str | None = None):
        return self.workspace.read_table(stage or self.stage)

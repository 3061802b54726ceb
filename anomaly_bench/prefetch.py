"""``anomaly-bench-prefetch``: fetch every pretrained weight a run or a sweep needs, on a
machine with network, into the caches that machines without network then read.

    anomaly-bench-prefetch [--cache-dir DIR] [--dry-run] <the overrides of the run or sweep>

The overrides are those of ``anomaly-bench`` (``-m`` optional): a sweep's values are
expanded into its jobs as Hydra does (``experiment=`` presets included), each job's
configuration is composed, and every backbone it names (the ``backbone`` group, and any
other backbone configuration a method holds, such as MMR's teacher) is built once the way
a run builds it (:mod:`anomaly_bench.backbones`), which downloads its weights into the
caches of timm and open_clip (the Hugging Face cache, ``$HF_HOME``) or of torch hub
(``$TORCH_HOME``: weights published at a URL, such as MAE's) and loads them, so a file
that does not load is found here and not on the cluster. A local ``backbone.weights``
file is checked to exist; random initialisations need nothing.

On the compute nodes set the same ``HF_HOME`` and ``TORCH_HOME`` (``--cache-dir DIR``
sets both under DIR and prints the lines) and ``HF_HUB_OFFLINE=1``: runs then read the
weights from there and never touch the network.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from anomaly_bench.errors import AnomalyBenchError, ConfigError, WeightsError


@dataclass(frozen=True)
class WeightsRequest:
    """One backbone's weights: what a run builds, keyed by what selects the weights."""

    key: str  # where in the config (``backbone``, ``method.teacher``)
    kind: str
    name: str
    hub_tag: str | None
    url: str | None
    image_size: int | None
    pretrained: bool
    file: str | None

    @property
    def what(self) -> str:
        if self.file:
            return f"file {self.file}"
        if not self.pretrained:
            return "random initialisation"
        if self.url:
            return self.url
        hub = "open_clip" if self.kind == "clip" else "timm"
        return f"{hub}:{self.name}" + (f".{self.hub_tag}" if self.hub_tag else "")


def backbone_nodes(tree: Any, prefix: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every backbone configuration in a resolved config: a mapping with ``name``,
    ``pretrained`` and ``weights`` (the keys conf/base/backbone.yaml gives each one)."""
    if isinstance(tree, Mapping):
        if {"name", "pretrained", "weights"} <= set(tree):
            yield prefix.rstrip("."), tree
            return
        for key, value in tree.items():
            if key != "hydra":
                yield from backbone_nodes(value, f"{prefix}{key}.")


def requests(configs: Sequence[Mapping[str, Any]]) -> list[WeightsRequest]:
    """The distinct weights the resolved job configurations ask for, in first-use order."""
    out: dict[WeightsRequest, None] = {}
    for cfg in configs:
        for key, node in backbone_nodes(cfg):
            out[WeightsRequest(
                key=key, kind=str(node.get("kind", "cnn")), name=str(node["name"]),
                hub_tag=node.get("hub_tag"), url=node.get("weights_url"),
                image_size=node.get("image_size"), pretrained=bool(node["pretrained"]),
                file=node.get("weights"))] = None
    return list(out)


def job_configs(overrides: Sequence[str]) -> list[dict[str, Any]]:
    """The resolved configuration of every job of ``anomaly-bench [-m] <overrides>``."""
    from anomaly_bench.configs import composer
    from anomaly_bench.sweep import job_overrides

    given = [o for o in overrides if o not in ("-m", "--multirun")]
    try:
        with composer() as compose:
            jobs = job_overrides(given, compose)
            configs = []
            for job in jobs:
                cfg = compose(job)
                plain = {k: OmegaConf.to_container(cfg[k], resolve=True)
                         if OmegaConf.is_config(cfg[k]) else cfg[k]
                         for k in cfg if k != "hydra"}
                configs.append(plain)
    except AnomalyBenchError:
        raise
    except Exception as exc:  # Hydra's composition error names the key
        raise ConfigError(f"the overrides {' '.join(given)} do not compose: "
                          f"{' '.join(str(exc).split())}") from None
    return configs


def fetch(req: WeightsRequest) -> str:
    """Make ``req``'s weights available offline; where they are (or why nothing is needed)."""
    from anomaly_bench.backbones import weights

    if req.file:
        path = Path(req.file).expanduser()
        if not path.is_file():
            raise WeightsError(f"{req.key}.weights={req.file}: no such file (a local weights "
                               "file must exist on every machine that runs the jobs).")
        return f"local file {path}"
    if not req.pretrained:
        return "nothing to fetch (seeded random initialisation)"
    if req.kind == "clip":
        import open_clip

        from anomaly_bench.backbones.clip import create_clip_model

        create_clip_model(req.name, req.hub_tag, True, None, 0, req.image_size)
        cfg = open_clip.get_pretrained_cfg(req.name, req.hub_tag) or {}
        where = weights.hub_file((cfg.get("hf_hub") or "").rstrip("/") or None)
        return str(where) if where else "open_clip's cache"
    from anomaly_bench.backbones.extractor import create_timm_model

    create_timm_model(req.name, req.hub_tag, True, None, 0, shared=False, url=req.url)
    if req.url:
        return str(weights.url_cache_path(req.url))
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{req.name}.{req.hub_tag}" if req.hub_tag
                                         else req.name)
    hf_id = cfg.hf_hub_id if cfg is not None else None
    if hf_id and hf_id.endswith("/"):
        hf_id += f"{req.name}.{req.hub_tag}"
    where = weights.hub_file(hf_id)
    return str(where) if where else "timm's cache"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="anomaly-bench-prefetch",
        description="Fetch every pretrained weight a run or sweep needs (same overrides as "
                    "anomaly-bench), for machines without network.")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="cache folder: sets HF_HOME=DIR/huggingface and TORCH_HOME=DIR/torch "
                         "(default: the current HF_HOME and TORCH_HOME)")
    ap.add_argument("--dry-run", action="store_true", help="list the weights, fetch nothing")
    args, overrides = ap.parse_known_args(argv)
    if args.cache_dir is not None:
        os.environ["HF_HOME"] = str(args.cache_dir.expanduser().resolve() / "huggingface")
        os.environ["TORCH_HOME"] = str(args.cache_dir.expanduser().resolve() / "torch")
    try:
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not args.dry_run:
            raise ConfigError("HF_HUB_OFFLINE=1 is set, but anomaly-bench-prefetch downloads: "
                              "run it without HF_HUB_OFFLINE on a machine with network.")
        configs = job_configs(overrides)
        wanted = requests(configs)
        print(f"{len(configs)} job(s), {len(wanted)} distinct backbone weight(s):")
        for req in wanted:
            print(f"  {req.key}: {req.what}" + ("" if args.dry_run else f" -> {fetch(req)}"))
    except AnomalyBenchError as exc:
        print(f"anomaly-bench-prefetch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not args.dry_run:
        import torch

        hf_home = os.environ.get("HF_HOME", str(Path("~/.cache/huggingface").expanduser()))
        print("On the machines that run the jobs (without network):\n"
              f"  export HF_HOME={hf_home}\n  export TORCH_HOME={Path(torch.hub.get_dir()).parent}"
              "\n  export HF_HUB_OFFLINE=1")
    return 0


def main_exit() -> None:
    """Console script ``anomaly-bench-prefetch``."""
    raise SystemExit(main())


if __name__ == "__main__":
    main_exit()

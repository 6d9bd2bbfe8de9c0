"""The simulator's output for the shipped configs, byte for byte, against stored digests: those of the
38 configs that predate plug-in policies were stored before the scheduler's policies became plug-ins
(with the default policy, `fcfs`, nothing a user ran changed); a config added since has its digest
stored when it was added.

Configs: every `simulator/configs/*.yaml` and the simulation of every sweep point of every
`experiments/*.yaml` (of `pd_cluster.yaml`, the first rate of each variant). `hardware: local` is
priced by one committed profile, so the digests do not depend on this machine. Each digest covers
the files `sagellm simulate` writes: requests.csv, summary.json (summary and info) and kv_usage.csv.
Regenerate (only when a change is meant to alter results): `python tests/test_sim_digest.py --write`;
store the digests of new configs only, leaving the others as they are: `--add`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = Path(__file__).parent / "data" / "sim_digests.json"
PROFILE = ROOT / "simulator/hardware/profiles/cpu-amd-epyc-avx2-2c-1t__llama-L30-H576-I1536-KV3-V49152__float32.json"


def shipped_configs() -> dict[str, object]:
    from experiments.config import ExperimentConfig
    from simulator.config import SimulationConfig

    configs = {p.name: SimulationConfig.from_yaml(p) for p in sorted((ROOT / "simulator/configs").glob("*.yaml"))}
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        seen_variants: set[str] = set()
        for point in ExperimentConfig.from_yaml(path).points:
            variant = point.slug.split("_")[1] if path.name == "pd_cluster.yaml" else point.slug
            if variant in seen_variants:
                continue
            seen_variants.add(variant)
            configs[f"{path.name}:{point.slug}"] = point.simulation
    return {name: replace(cfg, hardware=str(PROFILE)) if cfg.hardware == "local" else cfg
            for name, cfg in configs.items()}


def digest(config: object) -> str:
    from sagellm.metrics.io import write_run
    from simulator.sim import Simulation

    result = Simulation(config).run()
    with tempfile.TemporaryDirectory() as tmp:
        out = write_run(Path(tmp), result.records, result.summary, result.kv_usage, result.info)
        h = hashlib.sha256()
        for name in ("requests.csv", "summary.json", "kv_usage.csv"):
            h.update((out / name).read_bytes())
    return h.hexdigest()


CONFIGS = shipped_configs()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_config_output_is_unchanged(name: str) -> None:
    stored = json.loads(DIGESTS.read_text())
    assert name in stored, f"no stored digest for {name}; regenerate with --write if it is a new config"
    assert digest(CONFIGS[name]) == stored[name], f"the simulator's output for {name} changed"


if __name__ == "__main__":
    if sys.argv[1:] not in (["--write"], ["--add"]):
        sys.exit("usage: python tests/test_sim_digest.py --write | --add")
    DIGESTS.parent.mkdir(exist_ok=True)
    stored = json.loads(DIGESTS.read_text()) if sys.argv[1] == "--add" and DIGESTS.exists() else {}
    new = {name: digest(cfg) for name, cfg in sorted(CONFIGS.items()) if name not in stored}
    DIGESTS.write_text(json.dumps(dict(sorted({**stored, **new}.items())), indent=1) + "\n")
    print(f"wrote {len(new)} new digests to {DIGESTS} ({len(stored)} kept)")

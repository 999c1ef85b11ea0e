"""A round across network stacks: WAN conditions against the same namespaces without
them, in one run (these machines are shared: compare the ratio, not the seconds).

The coordinator and three hospitals each in a network namespace (experiments.netlab),
TLS and SuperNode authentication, site runners. LAN: every SuperNode through a delay
proxy holding nothing (the same path as the WAN's, minus the conditions). WAN: 20 ms
each way in the proxy (40 ms round trip), 20 Mbit/s (tbf) and 1% loss (nftables) on
each hospital's link. The same job twice per condition, interleaved.

    python -m experiments.bench_wan --out experiments/results/bench_wan    # root
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from experiments.deployment_lab import Deployment, write_site_csv
from experiments.netlab import NetLab, unavailable
from fed_dplora.run.results import read_metrics

log = logging.getLogger("fed_dplora.bench_wan")
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")


def job(deployment: Deployment, out: Path, name: str, model: str) -> list[dict]:
    config = {"model.name": f'"{model}"', "output-dir": f'"{out}"', "run-name": f'"{name}"',
              "clients-per-round": 3, "num-server-rounds": 3, "local-steps": 5,
              "batch-size": 64, "physical-batch-size": 64, "privacy.secure-noise": "false"}
    result = deployment.run(" ".join(f"{k}={v}" for k, v in config.items()))
    if deployment.statuses()[-1] != "finished:completed":
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}")
    return read_metrics(out / name)


def condition(tmp: Path, lab: NetLab, wan: bool, model: str) -> Deployment:
    """The SuperLink and three hospitals online (allowing `model`), with or without WAN
    conditions."""
    deployment = Deployment(tmp, lab=lab, sites=HOSPITALS, models=model)
    deployment.superlink()
    for i, site in enumerate(HOSPITALS):
        write_site_csv(tmp / f"{site}.csv", i, 600)
        if wan:
            lab.set_rate(site, 20)
            lab.set_loss(site, 1.0)
        proxy = deployment.delay_proxy(site, 20 if wan else 0)
        deployment.register(site)
        deployment.supernode(site, retries=None, superlink=proxy,
                             **{"privacy-ledger": str(tmp / f"{site}-ledger.json")})
    deployment.wait_for(lambda: deployment.online() == len(HOSPITALS), "three SuperNodes",
                        180)
    return deployment


def measure(out: Path, model: str, repeats: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {"lan": [], "wan": []}
    for repeat in range(repeats):
        for name in ("lan", "wan"):
            lab = NetLab(HOSPITALS).create()
            with tempfile.TemporaryDirectory() as tmp:
                deployment = condition(Path(tmp), lab, name == "wan", model)
                try:
                    rows[name] += job(deployment, out, f"{name}-{repeat}", model)
                finally:
                    deployment.stop_all()
                    lab.destroy()
    return rows


def table(rows: dict[str, list[dict]]) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])
    lines = ["| condition | round wall s (median) | server wait for training s | "
             "bytes up + down per round | rounds |", "|---|---|---|---|---|"]
    for name in ("lan", "wan"):
        lines.append(f"| {name} | {median(name, 'wall_s'):.1f} | {median(name, 'train_s'):.1f}"
                     f" | {median(name, 'bytes_up') + median(name, 'bytes_down'):,.0f} | "
                     f"{len(rows[name])} |")
    ratio = median("wan", "wall_s") / median("lan", "wall_s")
    lines.append(f"\nWAN / LAN round wall time: {ratio:.2f}x (target <= 1.5x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_wan")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if unavailable():
        raise SystemExit(f"bench_wan: {unavailable()}")
    rows = measure(args.out.resolve(), args.model, args.repeats)
    (args.out / "rounds.json").write_text(json.dumps(rows, indent=1))
    (args.out / "bench_wan.md").write_text(table(rows) + "\n")
    log.info("%s", table(rows))


if __name__ == "__main__":
    main()

"""Turn a finished sweep into a table and a plot: read every run's TensorBoard events, keep each metric's final
value, and write `sweep.md`, `sweep.csv` and `sweep.png` (one bar per run for the chosen metric).

    python -m uae_lightning.sweeps runs/g4u_group_size                      # every final metric, default plot
    python -m uae_lightning.sweeps runs/g4u_group_size --metric g4u/reward --out tables/

A run is a folder with `.hydra/overrides.yaml` (what Hydra wrote for that job); its label is the overrides that
differ between the runs of the sweep. Metrics are named `<stage>/<tag>`; when a tag was logged several times
(e.g. the held-out reward before and after a stage) the last value counts.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import yaml


def final_scalars(tb_dir: Path) -> dict[str, float]:
    """The last value of every scalar tag in a TensorBoard log directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        if events:
            out[tag] = float(max(events, key=lambda e: (e.wall_time, e.step)).value)  # the latest one logged
    return out


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run: its overrides and the final value of every metric of every stage."""
    rows = []
    for cfg in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run = cfg.parent.parent
        overrides = yaml.safe_load(cfg.read_text()) or []
        metrics: dict[str, float] = {}
        for tb in sorted(run.glob("*/tensorboard")):
            stage = tb.parent.name
            metrics.update({f"{stage}/{k}": v for k, v in final_scalars(tb).items()})
        summary = run / "summary.json"
        if summary.is_file():
            saved = json.loads(summary.read_text())
            for key in ("unified_bench", "geneval"):
                for stage, score in saved.get(key, {}).items():
                    metrics[f"{stage}/{key}"] = score
        if metrics:
            rows.append({"run": str(run.relative_to(sweep_dir)), "overrides": overrides, "metrics": metrics})
    return rows


def labels(rows: list[dict]) -> list[str]:
    """Each run's label: the overrides that are not shared by every run."""
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    return [" ".join(o for o in r["overrides"] if o not in shared) or r["run"] for r in rows]


def write_table(rows: list[dict], out: Path, metrics: list[str]) -> None:
    names = labels(rows)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *metrics])
        for name, r in zip(names, rows):
            w.writerow([name, *[r["metrics"].get(m, "") for m in metrics]])
    lines = ["| run | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, r in zip(names, rows):
        cells = [f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], out: Path, metric: str) -> None:
    """A horizontal bar chart of `metric` per run (matplotlib, file output only)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    names = labels(rows)
    values = [r["metrics"].get(metric) for r in rows]
    if all(v is None for v in values):
        raise ValueError(f"no run logged {metric!r}")
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.2))
    y = list(range(len(rows)))
    bars = ax.barh(y, [v if v is not None else 0.0 for v in values], color="#4670be")
    ax.bar_label(bars, labels=[f"{v:.4f}" if v is not None else "n/a" for v in values], padding=3, fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # first run on top, as in the table
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(metric)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


ROUND_STAGE = re.compile(r"^(g4u|u4g)(?:_round(\d+))?$")


def by_round(sweep_dir: Path, metric: str) -> dict[str, dict[str, dict[int, float]]]:
    """{run: {"g4u" | "u4g": {round: value}}} of every run under `sweep_dir` (or `sweep_dir` itself): `metric` of
    each G4U and U4G stage of each round, from summary.json (`unified_bench`, `geneval`, or a stage metric such as
    `reward_after`)."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    summaries = [sweep_dir / "summary.json"] if (sweep_dir / "summary.json").is_file() else sorted(sweep_dir.rglob("summary.json"))
    for path in summaries:
        summary = json.loads(path.read_text())
        series: dict[str, dict[int, float]] = {}
        for folder, metrics in summary["stages"].items():
            m = ROUND_STAGE.match(folder)
            if not m:
                continue
            value = summary.get(metric, {}).get(folder) if metric in ("unified_bench", "geneval") else metrics.get(metric)
            if value is not None:
                series.setdefault(m.group(1), {})[int(m.group(2) or 1)] = value
        if series:
            out[str(path.parent.relative_to(sweep_dir)) if path.parent != sweep_dir else path.parent.name] = series
    return out


def write_round_plot(sweep_dir: Path, out: Path, metric: str) -> Path:
    """`metric` against the round, one line per run and stage (G4U, U4G): sweep_rounds.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = by_round(sweep_dir, metric)
    if not data:
        raise ValueError(f"no G4U / U4G stage under {sweep_dir} reports {metric!r}")
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, series in data.items():
        for stage, points in series.items():
            rounds = sorted(points)
            ax.plot(rounds, [points[r] for r in rounds], marker="o", label=f"{run}: {stage}")
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "sweep_rounds.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bench_scores(stage_dir: Path) -> dict[str, float]:
    """Each image's Unified-Bench score (x 100, the mean over backbones) from a stage's results.jsonl."""
    rows = [json.loads(line) for line in (stage_dir / "unified_bench" / "results.jsonl").read_text().splitlines()]
    return {r["image"]: 100 * sum(r["scores"].values()) / len(r["scores"]) for r in rows}


def per_stage_table(run_dir: Path) -> str:
    """One row per stage (and round) of one run: what it added over the stage before it, each a mean of paired
    per-image differences on the held-out images +- its standard error: held-out reward, informativeness, caption
    length (from its before/after test), Unified-Bench (x 100, per image against the previous stage's); and GenEval."""
    import math

    summary = json.loads((run_dir / "summary.json").read_text())
    lines = ["| stage | reward | informativeness | caption length | Unified-Bench | GenEval |",
             "|---|---:|---:|---:|---:|---:|"]
    previous = None
    for stage, m in summary["stages"].items():
        cells = []
        for metric in ("reward", "informativeness", "caption_length"):
            if f"{metric}_after" in m:
                gain = m[f"{metric}_after"] - m[f"{metric}_before"]
                cells.append(f"{gain:+.4f} ± {m.get(f'{metric}_gain_se') or 0:.4f}")
            else:
                cells.append(f"{m[metric]:.4f}" if metric in m else "")
        bench = _bench_scores(run_dir / stage) if (run_dir / stage / "unified_bench").is_dir() else None
        if bench is not None and previous is not None:
            diffs = [bench[k] - previous[k] for k in bench if k in previous]
            mean = sum(diffs) / len(diffs)
            se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else 0.0
            cells.append(f"{mean:+.2f} ± {se:.2f}")
        else:
            cells.append(f"{summary['unified_bench'].get(stage, float('nan')):.2f}")
        geneval = summary.get("geneval", {}).get(stage)
        cells.append("" if geneval is None else f"{geneval:.4f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        previous = bench
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m uae_lightning.sweeps", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="the sweep's folder (runs_dir/name)")
    p.add_argument("--metric", default=None, help="metric to plot (default: the last stage's held-out reward)")
    p.add_argument("--metrics", nargs="*", default=None, help="columns of the table (default: all final metrics)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    p.add_argument("--per-stage", action="store_true",
                   help="sweep_dir is one run: print what each stage (and round) added over the one before it")
    p.add_argument("--by-round", metavar="METRIC", default=None,
                   help="plot METRIC (reward_after, informativeness_after, caption_length_after, unified_bench, "
                        "geneval) against the round, one line per run and stage: sweep_rounds.png")
    args = p.parse_args(argv)
    if args.per_stage:
        print(per_stage_table(args.sweep_dir))
        return []
    if args.by_round:
        path = write_round_plot(args.sweep_dir, args.out or args.sweep_dir, args.by_round)
        print(f"{path} ({args.by_round} by round)")
        return []
    rows = collect(args.sweep_dir)
    if not rows:
        raise SystemExit(f"no finished runs with TensorBoard events under {args.sweep_dir}")
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    all_metrics = sorted({m for r in rows for m in r["metrics"]})
    metrics = args.metrics or [m for m in all_metrics if not m.split("/", 1)[1].startswith(("timestep_", "lr-"))]
    metric = args.metric
    if metric is None:
        candidates = [m for m in all_metrics if m.endswith(("/reward", "/unified_bench", "/geneval"))]
        metric = candidates[-1] if candidates else metrics[0]
    write_table(rows, out, metrics)
    write_plot(rows, out, metric)
    print((out / "sweep.md").read_text() + f"\n{out / 'sweep.csv'}\n{out / 'sweep.png'} ({metric})")
    return rows


if __name__ == "__main__":
    main()

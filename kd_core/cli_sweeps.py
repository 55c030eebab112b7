"""``python -m kd_core sweep`` and ``sweeps``: queue a grid of runs, list sweeps, show one's results."""

from __future__ import annotations

import argparse
import sys

from kd_core.cli_common import command, format_table, open_store


@command("sweep", "queue every run of a sweep file (a config with a sweep: section); prints only the sweep's id",
         lambda p: p.add_argument("config", help="YAML config with a sweep: section"))
def cmd_sweep(args: argparse.Namespace) -> int:
    import yaml

    from kd_core.config import ConfigError
    from kd_core.sweeps import submit_sweep

    try:
        raw = yaml.safe_load(open(args.config).read())
    except FileNotFoundError:
        raise ConfigError([("(file)", f"no sweep file at {args.config!r}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("(file)", f"{args.config} is not valid YAML: {exc}")]) from None
    store = open_store(args)
    sweep_id = submit_sweep(store, raw)
    runs = store.list_runs(sweep_id=sweep_id, include_hidden=True)
    teachers = sum(not str(r.config["teacher"]["source"]).startswith("run:") for r in runs)
    print(f"sweep {sweep_id}: {len(runs)} runs queued, {teachers} teacher(s) and {sum(bool(r.config.get('baseline')) for r in runs)} "
          f"baseline(s) trained once each; `python -m kd_core sweeps {sweep_id}` shows the results", file=sys.stderr)
    print(sweep_id)
    return 0


def _sweeps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_id", type=int, nargs="?", help="a sweep's id: its runs and results (default: list sweeps)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--cancel", action="store_true", help="cancel every queued or running run of the sweep")
    what.add_argument("--resume", action="store_true", help="queue every failed or cancelled run of the sweep again")


@command("sweeps", "list sweeps, or show one sweep's results (mean ± std and 95 %% interval over seeds)", _sweeps_args)
def cmd_sweeps(args: argparse.Namespace) -> int:
    from kd_core.sweeps import cancel_sweep, resume_sweep, sweep_runs, sweep_summary

    store = open_store(args)
    if args.sweep_id is None:
        rows = [[s.id, s.name, ", ".join(f"{k}: {v}" for k, v in s.spec.get("axes", {}).items()), len(store.list_runs(sweep_id=s.id, include_hidden=True))]
                for s in store.list_sweeps()]
        print(format_table(rows, ["id", "name", "swept", "runs"]))
        return 0
    sweep = store.get_sweep(args.sweep_id)
    if args.cancel or args.resume:
        acted = (cancel_sweep if args.cancel else resume_sweep)(store, sweep.id)
        print(f"sweep {sweep.id}: {'cancelled' if args.cancel else 'resumed'} runs {', '.join(map(str, acted)) or '(none)'}", file=sys.stderr)
        return 0
    runs = sweep_runs(store, sweep.id)
    axes = list(sweep.spec.get("axes", {}))
    print(f"sweep {sweep.id}: {sweep.name}")
    print(format_table(runs.astype(object).where(runs.notna(), None).values.tolist(), list(runs.columns)))
    summary = sweep_summary(runs, axes)
    if len(summary):
        cols = [c for c in summary.columns if not c.endswith("_std")]
        print("\n" + format_table([[f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in summary[cols].values.tolist()], cols))
    return 0

"""Presets: the shipped configs, named after what they train, with what is known about them.

A preset's label is computed from its config (dataset, teacher → student, recipe), so it cannot drift from
what it does. Its description gives the compression computed from the architectures, what was measured when
the preset was made (``MEASURED``, dated), and what this database has measured since: the last duration
of the same config and the KD gain over the seeds it was run with.

Presets carry no machine paths: ``dataset.root`` is left to the form's default (this machine's data folder,
``$DISTILLERY_HOME/datasets``), so a preset loads as valid wherever the dashboard runs (e.g. Docker's /data).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st
import yaml

from ui.badges import count_text, duration_text, recipe_text
from ui.state import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"
DEFAULT_FILE = "configs/mnist5k_kd.yaml"
FIRST = (DEFAULT_FILE, "configs/digits_kd.yaml")
# measured when the preset was made: each figure says where, when and over how many seeds
MEASURED = {
    "configs/digits_kd.yaml": "KD gain +3.8 ± 1.5 points over the CE-only baseline (seeds 0, 1, 2: +2.2, +3.9, +5.3; "
                              "trained 4–7 min each on a 2-core CPU at load 20, 2026-11)",
}


@dataclass(frozen=True)
class Preset:
    file: str  # relative to the project, e.g. configs/digits_kd.yaml
    config: dict[str, Any]

    @property
    def label(self) -> str:
        c = self.config
        method = (c.get("method") or {}).get("name") if isinstance(c.get("method"), dict) else None
        return (f"{(c.get('dataset') or {}).get('name', 'mnist5k')} · {(c.get('teacher') or {}).get('arch')} → "
                f"{(c.get('student') or {}).get('arch')} · {recipe_text(c.get('recipe'))}" + (f" · method {method}" if method else ""))


def presets() -> dict[str, Preset]:
    """Label -> preset: the default, the digits demo, then every other config in configs/ (sub-folders too)."""
    files = [*FIRST, *(p.relative_to(PROJECT_ROOT).as_posix() for p in sorted(CONFIGS.rglob("*.y*ml")))]
    out: dict[str, Preset] = {}
    for rel in dict.fromkeys(files):
        config = _read(PROJECT_ROOT / rel)
        if config is None:
            continue
        preset = Preset(rel, config)
        label = preset.label if preset.label not in out else f"{preset.label} ({Path(rel).stem})"
        out[label] = preset
    return out


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or "recipe" not in data or "sweep" in data:
        return None  # a sweep is several runs: `python -m kd_core sweep FILE` launches it
    dataset = {k: v for k, v in (data.get("dataset") or {}).items() if k != "root"}  # see the module docstring
    return {**data, "dataset": dataset}


def default_preset() -> Preset | None:
    return next((p for p in presets().values() if p.file == DEFAULT_FILE), None)


# --------------------------------------------------------------------------- what is known about a preset


def description(preset: Preset, store: Any) -> str:
    """One paragraph: the file, what it trains, computed compression, recorded and measured results."""
    from ui.forms import dataset_shape, param_count

    c = preset.config
    parts = [f"`{preset.file}`", _phases_text(c)]
    shape = dataset_shape((c.get("dataset") or {}).get("name", "mnist5k"), (c.get("dataset") or {}).get("image_size"))
    t_n = param_count(str((c.get("teacher") or {}).get("arch")), *shape)
    s_n = param_count(str((c.get("student") or {}).get("arch")), *shape)
    if t_n and s_n:
        parts.append(f"student {count_text(s_n)} vs teacher {count_text(t_n)} parameters ({t_n / s_n:.1f}× smaller)")
    if preset.file in MEASURED:
        parts.append(f"when made: {MEASURED[preset.file]}")
    here = measured_here(preset.config, store)
    if here:
        parts.append(here)
    return " · ".join(parts)


def _phases_text(c: Mapping[str, Any]) -> str:
    teacher, student = c.get("teacher") or {}, c.get("student") or {}
    steps = []
    if teacher.get("source", "train") == "train":
        steps.append(f"teacher {teacher.get('epochs', 10)} epochs")
    steps.append(f"student {student.get('epochs', 10)}")
    if c.get("baseline", True):
        steps.append(f"CE-only baseline {student.get('epochs', 10)}")
    return "trains " + " → ".join(steps)


def measured_here(config: Mapping[str, Any], store: Any) -> str:
    """The last duration of this exact config and the KD gain over its seeds, from this database's runs."""
    same, same_but_seed = _matching_runs(dict(config), store.url, store)
    parts = []
    if same:
        last = same[0]
        took = duration_text(last["trained_s"])
        if last["analysis_s"]:
            took += f" + analysis {duration_text(last['analysis_s'])}"
        parts.append(f"last run here: #{last['id']}, trained {took}")
    gains = [r["kd_gain"] for r in same_but_seed if isinstance(r["kd_gain"], (int, float))]
    if gains:
        spread = f" ± {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
        parts.append(f"KD gain here {statistics.mean(gains):+.1f}{spread} points over {len(gains)} run(s)")
    return " · ".join(parts)


@st.cache_data(show_spinner=False, ttl=30, max_entries=64)
def _matching_runs(config: dict[str, Any], url: str, _store: Any) -> tuple[list[dict], list[dict]]:
    """Completed runs (newest first) of the same config, and of the same config with any seed, in the database at ``url``."""
    from kd_core.config import ConfigError, config_fingerprint, validate_config

    try:
        wanted = validate_config(config)
    except ConfigError:
        return [], []
    exact, any_seed = config_fingerprint(wanted), config_fingerprint(wanted.model_copy(update={"seed": 0}))
    same, same_but_seed = [], []
    for run in _store.list_runs(status=["completed"], include_hidden=True, limit=300):
        prints = _fingerprints(run.uid, run.config)
        if prints is None:
            continue
        facts = {"id": run.id, "trained_s": run.summary.get("trained_s"), "analysis_s": run.summary.get("analysis_s"),
                 "kd_gain": run.summary.get("kd_gain")}
        if prints[0] == exact and facts["trained_s"] is not None:
            same.append(facts)
        if prints[1] == any_seed:
            same_but_seed.append(facts)
    return same, same_but_seed


@st.cache_data(show_spinner=False, max_entries=5000)
def _fingerprints(uid: str, _config: dict[str, Any]) -> tuple[str, str] | None:
    """(fingerprint, fingerprint with the seed set to 0) of a stored run's config; a run's config never changes."""
    from pydantic import ValidationError

    from kd_core.config import ExperimentConfig, config_fingerprint

    try:
        config = ExperimentConfig.model_validate(_config)
    except ValidationError:
        return None  # a config from an older schema
    return config_fingerprint(config), config_fingerprint(config.model_copy(update={"seed": 0}))

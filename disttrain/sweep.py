"""`disttrain -m OVERRIDE=A,B ...`: a sweep, one job per combination of the swept values (Hydra's own
override grammar: `a=1,2`, `a=range(1,4)`, `a=choice(x,y)`), then one table of every job.

Decisions:
- Every combination is composed and checked (values, job shape, run dir, resume, machine) before the
  first job starts: a bad one refuses the whole sweep in one line naming it.
- Each job gets its own run dir, `runs/<name>/multirun/<the job's swept overrides>` (e.g.
  `runs/default/multirun/optim.lr=0.1,trainer.seed=1`) unless the overrides set `run_dir` themselves.
  The same sweep run again finds the same run dirs and resumes every job from its newest snapshot; a
  job that had finished changes nothing. Two jobs that would share a run dir refuse the sweep.
- launcher=local and torchrun/multinode run the jobs one after the other on this machine; launcher=slurm
  submits one SLURM job per combination (not an array: each keeps its own resources, run dir and
  requeue), and with `launcher.wait=true` waits for all of them before printing the table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from disttrain.compose import check_job, compose
from disttrain.config import ConfigError, TrainConfig, load_config
from disttrain.launch import launch, preflight
from disttrain.snapshot import SnapshotError
from disttrain.worker import BuildError


@dataclasses.dataclass
class SweepJob:
    number: int
    #: Every override of this job, as it would be typed for a single run.
    overrides: list[str]
    #: The overrides that vary across the sweep (what names the job).
    swept: list[str]
    cfg: TrainConfig
    exit_code: int | str = "-"


def combinations(overrides: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """(every override, the swept ones) for each combination, in Hydra's order (the last key varies
    fastest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        axes = []
        for o in parsed:
            if o.is_sweep_override():
                key = o.get_key_element()
                axes.append([(f"{key}={v}", True) for v in o.sweep_string_iterator()])
            else:
                assert o.input_line is not None  # the parser keeps the text of every override it parsed
                axes.append([(o.input_line, False)])
    except HydraException as e:
        raise ConfigError(f"sweep: {str(e).splitlines()[0]}") from None
    jobs = []
    for combo in itertools.product(*axes):
        jobs.append(([o for o, _ in combo], [o for o, swept in combo if swept]))
    return jobs


def _job_dir(cfg: TrainConfig, swept: list[str]) -> str:
    name = ",".join(swept).replace("/", "_") or "job"
    return str(Path("runs") / cfg.name / "multirun" / name)


def plan(overrides: Sequence[str], config_dirs: Sequence[Path]) -> list[SweepJob]:
    """Every job of the sweep, composed and checked; ConfigError naming the first bad combination."""
    jobs: list[SweepJob] = []
    for number, (job_overrides, swept) in enumerate(combinations(overrides), start=1):
        try:
            cfg = load_config(compose(job_overrides, config_dirs))
            if not any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in job_overrides):
                cfg = dataclasses.replace(cfg, run_dir=_job_dir(cfg, swept))
                job_overrides = [*job_overrides, f"run_dir={cfg.run_dir}"]
            check_job(cfg)
            preflight(cfg)
        except (ConfigError, SnapshotError, BuildError) as e:
            label = " ".join(swept) or "(no swept value)"
            kind = BuildError if isinstance(e, BuildError) else ConfigError  # exit 1 or 2, as the job's own
            raise kind(f"sweep job {number} ({label}): {e}") from None
        jobs.append(SweepJob(number, job_overrides, swept, cfg))
    seen: dict[Path, SweepJob] = {}
    for job in jobs:
        other = seen.setdefault(Path(job.cfg.run_dir).absolute(), job)
        if other is not job:
            raise ConfigError(
                f"sweep: jobs {other.number} ({' '.join(other.swept)}) and {job.number} "
                f"({' '.join(job.swept)}) would share run_dir={job.cfg.run_dir!r}; leave run_dir to the "
                "sweep, or make it depend on a swept value"
            )
    return jobs


def run_sweep(overrides: Sequence[str], config_dirs: Sequence[Path] = ()) -> int:
    jobs = plan(overrides, config_dirs)
    print(f"sweep: {len(jobs)} jobs", flush=True)
    slurm_ids: dict[int, str] = {}
    for job in jobs:
        print(f"sweep job {job.number}/{len(jobs)}: {' '.join(job.swept)}", flush=True)
        try:
            if job.cfg.launcher.name == "slurm" and not job.cfg.launcher.dry_run:
                from disttrain.launch.slurm import submit

                slurm_ids[job.number] = submit(job.cfg) or ""
                job.exit_code = f"submitted {slurm_ids[job.number]}"
            else:
                job.exit_code = launch(job.cfg, job.overrides)
        except (ConfigError, SnapshotError) as e:
            print(f"disttrain: error: sweep job {job.number}: {e}", file=sys.stderr, flush=True)
            job.exit_code = 2 if isinstance(e, ConfigError) else 1
    if slurm_ids and jobs[0].cfg.launcher.wait:
        from disttrain.launch.slurm import wait_for_job

        for job in jobs:
            if job.number in slurm_ids:
                job.exit_code = wait_for_job(slurm_ids[job.number])
    print_table(jobs)
    return 0 if all(job.exit_code == 0 or isinstance(job.exit_code, str) for job in jobs) else 1


def _summary(run_dir: str) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def print_table(jobs: list[SweepJob]) -> None:
    rows = [("job", "overrides", "exit", "steps", "final loss", "run dir")]
    for job in jobs:
        s = _summary(job.cfg.run_dir)
        loss = s.get("final_loss")
        rows.append(
            (
                str(job.number),
                " ".join(job.swept) or "-",
                str(job.exit_code),
                str(s.get("steps", "-")),
                f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else str(loss or "-"),
                job.cfg.run_dir,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

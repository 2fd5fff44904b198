"""Grid commands: ``qvec grid run|plan|export``, ``qvec report``, ``qvec demo``, ``qvec reproduce mini``.

Each command is one call into :mod:`qvec.grid` plus printing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from qvec.cli import app, make_console, output_file
from qvec.cli.options import takes
from qvec.core.errors import QvecError

out = make_console()
err = make_console(stderr=True)

grid_app = typer.Typer(help="Donor x receiver experiment grids: run, plan, export.", no_args_is_help=True)
reproduce_app = typer.Typer(help="Reproduce the studies shipped with qvec.", no_args_is_help=True)
app.add_typer(grid_app, name="grid")
app.add_typer(reproduce_app, name="reproduce")

Config = Annotated[Path | None, typer.Argument(help="Grid config (.toml/.yaml); optional when flags say it all.")]
DataDir = Annotated[Path | None, typer.Option("--data", "-d", help="Folder of task .npz files (overrides the config).")]
Db = Annotated[Path | None, typer.Option("--db", help="Results database (default: <workdir>/<study>.db).")]
Artifacts = Annotated[Path | None, typer.Option("--artifacts", help="Artifact folder (default: <workdir>/artifacts).")]
Workdir = Annotated[Path, typer.Option("--workdir", help="Where the database and artifacts go by default.")]
ExecutorOpt = Annotated[str, typer.Option("--executor", "-e", help="local (default) or ray.")]
Address = Annotated[str | None, typer.Option("--address", help="Ray cluster address (default: start a local one).")]
Workers = Annotated[int | None, typer.Option(
    "--workers", "-w", help="Worker processes (default: one per CPU, at most 4; 1 = sequential in this process); "
    "with --executor ray and no --address, the CPUs of the Ray cluster started here.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No per-job lines or progress bars.")]
Threads = Annotated[int | None, typer.Option("--threads", help="Torch threads per job (default: every CPU for "
                                             "pretraining, CPUs / workers otherwise). On a busy machine fewer "
                                             "threads can be much faster.")]


def _csv(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise QvecError(f"cannot parse {text!r} as a comma-separated list") from None


def _load(config: Path | None, data: Path | None, name: str | None, model: str | None, tasks: str | None,
          bits: str | None, lambdas: str | None, backbone: str | None, check_tasks: bool = True):
    from qvec.grid.config import load_config

    overrides = {"data_dir": str(data.resolve()) if data else None, "name": name, "model": model,
                 "tasks": _csv(tasks), "bits": _csv(bits, int), "lambdas": _csv(lambdas, float), "backbone": backbone}
    return load_config(config, overrides, check_tasks=check_tasks)


def _executor(name: str, address: str | None, workers: int | None, progress: bool, gpus_per_job: float = 0,
              threads: int | None = None):
    from qvec.grid.executors import make_executor

    return make_executor(name, address=address, workers=workers, progress=progress, gpus_per_job=gpus_per_job,
                         threads=threads)


def _log(quiet: bool):
    """Where a grid run's per-job lines go: stderr, or nowhere with --quiet."""
    return None if quiet else lambda m: err.print(m, highlight=False)


NameOpt = Annotated[str | None, typer.Option("--name", help="Study name (default: the config file's stem).")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Model (family:name), e.g. qvec:vit-mini.")]
TasksOpt = Annotated[str | None, typer.Option("--tasks", help="Comma-separated tasks (donors and receivers).")]
BitsOpt = Annotated[str | None, typer.Option("--bits", "-b", help="Comma-separated bit-widths, e.g. 3,2,4.")]
LambdasOpt = Annotated[str | None, typer.Option("--lambdas", help="Comma-separated lambda grid.")]
BackboneOpt = Annotated[str | None, typer.Option("--backbone", help="pretrain, hub or a theta_0 weights file.")]
GpusOpt = Annotated[float, typer.Option("--gpus-per-job", help="Ray: GPUs reserved per job (e.g. 1 on GPU nodes).")]


@dataclass(frozen=True)
class StudyFlags:
    """The options of ``qvec grid run`` and ``qvec grid plan`` that say which study and where its files are."""

    db: Db = None
    artifacts: Artifacts = None
    data: DataDir = None
    workdir: Workdir = Path("runs")
    name: NameOpt = None
    model: ModelOpt = None
    tasks: TasksOpt = None
    bits: BitsOpt = None
    lambdas: LambdasOpt = None
    backbone: BackboneOpt = None

    def load(self, config: Path | None):
        """The grid config, with these flags overriding its fields."""
        return _load(config, self.data, self.name, self.model, self.tasks, self.bits, self.lambdas, self.backbone)

    def paths(self, cfg) -> tuple[Path, Path]:
        """The results database and artifact folder: the flags', else the defaults under --workdir."""
        from qvec.grid import default_paths

        d_db, d_art = default_paths(cfg, self.workdir)
        return self.db or d_db, self.artifacts or d_art


@dataclass(frozen=True)
class RunnerFlags:
    """The options of the ready-made studies (``qvec demo``, ``qvec reproduce``) that say how jobs run."""

    executor: ExecutorOpt = "local"
    address: Address = None
    workers: Workers = None
    threads: Threads = None
    quiet: Quiet = False

    def make_executor(self):
        return _executor(self.executor, self.address, self.workers, progress=not self.quiet, threads=self.threads)

    @property
    def log(self):
        return _log(self.quiet)


@grid_app.command("run")
@takes(study=StudyFlags)
def grid_run(
    config: Config = None,
    executor: ExecutorOpt = "local",
    address: Address = None,
    workers: Workers = None,
    study: StudyFlags = StudyFlags(),
    gpus_per_job: GpusOpt = 0,
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Run (or resume) a donor x receiver grid; finished jobs are never repeated."""
    from qvec.grid import run_grid

    ex = _executor(executor, address, workers, not quiet, gpus_per_job, threads)  # bad flags fail first
    cfg = study.load(config)
    db, artifacts = study.paths(cfg)
    summary = run_grid(cfg, db=db, artifacts=artifacts, executor=ex, log=_log(quiet))
    out.print(f"study {summary.study}: {summary.executed} jobs run, {summary.skipped} already done, "
              f"{summary.new_rows} new results in {summary.seconds:.0f}s -> {summary.db}")


@grid_app.command("plan")
@takes(study=StudyFlags)
def grid_plan(
    config: Config = None,
    study: StudyFlags = StudyFlags(),
    as_json: Annotated[bool, typer.Option("--json", help="Print the graph as JSON.")] = False,
) -> None:
    """Print the job graph of a grid (and, with an existing database, which jobs are done)."""
    from qvec.grid import build_plan, describe_plan, job_status
    from qvec.grid.plan import plan_json
    from qvec.grid.store import ResultStore

    cfg = study.load(config)
    db_path, artifacts = study.paths(cfg)
    plan = build_plan(cfg, artifacts)
    if as_json:
        print(plan_json(plan))
        return
    status = None
    if db_path.is_file():
        with ResultStore(db_path, create=False) as store:
            status = job_status(plan, store)
    print(describe_plan(plan, status))


@grid_app.command("theory")
def grid_theory(
    config: Annotated[Path, typer.Argument(help="Grid config (.toml/.yaml) of a finished study.")],
    bits: Annotated[int, typer.Option("--bits", "-b", help="Bit-width to check.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for theory_w<bits>.md/.csv.")] = Path("report"),
    examples: Annotated[int, typer.Option("--examples", help="Receiver training images for the Fisher.")] = 64,
    db: Db = None,
    artifacts: Artifacts = None,
    data: DataDir = None,
    workdir: Workdir = Path("runs"),
) -> None:
    """Check Proposition 1 on a study: predicted lambda* and recovery with H = I and H = the receiver's diagonal
    Fisher, against the measured ones (Spearman). Uses the receiver's own QAT and data: not a zero-shot rule."""
    from qvec.core.limits import check_count
    from qvec.grid.theory import fisher_check

    check_count(examples, "--examples", 1)
    study = StudyFlags(db=db, artifacts=artifacts, data=data, workdir=workdir)
    cfg = study.load(config)
    db, artifacts = study.paths(cfg)
    if not db.is_file():
        raise QvecError(f"{db}: no such results database; run the study first")
    chk = fisher_check(cfg, db, artifacts, bits, examples=examples, out_dir=output)
    out.print(f"{chk.pairs} pairs at {bits}-bit; Spearman(λ pred, λ*): H=I {chk.rho_lam['I']:+.2f}, "
              f"Fisher {chk.rho_lam['Fisher']:+.2f}; Spearman(cos², recovery): H=I {chk.rho_recovery['I']:+.2f}, "
              f"Fisher {chk.rho_recovery['Fisher']:+.2f} -> {output / f'theory_w{bits}.md'}")


@grid_app.command("adopt")
def grid_adopt(
    config: Annotated[Path, typer.Argument(help="Grid config (.toml/.yaml).")],
    files: Annotated[list[Path], typer.Argument(help="Checkpoints made by qvec pretrain / qvec finetune.")],
    artifacts: Artifacts = None,
    data: DataDir = None,
    workdir: Workdir = Path("runs"),
) -> None:
    """Reuse checkpoints trained outside the grid: each is checked against a training job's inputs (model, task,
    kind, quantizer, recipe, theta_0) and copied where the grid expects it."""
    from qvec.grid.run import adopt_checkpoints

    study = StudyFlags(artifacts=artifacts, data=data, workdir=workdir)
    cfg = study.load(config)
    for f, job in adopt_checkpoints(cfg, study.paths(cfg)[1], files):
        out.print(f"{f} -> {job}")


@grid_app.command("export")
def grid_export(
    db: Annotated[Path, typer.Argument(help="Results database.")],
    csv: Annotated[Path | None, typer.Option("--csv", help="Write every result row as CSV here.")] = None,
    parquet: Annotated[Path | None, typer.Option("--parquet", help="Write every result row as Parquet here.")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Only this study's rows (default: all).")] = None,
) -> None:
    """Export results to CSV and/or Parquet."""
    if csv is None and parquet is None:
        raise QvecError("give --csv PATH and/or --parquet PATH")
    for path in (csv, parquet):
        if path is not None:
            output_file(path, db)
    if csv is not None and parquet is not None and csv.resolve() == parquet.resolve():
        raise QvecError(f"{csv}: given as both --csv and --parquet; give two paths")
    from qvec.grid.store import ResultStore

    with ResultStore(db, create=False) as store:
        if study is not None:
            store.resolve_study(study)
        n = store.count(study)
        for path, fn in ((csv, store.export_csv), (parquet, store.export_parquet)):
            if path is not None:
                fn(path, study)
                out.print(f"wrote {n} rows to {path}")


@app.command("report")
def report_cmd(
    db: Annotated[Path, typer.Argument(help="Results database.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder.")] = Path("report"),
    study: Annotated[str | None, typer.Option("--study", help="Study to report (default: the latest).")] = None,
) -> None:
    """Write the study's tables (Markdown, CSV), figures (PNG, SVG) and report.md."""
    from qvec.core.checkpoint import require_file
    from qvec.grid.report import partial_note, write_report

    require_file(db, "results database")
    path = write_report(db, output, study)
    out.print(f"wrote {path} (tables .md/.csv, figures .png/.svg in {output})")
    note = partial_note(db, study)
    if note:
        err.print(f"note: {note}", highlight=False, markup=False)


def _print_study(run) -> None:
    from qvec.grid.report import print_summary

    print_summary(run.db, run.config.name, echo=print)
    out.print(f"\n{run.summary.executed} jobs run, {run.summary.skipped} reused, {run.seconds / 60:.1f} min; "
              f"report: {run.report} (figures beside it); results: {run.db}")


@app.command("demo")
@takes(runner=RunnerFlags)
def demo_cmd(
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Use the real tasks of this folder instead of "
                                              "the generated suite.")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where everything goes.")] = Path("runs/demo"),
    runner: RunnerFlags = RunnerFlags(),
) -> None:
    """A small end-to-end study (about 9 minutes on 2 idle CPU cores), no network or data folder needed."""
    from qvec.grid.studies import run_demo

    run = run_demo(workdir, data, runner.make_executor(), log=runner.log)
    _print_study(run)


@reproduce_app.command("mini")
@takes(runner=RunnerFlags)
def reproduce_mini_cmd(
    data: DataDir = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="Database and artifacts.")] = Path("runs/mini"),
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Report folder (default: results/<study>, "
                                                "the config's name).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Config (default: configs/mini.toml; "
                                                "configs/mini-quality.toml for the quality recipes).")] = None,
    runner: RunnerFlags = RunnerFlags(),
) -> None:
    """The CPU-scale replication on the 7 local tasks at 3, 2 and 4 bits (about 70 minutes on 2 cores)."""
    from qvec.grid.studies import reproduce_mini

    run = reproduce_mini(data, workdir, output, config, runner.make_executor(), log=runner.log)
    _print_study(run)


@reproduce_app.command("dinov2-s")
@takes(runner=RunnerFlags)
def reproduce_dinov2_cmd(
    data: DataDir = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="The DINOv2 ViT-S/14 backbone file (timm "
                                                 "layout; default: the config's backbone, ../shared/models).")]
    = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="Database and artifacts.")] = Path("runs/dinov2-s"),
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Report folder (default: "
                                                "results/<study>).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Config (default: configs/dinov2-s.toml; "
                                                "configs/dinov2-s-gpu.toml is the GPU study).")] = None,
    runner: RunnerFlags = RunnerFlags(),
) -> None:
    """The paper's study on the real DINOv2 ViT-S/14 backbone, sized for 2 CPU cores (resumable)."""
    from qvec.grid.studies import reproduce_study

    run = reproduce_study("dinov2-s", data, workdir, output, config, runner.make_executor(), log=runner.log,
                          backbone=weights)
    _print_study(run)

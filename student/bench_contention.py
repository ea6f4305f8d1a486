"""``opd bench contention``: the same short training quiet and beside busy processes.

For each backend (``local``: in-process teachers; ``http``: teachers ``a``, ``b`` (and ``base``
for Flow-OPD) and the router as processes, started as a user starts them) and each thread
variant, it runs ``opd train`` as a child process twice per round: on the quiet machine, then
beside ``--busy`` processes that each spin one core (started and stopped by the bench, and
self-terminating after ``--busy-max-s``). It prints the training wall time (``report.json``
``timings_s.wall``: the steps, without start-up and evaluation) of both and the ratio
loaded ÷ quiet; with several rounds, medians over rounds.

Variants:

* ``budget`` — this project's defaults: every process's torch threads from
  ``common.threads.thread_budget`` (one for the toy net) and OpenMP's passive wait policy;
* ``torch`` — the defaults before thread budgets: the trainer and teachers take one torch thread
  per usable core (``OPD_TRAIN_THREADS`` / ``OPD_TEACHER_THREADS``) and OpenMP keeps its own wait
  policy (``OPD_OMP_PASSIVE=0``). The router has always taken one thread.

A benchmark, not a test: it asserts nothing; results and the command are in docs/contention.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.cli import Command, UsageError
from common.settings import out_dir
from common.threads import usable_cpus
from services.cluster import PYTHON, start_cluster
from student.models import parse_names
from student.pretrain import ensure_models
from student.summary import md_table, text_table

VARIANTS = ("budget", "torch")
BACKENDS = ("local", "http")


class ContentionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_BENCH_CONTENTION_")
    method: Literal["diffusionopd", "flowopd", "danceopd"] = Field(
        "diffusionopd", description="OPD method of every run"
    )
    steps: int = Field(150, ge=1, description="optimizer steps per run")
    busy: int = Field(2, ge=0, le=64, description="busy processes beside the loaded runs")
    busy_max_s: float = Field(
        600.0, gt=0, description="a busy process ends itself after this long (safety bound)"
    )
    backends: str = Field("local,http", description="comma-separated: local, http")
    variants: str = Field("budget,torch", description="comma-separated: budget, torch")
    rounds: int = Field(1, ge=1, le=20, description="quiet/loaded pairs per backend and variant")
    models: Path = Field(Path("models"), description="checkpoints (pretrained when missing)")
    out: Path | None = Field(
        None, description="write contention.json, contention.md and contention.png here"
    )


def _choices(spec: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    try:
        names = parse_names(spec)
    except ValueError as exc:
        raise UsageError(f"--{flag}: {exc}") from None
    bad = [n for n in names if n not in allowed]
    if bad:
        raise UsageError(f"--{flag}: unknown {bad}; choose from {', '.join(allowed)}")
    return names


def variant_env(variant: str, role: str) -> dict[str, str]:
    """Environment of a ``role`` (``train`` or ``teacher``) process under ``variant``."""
    if variant == "budget":
        return {}
    cores = str(max(1, math.floor(usable_cpus())))
    return {f"OPD_{role.upper()}_THREADS": cores, "OPD_OMP_PASSIVE": "0"}


@contextlib.contextmanager
def busy_processes(n: int, max_s: float) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes spinning one core each, killed on exit (and ending themselves at ``max_s``)."""
    code = f"import time\nend = time.monotonic() + {max_s}\nwhile time.monotonic() < end: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(5)


def train_once(
    s: ContentionSettings, backend: str, variant: str, router_url: str | None, out: Path
) -> dict:
    """One ``opd train`` child process; its report's wall time, CPU figures and exit status."""
    cmd = [*PYTHON, "train", "--method", s.method, "--steps", str(s.steps)]
    cmd += ["--backend", backend, "--models", str(s.models), "--out", str(out)]
    cmd += ["--checkpoint-every", "0", "--no-progress"]
    cmd += ["--router-url", router_url] if router_url else []
    env = {**os.environ, **variant_env(variant, "train")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"opd train exited {done.returncode}:\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": report["timings_s"]["wall"], **report.get("cpu", {})}


def measure(s: ContentionSettings, backend: str, variant: str, tmp: Path) -> dict:
    """Rounds of (quiet, loaded) runs for one backend and variant; medians and the ratio."""
    stack = contextlib.ExitStack()
    with stack:
        router_url = None
        if backend == "http":
            anchor = "base" if s.method == "flowopd" else None
            cluster = stack.enter_context(
                start_cluster(s.models, anchor=anchor, env=variant_env(variant, "teacher"))
            )
            router_url = cluster.router_url
        rounds = []
        for r in range(s.rounds):
            quiet = train_once(s, backend, variant, router_url, tmp / f"{backend}-{variant}-q{r}")
            with busy_processes(s.busy, s.busy_max_s):
                loaded = train_once(
                    s, backend, variant, router_url, tmp / f"{backend}-{variant}-l{r}"
                )
            rounds.append({"quiet": quiet, "loaded": loaded})
            print(
                f"  {backend}/{variant} round {r + 1}: quiet {quiet['wall_s']:.2f} s, "
                f"loaded {loaded['wall_s']:.2f} s",
                flush=True,
            )
    med = statistics.median
    return {
        "backend": backend,
        "variant": variant,
        "quiet_s": med(x["quiet"]["wall_s"] for x in rounds),
        "loaded_s": med(x["loaded"]["wall_s"] for x in rounds),
        "ratio": med(x["loaded"]["wall_s"] / x["quiet"]["wall_s"] for x in rounds),
        "trainer_threads": rounds[0]["quiet"].get("threads"),
        "trainer_run_s_loaded": med(x["loaded"].get("run_s", 0.0) for x in rounds),
        "rounds": rounds,
    }


def plot(path: Path, results: list[dict], title: str) -> None:
    """Bars of quiet and loaded training wall time per backend and variant, ratio on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['backend']}\n{r['variant']}" for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(results), 3.6))
    ax.bar([x - 0.2 for x in xs], [r["quiet_s"] for r in results], 0.4, label="quiet")
    ax.bar([x + 0.2 for x in xs], [r["loaded_s"] for r in results], 0.4, label="loaded")
    for x, r in zip(xs, results, strict=True):
        ax.annotate(
            f"{r['ratio']:.1f}x",
            (x + 0.2, r["loaded_s"]),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("training wall s")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


HEAD = ("backend", "variant", "trainer threads", "quiet s", "loaded s", "loaded / quiet")


def run_contention(s: ContentionSettings) -> int:
    backends = _choices(s.backends, BACKENDS, "backends")
    variants = _choices(s.variants, VARIANTS, "variants")
    if s.out is not None:
        out_dir(s.out)
    ensure_models(s.models)
    print(
        f"opd bench contention: {s.method}, {s.steps} steps, {s.busy} busy processes, "
        f"{usable_cpus():g} usable cores, {s.rounds} round(s)",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="opd-contention-") as tmp:
        for backend in backends:
            for variant in variants:
                results.append(measure(s, backend, variant, Path(tmp)))
    rows = [
        (
            r["backend"],
            r["variant"],
            str(r["trainer_threads"]),
            f"{r['quiet_s']:.2f}",
            f"{r['loaded_s']:.2f}",
            f"{r['ratio']:.2f}",
        )
        for r in results
    ]
    print(text_table(HEAD, rows))
    if s.out is not None:
        doc = {"settings": s.model_dump(mode="json"), "cpus": usable_cpus(), "results": results}
        (s.out / "contention.json").write_text(json.dumps(doc, indent=2) + "\n")
        (s.out / "contention.md").write_text(md_table(HEAD, rows) + "\n")
        title = f"{s.method}, {s.steps} steps, quiet vs beside {s.busy} busy processes"
        plot(s.out / "contention.png", results, title)
        print(f"wrote contention.json, contention.md and contention.png in {s.out}")
    return 0


CONTENTION = Command(
    "the same short training quiet and beside busy processes", ContentionSettings, run_contention
)

import json
import signal
from collections import Counter

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import student.students as students_module
import student.trainer as trainer_module
from common.checkpoint import CheckpointError, read_model
from student.clients import (
    Answer,
    LocalTeacherClient,
    QueryCost,
    TeacherUnavailable,
    in_submit_order,
)
from student.commands import TrainSettings, local_client, run_train
from student.models import BASE_NAME, load_named
from student.report import COUNT_KEYS, METRIC_KEYS, TIMING_KEYS
from student.trainer import TrainConfig, TrainingAborted, TrainingInterrupted, train


def run(models, out, method, steps, supervise="router", teachers=("a", "b"), **kw):
    cfg = TrainConfig(
        method=method, teachers=list(teachers), supervise=supervise, steps=steps, **kw
    )
    student, base_meta = load_named(models, BASE_NAME)
    with local_client(models, list(teachers), supervise, anchor=method == "flowopd") as client:
        return train(cfg, student, client, out, base_meta=base_meta, progress=False)


@pytest.mark.parametrize(
    ("method", "per_step"), [("diffusionopd", 1536), ("flowopd", 1536), ("danceopd", 128)]
)
def test_counts_and_report_files(tiny_models, tmp_path, method, per_step):
    rep = run(tiny_models, tmp_path, method, steps=3, eval_samples=200)
    assert rep["counts"]["teacher_queries"] == 3 * per_step
    assert rep["counts"]["rollouts"] == 3 * 128
    disk = json.loads((tmp_path / "report.json").read_text())
    for key in ("method", "teachers", "supervise", "backend", "steps", "seed"):
        assert key in disk
    assert set(disk["metrics"]) == set(METRIC_KEYS)
    assert set(disk["counts"]) == set(COUNT_KEYS) and set(disk["timings_s"]) == set(TIMING_KEYS)
    assert disk["timings_s"]["update"] > 0 and disk["counts"]["requests"] == 0
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["teacher_queries"] == per_step
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
    _, meta = read_model(tmp_path / "student.safetensors")
    names = [r.name for r in meta.teachers]
    assert names == (["a", "b", "base"] if method == "flowopd" else ["a", "b"])
    _, a_meta = read_model(tiny_models / "teacher-a.safetensors")
    assert meta.teachers[0].digest == a_meta.digest and meta.training["method"] == method


def test_same_seed_same_student(tiny_models, tmp_path):
    a = run(tiny_models, tmp_path / "a", "danceopd", steps=5, eval_samples=100)
    b = run(tiny_models, tmp_path / "b", "danceopd", steps=5, eval_samples=100)
    c = run(tiny_models, tmp_path / "c", "danceopd", steps=5, eval_samples=100, seed=7)
    assert a["student_digest"] == b["student_digest"] != c["student_digest"]


@pytest.mark.slow
def test_short_training_reaches_teacher_modes(models, tmp_path):
    steps = 300
    dense = run(models, tmp_path / "dense", "diffusionopd", steps)
    dance = run(models, tmp_path / "dance", "danceopd", steps)
    avg = run(models, tmp_path / "avg", "diffusionopd", steps, supervise="average")
    base, _ = load_named(models, BASE_NAME)
    for rep in (dense, dance):
        assert rep["metrics"]["teacher_mode_mass"] >= 0.95, rep["metrics"]
        assert 3.3 <= rep["metrics"]["effective_modes"] <= 4.3, rep["metrics"]
        assert rep["param_change_l2"] > 0
    student, _ = read_model(tmp_path / "dense" / "student.safetensors")
    assert any(
        not torch.equal(p, q) for p, q in zip(student.parameters(), base.parameters(), strict=True)
    )
    # averaging teachers pulls the modes toward their midpoints: far worse target density
    assert avg["metrics"]["avg_target_logp"] <= dense["metrics"]["avg_target_logp"] - 3.0, (
        avg["metrics"],
        dense["metrics"],
    )


def test_resume_ends_with_the_same_student(tiny_models, tmp_path):
    """A run stopped at a checkpoint and resumed equals an uninterrupted one (in-process)."""
    full = run(tiny_models, tmp_path / "full", "flowopd", steps=8, eval_samples=100)
    part = tmp_path / "part"
    run(
        tiny_models, part, "flowopd", steps=5, eval_samples=100, checkpoint_every=2
    )  # saved at step 4
    assert (part / "checkpoint.safetensors").exists()
    cfg = TrainConfig(method="flowopd", teachers=["a", "b"], steps=8, eval_samples=100)
    student, _ = load_named(tiny_models, BASE_NAME)
    with local_client(tiny_models, ["a", "b"], "router", anchor=True) as client:
        resumed = train(cfg, student, client, part, progress=False, resume=True)
    a, _ = read_model(tmp_path / "full" / "student.safetensors")
    b, _ = read_model(part / "student.safetensors")
    diff = max(
        float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )
    assert diff <= 1e-6
    assert resumed["counts"]["teacher_queries"] == full["counts"]["teacher_queries"] == 8 * 1536
    assert len((part / "steps.jsonl").read_text().splitlines()) == 8


def test_resume_refuses_a_different_recipe(tiny_models, tmp_path):
    run(tiny_models, tmp_path, "danceopd", steps=3, eval_samples=100, checkpoint_every=1)
    cfg = TrainConfig(method="danceopd", teachers=["a", "b"], steps=5, seed=9, eval_samples=100)
    student, _ = load_named(tiny_models, BASE_NAME)
    with (
        local_client(tiny_models, ["a", "b"], "router", anchor=False) as client,
        pytest.raises(Exception, match="differs in seed"),
    ):
        train(cfg, student, client, tmp_path, progress=False, resume=True)


class _PerSubmitClient(LocalTeacherClient):
    """The in-process teachers, answering each submitted batch as its own group (as a remote
    client answers each request), and failing every step from ``fail_at`` on when set."""

    def __init__(self, inner: LocalTeacherClient, fail_at: int | None = None) -> None:
        self.__dict__.update(inner.__dict__)
        self.fail_at, self.steps = fail_at, 0

    def collect_parts(self):
        self.steps += 1
        # one routing and forward over the step's states, as the in-process client does
        [(answers, cost)] = LocalTeacherClient.collect_parts(self)
        if self.fail_at is not None and self.steps > self.fail_at:
            raise TeacherUnavailable("teachers unreachable at test://nowhere")
        for k, answer in enumerate(answers):
            yield [answer], cost if k == 0 else QueryCost()


class _PerTeacherClient(_PerSubmitClient):
    """The in-process teachers, answering each teacher's rows of the step as one group that
    names its rows (as in-client routing does), the last teacher's first."""

    def collect_parts(self):
        [(answers, cost)] = LocalTeacherClient.collect_parts(self)
        whole = in_submit_order(answers)
        for k in sorted(set(whole.teacher.tolist()), reverse=True):
            rows = torch.nonzero(whole.teacher == k).flatten()
            va = None if whole.v_anchor is None else whole.v_anchor[rows]
            yield [Answer(whole.v[rows], whole.teacher[rows], va, rows)], cost
            cost = QueryCost()


def _student_params(path):
    net, _ = read_model(path)
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("grouping", [_PerSubmitClient, _PerTeacherClient])
@pytest.mark.parametrize("method", ["diffusionopd", "flowopd"])
def test_update_by_groups_equals_one_batch(tiny_models, tmp_path, method, grouping):
    """Regressing group by group as answers arrive (per request, or per teacher's rows) ends
    where one-batch regression ends."""
    cfg = TrainConfig(method=method, teachers=["a", "b"], steps=4, eval_samples=100)
    run(tiny_models, tmp_path / "one", method, steps=4, eval_samples=100)
    student, _ = load_named(tiny_models, BASE_NAME)
    inner = local_client(tiny_models, ["a", "b"], "router", anchor=method == "flowopd")
    with grouping(inner) as client:
        rep = train(cfg, student, client, tmp_path / "groups", progress=False)
    one = _student_params(tmp_path / "one" / "student.safetensors")
    groups = _student_params(tmp_path / "groups" / "student.safetensors")
    # Float rounding only (the groups sum in another order). Adam's normalised step can turn an
    # ulp in a near-zero gradient into ~1e-6 of one weight: seen 1.04e-6 on 1 of 35,714 weights
    # after 4 Flow-OPD steps grouped per teacher, every other weight within 1e-7.
    assert float((one - groups).abs().max()) <= 2e-6
    assert rep["counts"]["teacher_queries"] == 4 * 1536
    trace = json.loads((tmp_path / "groups" / "trace.json").read_text())
    waits = [e for e in trace["traceEvents"] if e["name"] == "wait for teachers"]
    # one wait per group: 12 rollout states per dense step, or teachers a and b
    assert len(waits) == 4 * (12 if grouping is _PerSubmitClient else 2)


def test_failed_step_resumes_to_the_uninterrupted_student(tiny_models, tmp_path):
    """A step whose answers never come is saved as it began (RNG included) and replayed."""
    cfg = TrainConfig(method="flowopd", teachers=["a", "b"], steps=6, eval_samples=100)
    run(tiny_models, tmp_path / "full", "flowopd", steps=6, eval_samples=100)
    student, _ = load_named(tiny_models, BASE_NAME)
    inner = local_client(tiny_models, ["a", "b"], "router", anchor=True)
    with (
        _PerSubmitClient(inner, fail_at=3) as client,
        pytest.raises(TrainingAborted, match="stopped after 3 of 6 steps"),
    ):
        train(cfg, student, client, tmp_path / "part", progress=False)
    student, _ = load_named(tiny_models, BASE_NAME)
    with local_client(tiny_models, ["a", "b"], "router", anchor=True) as client:
        train(cfg, student, client, tmp_path / "part", progress=False, resume=True)
    full = _student_params(tmp_path / "full" / "student.safetensors")
    part = _student_params(tmp_path / "part" / "student.safetensors")
    assert float((full - part).abs().max()) <= 1e-6


def _aborted_run(models, out, steps=6, fail_at=3):
    """A danceopd run whose teachers stop answering at step ``fail_at``: a checkpoint, no report."""
    cfg = TrainConfig(method="danceopd", teachers=["a", "b"], steps=steps, eval_samples=100)
    student, _ = load_named(models, BASE_NAME)
    inner = local_client(models, ["a", "b"], "router", anchor=False)
    with _PerSubmitClient(inner, fail_at=fail_at) as client, pytest.raises(TrainingAborted):
        train(cfg, student, client, out, progress=False)
    assert (out / "checkpoint.safetensors").exists() and not (out / "report.json").exists()


def test_new_run_over_an_unfinished_one_is_refused(opd_cli, tiny_models, tmp_path):
    """Without --resume, an --out holding an unfinished run's checkpoint is a usage error (before,
    the new run kept the stale checkpoint and a later --resume spliced the two runs)."""
    _aborted_run(tiny_models, tmp_path)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    flags = ["--method", "danceopd", "--models", tiny_models, "--out", tmp_path, "--no-progress"]
    code, out, err = opd_cli("train", *flags, "--steps", "4")
    assert code == 2 and out == ""
    assert err == (
        f"opd train: error: --out {tmp_path} holds a checkpoint of an earlier run (step 3 of 6); "
        "add --resume to continue it, or use another --out\n"
    )
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before


def test_new_run_over_a_finished_one_replaces_it(tiny_models, tmp_path):
    """A finished run's directory is overwritten, leftover periodic checkpoint included: nothing
    of the earlier run is left for a --resume to splice onto the new one."""
    run(tiny_models, tmp_path, "danceopd", steps=5, eval_samples=100, checkpoint_every=2)
    assert (tmp_path / "checkpoint.safetensors").exists()  # saved at step 4 of 5
    s = TrainSettings(
        method="danceopd", models=tiny_models, out=tmp_path, steps=3, checkpoint_every=0
    )
    assert run_train(s.model_copy(update={"progress": False})) == 0
    assert not (tmp_path / "checkpoint.safetensors").exists()
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 3
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 3
    with pytest.raises(CheckpointError, match="does not exist"):
        run_train(s.model_copy(update={"progress": False, "resume": True, "steps": 8}))


def test_resume_to_fewer_steps_than_done_is_refused(opd_cli, tiny_models, tmp_path):
    """--resume --steps below the checkpoint's step would leave a report of N steps with the
    counts of more; --steps above it extends the run (test_resume_ends_with_the_same_student)."""
    _aborted_run(tiny_models, tmp_path)
    flags = ["--method", "danceopd", "--models", tiny_models, "--out", tmp_path, "--resume"]
    code, _, err = opd_cli("train", *flags, "--steps", "2", "--no-progress")
    assert code == 2
    assert err == (
        f"opd train: error: --resume: the run in {tmp_path} has done 3 steps, more than "
        "--steps 2; give --steps 3 or more\n"
    )
    cfg = TrainConfig(method="danceopd", teachers=["a", "b"], steps=2, eval_samples=100)
    student, _ = load_named(tiny_models, BASE_NAME)
    with (
        local_client(tiny_models, ["a", "b"], "router", anchor=False) as client,
        pytest.raises(CheckpointError, match="has done 3 steps, more than --steps 2"),
    ):
        train(cfg, student, client, tmp_path, progress=False, resume=True)
    assert not (tmp_path / "report.json").exists()


def _trace_steps(path):
    events = json.loads(path.read_text())["traceEvents"]
    return [e for e in events if e["ph"] == "X"]


def test_resume_keeps_the_earlier_trace(tiny_models, tmp_path):
    """The resumed part's trace follows the first part's (the replayed step once, drawn after);
    a resumed part past --trace-steps leaves the trace as it was (before: an empty trace)."""
    for out, trace_steps in ((tmp_path / "all", 200), (tmp_path / "first3", 3)):
        kw = {"eval_samples": 100, "trace_steps": trace_steps}
        run(tiny_models, out, "danceopd", steps=5, checkpoint_every=2, **kw)  # saved at step 4
        first = _trace_steps(out / "trace.json")
        cfg = TrainConfig(method="danceopd", teachers=["a", "b"], steps=8, **kw)
        student, _ = load_named(tiny_models, BASE_NAME)
        with local_client(tiny_models, ["a", "b"], "router", anchor=False) as client:
            train(cfg, student, client, out, progress=False, resume=True)
        merged = _trace_steps(out / "trace.json")
        steps = sorted({e["args"]["step"] for e in merged})
        assert steps == list(range(min(8, trace_steps)))
        old = [e for e in merged if e["args"]["step"] < 4]
        assert old == [e for e in first if e["args"]["step"] < 4]
        new = [e for e in merged if e["args"]["step"] >= 4]
        assert min((e["ts"] for e in new), default=1e18) >= max(e["ts"] + e["dur"] for e in old)
        # as many spans in each step: step 4 of the first part was dropped, not kept twice
        per_step = Counter(e["args"]["step"] for e in merged)
        assert len(set(per_step.values())) == 1, per_step


@pytest.fixture
def sigterm_fails_the_test():
    """SIGTERM in this process raises, where the trainer does not take it (instead of killing
    the test run)."""

    def raise_(signum, frame):
        raise RuntimeError("SIGTERM reached the test, not the trainer")

    previous = signal.signal(signal.SIGTERM, raise_)
    yield
    signal.signal(signal.SIGTERM, previous)


class _SignalAt(_PerSubmitClient):
    """Sends this process SIGTERM while step ``at`` waits for its answers (before its update)."""

    def __init__(self, inner, at):
        super().__init__(inner)
        self.at = at

    def collect_parts(self):
        if self.steps == self.at:
            signal.raise_signal(signal.SIGTERM)
        yield from super().collect_parts()


def _interrupted_run(models, out, cfg, client):
    student, _ = load_named(models, BASE_NAME)
    with client, pytest.raises(TrainingInterrupted) as info:
        train(cfg, student, client, out, progress=False)
    return info.value


def _signalling(fn):
    """``fn``, sending this process SIGTERM as it starts."""

    def wrapper(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return fn(*args, **kwargs)

    return wrapper


def _signal_at_update(k):
    """An optimizer step post-hook: SIGTERM as Adam's ``k``-th update ends (the step not yet
    accounted)."""
    updates = []

    def hook(opt, args, kwargs):
        updates.append(k)
        if len(updates) == k:
            signal.raise_signal(signal.SIGTERM)

    return hook


@pytest.mark.usefixtures("sigterm_fails_the_test")
@pytest.mark.parametrize(
    ("where", "done"),
    [
        ("waiting for teachers", 3),
        ("during the update", 3),
        ("twice, again while saving", 3),
        ("during evaluation", 6),
    ],
)
def test_sigterm_saves_a_checkpoint_resume_ends_as_uninterrupted(
    tiny_models, tmp_path, monkeypatch, where, done
):
    """SIGTERM while a step waits stops the run with that step to replay. SIGTERM during Adam's
    update is held until the step is in (a checkpoint then would hold the update but not count
    it, and the resumed run would apply it twice); a second one while the state is saved does
    not cut the save short; one during the final evaluation leaves the state after the last step.
    """
    cfg = TrainConfig(method="flowopd", teachers=["a", "b"], steps=6, eval_samples=100)
    run(tiny_models, tmp_path / "full", "flowopd", steps=6, eval_samples=100)
    client = local_client(tiny_models, ["a", "b"], "router", anchor=True)
    if where in ("waiting for teachers", "twice, again while saving"):
        client = _SignalAt(client, at=3)
    if where == "twice, again while saving":
        monkeypatch.setattr(trainer_module, "save_state", _signalling(trainer_module.save_state))
    if where == "during evaluation":
        monkeypatch.setattr(students_module, "evaluate", _signalling(students_module.evaluate))
    hook = register_optimizer_step_post_hook(
        _signal_at_update(3) if where == "during the update" else lambda *_: None
    )
    part = tmp_path / "part"
    try:
        exc = _interrupted_run(tiny_models, part, cfg, client)
    finally:
        hook.remove()
        monkeypatch.undo()
    assert exc.signum == signal.SIGTERM
    assert str(exc) == (
        f"interrupted after {done} of 6 steps; state saved to {part / 'checkpoint.safetensors'}; "
        "rerun with --resume to continue"
    )
    assert len((part / "steps.jsonl").read_text().splitlines()) == done
    assert not (part / "report.json").exists()
    assert signal.getsignal(signal.SIGTERM).__name__ == "raise_"  # the test's handler is back
    student, _ = load_named(tiny_models, BASE_NAME)
    with local_client(tiny_models, ["a", "b"], "router", anchor=True) as client:
        train(cfg, student, client, part, progress=False, resume=True)
    full = _student_params(tmp_path / "full" / "student.safetensors")
    assert float((full - _student_params(part / "student.safetensors")).abs().max()) <= 1e-6
    logged = [json.loads(x)["step"] for x in (part / "steps.jsonl").read_text().splitlines()]
    assert logged == list(range(6))

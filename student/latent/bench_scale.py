"""``opd bench cost --world latent``: rollout vs query vs update per OPD method at latent shapes,
and how DanceOPD's saving moves as the states and the teachers grow.

Each point serves a random-weight SD3 teacher (``opd serve teacher --model-dir``; cost does not
depend on what the weights learned) of ``teacher_layers`` joint blocks and ``teacher_heads``
heads of 16 at latent side ``side`` (states ``[4, side, side]``) behind a label router, the same
model as the anchor; the student is the latent world's architecture (2 blocks, 2 heads) at that
side. The loop is a user's own loop over the public client (:mod:`student.client`): roll out
``N`` Euler steps without grad, each queried state submitted as soon as it exists (the prompt
once per step under a ``cond_id``), wait for the answers, one Adam step on the method's loss
(``student/methods.py``). Per step: ``rollout`` (student forwards, sending overlapped),
``query_exposed`` (time blocked on answers after the rollout), ``update``; the requests' latency,
the teacher's compute and bytes come from the client's accounting. Step 0 warms up, uncounted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from student.methods import METHODS

#: the latent world's student: what grows in the sweep is the teacher and the state
STUDENT = {"num_layers": 2, "num_attention_heads": 2}


def transformer(side: int, layers: int, heads: int, seed: int) -> torch.nn.Module:
    """A random SD3 transformer for latents ``[4, side, side]`` (the latent world's config with
    the side, depth and heads replaced)."""
    from diffusers import SD3Transformer2DModel

    from student.latent.models import SD3_CONFIG

    torch.manual_seed(seed)
    cfg = SD3_CONFIG | {
        "sample_size": side,
        "pos_embed_max_size": side,
        "num_layers": layers,
        "num_attention_heads": heads,
        "caption_projection_dim": heads * SD3_CONFIG["attention_head_dim"],  # = the inner width
    }
    return SD3Transformer2DModel(**cfg)


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def serve(model_dir: Path, threads: int):
    """The teacher process (model ``base``) and a label router with it as teacher ``a`` and
    as the anchor; returns ``(teacher, router)`` services."""
    import sys

    from common.procs import start_service

    py = sys.executable
    teacher = start_service(
        [py, "-m", "common.cli", "serve", "teacher", "--model-dir", str(model_dir)]
        + ["--port", "0", "--threads", str(threads), "--max-body-mb", "512"]
    )
    try:
        router = start_service(
            [py, "-m", "common.cli", "serve", "router", "--port", "0", "--policy", "label"]
            + ["--teacher", f"a={teacher.url}#base", "--anchor", f"base={teacher.url}#base"]
            + ["--max-body-mb", "512"]
        )
    except BaseException:
        teacher.stop()
        raise
    return teacher, router


def run_method(
    url: str, student_tf: torch.nn.Module, method_name: str, batch: int, n: int, steps: int
) -> dict[str, Any]:
    """``steps`` (+1 warm-up) OPD steps of ``method_name`` through the router at ``url``; per
    step milliseconds and counts."""
    from student.client import OPDClient
    from student.latent.models import SCHEDULER_CONFIG, sigma_grid, velocity, wrap
    from student.latent.world import make_world

    method = METHODS[method_name]
    student = wrap(student_tf)
    student.transformer.train().requires_grad_(True)
    opt = torch.optim.Adam(student.transformer.parameters(), lr=1e-4)
    world, sig = make_world(), sigma_grid(SCHEDULER_CONFIG, n)
    side = student_tf.config.sample_size
    sums = dict.fromkeys(["rollout", "query_exposed", "update", "query_latency", "compute"], 0.0)
    counts = dict.fromkeys(["states", "requests", "bytes_sent", "bytes_received"], 0)
    g = torch.Generator().manual_seed(0)
    with OPDClient(url, max_in_flight=max(2, n)) as client:
        for step in range(steps + 1):
            fam = step % 2  # teacher a's families; one prompt per step, sent once
            cond = world.cond(torch.tensor([fam]))
            plan = set(method.plan(n))
            x = torch.randn((batch, 4, side, side), generator=g)
            futs, xs, ts = [], [], []
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(n):
                    t = torch.full((batch,), sig[i])
                    if i in plan:
                        kw = {"cond": cond, "cond_id": f"bench-{fam}", "labels": ["a"] * batch}
                        futs.append(client.submit(x, t, anchor=method.uses_anchor, **kw))
                        xs.append(x)
                        ts.append(t)
                    x = x - (sig[i] - sig[i + 1]) * velocity(student, x, t, cond)
                    if method.sde_noise and i < n - 1:
                        x = x + method.sde_noise * (sig[i] - sig[i + 1]) ** 0.5 * torch.randn(
                            x.shape, generator=g
                        )
            t1 = time.perf_counter()
            replies = client.wait(futs)
            t2 = time.perf_counter()
            xq, tq = torch.cat(xs), torch.cat(ts)
            v = velocity(student, xq, tq, cond)
            va = torch.cat([r.v_anchor for r in replies]) if method.uses_anchor else None
            loss = method.loss(v, tq, torch.cat([r.v for r in replies]), va)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t3 = time.perf_counter()
            q = client.step_cost().query
            if step == 0:
                continue
            for k, dt in (("rollout", t1 - t0), ("query_exposed", t2 - t1), ("update", t3 - t2)):
                sums[k] += dt
            sums["query_latency"] += q.latency_s
            sums["compute"] += q.server_compute_s
            counts["states"] += q.states
            counts["requests"] += q.requests
            counts["bytes_sent"] += q.bytes_sent
            counts["bytes_received"] += q.bytes_received
    row: dict[str, Any] = {f"{k}_ms": 1e3 * v / steps for k, v in sums.items()}
    row |= {k: v / steps for k, v in counts.items()}
    row["step_ms"] = row["rollout_ms"] + row["query_exposed_ms"] + row["update_ms"]
    return row


def sweep(
    points: list[tuple[int, int, int]],
    methods: list[str],
    batch: int,
    n: int,
    steps: int,
    threads: int,
    work: Path,
    say=print,
) -> list[dict[str, Any]]:
    """Every method at every ``(side, teacher_layers, teacher_heads)`` point: one row each,
    with the point, the parameter counts and the per-step figures of :func:`run_method`."""
    from student.latent.models import save_base

    torch.set_num_threads(threads)
    rows = []
    for side, layers, heads in points:
        tdir = work / f"s{side}-l{layers}-h{heads}" / "base"
        teacher_tf = transformer(side, layers, heads, seed=1)
        save_base(teacher_tf, tdir)
        student_tf = transformer(side, STUDENT["num_layers"], STUDENT["num_attention_heads"], 0)
        teacher, router = serve(tdir, threads)
        try:
            for m in methods:
                tf = transformer(side, STUDENT["num_layers"], STUDENT["num_attention_heads"], 0)
                row = run_method(router.url, tf, m, batch, n, steps)
                row |= {
                    "method": m,
                    "side": side,
                    "state_floats": 4 * side * side,
                    "teacher_layers": layers,
                    "teacher_heads": heads,
                    "teacher_params": params(teacher_tf),
                    "student_params": params(student_tf),
                }
                rows.append(row)
                say(
                    f"side {side}, teacher {layers}x{heads} heads, {m}: "
                    f"{row['step_ms']:.0f} ms/step (rollout {row['rollout_ms']:.0f}, exposed "
                    f"{row['query_exposed_ms']:.0f}, update {row['update_ms']:.0f})"
                )
        finally:
            router.stop()
            teacher.stop()
    return rows


def savings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per point: DanceOPD's step time against DiffusionOPD's (``1 − dance / dense``) and the
    shares of the dense step."""
    out = []
    keyed = {(r["side"], r["teacher_layers"], r["teacher_heads"], r["method"]): r for r in rows}
    for (side, layers, heads, m), dense in keyed.items():
        dance = keyed.get((side, layers, heads, "danceopd"))
        if m != "diffusionopd" or dance is None:
            continue
        out.append(
            {
                "side": side,
                "state_floats": dense["state_floats"],
                "teacher": f"{layers} blocks x {heads} heads ({dense['teacher_params']:,} params)",
                "dense_step_ms": dense["step_ms"],
                "dance_step_ms": dance["step_ms"],
                "saving": 1 - dance["step_ms"] / dense["step_ms"],
                "dense_rollout_share": dense["rollout_ms"] / dense["step_ms"],
                "dense_query_share": dense["query_exposed_ms"] / dense["step_ms"],
                "dense_update_share": dense["update_ms"] / dense["step_ms"],
                "dense_teacher_compute_ms": dense["compute_ms"],
                "dense_mb_per_step": (dense["bytes_sent"] + dense["bytes_received"]) / 1e6,
            }
        )
    return out


def tables(rows: list[dict[str, Any]], saved: list[dict[str, Any]]) -> str:
    """The per-method breakdown and the saving table (markdown)."""
    lines = [
        "| side (state floats) | teacher | method | rollout ms | exposed query ms | update ms "
        "| step ms | query latency ms | teacher compute ms | states/step | MB/step |",
        "| --- | --- | --- |" + " ---: |" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['side']} ({r['state_floats']:,}) | {r['teacher_layers']}x{r['teacher_heads']} "
            f"| {r['method']} | {r['rollout_ms']:.0f} | {r['query_exposed_ms']:.0f} | "
            f"{r['update_ms']:.0f} | {r['step_ms']:.0f} | {r['query_latency_ms']:.0f} | "
            f"{r['compute_ms']:.0f} | {r['states']:,.0f} | "
            f"{(r['bytes_sent'] + r['bytes_received']) / 1e6:.2f} |"
        )
    lines += [
        "",
        "| side (state floats) | teacher | dense step ms | DanceOPD step ms | DanceOPD saving "
        "| dense: rollout / exposed query / update |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for s in saved:
        lines.append(
            f"| {s['side']} ({s['state_floats']:,}) | {s['teacher']} | {s['dense_step_ms']:.0f} "
            f"| {s['dance_step_ms']:.0f} | {s['saving']:.0%} | "
            f"{s['dense_rollout_share']:.0%} / {s['dense_query_share']:.0%} / "
            f"{s['dense_update_share']:.0%} |"
        )
    return "\n".join(lines)

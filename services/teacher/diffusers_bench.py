"""Diffusers teacher benchmark: wire bytes per dense step (with and without the conditioning
cache) and served states/s vs the in-process forward of the same transformer.

    HF_HUB_OFFLINE=1 python -m services.teacher.diffusers_bench --out docs/benchmarks/diffusers.json
    # a GPU machine: an SD3.5-Medium-sized transformer (random weights), bf16
    HF_HUB_OFFLINE=1 python -m services.teacher.diffusers_bench --config sd35m --device cuda \\
        --dtype bf16 --states 1,4,8 --concurrency 1,4

The model is built from a config with random weights and ``save_pretrained`` into a temporary
directory (no hub). ``cpu-small`` is real-shaped where the wire is concerned (latents
``[16, 64, 64]``, text ``333 x 4096``, pooled ``2048``) but two narrow layers deep, so a CPU can
run it. Served requests send the prompt's conditioning once under a ``cond_id`` and then states
only (what a streaming trainer does). Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from common.codec import HEADER_LENGTH, decode_response, encode_request, encode_response

#: SD3-like wire shapes: latent channels / size, prompt tokens (77 CLIP + 256 T5), widths
LATENT, TEXT_LEN, TEXT_DIM, POOLED = (16, 64, 64), 333, 4096, 2048
CONFIGS: dict[str, dict[str, Any]] = {
    "cpu-small": dict(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=64,
        pooled_projection_dim=POOLED,
        pos_embed_max_size=64,
    ),
    # SD3.5 Medium's transformer config (2.5 B parameters); random weights
    "sd35m": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=1536,
        pooled_projection_dim=POOLED,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
}
ROLLOUT_STEPS = 12


def _nbytes(body: bytes) -> int:
    return len(body)


def bytes_per_step(dtype: str = "float32") -> dict[str, Any]:
    """Request and response body bytes for one prompt's dense step (12 states queried), per
    way of sending the conditioning, measured from the codec's binary encodings."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *LATENT)).astype(dtype)
    t = np.array([0.5], np.float32)
    ehs = rng.standard_normal((1, TEXT_LEN, TEXT_DIM)).astype(dtype)
    pooled = rng.standard_normal((1, POOLED)).astype(dtype)
    cond = {"encoder_hidden_states": ehs, "pooled_projections": pooled}

    def req(n: int, with_cond: int, params: dict | None = None) -> int:
        inputs = {"x": np.repeat(x, n, 0), "t": np.repeat(t, n, 0)}
        if with_cond:
            inputs.update({k: np.repeat(v, with_cond, 0) for k, v in cond.items()})
        return _nbytes(encode_request(inputs, binary=True, parameters=params)[0])

    resp1 = _nbytes(encode_response({"v": x}, "m", "1", binary=True)[0])
    resp12 = _nbytes(encode_response({"v": np.repeat(x, 12, 0)}, "m", "1", binary=True)[0])
    n = ROLLOUT_STEPS
    rows = {
        # streamed (one request per rollout step), conditioning with every request
        "streamed, conditioning in every request": n * req(1, 1),
        # streamed, conditioning once under a cond_id, then states only
        "streamed, cond_id (sent once)": req(1, 1, {"cond_id": "p"})
        + (n - 1) * req(1, 0, {"cond_id": "p"}),
        # one request at the end of the rollout: 12 states, conditioning one row per state
        "one request, a conditioning row per state": req(n, n),
        # one request, one conditioning row shared by its 12 states
        "one request, one shared conditioning row": req(n, 1),
    }
    return {
        "dtype": str(np.dtype(dtype)),
        "state_bytes": int(x.nbytes),
        "conditioning_bytes": int(ehs.nbytes + pooled.nbytes),
        "request_bytes": rows,
        "response_bytes": {"streamed": n * resp1, "one request": resp12},
    }


def build(config: str, out: Path) -> tuple[Path, int]:
    """Save a random-weight transformer of ``config`` into ``out``: ``(out, parameters)``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIGS[config])
    model.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def in_process_rate(backend: Any, states: int, seconds: float) -> dict[str, float]:
    """states/s of the backend's forward at ``states`` rows (one shared prompt)."""
    device, dt = backend.device, backend.dtype
    x = torch.randn(states, *LATENT, device=device, dtype=dt)
    t = torch.full((states,), 0.5, device=device)
    cond = {
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, TEXT_DIM, device=device, dtype=dt)
        .expand(states, -1, -1)
        .contiguous(),
        "pooled_projections": torch.randn(1, POOLED, device=device, dtype=dt)
        .expand(states, -1)
        .contiguous(),
    }
    backend.forward(x, t, cond)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        backend.forward(x, t, cond)
        if device == "cuda":
            torch.cuda.synchronize()
        n += 1
    elapsed = time.perf_counter() - start
    return {"states_s": n * states / elapsed, "forward_ms": elapsed / n * 1e3}


def served_rate(
    url: str, model: str, states: int, concurrency: int, seconds: float
) -> dict[str, float]:
    """states/s and MB/s (bodies both ways) of ``concurrency`` clients sending ``states``
    states per request with a cached ``cond_id`` (conditioning sent once per client)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((states, *LATENT)).astype(np.float32)
    t = np.full(states, 0.5, np.float32)
    cond = {
        "encoder_hidden_states": rng.standard_normal((1, TEXT_LEN, TEXT_DIM)).astype(np.float32),
        "pooled_projections": rng.standard_normal((1, POOLED)).astype(np.float32),
    }
    stop = threading.Event()
    totals = {"states": 0, "bytes": 0, "errors": 0}
    lock = threading.Lock()

    def worker(k: int) -> None:
        params = {"cond_id": f"bench-{k}"}
        with httpx.Client(timeout=600) as client:
            body, headers = encode_request({"x": x, "t": t, **cond}, parameters=params)
            client.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers)
            body, headers = encode_request({"x": x, "t": t}, parameters=params)
            while not stop.is_set():
                r = client.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers)
                if r.status_code != 200:
                    with lock:
                        totals["errors"] += 1
                    continue
                decode_response(r.content, r.headers.get(HEADER_LENGTH))
                with lock:
                    totals["states"] += states
                    totals["bytes"] += len(body) + len(r.content)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    time.sleep(min(2.0, seconds / 3))  # warm-up: first requests carry the conditioning
    with lock:
        s0, b0 = totals["states"], totals["bytes"]
    start = time.perf_counter()
    time.sleep(seconds)
    with lock:
        s1, b1 = totals["states"], totals["bytes"]
    elapsed = time.perf_counter() - start
    stop.set()
    for th in threads:
        th.join()
    return {
        "states_s": (s1 - s0) / elapsed,
        "mb_s": (b1 - b0) / elapsed / 1e6,
        "errors": totals["errors"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--states", default="1,4", help="states per request (comma list)")
    p.add_argument("--concurrency", default="1,2", help="requests in flight (comma list)")
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per point")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (server and local)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "config": args.config,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "bytes_per_dense_step": {
            "fp32": bytes_per_step("float32"),
            "fp16": bytes_per_step("float16"),
        },
    }
    print(json.dumps(results["bytes_per_dense_step"], indent=2), flush=True)
    from common.procs import start_service

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, results["parameters"] = build(args.config, Path(tmp) / "teacher")
        cmd = [sys.executable, "-m", "common.cli", "serve", "teacher", "--model-dir"]
        cmd += [str(model_dir), "--name", "teacher", "--port", "0", "--threads"]
        cmd += [str(args.threads), "--dtype", args.dtype, "--device", args.device]
        cmd += ["--max-body-mb", "1024"]
        from services.teacher.diffusers_backend import load_backend

        backend = load_backend(model_dir, args.dtype, args.device)
        states_list = [int(s) for s in args.states.split(",")]
        points = [(n, int(c)) for n in states_list for c in args.concurrency.split(",")]
        rounds: dict[tuple[int, int], list[dict[str, float]]] = {p: [] for p in points}
        svc = start_service(cmd, timeout_s=600)
        try:
            # alternating rounds: a shared machine's load moves both sides alike
            for r in range(args.rounds):
                for n, c in points:
                    local = in_process_rate(backend, n, args.seconds)
                    served = served_rate(svc.url, "teacher", n, c, args.seconds)
                    point = {
                        "served_states_s": served["states_s"],
                        "served_mb_s": served["mb_s"],
                        "errors": served["errors"],
                        "in_process_states_s": local["states_s"],
                        "in_process_forward_ms": local["forward_ms"],
                        "ratio": served["states_s"] / local["states_s"],
                    }
                    rounds[(n, c)].append(point)
                    print(json.dumps({"round": r, "states": n, "concurrency": c, **point}))
        finally:
            svc.stop()
        rows = []
        for (n, c), got in rounds.items():
            med = {k: float(np.median([g[k] for g in got])) for k in got[0]}
            rows.append(
                {
                    "states_per_request": n,
                    "concurrency": c,
                    **{k: round(v, 3) for k, v in med.items()},
                    "ratios": [round(g["ratio"], 3) for g in got],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        results["serving"] = rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

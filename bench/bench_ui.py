"""UI round-trip latency: p50 / p95 of a cheap app request, idle and while a fine-tune runs.

    python -m bench.bench_ui [--calls 40] [--steps 100000]

Starts the app on a free local port with the starter family, fits it, then times /select_stitch
(graph + curve redrawn: what a click on the curve costs) through gradio_client: first with
nothing running, then while a fine-tune of the same session trains in the background. Prints
both and their ratio, measured side by side in this run. The app leaves torch one core short
(as `python app.py` does), so the web server keeps a core while training.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentiles(samples: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(samples, n=20, method="inclusive")   # 5 % steps: [9] = p50, [18] = p95
    return qs[9], qs[18]


def time_calls(client, key: str, calls: int) -> list[float]:
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        client.predict(key, i % 5, "macs", api_name="/select_stitch")
        out.append(1000 * (time.perf_counter() - t0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--steps", type=int, default=100_000, help="fine-tune length (cancelled when timing ends)")
    args = p.parse_args()

    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    from gradio_client import Client

    from composer.ui import build_app, launch
    from composer.ui.session import AppConfig
    tmp = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    demo = build_app(AppConfig(runs_root=tmp / "runs", exports_dir=tmp / "exports", eval_limit=100))
    launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        key = client.predict(api_name="/new_session")
        client.predict(key, "starter", api_name="/choose_family")
        client.predict(key, "starter", 64, 100, "macs", api_name="/fit")
        time_calls(client, key, 3)                                   # warm-up
        idle = time_calls(client, key, args.calls)
        client.predict(key, args.steps, 0, 64, "uniform", "none", 0, "starter", api_name="/train_start")
        while "data-state='running'" not in client.predict(key, "macs", api_name="/train_poll")[0]:
            time.sleep(0.2)
        busy = time_calls(client, key, args.calls)
        snap = demo.store.get(key).job.snapshot()
        client.predict(key, api_name="/train_cancel")
        while demo.store.get(key).job.running:
            time.sleep(0.2)
    finally:
        demo.close()
    (i50, i95), (b50, b95) = percentiles(idle), percentiles(busy)
    print(f"UI round trip (/select_stitch, {args.calls} calls each, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}):")
    print(f"  idle:                 p50 {i50:7.1f} ms   p95 {i95:7.1f} ms")
    print(f"  during a fine-tune:   p50 {b50:7.1f} ms   p95 {b95:7.1f} ms   "
          f"(training at {snap.get('images_per_s') or 0:.0f} images/s, step {snap.get('step')})")
    print(f"  ratio busy / idle:    p50 x{b50 / i50:.2f}   p95 x{b95 / i95:.2f}")


if __name__ == "__main__":
    main()

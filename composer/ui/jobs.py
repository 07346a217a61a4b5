"""A fine-tune running in a background thread, watched by polling a locked snapshot.

The web server stays responsive because the training loop runs in its own thread (and the app
leaves torch one core short, see app.py); the UI's timer reads `snapshot()` twice a second.
Cancelling sets an Event the trainer checks every step; it then writes a checkpoint, so starting
again resumes where it stopped. An exception in the trainer ends the job with a message, never
the server.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from composer.errors import UserError

log = logging.getLogger(__name__)


class TrainJob:
    def __init__(self, run_dir: Path, data: str, config, on_eval: Callable[[int, dict, dict | None], None] | None = None,
                 on_end: Callable[[Path, str], None] | None = None):
        self.run_dir, self.data, self.config = Path(run_dir), data, config
        self.on_eval, self.on_end = on_eval, on_end
        self.recipe = ""          # what the trainer resolved (lr, optimizer, distillation), once started
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"train:{self.run_dir.name}", daemon=True)
        self._state = {"state": "starting", "step": 0, "total_steps": config.steps, "loss": None, "lr": None,
                       "images_per_s": None, "eta_s": None, "message": "", "evals": 0, "started": time.time(), "resumed_from": None,
                       "result": None}

    @property
    def running(self) -> bool:
        return self._thread.is_alive() or self._state["state"] == "starting"

    def start(self) -> None:
        self._thread.start()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._state)

    def _update(self, **kv) -> None:
        with self._lock:
            self._state.update(kv)

    def _event(self, e: dict) -> None:
        kind = e.get("type")
        if kind == "start":
            resumed = e.get("step", 0) if e.get("resumed") else None
            self.recipe = recipe_text(e.get("config") or {})
            before = e.get("after_divergence")
            after = (f" (the previous fine-tune diverged at step {before.get('at_step')} with lr {before.get('lr')})"
                     if before else "")
            where = (f"resumed from the checkpoint at step {resumed}" if resumed is not None else
                     "started from the fitted run") + after
            self._update(state="running", step=e.get("step", 0), total_steps=e.get("total_steps"), resumed_from=resumed,
                         started_at=e.get("step", 0), recipe=self.recipe, message=where, after_divergence=before)
        elif kind == "step":
            self._update(state="running", **{k: e.get(k) for k in ("step", "total_steps", "loss", "lr", "images_per_s", "eta_s")})
        elif kind == "eval":
            if self.on_eval is not None:
                self.on_eval(e.get("step", 0), e.get("top1") or {}, e.get("reference"))
            j = e.get("judged")
            with self._lock:
                self._state["evals"] += 1
                self._state["message"] = f"evaluated at step {e.get('step')}"
                if j:   # judged against the line between the anchors as they were before the fine-tune
                    self._state["judged"] = (f"{j['within']} of {j['stitches_judged']} stitches within 1 point of "
                                             f"the original line (median gap {j['median_gap']:+.2f})")
        elif kind == "checkpoint":
            self._update(message=f"checkpoint saved at step {e.get('step')}")

    def _run(self) -> None:
        from composer.pipeline import train_run
        state = "error"
        try:
            result = train_run(self.run_dir, self.data, self.config, events=self._event, cancel=self.cancel)
            state = status = result.get("status", "done")
            snap = self.snapshot()
            resumed, first = snap.get("resumed_from"), snap.get("started_at") or 0
            trained = result.get("step", 0) - first
            if status == "diverged":
                kept = (f"the checkpoint at step {result['step']} is kept" if result.get("step") else
                        "no checkpoint was written (the fitted weights are kept)")
                message = (f"diverged at step {result.get('diverged_at')} ({result.get('reason')}) with lr "
                           f"{result.get('lr'):g}: stopped; {kept}. Lower the learning rate, then Start / resume "
                           "continues from it")
                self._update(state=status, result=result, eta_s=None, step=result.get("step", 0), message=message,
                             loss=None)
            else:
                words = {"done": "finished", "cancelled": "cancelled (checkpoint saved: resume continues from it)",
                         "budget": "stopped at the time budget (checkpoint saved)"}
                before = snap.get("after_divergence")
                notes = ([f"resumed from step {resumed}"] if resumed is not None else []) + (
                    [f"the previous fine-tune diverged at step {before.get('at_step')}"] if before else [])
                self._update(state=status, result=result, eta_s=0 if status == "done" else None,
                             message=f"{words.get(status, status)} at step {result.get('step')}: {trained} steps trained"
                                     + (f" ({'; '.join(notes)})" if notes else ""))
        except UserError as e:
            self._update(state="error", message=str(e))
        except Exception as e:  # a bug in training must end this job, not the server
            log.exception("fine-tune in %s failed", self.run_dir)
            self._update(state="error", message=f"fine-tuning failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        finally:
            if self.on_end is not None:
                try:
                    self.on_end(self.run_dir, state)
                except Exception:   # the job has ended either way
                    log.exception("after the fine-tune in %s", self.run_dir)


DISTILL_WORDS = {"off": "no distillation", "anchors": "distillation from each route's own anchor",
                 "largest": "distillation from the largest anchor",
                 "live": "distillation from each route's anchor as fine-tuned so far"}


def recipe_text(config: dict) -> str:
    """The recipe the trainer resolved (family defaults filled in), in words: what is run and recorded."""
    if not config:
        return ""
    distill = str(config.get("distill"))
    average = config.get("average")
    return (f"lr {config.get('lr'):g} ({config.get('optimizer')}), batch {config.get('batch_size')}, "
            f"{config.get('sampling')} sampling, {DISTILL_WORDS.get(distill, 'distillation from ' + distill)}"
            + (f", weights averaged {average:g} toward the fitted ones (WiSE-FT)" if average not in (None, 1.0) else ""))


class BuilderJob:
    """One run of another curve builder (elastic search, DMS shrinking, folding) in a background
    thread. `work(events, cancel)` calls the library and returns a one-line summary; events (dicts
    with a "type") are kept for the UI: the latest one, and for DMS the soft-MACs history it draws."""

    def __init__(self, kind: str, work: Callable[[Callable[[dict], None], threading.Event], str]):
        self.kind, self._work = kind, work
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self._state = {"kind": kind, "state": "starting", "message": f"{kind}: starting", "last": {}, "history": [],
                       "started": time.time()}
        self._thread = threading.Thread(target=self._run, name=f"builder:{kind}", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() or self._state["state"] == "starting"

    def start(self) -> None:
        self._thread.start()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._state, history=list(self._state["history"]))

    def _event(self, e: dict) -> None:
        with self._lock:
            self._state.update(state="running", last=dict(e))
            if e.get("type") == "step" and "soft_macs" in e:
                self._state["history"].append((e.get("step"), e["soft_macs"], e.get("target")))

    def _run(self) -> None:
        try:
            summary = self._work(self._event, self.cancel)
            with self._lock:
                self._state.update(state="done", message=summary)
        except UserError as e:
            with self._lock:
                self._state.update(state="error", message=f"{self.kind}: {e}")
        except Exception as e:  # a bug in a builder ends this job, never the server
            log.exception("%s failed", self.kind)
            with self._lock:
                self._state.update(state="error", message=f"{self.kind} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

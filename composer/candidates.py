"""Curve points that are not stitches: what the other curve builders (elastic sub-networks, DMS
shrinking, folding, scaling) propose, stored beside a run so that one curve shows them all.

A candidate says which method made it and whether its accuracy was *measured* (evaluated on the
user's data here), *predicted* (an accuracy predictor's estimate) or *quoted* (from a paper, never
reproduced here). Costs use the conventions of `composer.costs` (MACs: 1 multiply-add = 1).

Stored in RUN/candidates.json as {"candidates": [...]}; a candidate with the same (method, name)
as a stored one replaces it, so re-running a builder updates its points instead of piling them up.
"""
from __future__ import annotations

from composer.errors import UserError
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from composer.io import write_json_atomic

CANDIDATES = "candidates.json"
METHODS = ("snnet", "elastic", "shrink", "fold", "scale")   # "snnet": stitches from elsewhere (quoted)
STATUSES = ("measured", "predicted", "quoted")


class CandidateError(UserError):
    """A candidate that cannot be stored or read; the message says why."""


@dataclass
class Candidate:
    method: str                 # one of METHODS
    name: str                   # unique within the method, shown in hover text, e.g. "resnet56 d=3,3,3 w=0.5"
    source: str                 # what it was made from: an anchor spec, or "stitch 12"
    macs: int                   # per image, 1 multiply-add = 1
    params: int
    activations: int            # outputs of conv/linear layers per image
    top1: float | None = None   # %, None when not known
    status: str = "measured"    # one of STATUSES: how top1 was obtained
    latency_ms: float | None = None
    config: dict = field(default_factory=dict)   # method-specific, enough to rebuild or export it

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CandidateError(f"unknown method '{self.method}' (one of {', '.join(METHODS)})")
        if self.status not in STATUSES:
            raise CandidateError(f"unknown status '{self.status}' (one of {', '.join(STATUSES)})")

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.name

    def to_dict(self) -> dict:
        return asdict(self)


def read_candidates(run_dir) -> list[Candidate]:
    """The run's stored candidates ([] when there are none)."""
    f = Path(run_dir) / CANDIDATES
    if not f.is_file():
        return []
    try:
        return [Candidate(**c) for c in json.loads(f.read_text())["candidates"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CandidateError(f"{f} is unreadable ({e})") from None


def find_candidate(run_dir, ref: str) -> Candidate:
    """The stored candidate `ref` names: "METHOD:NAME" (its key on the curve and in the curve's
    JSON) or a bare NAME that only one method uses."""
    stored = read_candidates(run_dir)
    method, _, name = ref.partition(":")
    found = [c for c in stored if (c.method, c.name) == (method, name)] or [c for c in stored if c.name == ref]
    if len(found) == 1:
        return found[0]
    keys = [f"{c.method}:{c.name}" for c in (found or stored)]
    listed = ", ".join(f"'{k}'" for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    if found:
        raise CandidateError(f"'{ref}' names {len(found)} candidates in {run_dir}: say which as METHOD:NAME ({listed})")
    raise CandidateError(f"no candidate '{ref}' in {run_dir} ({listed or 'it has none yet'})")


def add_candidates(run_dir, new: list[Candidate]) -> list[Candidate]:
    """Store `new` in the run, replacing stored ones with the same (method, name); returns all."""
    stored = {c.key: c for c in read_candidates(run_dir)}
    for c in new:
        stored[c.key] = c
    out = list(stored.values())
    write_json_atomic(Path(run_dir) / CANDIDATES, {"candidates": [c.to_dict() for c in out]})
    return out


def remove_candidates(run_dir, method: str) -> None:
    """Forget every stored candidate of one method."""
    keep = [c for c in read_candidates(run_dir) if c.method != method]
    write_json_atomic(Path(run_dir) / CANDIDATES, {"candidates": [c.to_dict() for c in keep]})

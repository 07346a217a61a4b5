"""Curve points that are not stitches: what the other curve builders (elastic sub-networks, DMS
shrinking, folding, scaling) propose, stored beside a run so that one curve shows them all.

A candidate says which method made it and whether its accuracy was *measured* (evaluated on the
user's data here), *predicted* (an accuracy predictor's estimate) or *quoted* (from a paper, never
reproduced here). Costs use the conventions of `composer.costs` (MACs: 1 multiply-add = 1).

Stored in RUN/candidates.json (read and written by composer.run) as {"candidates": [...]}; a candidate with the same (method, name)
as a stored one replaces it, so re-running a builder updates its points instead of piling them up.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from composer.errors import UserError

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

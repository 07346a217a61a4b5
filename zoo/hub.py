"""Model families: groups of same-architecture models of different sizes, ready to stitch.

Families come from the Hugging Face Hub (`list_hub_families`), from the local Hugging Face cache
(`cached_families`, works offline), or from a folder of timm `local-dir:` models
(`local_families`). Members are anchor specs that `timm.create_model(spec, pretrained=True)`
accepts. This module does not import composer: callers that want members ordered by MACs pass
their own `sort_key`.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "Family",
    "HubUnavailable",
    "SIZE_TOKENS",
    "family_key",
    "group_families",
    "hub_status",
    "list_hub_families",
    "cached_families",
    "local_families",
]

# Size words used in timm model names, smallest first; their order ranks family members.
SIZE_TOKENS = (
    "atto", "femto", "pico", "nano", "tiny", "mini", "xsmall", "small", "medium",
    "base", "large", "xlarge", "huge", "giant", "gigantic",
)
_SIZE_RANK = {t: i for i, t in enumerate(SIZE_TOKENS)}

# A depth number glued to an architecture word: resnet18, densenet121, vgg16, cifar_resnet20.
# Two or more digits, not starting with 0, and not a version ("mobilenetv3", "eva02" stay as they are).
_DEPTH_TOKEN = re.compile(r"^([a-z]*[a-uw-z])([1-9]\d+)$")

_PROBE_TIMEOUT_S = 2.0


class HubUnavailable(RuntimeError):
    """The Hub cannot be asked right now (offline mode, no network); the message says which."""


@dataclass
class Family:
    name: str  # e.g. "deit_*_patch16_224.fb_in1k"
    tag: str  # pretraining tag, e.g. "fb_in1k"; "" when the models carry none
    source: str  # "hub" | "cache" | "local" | "starter"
    members: list[str] = field(default_factory=list)  # anchor specs, small -> large


# ---------------------------------------------------------------------------------------------
# Grouping (pure functions)
# ---------------------------------------------------------------------------------------------
def family_key(arch: str) -> tuple[str, tuple[int, int]] | None:
    """Architecture name with its size slot replaced by '*', and the size's rank; None if no slot.

    >>> family_key("deit_tiny_patch16_224")
    ('deit_*_patch16_224', (4, 0))
    >>> family_key("resnet50")
    ('resnet*', (-1, 50))
    """
    tokens = arch.split("_")
    depth_allowed = True
    for i, tok in enumerate(tokens):
        if tok in _SIZE_RANK:
            return "_".join(tokens[:i] + ["*"] + tokens[i + 1:]), (_SIZE_RANK[tok], 0)
        m = _DEPTH_TOKEN.match(tok) if depth_allowed else None
        if m:
            return "_".join(tokens[:i] + [m.group(1) + "*"] + tokens[i + 1:]), (-1, int(m.group(2)))
        if any(c.isdigit() for c in tok):
            # Only the first digit-bearing token can be the depth: later ones are patch sizes,
            # resolutions and the like (patch16, 224). Size words may still follow (mobilenetv3_large).
            depth_allowed = False
    return None


def _split_tag(name: str) -> tuple[str, str]:
    """'deit_tiny_patch16_224.fb_in1k' -> ('deit_tiny_patch16_224', 'fb_in1k'), as timm splits."""
    arch, _, tag = name.partition(".")
    return arch, tag


def _group(items: Iterable[tuple[str, str]], source: str,
           sort_key: Callable[[str], float] | None = None) -> list[Family]:
    """Group (model name with tag, anchor spec) pairs into families of two or more."""
    groups: dict[tuple[str, str], list[tuple[tuple[int, int], str]]] = defaultdict(list)
    for name, spec in items:
        prefix, _, bare = name.rpartition("/")  # Hub ids carry an owner; same names, other owner = other weights
        arch, tag = _split_tag(bare)
        key = family_key(arch)
        if key is None:
            continue
        pattern, rank = key
        owner = f"{prefix}/" if prefix and prefix != "timm" else ""
        groups[(owner + pattern, tag)].append((rank, spec))

    families = []
    for (pattern, tag), members in sorted(groups.items()):
        specs = sorted(set(members))  # by size rank, then spec, for a stable order
        if len(specs) < 2:  # nothing to stitch
            continue
        ordered = [spec for _, spec in specs]
        if sort_key is not None:
            ordered.sort(key=sort_key)
        name = f"{pattern}.{tag}" if tag else pattern
        families.append(Family(name=name, tag=tag, source=source, members=ordered))
    return families


def group_families(model_ids: list[str], sort_key: Callable[[str], float] | None = None,
                   source: str = "hub") -> list[Family]:
    """Group Hub ids ("timm/deit_tiny_patch16_224.fb_in1k", ...) into families.

    Same family = same architecture line with the size word or depth number taken out, the same
    pretraining tag, and the same owner. Families of one member are dropped. Members are
    "hf-hub:<id>" specs, ordered by `sort_key` if given, else by size word / depth.
    """
    return _group(((mid, f"hf-hub:{mid}") for mid in model_ids), source, sort_key)


# ---------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------
def hub_status() -> str | None:
    """None when the Hub answers; otherwise a one-line reason (offline mode, unreachable, ...)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return ("Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1): showing cached and local "
                "families only.")
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models?limit=1"
    try:
        # A bare short-timeout probe: huggingface_hub's own client retries with back-off, which
        # is right for downloads but leaves a UI hanging for a long time when there is no network.
        with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as resp:
            resp.read(1)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            return f"Hugging Face Hub at {constants.ENDPOINT} answered {e.code}: try again later."
    except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
        reason = getattr(e, "reason", e)
        return f"Hugging Face Hub at {constants.ENDPOINT} is unreachable ({reason})."
    return None


def list_hub_families(
    search: str | None = None,
    author: str | None = "timm",
    tags: list[str] | None = None,
    limit: int = 500,
    sort_key: Callable[[str], float] | None = None,
) -> list[Family]:
    """Families among timm models on the Hub; raises HubUnavailable at once when it can't be reached."""
    import huggingface_hub

    network_errors: tuple[type[BaseException], ...] = (OSError,)  # HfHubHTTPError is an OSError
    try:  # huggingface_hub 1.x+ talks through httpx2, whose transport errors are not OSErrors
        import httpx2
        network_errors += (httpx2.HTTPError,)
    except ImportError:
        pass

    status = hub_status()
    if status:
        raise HubUnavailable(status)
    # "timm" as a filter is the library tag: huggingface_hub 1.x+ has no separate library argument.
    filters = ["timm", *(tags or [])]
    try:
        ids = [m.id for m in huggingface_hub.list_models(author=author, search=search, filter=filters, limit=limit)]
    except network_errors as e:  # e.g. the network dropped between the probe and the listing
        raise HubUnavailable(f"Hugging Face Hub listing failed: {e}".splitlines()[0]) from e
    return group_families(ids, sort_key=sort_key, source="hub")


# ---------------------------------------------------------------------------------------------
# Offline sources
# ---------------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def cached_families(cache_dir: str | Path | None = None,
                    sort_key: Callable[[str], float] | None = None) -> list[Family]:
    """Families among timm models fully downloaded into the Hugging Face cache (works offline).

    `cache_dir` defaults to huggingface_hub's own (HF_HUB_CACHE / HF_HOME). A repo counts when one
    of its cached revisions has config.json and a weights file, which is what timm needs.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    ids = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            names = {f.file_name for f in rev.files}
            if "config.json" in names and names.intersection(_WEIGHT_FILES):
                ids.append(repo.repo_id)
                break
    return group_families(ids, sort_key=sort_key, source="cache")


def local_families(root: Path, source: str = "local",
                   sort_key: Callable[[str], float] | None = None) -> list[Family]:
    """Families among the timm `local-dir:` model folders directly under `root`.

    A folder counts when it holds config.json (with "architecture") and model.safetensors. The
    pretraining tag is taken from the folder name's ".tag" suffix, if any. Use
    `source="starter"` for the built-in starter zoo's models folder.
    """
    root = Path(root)
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            arch = json.loads((sub / "config.json").read_text())["architecture"]
        except (OSError, ValueError, KeyError):
            continue
        if not (sub / "model.safetensors").is_file():
            continue
        _, tag = _split_tag(sub.name)
        items.append((f"{arch}.{tag}" if tag else arch, f"local-dir:{sub.resolve()}"))
    return _group(items, source, sort_key)

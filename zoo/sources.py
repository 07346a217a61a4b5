"""Where anchors come from: anything `timm.create_model` accepts.

- a timm model name ("deit_tiny_patch16_224"): architecture only, random weights unless
  pretrained=True (which downloads through timm / huggingface_hub);
- "hf-hub:org/repo": config.json + weights from the Hub (or its cache when offline);
- "local-dir:DIR": timm's own folder format, config.json + model.safetensors.
Weights are read by timm through safetensors, or torch.load(weights_only=True) for .bin files:
never a full unpickle.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from composer.errors import UserError


class AnchorError(UserError):
    """An anchor spec that cannot be turned into a model; the message says why."""


_HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_sourced(spec: str) -> bool:
    return spec.startswith(("hf-hub:", "local-dir:"))


def create_anchor(spec: str, pretrained: bool | None = None, device: str | None = None) -> nn.Module:
    """Build an anchor from its spec, in eval mode. Sourced specs load weights by default.
    device="meta" builds the architecture without memory or init (enough to plan and count)."""
    pretrained = is_sourced(spec) if pretrained is None else pretrained
    if device == "meta" and pretrained:
        raise AnchorError(f"{spec}: weights cannot be loaded on the meta device")
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:"):]).expanduser()
        if not (folder / "config.json").is_file():
            raise AnchorError(f"{spec}: no config.json in {folder} (a local-dir: anchor is timm's "
                              "folder format: config.json + model.safetensors)")
        if pretrained and not any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
            raise AnchorError(f"{spec}: no model.safetensors in {folder}")
    elif spec.startswith("hf-hub:") and not _HUB_REPO.fullmatch(spec[len("hf-hub:"):]):
        raise AnchorError(f"'{spec[:80]}' is not a Hub model: write hf-hub:ORG/REPO (letters, digits, '-', '_', '.')")
    elif not is_sourced(spec) and not timm.is_model(spec):
        close = timm.list_models(f"*{spec.split('.')[0][:12]}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AnchorError(f"unknown model '{spec}': not a timm model name, hf-hub:org/repo or local-dir:DIR{hint}")
    try:
        with torch.device(device or "cpu"):
            model = timm.create_model(spec, pretrained=pretrained)
    except (SafetensorError, pickle.UnpicklingError, EOFError) as e:
        raise AnchorError(f"{spec}: weight file is corrupted or not a safe checkpoint "
                          f"(only safetensors or plain-tensor files load): {_first_line(e)}") from None
    except RuntimeError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "weights_only" in msg:
            raise AnchorError(f"{spec}: the weight file is a pickle with code objects; it is not loaded "
                              "for safety. Convert it to model.safetensors.") from None
        if "size mismatch" in msg or "Missing key" in msg or "Unexpected key" in msg:
            raise AnchorError(f"{spec}: weights do not match the architecture: {_first_line(e)}") from None
        if "Unknown model" in msg:
            raise AnchorError(f"{spec}: {_first_line(e)}") from None
        raise
    except json.JSONDecodeError as e:
        raise AnchorError(f"{spec}: config.json is not valid JSON ({e})") from None
    except ValueError as e:   # huggingface_hub's validation errors: a repo id it refuses
        raise AnchorError(f"{spec}: {_first_line(e)}") from None
    except OSError as e:  # network / cache misses surface as OSError subclasses in huggingface_hub
        raise AnchorError(f"{spec}: could not fetch weights ({type(e).__name__}: {_first_line(e)}); "
                          "offline? cached and local anchors still work") from None
    return model.eval()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def short_name(spec: str) -> str:
    """How an anchor is named on screen: `hf-hub:timm/deit_tiny_patch16_224.fb_in1k` ->
    `deit_tiny_patch16_224.fb_in1k`, `local-dir:/models/r20` -> `r20`."""
    return str(spec).rstrip("/").rsplit("/", 1)[-1].split(":", 1)[-1]

"""Stitched checkpoints people can use: one stitch as a standalone model, or the whole SN-Net.

export_stitch(RUN, id, OUT) writes
  model.safetensors  only the tensors the route runs (its anchors' stem / units / head it uses and
                     its stitching layers), under the SN-Net's own names
  config.json        anchors (spec, timm architecture, constructor args), route, stitching layers,
                     preprocessing, MACs / params / activations, top-1 if the run was evaluated
  README.md          a model card
  model.pt2          the same network as a torch.export program: `torch.export.load(p).module()(x)`
                     with plain torch (model.ts, TorchScript, for a family torch.export cannot trace)
`load_stitched(OUT)` rebuilds the route with timm.create_model(arch, pretrained=False) per anchor,
replaces every unit the route does not run by nn.Identity (no weights kept around) and loads the
file strictly.

export_snnet(RUN, OUT) writes the whole switchable network (snnet.safetensors, plan.json, config.json)
and table.json (stitch -> MACs, params, activations, top-1, optional latency); `select(OUT, budget)`
picks the most accurate stitch under a budget and `load_snnet(OUT)` rebuilds the network.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from composer.costs import describe
from composer.data import data_config
from composer.errors import UserError
from composer.io import read_config, save_safetensors_atomic, write_json_atomic, write_text_atomic
from composer.plan import LayerSpec, Stitch, StitchPlan, load_plan
from composer.run import load_run, read_evaluation, trained_average
from composer.snnet import StitchedNetwork, StitchLayer
from zoo.adapters import BlockAdapter, UnsupportedModel, adapt

FORMAT = "zoo-composer-stitch"
SNNET_FORMAT = "zoo-composer-snnet"
METRICS = {"macs": "macs", "params": "params", "activations": "activations", "latency": "latency_ms",
           "latency_ms": "latency_ms"}
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class ExportError(UserError):
    """An export or an exported folder that cannot be used as asked; the message says why."""


# --- describing anchors so that plain timm can rebuild them -----------------------------------------

def _register_project_models() -> None:
    """The project's own architectures (CIFAR ResNets, starter ViTs) must be known to timm."""
    import zoo  # noqa: F401
    try:
        import zoo.starter  # noqa: F401
    except ImportError:
        pass


def _source_model_args(spec: str) -> dict:
    """Constructor arguments a hf-hub:/local-dir: config.json records (timm's `model_args`)."""
    try:
        if spec.startswith("local-dir:"):
            cfg = json.loads((Path(spec[len("local-dir:"):]).expanduser() / "config.json").read_text())
        elif spec.startswith("hf-hub:"):
            from huggingface_hub import hf_hub_download
            cfg = json.loads(Path(hf_hub_download(spec[len("hf-hub:"):], "config.json")).read_text())
        else:
            return {}
    except (OSError, ValueError):
        return {}
    return dict(cfg.get("model_args") or {})


def anchor_entry(index: int, spec: str, model: nn.Module) -> dict:
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.pretrained_cfg.items()
           if k not in ("file", "source", "hf_hub_id", "url")}
    return {"index": index, "spec": spec, "architecture": cfg.get("architecture") or spec,
            "num_classes": model.num_classes, "model_args": _source_model_args(spec), "pretrained_cfg": cfg}


def build_anchor(entry: dict) -> nn.Module:
    _register_project_models()
    try:
        kwargs = {**entry.get("model_args", {}), "num_classes": entry["num_classes"]}
        return timm.create_model(entry["architecture"], pretrained=False,
                                 pretrained_cfg_overlay=entry.get("pretrained_cfg") or None, **kwargs).eval()
    except RuntimeError as e:
        raise ExportError(f"cannot build anchor {entry['architecture']}: {str(e).splitlines()[0]}") from None


def preprocessing_of(model: nn.Module) -> dict:
    cfg = data_config(model)
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in PREPROCESSING_KEYS if k in cfg}


# --- the route as its own module -------------------------------------------------------------------

def _owned(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _route_parts(adapter: BlockAdapter, anchor: int, route: list[dict]) -> set[str]:
    """Names (modules or parameters of the anchor) that the route runs in this anchor."""
    keep = set()
    for i, seg in enumerate(route):
        if seg["anchor"] != anchor:
            continue
        if i == 0:
            keep.update(adapter.stem_modules)
        first, last = seg["blocks"]
        for u in adapter.units[first:last + 1]:
            keep.update(u.modules)
        if i == len(route) - 1:
            keep.update(adapter.head_modules)
    return keep


def _drop_unused(model: nn.Module, adapter: BlockAdapter, keep: set[str]) -> None:
    """Replace every part the route does not run by nothing: nn.Identity for modules, no attribute
    for bare parameters (a ViT's cls_token / pos_embed when its stem is not used)."""
    owners = set(adapter.stem_modules) | set(adapter.head_modules) | {n for u in adapter.units for n in u.modules}
    for name in sorted(owners - keep, key=lambda n: -n.count(".")):
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            continue
        if attr in parent._modules and parent._modules[attr] is not None:
            parent._modules[attr] = nn.Identity()
        elif attr in parent._parameters:
            del parent._parameters[attr]
            object.__setattr__(parent, attr, None)


class StitchedRoute(nn.Module):
    """One stitch as a plain module: stem of the first anchor, its units, a stitching layer, the
    next anchor's units, ..., the last anchor's head. Parameter names equal the SN-Net's."""

    def __init__(self, anchors: dict[int, nn.Module], route: list[dict], layers: list[dict]):
        super().__init__()
        self.route = [(s["anchor"], s["blocks"][0], s["blocks"][1]) for s in route]
        self.layer_keys = [d["key"] for d in layers]
        self.out_shapes = [tuple(d["out_shape"]) for d in layers]
        adapters = {i: adapt(m) for i, m in anchors.items()}   # on the full models: unit names stay valid
        for i, m in anchors.items():
            _drop_unused(m, adapters[i], _route_parts(adapters[i], i, route))
        self._adapters = adapters
        self.anchors = nn.ModuleDict({str(i): m for i, m in anchors.items()})
        self.stitch_layers = nn.ModuleDict({d["key"]: StitchLayer(LayerSpec(**d["spec"])) for d in layers})

    @property
    def pretrained_cfg(self) -> dict:
        """The first anchor's timm config: its preprocessing is every anchor's (stitched anchors see
        the same images), so data loading and input sizes work as for a timm model."""
        return self._adapters[self.route[0][0]].model.pretrained_cfg

    @property
    def num_classes(self) -> int:
        return self._adapters[self.route[-1][0]].model.num_classes

    def route_units(self) -> list[tuple[str, int]]:
        """The blocks the route runs, in order: (module path in this module, the block's stage in
        its anchor); what composer.builders.subnet needs to see the route as stages of residual blocks."""
        out = []
        for anchor, first, last in self.route:
            adapter = self._adapters[anchor]
            for u in range(first, last + 1):
                unit = adapter.units[u]
                if len(unit.modules) != 1:
                    raise UnsupportedModel(f"unit {u} of anchor {anchor} runs {len(unit.modules)} modules "
                                           f"({', '.join(unit.modules)}); only single-block units are elastic")
                out.append((f"anchors.{anchor}.{unit.modules[0]}", unit.stage))
        return out

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self._adapters[self.route[0][0]].stem(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._adapters[self.route[-1][0]].head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, (anchor, first, last) in enumerate(self.route):
            for u in range(first, last + 1):
                x = self._adapters[anchor].unit(u, x)
            if i < len(self.layer_keys):
                x = self.stitch_layers[self.layer_keys[i]](x, self.out_shapes[i])
        return self.head(x)


def build_route(description: dict) -> StitchedRoute:
    """The route of a stitch description ({"anchors", "route", "stitch_layers"}, as `stitch_description`
    makes and an export's config.json holds), with untrained weights."""
    anchors = {e["index"]: build_anchor(e) for e in description["anchors"]}
    return StitchedRoute(anchors, description["route"], description["stitch_layers"])


def load_stitched(path) -> nn.Module:
    """The stitch exported by `export_stitch` in folder `path`, in eval mode."""
    path = Path(path).expanduser()
    config = read_config(path, FORMAT, ExportError, "an exported stitch")
    module = build_route(config)
    try:
        module.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{path}: weights do not load ({str(e).splitlines()[0]})") from None
    return module.eval()


# --- export one stitch ------------------------------------------------------------------------------

def _route_state(net: StitchedNetwork, stitch: Stitch) -> dict[str, torch.Tensor]:
    """The SN-Net's tensors that the route runs, plus any anchor buffer no part owns; BatchNorms
    behind the stitch point carry the stitch's statistics (StitchedNetwork.route_stats); low-rank
    stitching layers merged into one weight (the route's layers are plain)."""
    prefixes = tuple(net.route_prefixes(stitch))
    anchors = {seg.anchor for seg in stitch.route}
    parts = {}
    for a in anchors:
        ad = net.adapters[a]
        parts[a] = tuple(f"anchors.{a}.{n}" for n in (*ad.stem_modules, *ad.head_modules,
                                                         *(m for u in ad.units for m in u.modules)))
    out = {}
    for k, v in net.merged_state_dict().items():
        orphan = k.startswith("anchors.") and int(k.split(".")[1]) in anchors and not _owned(k, parts[int(k.split(".")[1])])
        if _owned(k, prefixes) or orphan:
            out[k] = v
    for i, n in enumerate(net.route_bn_names(stitch)):   # behind the stitch point: the stitch's own BatchNorms
        stats = net.route_stats[str(stitch.id)]
        out[f"{n}.running_mean"], out[f"{n}.running_var"] = stats.mean(i), stats.var(i)
        if f"{n}.weight" in out:
            out[f"{n}.weight"], out[f"{n}.bias"] = stats.weight(i).detach(), stats.bias(i).detach()
    return out


def _top1_of(evaluation: dict, stitch_id: int) -> float | None:
    for row in evaluation.get("stitches", []):
        if row.get("id") == stitch_id:
            return row.get("top1")
    return None


def _trained_steps(manifest: dict) -> int:
    return int((manifest.get("train") or {}).get("step") or 0)


def check_stitch_id(net: StitchedNetwork, stitch_id: int) -> None:
    n = len(net.plan.stitches)
    if not 0 <= stitch_id < n:
        raise ExportError(f"stitch {stitch_id} does not exist (this run has 0..{n - 1})")


def stitch_description(net: StitchedNetwork, stitch_id: int) -> dict:
    """What rebuilds stitch `stitch_id` as a StitchedRoute (`build_route`): its anchors (timm
    architecture entries), route and stitching layers."""
    check_stitch_id(net, stitch_id)
    plan = net.plan
    stitch = plan.stitches[stitch_id]
    layers = []
    for key, nxt in zip(stitch.layers, stitch.route[1:]):
        layers.append({"key": key, "spec": asdict(plan.layers[key]),
                       "out_shape": list(plan.infos[nxt.anchor].in_shapes[nxt.first])})
    anchors = sorted({seg.anchor for seg in stitch.route})
    return {"anchors": [anchor_entry(a, plan.anchors[a], net.anchors[a]) for a in anchors],
            "route": stitch.to_json()["route"], "stitch_layers": layers}


def route_of(net: StitchedNetwork, stitch_id: int) -> tuple[StitchedRoute, dict]:
    """Stitch `stitch_id` of an SN-Net as its own module, in memory (what `export_stitch` writes and
    `load_stitched` loads: the same weights, BatchNorms behind the stitch point on the stitch's
    statistics), in eval mode, and its description."""
    description = stitch_description(net, stitch_id)
    anchors = {e["index"]: copy.deepcopy(net.anchors[e["index"]]) for e in description["anchors"]}
    module = StitchedRoute(anchors, description["route"], description["stitch_layers"])
    module.load_state_dict(_route_state(net, net.plan.stitches[stitch_id]), strict=True)
    return module.eval(), description


def export_stitch(run_dir, stitch_id: int, out_dir) -> Path:
    """Write stitch `stitch_id` of the run as a standalone model folder; returns the folder."""
    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    run = load_run(run_dir)
    net, plan = run.net, run.plan
    description = stitch_description(net, stitch_id)
    stitch = plan.stitches[stitch_id]
    evaluation = read_evaluation(run_dir)
    top1 = _top1_of(evaluation, stitch_id)
    config = {
        "format": FORMAT, "version": 1, "stitch": stitch_id, "description": plan.describe_route(stitch),
        **description, "preprocessing": preprocessing_of(net.anchors[stitch.route[0].anchor]),   # its first anchor's size
        "cost": plan.cost(stitch).to_dict(), "num_classes": net.anchors[stitch.route[-1].anchor].num_classes,
        "top1": top1, "top1_source": {k: evaluation.get(k) for k in ("data", "images", "step")} if top1 is not None else None,
        "trained_steps": _trained_steps(run.manifest), "run": str(run_dir), "folder": out_dir.name,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(out_dir / "model.safetensors", _route_state(net, stitch))
    write_json_atomic(out_dir / "config.json", config)   # load_stitched needs both

    module = load_stitched(out_dir)
    config["program"] = save_program(module, config["preprocessing"]["input_size"], out_dir)
    write_json_atomic(out_dir / "config.json", config)
    write_text_atomic(out_dir / "README.md", _stitch_card(config, run.manifest, plan))
    return out_dir


def save_program(module: nn.Module, input_size, out_dir: Path) -> dict:
    """model.pt2 by torch.export (batch size dynamic); TorchScript (model.ts) if export fails.
    Either is checked against the module on a random batch before it is kept."""
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        want = module(x)
    errors = []
    for kind, save in (("torch.export", _save_export), ("torchscript", _save_torchscript)):
        try:
            name, run = save(module, x, out_dir)
            with torch.no_grad():
                got = run(x)
            diff = float((got - want).abs().max())
            if diff <= 1e-4 * max(1.0, float(want.abs().max())):
                return {"file": name, "kind": kind, "max_abs_diff": diff}
            errors.append(f"{kind}: outputs differ by {diff:.3g}")
            (out_dir / name).unlink(missing_ok=True)
        except Exception as e:  # tracing fails in many ways; the next format may still work
            errors.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return {"file": None, "kind": None, "errors": errors}


def _atomic_save(path: Path, save) -> None:
    # the temp name keeps the suffix: torch.export.save warns about names not ending in .pt2
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_export(module: nn.Module, x: torch.Tensor, out_dir: Path):
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
    except Exception:  # some models specialise on the batch size: a fixed-size program still helps
        program = torch.export.export(module, (x,))
    _atomic_save(out_dir / "model.pt2", lambda p: torch.export.save(program, p))
    loaded = torch.export.load(out_dir / "model.pt2").module()
    return "model.pt2", loaded


def _save_torchscript(module: nn.Module, x: torch.Tensor, out_dir: Path):
    with torch.no_grad():
        traced = torch.jit.trace(module, x)
    _atomic_save(out_dir / "model.ts", lambda p: torch.jit.save(traced, p))
    return "model.ts", torch.jit.load(str(out_dir / "model.ts"))


def _resolution_text(manifest: dict) -> str:
    """A sentence for cards when the run chose how anchors trained at different sizes run (fit --resolution)."""
    n = manifest.get("resolution")
    if n == "native":
        return ("\nEach anchor runs at its own input size (`fit --resolution native`): a route takes its first "
                "anchor's resolution and its stitching layers resample the features onto the next anchor's grid "
                "(bilinear); costs and top-1 are at the sizes actually run.")
    return (f"\nEvery anchor runs at resolution {n} x {n} with the first anchor's normalisation (`fit --resolution "
            f"{n}`), whatever size it was trained at; costs and top-1 are at that size.") if n else ""


def _sources(config_anchors: list[dict]) -> str:
    return "\n".join(f"- anchor {a['index']}: `{a['spec']}` (timm architecture `{a['architecture']}`)"
                     for a in config_anchors)


def _training_text(manifest: dict) -> str:
    fit = manifest.get("fit") or {}
    tr = manifest.get("train") or {}
    lines = []
    if fit:
        lines.append(f"- stitching layers initialised by least squares on {fit.get('calib', '?')} images of "
                     f"`{fit.get('data', '?')}`")
    if tr:
        cfg = tr.get("config") or {}
        lines.append(f"- fine-tuned for {tr.get('step', 0)} steps on `{tr.get('data', '?')}` "
                     f"(batch {cfg.get('batch_size', '?')}, {cfg.get('optimizer', '?')}, lr {cfg.get('lr', '?')}, "
                     f"sampling {cfg.get('sampling', '?')}, distillation {cfg.get('distill') or 'none'}), "
                     f"evaluated on `{tr.get('eval_data', '?')}`")
        alpha = trained_average(manifest)
        if alpha != 1.0:
            lines.append(f"- weights averaged toward the fitted ones (WiSE-FT): fitted + {alpha:g} x (fine-tuned - fitted)")
    else:
        lines.append("- not fine-tuned (least-squares stitching layers only)")
    return "\n".join(lines)


def _stitch_card(config: dict, manifest: dict, plan: StitchPlan) -> str:
    cost = config["cost"]
    top1 = f"{config['top1']:.2f} %" if config.get("top1") is not None else "not evaluated"
    src = config.get("top1_source") or {}
    where = f" on {src.get('images')} images of `{src.get('data')}`" if src else ""
    program = config.get("program") or {}
    plain = (f"m = torch.export.load(\"{config['folder']}/{program['file']}\").module()" if program.get("kind") == "torch.export" else
             f"m = torch.jit.load(\"{config['folder']}/{program['file']}\")" if program.get("kind") == "torchscript" else
             "# (no standalone program could be written for this family)")
    pre = config["preprocessing"]
    return f"""---
library_name: timm
tags: [image-classification, stitched-model, sn-net, zoo-composer]
---
# Stitched model: stitch {config['stitch']} of an SN-Net

Route: `{config['description']}`, made with Zoo Composer
(Stitchable Neural Networks, Pan et al., CVPR 2023, arXiv 2302.06586; routes there and back as in
SN-Netv2, arXiv 2307.00154): the first anchor's stem and first blocks, a stitching layer (a
per-position linear map / 1x1 conv), then the next anchor's blocks, and so on along the route, and
the last anchor's head.

## Anchors
{_sources(config['anchors'])}

All {len(plan.stitches)} stitches of the SN-Net were built from: {', '.join(f'`{a}`' for a in plan.anchors)}.

## Training
{_training_text(manifest)}

## On the curve
| MACs (M) | params (M) | activations (M) | top-1 |
|---|---|---|---|
| {cost['macs'] / 1e6:.2f} | {cost['params'] / 1e6:.3f} | {cost['activations'] / 1e6:.3f} | {top1} |

Top-1{where}. MACs: one multiply-add = 1 (FLOPs = 2 x MACs), per image of size {tuple(pre['input_size'])}.{_resolution_text(manifest)}

## Use
Preprocessing: resize/crop to {tuple(pre['input_size'][1:])} ({pre.get('interpolation')}), normalise with
mean {pre['mean']} and std {pre['std']} (the anchors' timm data config, also in config.json).

```python
import composer                      # Zoo Composer (rebuilds the route from timm architectures)
m = composer.load_stitched("{config['folder']}")

import torch                         # or plain torch, no Zoo Composer needed
{plain}
logits = m(images)                   # images: (N, {', '.join(str(d) for d in pre['input_size'])}) float tensor
```
`model.safetensors` holds only the tensors this route runs, under the SN-Net's parameter names.
"""


# --- export the whole SN-Net ------------------------------------------------------------------------

def export_snnet(run_dir, out_dir, latency: bool = False, device: torch.device | str | None = None,
                 precision: str = "fp32") -> Path:
    """Write the whole switchable SN-Net and its lookup table; returns the folder.
    latency=True also measures each stitch's batch-1 latency on `device` (default the CPU) in
    `precision` (slow for big plans); table.json and the card name the device that was timed."""
    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    run = load_run(run_dir)
    net, plan = run.net, run.plan
    evaluation = read_evaluation(run_dir)
    ms, timed = None, None
    if latency:
        from composer.device import autocast
        from composer.evaluate import stitch_latencies
        device = torch.device(device or "cpu")
        try:
            net.to(device)
            with autocast(precision, device):
                ms = stitch_latencies(net)
            timed = _device_text(device) + ("" if precision == "fp32" else f", {precision}")
        finally:
            net.cpu()   # the weights are saved from the CPU
    rows = []
    for s in plan.stitches:
        row = {"id": s.id, "route": plan.describe_route(s), **plan.cost(s).to_dict(), "top1": _top1_of(evaluation, s.id)}
        if ms is not None:
            row["latency_ms"] = ms[s.id]
        rows.append(row)
    table = {"stitches": rows, "top1_source": {k: evaluation.get(k) for k in ("data", "images", "step")} if evaluation else None,
             "latency_device": timed}
    config = {"format": SNNET_FORMAT, "version": 1,
              "anchors": [anchor_entry(i, spec, m) for i, (spec, m) in enumerate(zip(plan.anchors, net.anchors))],
              "preprocessing": preprocessing_of(net.anchors[net.input_anchor]), "trained_steps": _trained_steps(run.manifest),
              "run": str(run_dir), "folder": out_dir.name, "versions": {"torch": torch.__version__, "timm": timm.__version__}}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(out_dir / "snnet.safetensors", net.merged_state_dict())   # plain layers: load_snnet's
    plan.save(out_dir / "plan.json")
    write_json_atomic(out_dir / "config.json", config)
    write_json_atomic(out_dir / "table.json", table)
    write_text_atomic(out_dir / "README.md", _snnet_card(config, table, run.manifest, plan))
    return out_dir


def _device_text(device: torch.device) -> str:
    """The device the latencies were timed on (the network's, not merely one this machine has):
    composer.pipeline.device_name's words ("cuda:0 (NVIDIA H200)"), with the threads on the CPU."""
    from composer.pipeline import device_name
    if device.type == "cuda":
        return f"{device_name(device)}, batch 1"
    return f"cpu, {torch.get_num_threads()} threads, batch 1"


def load_snnet(path) -> StitchedNetwork:
    """The SN-Net exported by `export_snnet`, in eval mode; `.select(id)` switches stitches."""
    path = Path(path).expanduser()
    try:
        config = json.loads((path / "config.json").read_text())
        plan_data = json.loads((path / "plan.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not an exported SN-Net ({e})") from None
    if config.get("format") != SNNET_FORMAT:
        raise ExportError(f"{path}: config.json is not a {SNNET_FORMAT} export (format={config.get('format')!r})")
    models = [build_anchor(e) for e in sorted(config["anchors"], key=lambda e: e["index"])]
    infos = [describe(e["spec"], adapt(m)) for e, m in zip(config["anchors"], models)]
    net = StitchedNetwork(models, load_plan(plan_data, infos))
    try:
        net.load_state_dict(load_file(path / "snnet.safetensors"))
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{path}: weights do not load ({str(e).splitlines()[0]})") from None
    return net.eval()


def select(table_or_dir, budget: float, metric: str = "macs") -> dict:
    """The most accurate stitch whose `metric` (macs, params, activations, latency) is within
    `budget`; ties go to the cheaper one. `table_or_dir`: an export folder, its table.json, or the
    table itself (dict with "stitches" or a list of rows)."""
    if metric not in METRICS:
        raise ExportError(f"unknown metric '{metric}' (choose macs, params, activations or latency)")
    key = METRICS[metric]
    table = table_or_dir
    if isinstance(table_or_dir, (str, Path)):
        p = Path(table_or_dir).expanduser()
        p = p / "table.json" if p.is_dir() else p
        try:
            table = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{p}: no readable lookup table ({e})") from None
    rows = table["stitches"] if isinstance(table, dict) else list(table)
    if any(r.get(key) is None for r in rows):
        raise ExportError(f"the table has no {metric} for every stitch"
                          + (" (export with latency measured)" if key == "latency_ms" else ""))
    if all(r.get("top1") is None for r in rows):
        raise ExportError("the table has no accuracies: evaluate or fine-tune the run before exporting")
    fits = [r for r in rows if r[key] <= budget and r.get("top1") is not None]
    if not fits:
        cheapest = min(rows, key=lambda r: r[key])
        raise ExportError(f"no stitch within {metric} {budget:g}; the cheapest (stitch {cheapest['id']}) "
                          f"needs {cheapest[key]:g}")
    return dict(max(fits, key=lambda r: (r["top1"], -r[key])))


def _snnet_card(config: dict, table: dict, manifest: dict, plan: StitchPlan) -> str:
    rows = table["stitches"]
    has_lat = any("latency_ms" in r for r in rows)
    head = "| id | route | MACs (M) | params (M) | top-1 |" + (" latency (ms) |" if has_lat else "")
    sep = "|---|---|---|---|---|" + ("---|" if has_lat else "")
    lines = [head, sep]
    for r in rows:
        top1 = f"{r['top1']:.2f}" if r.get("top1") is not None else "-"
        lat = f" {r['latency_ms']:.2f} |" if has_lat else ""
        lines.append(f"| {r['id']} | `{r['route']}` | {r['macs'] / 1e6:.2f} | {r['params'] / 1e6:.3f} | {top1} |{lat}")
    return f"""---
library_name: timm
tags: [image-classification, stitched-model, sn-net, zoo-composer]
---
# Stitchable Neural Network: {len(rows)} stitches from {len(plan.anchors)} anchors

One network, many speed/accuracy trade-offs (SN-Net, Pan et al., CVPR 2023, arXiv 2302.06586):
pick a stitch by table lookup and switch instantly.

## Anchors
{_sources(config['anchors'])}

## Training
{_training_text(manifest)}

## Stitches
{chr(10).join(lines)}

MACs: one multiply-add = 1 (FLOPs = 2 x MACs), per image.{' Latency measured on ' + str(table.get('latency_device')) + '.' if has_lat else ''}{_resolution_text(manifest)}

## Use
```python
from composer.export import load_snnet, select
net = load_snnet("{config['folder']}")
best = select("{config['folder']}", budget=50e6, metric="macs")   # most accurate stitch under 50 M MACs
logits = net.select(best["id"])(images)
```
"""


def push_to_hub(folder, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face Hub (huggingface_hub's create_repo + upload_folder;
    the endpoint and token come from the usual HF_ENDPOINT / HF_TOKEN settings). Returns the URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=[".*"],
                                 commit_message="Upload stitched model (Zoo Composer)")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ExportError(f"could not push to the Hub repo {repo_id}: {str(e).splitlines()[0][:300]}") from None
    return str(getattr(info, "repo_url", None) or f"{api.endpoint}/{repo_id}")

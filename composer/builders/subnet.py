"""Elastic sub-networks of one pretrained model (Once-for-All style): which internal widths and
residual blocks can shrink, how to order units by importance, and how to cut a static, physically
smaller copy out of the model.

A model is seen as residual blocks grouped in stages. Each block may have internal widths
(`WidthDim`) that can shrink without touching the residual stream:
  - CIFAR / timm ResNet BasicBlock: "mid", the output channels of conv1 (= input of conv2);
  - timm ResNet Bottleneck: "mid1" (conv1 -> conv2) and "mid2" (conv2 -> conv3), both kind "mid";
  - timm ViT Block: "hidden", the MLP hidden units (fc1 -> fc2), and "heads", the attention heads
    (rows of qkv in three groups, columns of proj; Attention reads num_heads / attn_dim at run time,
    so a pruned head count is a matter of slicing the two Linears and setting those attributes).
A residual block whose input and output shapes are equal can be dropped ("skippable"); OFA's
elastic depth keeps the first D blocks of each stage, and a stage's first block always stays.

Costs: MACs / params / activations of a block are multilinear in its kept widths (every conv or
linear layer couples at most two of them), so `elastic_space` counts each block with composer.costs
on the meta device at the full widths and one unit less per width, and `subnet_cost` is then exact
arithmetic: equal to `model_cost(extract(...))` without building anything (tested). `soft_cost` is
the same polynomial for fractional (differentiable) widths and block keep-masks.

    space = elastic_space(model)
    sort_by_importance_(model, space)            # a pure permutation: outputs unchanged
    cfg = SubnetConfig(depth=[2, 3, 3], widths={"layer1.0.mid": 8})
    small = extract(model, space, cfg)           # keeps the first 8 channels, first 2/3/3 blocks
    assert subnet_cost(space, cfg) == model_cost(small)
"""
from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from composer.costs import Cost, model_cost
from composer.errors import UserError
from zoo.adapters import UnsupportedModel

Expand = Callable[[torch.Tensor], torch.Tensor]   # unit indices -> feature indices of one layer axis


class SubnetError(UserError):
    """A sub-network configuration that does not fit the model's elastic space; says why."""


@dataclass
class WidthDim:
    """One prunable internal width of a block (never the residual stream's width)."""
    key: str      # unique: the block's module path + name, e.g. "layer2.3.mid", "blocks.4.heads"
    block: int    # index into ElasticSpace.blocks
    kind: str     # "mid" (conv channels), "hidden" (ViT MLP units) or "heads" (attention heads)
    size: int     # full count

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[1]


@dataclass
class ElasticBlock:
    module: str                 # module path in the model, e.g. "layer2.3" or "blocks.4"
    stage: int
    skippable: bool             # residual block with equal input/output shapes: can be dropped
    widths: list[WidthDim]
    type: str = ""              # "cifar_basic", "basic", "bottleneck" or "vit"
    # Multilinear cost: sum over (keys, Cost c) of c * prod(size - kept for each key); see _cost_terms.
    cost_terms: list[tuple[tuple[str, ...], Cost]] = field(default_factory=list, repr=False)


@dataclass
class SubnetConfig:
    depth: list[int]                                      # per stage: keep the first D blocks
    widths: dict[str, int] = field(default_factory=dict)  # WidthDim.key -> kept count (missing: full)
    skip: list[int] = field(default_factory=list)         # also drop these skippable blocks (for DMS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SubnetConfig":
        try:
            return cls([int(x) for x in d["depth"]], {str(k): int(v) for k, v in (d.get("widths") or {}).items()},
                       [int(b) for b in d.get("skip") or []])
        except (KeyError, TypeError, ValueError) as e:
            raise SubnetError(f"not a sub-network configuration ({type(e).__name__}: {e})") from None


@dataclass
class ElasticSpace:
    blocks: list[ElasticBlock]
    input_size: tuple[int, ...]
    outside: Cost = field(default_factory=Cost)   # everything no block owns (stem, head)

    def dims(self) -> list[WidthDim]:
        return [d for b in self.blocks for d in b.widths]

    def dim(self, key: str) -> WidthDim:
        for d in self.dims():
            if d.key == key:
                return d
        raise SubnetError(f"no width '{key}' in this model (widths look like {self.dims()[0].key if self.dims() else '-'})")

    @property
    def num_stages(self) -> int:
        return max(b.stage for b in self.blocks) + 1

    def stage_blocks(self, stage: int) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.stage == stage]

    def full_config(self) -> SubnetConfig:
        return SubnetConfig([len(self.stage_blocks(s)) for s in range(self.num_stages)], {})

    def kept_blocks(self, config: SubnetConfig) -> list[bool]:
        """Which blocks a configuration runs (after checking it)."""
        check_config(self, config)
        kept = [False] * len(self.blocks)
        for s, d in enumerate(config.depth):
            for b in self.stage_blocks(s)[:d]:
                kept[b] = b not in config.skip
        return kept


def check_config(space: ElasticSpace, config: SubnetConfig) -> None:
    """Raise SubnetError naming the first thing the configuration gets wrong."""
    if len(config.depth) != space.num_stages:
        raise SubnetError(f"depth has {len(config.depth)} entries, the model has {space.num_stages} stages")
    for s, d in enumerate(config.depth):
        blocks = space.stage_blocks(s)
        if not 1 <= d <= len(blocks):
            raise SubnetError(f"stage {s} has {len(blocks)} blocks; depth {d} is not in 1..{len(blocks)}")
        for b in blocks[d:]:
            if not space.blocks[b].skippable:
                raise SubnetError(f"block {space.blocks[b].module} changes the shape and cannot be dropped")
    sizes = {d.key: d.size for d in space.dims()}
    for key, k in config.widths.items():
        if key not in sizes:
            space.dim(key)   # raises with an example of a valid key
        if not 1 <= k <= sizes[key]:
            raise SubnetError(f"width {key}: keeping {k} is not in 1..{sizes[key]}")
    for b in config.skip:
        if not 0 <= b < len(space.blocks):
            raise SubnetError(f"skip: no block {b} (0..{len(space.blocks) - 1})")
        if not space.blocks[b].skippable:
            raise SubnetError(f"skip: block {space.blocks[b].module} changes the shape and cannot be dropped")
        if b == space.stage_blocks(space.blocks[b].stage)[0]:
            raise SubnetError(f"skip: block {space.blocks[b].module} is its stage's first block, which always runs")


# --- which layers carry each width ------------------------------------------------------------------

@dataclass
class _Wiring:
    """The layers whose output (producers) and input (consumers) features are a width's units."""
    outs: list[tuple[nn.Module, Expand]]
    ins: list[tuple[nn.Module, Expand]]
    per_unit: int = 1                                      # consumer features per unit (contiguous)
    resize: Callable[[int], None] = lambda k: None         # attributes that must follow the count


def _units(idx: torch.Tensor) -> torch.Tensor:
    return idx


def _wiring(block: nn.Module, btype: str, name: str) -> _Wiring:
    if btype in ("cifar_basic", "basic") or (btype == "bottleneck" and name == "mid1"):
        return _Wiring([(block.conv1, _units), (block.bn1, _units)], [(block.conv2, _units)])
    if btype == "bottleneck" and name == "mid2":
        return _Wiring([(block.conv2, _units), (block.bn2, _units)], [(block.conv3, _units)])
    if btype == "vit" and name == "hidden":
        return _Wiring([(block.mlp.fc1, _units)], [(block.mlp.fc2, _units)])
    if btype == "vit" and name == "heads":
        attn = block.attn
        hd = attn.head_dim

        def head_features(idx: torch.Tensor) -> torch.Tensor:   # head h -> features h*hd .. h*hd+hd-1
            return (idx[:, None] * hd + torch.arange(hd, device=idx.device)).flatten()

        def qkv_rows(idx: torch.Tensor) -> torch.Tensor:        # qkv rows are [q heads | k heads | v heads]
            f = head_features(idx)
            return torch.cat([f + j * attn.attn_dim for j in range(3)])

        def resize(k: int) -> None:
            attn.num_heads, attn.attn_dim = k, k * hd

        return _Wiring([(attn.qkv, qkv_rows)], [(attn.proj, head_features)], per_unit=hd, resize=resize)
    raise SubnetError(f"no width '{name}' in a {btype} block")


def _residual_ends(block: nn.Module, btype: str) -> list[nn.Module]:
    """The last module of each residual branch: scaling its output by m gives x + m * f(x)."""
    if btype == "vit":
        return [block.drop_path1, block.drop_path2]
    last = block.bn2 if btype in ("cifar_basic", "basic") else block.bn3
    for name in ("se", "drop_path"):   # timm runs these after the last BN, before the addition
        if getattr(block, name, None) is not None:
            last = getattr(block, name)
    return [last]


# --- recognising a model ------------------------------------------------------------------------------

def _family(model: nn.Module) -> str | None:
    names = {c.__name__ for c in type(model).__mro__}
    return next((f for f in ("CifarResNet", "ResNet", "VisionTransformer") if f in names), None)


def _block_paths(model: nn.Module) -> list[tuple[str, int]]:
    """(module path, stage) of every residual block, in order. A model that lists its own blocks
    (`route_units()`: a stitch's route, composer.export.StitchedRoute) gives them; a timm model of a
    supported family is walked."""
    if callable(getattr(model, "route_units", None)):
        return model.route_units()
    family = _family(model)
    if family is None:
        raise UnsupportedModel(f"elastic sub-networks are not supported for {type(model).__name__} "
                               "(supported: CIFAR ResNets, timm ResNet with Basic/Bottleneck blocks, timm ViT, "
                               "and stitches of these)")
    if family == "VisionTransformer":
        return [(f"blocks.{i}", 0) for i in range(len(model.blocks))]
    n_stages = 3 if family == "CifarResNet" else 4
    return [(f"layer{s + 1}.{i}", s) for s in range(n_stages) for i in range(len(model.get_submodule(f"layer{s + 1}")))]


def _describe_blocks(model: nn.Module) -> list[ElasticBlock]:
    """The model's residual blocks as ElasticBlocks. A stage is a run of blocks of one stage of
    their model; on a stitch's route a new stage also starts at a block that changes the shape
    (the first block of a stage always runs), so front and back blocks of the stage where the
    stitch sits form one stage: keeping its first D blocks may drop back blocks, the stitching
    layer (on the residual stream, never cut) still runs."""
    blocks, stage, prev = [], -1, None
    for path, anchor_stage in _block_paths(model):
        blk = _describe_block(model.get_submodule(path), path, len(blocks))
        if anchor_stage != prev or not blk.skippable:
            stage += 1
        prev, blk.stage = anchor_stage, stage
        blocks.append(blk)
    return blocks


def _describe_block(blk: nn.Module, path: str, b: int) -> ElasticBlock:
    """One residual block (its stage is set by the caller)."""
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import Block

    from zoo.cifar_resnet import BasicBlock as CifarBasic
    if isinstance(blk, Block) or (hasattr(blk, "attn") and hasattr(blk, "mlp")):   # ViT-like: checked there
        _check_vit_block(blk, path)
        dims = [WidthDim(f"{path}.hidden", b, "hidden", blk.mlp.fc1.out_features),
                WidthDim(f"{path}.heads", b, "heads", blk.attn.num_heads)]
        return ElasticBlock(path, 0, True, dims, "vit")
    if isinstance(blk, CifarBasic):
        return ElasticBlock(path, 0, isinstance(blk.shortcut, nn.Identity),
                            [WidthDim(f"{path}.mid", b, "mid", blk.conv1.out_channels)], "cifar_basic")
    if not isinstance(blk, (BasicBlock, Bottleneck)):
        raise UnsupportedModel(f"{path} is a {type(blk).__name__}; only Basic/Bottleneck blocks and ViT blocks are elastic")
    if not isinstance(blk.aa, nn.Identity):
        raise UnsupportedModel(f"{path}: anti-aliased blocks (aa_layer) are not supported")
    skippable = blk.downsample is None
    if isinstance(blk, BasicBlock):
        return ElasticBlock(path, 0, skippable, [WidthDim(f"{path}.mid", b, "mid", blk.conv1.out_channels)], "basic")
    if blk.conv2.groups != 1:   # grouped convs tie channel counts to the group count
        raise UnsupportedModel(f"{path}: grouped convolutions (ResNeXt) are not supported")
    return ElasticBlock(path, 0, skippable, [WidthDim(f"{path}.mid1", b, "mid", blk.conv1.out_channels),
                                             WidthDim(f"{path}.mid2", b, "mid", blk.conv2.out_channels)], "bottleneck")


def _check_vit_block(blk: nn.Module, path: str) -> None:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block
    # Norms over the hidden units or the attention output would see fewer features after pruning
    # and normalise differently: a pruned unit would no longer be the same as a zeroed one.
    if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
        raise UnsupportedModel(f"{path}: only timm's plain ViT Block (Attention + Mlp) is elastic, "
                               f"not {type(blk).__name__}/{type(blk.attn).__name__}/{type(blk.mlp).__name__}")
    if not isinstance(blk.mlp.fc1, nn.Linear):
        raise UnsupportedModel(f"{path}: convolutional MLPs are not supported")
    if not isinstance(blk.mlp.norm, nn.Identity) or not isinstance(blk.attn.norm, nn.Identity) \
            or blk.attn.gate is not None:
        raise UnsupportedModel(f"{path}: MLP/attention output norms or gates are not supported")


def elastic_space(model: nn.Module, input_size: tuple[int, ...] | None = None) -> ElasticSpace:
    """The model's blocks, stages and prunable widths, with each block's cost polynomial.
    Raises UnsupportedModel for a model (or block) this module cannot shrink exactly."""
    blocks = _describe_blocks(model)
    input_size = tuple(input_size or model.pretrained_cfg["input_size"])
    meta = _meta_copy(model)
    in_shapes: dict[str, tuple[int, ...]] = {}
    handles = [meta.get_submodule(b.module).register_forward_pre_hook(
        lambda m, args, path=b.module: in_shapes.__setitem__(path, tuple(args[0].shape[1:]))) for b in blocks]
    try:
        total = model_cost(meta, input_size)
    finally:
        for h in handles:
            h.remove()
    outside, seen = total, {}
    for b in blocks:
        module = meta.get_submodule(b.module)
        # Counting is slow (FlopCounterMode dispatches every op in Python) and most blocks of a
        # stage are alike: same layers, shapes and input shape give the same polynomial.
        same = (b.type, in_shapes[b.module], str(module),
                tuple((n, tuple(t.shape)) for n, t in itertools.chain(module.named_parameters(), module.named_buffers())))
        if same not in seen:
            seen[same] = [(tuple(k.split(".")[-1] for k in keys), c)
                          for keys, c in _cost_terms(module, b, in_shapes[b.module])]
        b.cost_terms = [(tuple(f"{b.module}.{name}" for name in names), c) for names, c in seen[same]]
        full = next(c for keys, c in b.cost_terms if not keys)
        outside = Cost(outside.macs - full.macs, outside.params - full.params, outside.activations - full.activations)
    return ElasticSpace(blocks, input_size, outside)


def _cost_terms(block: nn.Module, eb: ElasticBlock, in_shape: tuple[int, ...]) -> list[tuple[tuple[str, ...], Cost]]:
    """Coefficients c_S of cost(kept) = sum_S c_S prod_{i in S} (size_i - kept_i), from counts at
    the full widths and one unit less (Moebius inversion over the subsets of widths)."""
    variable = [d for d in eb.widths if d.size > 1]   # a width of 1 can never shrink
    counted = {}
    for r in range(len(variable) + 1):
        for subset in itertools.combinations(variable, r):
            b = _meta_copy(block)
            for d in subset:
                _keep_(_wiring(b, eb.type, d.name), torch.arange(d.size - 1), shrink=True)
            counted[tuple(d.key for d in subset)] = model_cost(b, in_shape)
    terms = []
    for keys in counted:
        c = [0, 0, 0]
        for r in range(len(keys) + 1):
            for sub in itertools.combinations(keys, r):
                sign = (-1) ** (len(keys) - r)
                v = counted[sub]
                c = [c[0] + sign * v.macs, c[1] + sign * v.params, c[2] + sign * v.activations]
        terms.append((keys, Cost(*c)))
    return terms


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose tensors live on the meta device (shapes only, no memory, no copying)."""
    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


# --- costs without building ---------------------------------------------------------------------------

def soft_cost(space: ElasticSpace, widths: Mapping[str, float | torch.Tensor] | None = None,
              keep: Mapping[int, float | torch.Tensor] | None = None) -> dict[str, float | torch.Tensor]:
    """MACs / params / activations for (possibly fractional, differentiable) kept widths and block
    keep-factors (1 runs the block, 0 drops it; only for skippable blocks). With whole numbers this
    is exactly the counted cost of the extracted network."""
    widths, keep = widths or {}, keep or {}
    out = {"macs": space.outside.macs, "params": space.outside.params, "activations": space.outside.activations}
    for b, blk in enumerate(space.blocks):
        removed = {d.key: d.size - widths.get(d.key, d.size) for d in blk.widths}
        k = keep.get(b, 1)
        for keys, c in blk.cost_terms:
            f = k
            for key in keys:
                f = f * removed[key]
            out["macs"] = out["macs"] + f * c.macs
            out["params"] = out["params"] + f * c.params
            out["activations"] = out["activations"] + f * c.activations
    return out


def subnet_cost(model_or_space: nn.Module | ElasticSpace, config: SubnetConfig) -> Cost:
    """Exact cost of `extract(model, space, config)` per image, without building it."""
    space = model_or_space if isinstance(model_or_space, ElasticSpace) else elastic_space(model_or_space)
    kept = space.kept_blocks(config)
    c = soft_cost(space, config.widths, {b: 0 for b, k in enumerate(kept) if not k})
    return Cost(int(c["macs"]), int(c["params"]), int(c["activations"]))


# --- importance and permutation -----------------------------------------------------------------------

def _take_(module: nn.Module, name: str, idx: torch.Tensor, axis: int) -> None:
    """Keep entries `idx` (in that order) of a parameter / buffer along `axis`: in place when the
    shape is unchanged (a permutation: optimisers keep their parameter), a new tensor otherwise."""
    t = getattr(module, name, None)
    if t is None:
        return
    new = t.detach().index_select(axis, idx.to(t.device))
    if new.shape == t.shape:
        with torch.no_grad():
            t.copy_(new)
    elif isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


def _select_out_(m: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(m, nn.Conv2d):
        m.out_channels = len(idx)
    elif isinstance(m, nn.Linear):
        m.out_features = len(idx)
    elif isinstance(m, nn.BatchNorm2d):
        m.num_features = len(idx)
        for name in ("running_mean", "running_var"):
            _take_(m, name, idx, 0)
    else:
        raise UnsupportedModel(f"cannot slice the outputs of {type(m).__name__}")
    _take_(m, "weight", idx, 0)
    _take_(m, "bias", idx, 0)


def _select_in_(m: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(m, nn.Conv2d):
        m.in_channels = len(idx)
    elif isinstance(m, nn.Linear):
        m.in_features = len(idx)
    else:
        raise UnsupportedModel(f"cannot slice the inputs of {type(m).__name__}")
    _take_(m, "weight", idx, 1)


def _keep_(w: _Wiring, units: torch.Tensor, shrink: bool = False) -> None:
    """Keep `units` (in that order) of one width in every layer that carries it."""
    for m, expand in w.outs:
        _select_out_(m, expand(units))
    for m, expand in w.ins:
        _select_in_(m, expand(units))
    if shrink:
        w.resize(len(units))


def _wirings(model: nn.Module, space: ElasticSpace) -> dict[str, _Wiring]:
    return {d.key: _wiring(model.get_submodule(space.blocks[d.block].module), space.blocks[d.block].type, d.name)
            for d in space.dims()}


@torch.no_grad()
def importance(model: nn.Module, space: ElasticSpace) -> dict[str, torch.Tensor]:
    """Per width: a score per unit, the L1 norm of the next layer's input weights for that unit
    (what OFA's code sorts channels by). Higher is more important."""
    scores = {}
    for key, w in _wirings(model, space).items():
        m, _ = w.ins[0]
        per_feature = m.weight.abs().sum(dim=[d for d in range(m.weight.dim()) if d != 1])
        scores[key] = per_feature.view(-1, w.per_unit).sum(1).float().cpu()
    return scores


@torch.no_grad()
def permute_(model: nn.Module, space: ElasticSpace, order: Mapping[str, torch.Tensor]) -> None:
    """Reorder the units of each width in `order` (unit order[j] moves to position j), in place.
    Only units internal to a block move, so the model computes exactly the same function."""
    wirings = _wirings(model, space)
    for key, perm in order.items():
        size = space.dim(key).size
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (size,) or not torch.equal(perm.sort().values, torch.arange(size)):
            raise SubnetError(f"order for {key} is not a permutation of 0..{size - 1}")
        _keep_(wirings[key], perm)


def sort_by_importance_(model: nn.Module, space: ElasticSpace,
                        scores: Mapping[str, torch.Tensor] | None = None) -> None:
    """Permute every width so that its most important units come first (ties keep their order);
    after this, "keep the first k" means "keep the k most important"."""
    scores = importance(model, space) if scores is None else scores
    permute_(model, space, {k: torch.argsort(torch.as_tensor(s), descending=True, stable=True)
                            for k, s in scores.items()})


# --- static sub-networks ------------------------------------------------------------------------------

def extract(model: nn.Module, space: ElasticSpace, config: SubnetConfig) -> nn.Module:
    """A physically smaller deep copy: the first k units of each width, the first D blocks of each
    stage (a dropped block becomes what it computes with a zero residual branch, `_dropped`: no
    parameters, so parameter names stay those of the model)."""
    kept = space.kept_blocks(config)
    sub = copy.deepcopy(model)
    for d in space.dims():
        k = config.widths.get(d.key, d.size)
        if kept[d.block] and k < d.size:
            blk = space.blocks[d.block]
            _keep_(_wiring(sub.get_submodule(blk.module), blk.type, d.name), torch.arange(k), shrink=True)
    for b, blk in enumerate(space.blocks):
        if not kept[b]:
            parent, _, name = blk.module.rpartition(".")
            setattr(sub.get_submodule(parent), name, _dropped(sub.get_submodule(blk.module), blk.type))
    return sub


def _dropped(block: nn.Module, btype: str) -> nn.Module:
    """A dropped block: x + 0 * f(x) followed by what the block runs after the sum. A ViT block adds
    last (nn.Identity); a ResNet block applies its activation after the sum (CIFAR: ReLU; timm:
    act2 / act3), a no-op on the non-negative output of the block before it in an anchor, but not
    behind a stitching layer, whose output has any sign. So extraction equals `masked` always."""
    if btype == "vit":
        return nn.Identity()
    if btype == "cifar_basic":
        return nn.ReLU()
    act = copy.deepcopy(block.act2 if btype == "basic" else block.act3)
    if hasattr(act, "inplace"):
        act.inplace = False   # its input may be read again (hooks, shared prefixes)
    return act


def config_masks(space: ElasticSpace, config: SubnetConfig) -> tuple[Callable, Callable]:
    """The (width, depth) mask functions `masked` takes to run `config` inside the full model: the
    first k units of every cut width, and 0 on the residual branch of every block not kept."""
    kept = space.kept_blocks(config)
    widths = {d.key: (torch.arange(d.size) < config.widths[d.key]).float()
              for d in space.dims() if config.widths.get(d.key, d.size) < d.size}
    zero = torch.zeros(())
    return widths.get, (lambda b: None if kept[b] else zero)


@contextmanager
def masked(model: nn.Module, space: ElasticSpace,
           width_masks: Callable[[str], torch.Tensor | None],
           depth_masks: Callable[[int], torch.Tensor | None] = lambda b: None) -> Iterator[nn.Module]:
    """While active, every forward multiplies each width's units by `width_masks(key)` (shape
    [size], or None: untouched) and each skippable block's residual branch by `depth_masks(block)`
    (a scalar: x + m * f(x)). The callables are called on every forward, so masks computed from
    learnable parameters get a fresh graph each step. All-ones masks change nothing; 0/1 masks give
    the outputs of `extract` with the units / blocks whose mask is 0 removed."""
    handles = []

    def width_hook(key: str, per_unit: int, axis: int):
        def hook(module, args):
            m = width_masks(key)
            if m is None:
                return None
            m = m.to(args[0].device, args[0].dtype).repeat_interleave(per_unit)   # masks may live on the CPU
            shape = [1] * args[0].dim()
            shape[axis] = -1
            return (args[0] * m.view(shape), *args[1:])
        return hook

    def depth_hook(b: int):
        def hook(module, args, out):
            m = depth_masks(b)
            return out if m is None else out * m.to(out.device, out.dtype)
        return hook

    try:
        for key, w in _wirings(model, space).items():
            consumer = w.ins[0][0]
            axis = 1 if isinstance(consumer, nn.Conv2d) else -1
            handles.append(consumer.register_forward_pre_hook(width_hook(key, w.per_unit, axis)))
        for b, blk in enumerate(space.blocks):
            if blk.skippable:
                for end in _residual_ends(model.get_submodule(blk.module), blk.type):
                    handles.append(end.register_forward_hook(depth_hook(b)))
        yield model
    finally:
        for h in handles:
            h.remove()

"""Filter (structured) pruning: choose whole output channels of convs, then remove them.

Choosing is done here: per-layer counts come from a uniform `ratio` or a PFEC `preset`, and
each pruner ranks the filters of a layer by its own importance and removes the lowest:

- l1_filter (Li et al. 2017): L1 norm of the filter's weights.
- random_filter: the same per-layer counts, indices drawn with a torch.Generator seeded by
  `seed`.
- hrank (Lin et al. 2020): average matrix rank of the filter's output feature maps over the
  given batches. The map is taken after the conv's BatchNorm (the one following it in module
  order, where present) and the activation that follows it (ReLU6 in MobileNetV2, ReLU in
  every other model here), i.e. the map the next layer sees, as in HRank's own hooks.
- taylor_conv_oneshot: a one-shot first-order Taylor score on conv weights: per filter,
  (sum over its weights of w * dL/dw) squared, summed over the given batches, L = mean
  cross-entropy of the batch. This is not Molchanov et al. 2019's procedure (a gate after
  BatchNorm, global ranking across layers, iterative pruning with fine-tuning); the name says
  what it is.

Which function scores which pruner is the pruner registry's business
(nptm.trainables.catalog.PRUNERS, field `importance`).

Data-driven importance runs the model in eval mode (running BatchNorm statistics, no buffer
updates) and takes gradients with torch.autograd.grad, so the model's weights, buffers,
`.grad`, training mode and requires_grad flags are exactly as before.

Removing is done by torch-pruning's DependencyGraph: pruning a conv's output channels also
removes the coupled BatchNorm entries and the next layers' input channels (and, in MobileNetV2,
the depthwise conv sharing them), for any traceable architecture. Channels joined to another
conv's output by a residual add are refused: plans only name block-internal convs
(nptm.trainables.models.prunable_convs).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from nptm.trainables.catalog import PRUNERS
from nptm.trainables.models import prunable_convs
from nptm.trainables.pruners.plan import PrunePlan
from nptm.trainables.pruners.presets import preset_removals
from nptm.trainables.registry import resolve

Batch = tuple[torch.Tensor, torch.Tensor]
Importance = dict[str, torch.Tensor]  # conv name -> one score per filter, higher = keep


def filter_counts(
    model: nn.Module, model_name: str, *, ratio: float | None, preset: str | None
) -> dict[str, int]:
    """Conv name -> number of filters to remove (only layers that lose at least one)."""
    if (ratio is None) == (preset is None):
        raise ValueError("give exactly one of 'ratio' or 'preset'")
    if preset is not None:
        return preset_removals(model, model_name, preset)
    assert ratio is not None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio!r} is outside [0, 1)")
    modules = dict(model.named_modules())
    counts = {}
    for name in prunable_convs(model, model_name):
        out = modules[name].out_channels
        n = min(math.floor(out * ratio), out - 1)  # never remove every filter
        if n > 0:
            counts[name] = n
    return counts


def l1_importance(
    model: nn.Module, names: Sequence[str], _batches: object = None, _seed: int = 0
) -> Importance:
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().abs().sum(dim=(1, 2, 3)).double().cpu() for n in names}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _activation_after(model: nn.Module, name: str) -> tuple[nn.Module, Callable]:
    """The module whose output is the conv's normalised map (its BatchNorm, else the conv
    itself) and the activation applied to it."""
    mods = list(model.named_modules())
    i = next(k for k, (n, _) in enumerate(mods) if n == name)
    conv = mods[i][1]
    after = [m for _, m in mods[i + 1 : i + 3]]
    if (
        after
        and isinstance(after[0], nn.BatchNorm2d)
        and after[0].num_features == conv.out_channels
    ):
        source = after[0]
        nxt = after[1] if len(after) > 1 else None
    else:
        source, nxt = conv, after[0] if after else None
    act = (lambda t: t.clamp(0, 6)) if isinstance(nxt, nn.ReLU6) else F.relu
    return source, act


def _require_batches(pruner: str, batches: Iterable[Batch] | None) -> Iterable[Batch]:
    if batches is None:
        raise ValueError(f"pruner {pruner!r} ranks filters on data: pass 'batches' (got None)")
    return batches


def random_importance(
    model: nn.Module, names: Sequence[str], _batches: object = None, seed: int = 0
) -> Importance:
    """A random permutation per conv (one torch.Generator seeded by `seed`, convs in order):
    filter perm[k] scores k, so the n lowest are the permutation's first n."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for n in names:
        perm = torch.randperm(modules[n].out_channels, generator=gen)
        score = torch.empty(len(perm), dtype=torch.float64)
        score[perm] = torch.arange(len(perm), dtype=torch.float64)
        scores[n] = score
    return scores


def hrank_importance(
    model: nn.Module, names: Sequence[str], batches: Iterable[Batch] | None, _seed: int = 0
) -> Importance:
    """Average rank of each filter's (post BN + activation) feature map over all images."""
    batches = _require_batches("hrank", batches)
    modules = dict(model.named_modules())
    totals = {n: torch.zeros(modules[n].out_channels, dtype=torch.float64) for n in names}
    images = 0
    handles = []
    for n in names:
        source, act = _activation_after(model, n)

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, n: str = n, act: Callable = act):
            # one rank per (image, channel) map; summed over the batch's images
            totals[n] += torch.linalg.matrix_rank(act(out).float()).double().sum(dim=0).cpu()

        handles.append(source.register_forward_hook(hook))
    device = _device(model)
    try:
        with _eval_mode(model), torch.no_grad():
            for x, _ in batches:
                model(x.to(device))
                images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if images == 0:
        raise ValueError("pruner 'hrank' got an empty 'batches'")
    return {n: t / images for n, t in totals.items()}


def taylor_importance(
    model: nn.Module, names: Sequence[str], batches: Iterable[Batch] | None, _seed: int = 0
) -> Importance:
    """First-order Taylor score (sum_w w * dL/dw)^2 per filter, summed over batches."""
    batches = _require_batches("taylor_conv_oneshot", batches)
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    scores = {n: torch.zeros(modules[n].out_channels, dtype=torch.float64) for n in names}
    device, seen = _device(model), 0
    try:
        for w in weights:
            w.requires_grad_(True)
        with _eval_mode(model), torch.enable_grad():
            for x, y in batches:
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                grads = torch.autograd.grad(loss, weights)
                for n, w, g in zip(names, weights, grads, strict=True):
                    s = (w.detach() * g).sum(dim=tuple(range(1, w.dim())))
                    scores[n] += s.double().cpu() ** 2
                seen += 1
    finally:
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
    if seen == 0:
        raise ValueError("pruner 'taylor_conv_oneshot' got an empty 'batches'")
    return scores


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the `n` lowest scores (ties: lower index first), ascending."""
    return sorted(torch.argsort(scores, stable=True)[:n].tolist())


def structured_plan(
    model: nn.Module,
    model_name: str,
    pruner: str,
    *,
    ratio: float | None = None,
    preset: str | None = None,
    batches: Iterable[Batch] | None = None,
    seed: int = 0,
) -> PrunePlan:
    """Which filters of which convs to remove. The model is left unchanged."""
    structured = [name for name, info in PRUNERS.items() if info.structured]  # plugins' too
    if pruner not in structured:
        raise ValueError(f"unknown structured pruner {pruner!r}; known: {structured}")
    if PRUNERS[pruner].needs_data:
        _require_batches(pruner, batches)
    counts = filter_counts(model, model_name, ratio=ratio, preset=preset)
    names = list(counts)
    if not names:
        return PrunePlan(pruner)
    scores = resolve(PRUNERS[pruner].importance)(model, names, batches, seed)
    return PrunePlan(pruner, removed_channels={n: lowest(scores[n], counts[n]) for n in names})


def _check_block_internal(
    graph: tp.DependencyGraph, names: dict[nn.Module, str], name: str, idxs: list[int]
) -> None:
    """Refuse channels shared with another conv's output (a residual add): removing those
    would change the residual stream, which plans here never do and option-A shortcuts
    cannot follow. A depthwise conv sharing the channels (MobileNetV2) is pruned along."""
    conv = graph.model.get_submodule(name)
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs)
    others = [
        names[dep.target.module]
        for dep, _ in group
        if isinstance(dep.target.module, nn.Conv2d)
        and dep.target.module is not conv
        and graph.is_out_channel_pruning_fn(dep.handler)
        and dep.target.module.groups != dep.target.module.out_channels
    ]
    if others:
        raise ValueError(
            f"removed_channels[{name!r}] would also remove output channels of {others} "
            "(channels joined by a residual connection); only block-internal convs "
            "(nptm.trainables.models.prunable_convs) can be pruned"
        )


def apply_structured(
    model: nn.Module,
    removed_channels: dict[str, list[int]],
    *,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Remove the given filters (and everything coupled to them) from `model`, in place.

    `input_shape` (C, H, W) of the tracing input defaults to `model.input_shape`, which
    nptm.trainables.models.build_model sets. Returns `model`.
    """
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("model has no 'input_shape' attribute; pass input_shape=(C, H, W)")
    modules = dict(model.named_modules())
    for name, idxs in removed_channels.items():
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"removed_channels names {name!r}, which is not a Conv2d of the model")
        bad = [i for i in idxs if not 0 <= i < conv.out_channels]
        if bad or len(set(idxs)) != len(idxs) or len(idxs) >= conv.out_channels:
            raise ValueError(
                f"removed_channels[{name!r}] must be distinct indices in [0, "
                f"{conv.out_channels}) leaving at least one filter; got {sorted(idxs)}"
            )
    todo = {n: sorted(int(i) for i in idxs) for n, idxs in removed_channels.items() if idxs}
    if not todo:
        return model
    first = next(model.parameters())
    example = torch.zeros(1, *shape, device=first.device, dtype=first.dtype)
    was_training = model.training
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, verbose=False
            )
        names = {m: n for n, m in modules.items()}
        for name, idxs in todo.items():  # check every group before changing anything
            _check_block_internal(graph, names, name, idxs)
        for name, idxs in todo.items():
            graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs).prune()
    finally:
        model.train(was_training)  # tracing switches the model to eval mode
    return model

"""Plain-text views for the terminal of a plan (`nptm plan`), of an inspected model
(`nptm inspect`) and of the retraining schedules (`nptm schedules`), drawn by the table
renderer every command shares."""

from __future__ import annotations

from typing import Any

from nptm.orchestrator.gpu_hours import describe
from nptm.orchestrator.planner import Plan
from nptm.results.tables import text_table
from nptm.trainables.schedule_curves import per_epoch
from nptm.trainables.stage import StageKind


def render_plan(plan: Plan) -> str:
    s = plan.summary()
    planned, naive = s["epochs"]["planned_by_kind"], s["epochs"]["naive_by_kind"]
    counts = s["stages"]
    rows = [[k.value, f"{counts[k]:,}", f"{planned[k]:,}", f"{naive[k]:,}"] for k in StageKind]
    total_p, total_n = s["epochs"]["planned"], s["epochs"]["naive"]
    rows.append(["total", f"{sum(counts.values()):,}", f"{total_p:,}", f"{total_n:,}"])
    rounds = f", {s['rounds']} pruning rounds" if s["rounds"] > 1 else ""
    lines = [
        f"sweep {s['sweep']!r}: {s['trials']:,} trials, {sum(counts.values()):,} unique "
        f"stages ({s['executor']} executor{rounds})",
        text_table(
            ["stage kind", "stages", "planned epochs", "naive epochs"],
            rows,
            right=(1, 2, 3),
            total=True,
        ),
    ]
    if total_n:
        lines.append(
            f"sharing stages saves {total_n - total_p:,} of {total_n:,} training "
            f"epochs ({(total_n - total_p) / total_n:.0%})"
        )
    lines.append(describe(s["gpu_hours"]))
    return "\n".join(lines)


def render_inspect(result: dict[str, Any]) -> str:
    """A plain-text report of a `nptm.trainables.inspect.inspect_model` result."""
    title = f"{result['model']} on {result['dataset']}"
    if result["pruner"]:
        target = f"preset {result['preset']}" if result["preset"] else f"ratio {result['ratio']}"
        title += f", pruner {result['pruner']} ({target}, seed {result['seed']})"
    base, pruned = result["base"], result["pruned"]
    sizes = [["base", f"{base['params']:,}", f"{base['macs']:,}"]]
    if pruned:
        sizes.append(["pruned", f"{pruned['params']:,}", f"{pruned['macs']:,}"])
        sizes.append(
            ["reduction", f"{pruned['params_reduction']:.1%}", f"{pruned['macs_reduction']:.1%}"]
        )
    lines = [title, "", text_table(["", "params", "MACs"], sizes, right=(1, 2))]
    if pruned:
        lines.append(
            f"nonzero params {pruned['nonzero_params']:,} (sparsity {pruned['sparsity']:.1%})"
        )
        if result["importance_data"] == "synthetic":
            lines.append("filter importance ranked on synthetic random-normal batches")
    if result.get("shortcuts"):
        lines.append("")
    for sc in result.get("shortcuts", []):
        k = sc["stride"]
        how = f"AvgPool2d({k}, {k})" if sc["kind"] == "avgpool" else f"x[:, :, ::{k}, ::{k}]"
        lines.append(f"shortcut {sc['name']}: {how} + {sc['zero_channels']} zero channels")
    headers = ["layer", "type", "out"] + (["pruned", "density"] if pruned else [])
    rows = []
    for layer in result["layers"]:
        row = [layer["name"], layer["type"], layer["out_channels_base"]]
        if pruned:
            changed = layer["out_channels_pruned"] != layer["out_channels_base"]
            density = f"{layer['weight_density']:.1%}" + (" *" if changed else "")
            row += [layer["out_channels_pruned"], density]
        rows.append(row)
    lines += ["", text_table(headers, rows, right=(2, 3))]
    return "\n".join(lines)


def render_curves(result: dict[str, Any]) -> str:
    """One row per epoch: lr / momentum of each schedule at the epoch's first step."""
    view = per_epoch(result)
    names = list(view["schedules"])
    r = view["recipe"]
    rows = [
        [epoch]
        + [
            f"{view['schedules'][n]['lr'][i]:.6g} / {view['schedules'][n]['momentum'][i]:.3g}"
            for n in names
        ]
        for i, epoch in enumerate(view["epochs"])
    ]
    lines = [
        f"{view['dataset']}: retraining budget {view['budget']} epochs x "
        f"{view['steps_per_epoch']} steps (global batch {r['batch_size']}); recipe lr {r['lr']:g}, "
        f"{r['epochs']} epochs, x{r['gamma']:g} at {r['milestones']}",
        "lr / momentum at the first step of each epoch",
        "",
        text_table(["epoch", *names], rows, right=range(len(names) + 1)),
    ]
    lines += [f"{name}: not shown ({why})" for name, why in view["skipped"].items()]
    return "\n".join(lines)

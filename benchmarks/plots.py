"""The PNG charts of ``run.py``'s results (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402

COLORS = {"hand": "#7f7f7f", "trainer": "#1f77b4", "extra": "#ff7f0e", "isolated": "#2ca02c",
          "measured": "#d62728"}


def _footer(fig: Figure, results: dict[str, Any], section: str) -> None:
    machine = results["machine"]
    measured = results["conditions"].get(section, {}).get("timestamp_utc", machine["timestamp_utc"])
    fig.text(0.01, 0.005, f"{machine['cpu_cores']}-core {machine['cpu_model']}, torch "
                          f"{machine['torch']}, {measured}, mode {results['mode']}",
             fontsize=8, color="gray")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def overhead(results: dict[str, Any], path: Path) -> Path:
    """Per workload: what each of ddp_train's extras adds to a step (µs), with 95% intervals."""
    sections = results["overhead"]
    fig, axes = plt.subplots(1, len(sections), figsize=(7.5 * len(sections), 6.5), dpi=110,
                             squeeze=False)
    for ax, (name, data) in zip(axes[0], sections.items()):
        rows = list(data["breakdown"].items())[::-1]
        labels = [f"{key}\n({value['with']} − {value['without']})" for key, value in rows]
        added = [value["added_us"] for _, value in rows]
        low = [value["added_us"] - value["ci95_us"][0] for _, value in rows]
        high = [value["ci95_us"][1] - value["added_us"] for _, value in rows]
        y = range(len(rows))
        ax.barh(y, added, xerr=[[max(v, 0) for v in low], [max(v, 0) for v in high]], capsize=4,
                color=[COLORS["trainer"] if key in ("all_extras", "rest_of_trainer") else COLORS["extra"]
                       for key, _ in rows], edgecolor="black", linewidth=0.5,
                label="added to the median step (bar: 95% interval)")
        isolated = [(i, value["isolated_us"]) for i, (_, value) in enumerate(rows)
                    if value["isolated_us"] is not None]
        ax.scatter([v for _, v in isolated], [i for i, _ in isolated], marker="D", s=40, zorder=3,
                   color=COLORS["isolated"], label="timed alone in a tight loop")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.set_xlabel("µs per optimizer step", fontsize=10)
        hand = data["step_s"]["hand"]["median"] * 1e6
        goal = data["goal"]
        ax.set_title(f"{name}: hand-written step {hand:,.0f} µs (median)\n"
                     f"overhead ratio {data['overhead_ratio']:.3f} "
                     f"[{data['overhead_ratio_ci95'][0]:.3f}, {data['overhead_ratio_ci95'][1]:.3f}]"
                     + (f", goal ≤ {goal}" if goal else ""), fontsize=11)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    _footer(fig, results, "overhead")
    return _save(fig, path)


def accumulation(results: dict[str, Any], path: Path) -> Path:
    """Optimizer-step time with accumulation: ddp_train, hand-written no_sync, and without it."""
    sections = results["accumulation"]
    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4.8), dpi=110,
                             squeeze=False)
    names = ["trainer", "hand_no_sync", "hand_sync_every_micro"]
    labels = ["ddp_train\n(no_sync)", "hand-written\nno_sync",
              "hand-written\nall-reduce every\nmicro-batch"]
    for ax, (name, data) in zip(axes[0], sections.items()):
        stats = data["optimizer_step_s"]
        medians = [stats[n]["median"] * 1e3 for n in names]
        err = [[medians[i] - stats[n]["p25"] * 1e3 for i, n in enumerate(names)],
               [stats[n]["p75"] * 1e3 - medians[i] for i, n in enumerate(names)]]
        bars = ax.bar(labels, medians, yerr=err, capsize=5, edgecolor="black", linewidth=0.5,
                      color=[COLORS["trainer"], COLORS["hand"], COLORS["extra"]])
        for bar, value in zip(bars, medians):
            ax.annotate(f"{value:.1f} ms", (bar.get_x() + bar.get_width() / 2, value),
                        xytext=(0, 4), textcoords="offset points", ha="center", fontsize=9)
        ax.set_ylabel("ms per optimizer step (median, bar: quartiles)")
        ax.set_title(f"{name}, {data['grad_accum_steps']} micro-batches per step\n"
                     f"{data['allreduce_per_optimizer_step']:g} all-reduce(s) per step in "
                     f"{data['buckets_per_optimizer_step']:g} bucket(s); no_sync saves "
                     f"{data['no_sync_saving'] * 100:.0f}%", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    _footer(fig, results, "accumulation")
    return _save(fig, path)


def scaling(results: dict[str, Any], path: Path) -> Path:
    """Throughput at world size 1 and 2, DDP (none at world size 1) beside FSDP; efficiencies."""
    data = results["scaling"]
    runs = data["runs"]
    fsdp = data.get("fsdp", {}).get("runs", {})
    keys = sorted(runs, key=lambda k: (runs[k]["world_size"], runs[k]["batch_per_rank"]))
    labels = [f"{runs[k]['world_size']} rank(s)\n× batch {runs[k]['batch_per_rank']}" for k in keys]
    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=110)
    width = 0.38 if fsdp else 0.7
    series = [("ddp (none at 1 rank)", runs, COLORS["trainer"], 0.0)]
    if fsdp:
        series = [("ddp (none at 1 rank)", runs, COLORS["trainer"], -width / 2),
                  ("fsdp", fsdp, COLORS["extra"], width / 2)]
    for label, source, color, shift in series:
        values = [source[k]["samples_per_s"] if k in source else 0.0 for k in keys]
        bars = ax.bar([i + shift for i in range(len(keys))], values, width, color=color,
                      edgecolor="black", linewidth=0.5, label=label)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=9)
    ax.set_xticks(range(len(keys)), labels)
    title = f"ddp_train throughput, {data['workload']['name']} ({data['device']})"
    if "strong_efficiency" in data:
        title += (f"\nstrong / weak scaling efficiency: ddp {data['strong_efficiency']:.2f} / "
                  f"{data['weak_efficiency']:.2f}")
        if "strong_efficiency" in data.get("fsdp", {}):
            title += (f", fsdp {data['fsdp']['strong_efficiency']:.2f} / "
                      f"{data['fsdp']['weak_efficiency']:.2f}")
    ax.set_title(title, fontsize=11)
    ax.set_ylabel("samples/s (global batch / median step)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    if data.get("note"):
        fig.text(0.01, 0.04, data["note"], fontsize=8, color="dimgray")
    _footer(fig, results, "scaling")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def bandwidth(results: dict[str, Any], path: Path) -> Path:
    """All-reduce time and bus bandwidth against message size."""
    data = results["bandwidth"]
    sizes = [s["bytes"] for s in data["sizes"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    left.loglog(sizes, [s["time_s"]["median"] * 1e6 for s in data["sizes"]], "o-")
    left.set_xlabel("message size (bytes)")
    left.set_ylabel("µs per all-reduce (median)")
    left.set_title(f"{data['backend']} all-reduce, {data['world_size']} ranks: time", fontsize=11)
    right.semilogx(sizes, [s["busbw_gb_s"] for s in data["sizes"]], "o-", color=COLORS["trainer"])
    right.set_xlabel("message size (bytes)")
    right.set_ylabel("bus bandwidth (GB/s)")
    right.set_title(f"bus bandwidth (peak {data['peak_busbw_gb_s']:.2f} GB/s, latency "
                    f"{data['latency_s'] * 1e6:.0f} µs)", fontsize=11)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    _footer(fig, results, "bandwidth")
    return _save(fig, path)


def startup(results: dict[str, Any], path: Path) -> Path:
    """Median time to each start-up mark."""
    data = results["startup"]["summary_s"]
    labels = {"python_s": "python", "import_torch_s": "import torch",
              "plain_first_step_s": "plain torch:\nfirst step",
              "first_step_s": "ddp_train:\nfirst step", "first_step_torchrun2_s":
              "ddp_train, torchrun\n2 ranks: first step"}
    keys = [k for k in labels if k in data]
    values = [data[k]["median"] for k in keys]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    bars = ax.bar([labels[k] for k in keys], values, edgecolor="black", linewidth=0.5,
                  yerr=[[v - data[k]["min"] for k, v in zip(keys, values)],
                        [data[k]["max"] - v for k, v in zip(keys, values)]], capsize=5,
                  color=[COLORS["trainer"] if k.startswith("first") else COLORS["hand"] for k in keys])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.2f} s", (bar.get_x() + bar.get_width() / 2, value), xytext=(0, 4),
                    textcoords="offset points", ha="center", fontsize=9)
    ax.set_ylabel("seconds from process start (median, bar: min to max)")
    ax.set_title(f"Start-up: startup_ratio = first step / import torch = "
                 f"{results['startup']['startup_ratio']:.2f}", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    _footer(fig, results, "startup")
    return _save(fig, path)


def projection(results: dict[str, Any], path: Path) -> Path:
    """Projected efficiency vs N per model size × link; the CPU check beside it."""
    data = results["projection"]
    has_check = "check_ws2" in data
    fig, axes = plt.subplots(1, 2 if has_check else 1, figsize=(14 if has_check else 9, 7), dpi=110,
                             gridspec_kw={"width_ratios": [3, 1]} if has_check else None, squeeze=False)
    ax = axes[0][0]
    links = list(data["assumptions"]["links"])
    link_colors = dict(zip(links, ["#2ca02c", "#1f77b4", "#d62728"]))
    # Wider lines underneath, so that a link whose lines coincide with another's still shows.
    link_widths = dict(zip(links, [4.0, 2.2, 1.8]))
    styles = {"10M": ":", "100M": "--", "1B": "-"}
    for line in data["lines"]:
        curve = sorted((int(n), value) for n, value in line["efficiency"].items())
        ax.plot([n for n, _ in curve], [value * 100 for _, value in curve], styles[line["model"]],
                color=link_colors[line["link"]], linewidth=link_widths[line["link"]],
                zorder=3 - links.index(line["link"]) * 0.5,
                label=f"{line['model']} params, {line['link']}")
        marked = sorted((int(n), value) for n, value in line["efficiency_marked"].items())
        ax.plot([n for n, _ in marked], [value * 100 for _, value in marked], "o",
                color=link_colors[line["link"]], markersize=5)
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 8, 64, 512, 1024], ["2", "8", "64", "512", "1024"])
    ax.set_xlabel("data-parallel ranks N (GPUs)")
    ax.set_ylabel("projected DDP efficiency (%)")
    gpu = data["assumptions"]["gpu"]
    ax.set_title(f"Projection: ring all-reduce in 25 MiB buckets overlapped with backward\n"
                 f"H100 at {gpu['mfu'] * 100:.0f}% MFU, {gpu['tokens_per_gpu_step']:,.0f} tokens "
                 f"per GPU per step, fp32 gradients", fontsize=11)
    lowest = min(value for line in data["lines"] for value in line["efficiency"].values())
    ax.set_ylim(max(0.0, math.floor(lowest * 10) * 10 - 5), 101)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3)
    if has_check:
        check = data["check_ws2"]
        right = axes[0][1]
        labels = ["compute\nonly", "+ all-reduce\n(overlap)", "+ all-reduce\n(no overlap)",
                  "measured"]
        values = [check["predicted"]["compute_only"]["efficiency"] * 100,
                  check["predicted"]["overlapped"]["efficiency"] * 100,
                  check["predicted"]["not_overlapped"]["efficiency"] * 100,
                  check["measured"]["efficiency"] * 100]
        bars = right.bar(labels, values, color=[COLORS["hand"]] * 3 + [COLORS["measured"]],
                         edgecolor="black", linewidth=0.5)
        for bar, value in zip(bars, values):
            right.annotate(f"{value:.0f}%", (bar.get_x() + bar.get_width() / 2, value),
                           xytext=(0, 4), textcoords="offset points", ha="center", fontsize=10)
        right.set_ylim(0, 110)
        right.set_ylabel("weak-scaling efficiency at N = 2 (%)")
        right.set_title(f"Check at N = 2 here ({check['backend']})\ngrey: predicted (cores "
                        f"×{check['concurrency_factor']:.2f})", fontsize=10)
        right.grid(axis="y", alpha=0.3)
        right.tick_params(axis="x", labelsize=7.5)
    _footer(fig, results, "projection")
    return _save(fig, path)


def gpu(results: dict[str, Any], path: Path) -> Path:
    """Tokens/s, MFU and peak memory, eager vs torch.compile."""
    data = results["gpu"]
    modes = data["modes"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), dpi=110)
    for ax, (key, label, scale) in zip(axes, [("tokens_per_s", "tokens/s", 1.0),
                                              ("mfu", "MFU (%)", 100.0),
                                              ("peak_memory_gib", "peak memory (GiB)", 1.0)]):
        values = [(modes[m][key] or 0.0) * scale for m in modes]
        ax.bar(list(modes), values, color=[COLORS["hand"], COLORS["trainer"]], edgecolor="black")
        for x, value in enumerate(values):
            ax.annotate(f"{value:,.1f}", (x, value), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=9)
        ax.set_title(label, fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    device = next(iter(modes.values()))["device_name"]
    fig.suptitle(f"{data['workload']['name']} ({data['workload']['parameters'] / 1e6:.0f} M params), "
                 f"bf16, batch {data['workload']['batch_size_per_rank']} on {device}", fontsize=11)
    _footer(fig, results, "gpu")
    return _save(fig, path)

"""
The figures of compare.py, drawn from results.json alone (so `compare.py --plot_only=true` redraws them):

    compare_curves.png      training and validation loss of every run
    compare_params.png      trainable parameters vs final validation loss (points named by label_points)
    compare_cost.png        peak memory, wall time and throughput per run
    compare_lr.png          final validation loss vs learning rate, one line per grid entry (a sweep)
    compare_forgetting.png  perplexity on the fine-tuning data vs on the base's own data (forget_data)

`results` is the dict compare.py writes to results.json; each run there holds its curves
(`curve`, `steps`), `trainable_params`, `final_val_loss`, memory, time and throughput. matplotlib
is imported inside the functions (no display needed: draw() selects the Agg backend).
"""

import os

FIGURES = ("compare_curves.png", "compare_params.png", "compare_cost.png")


def colors(n):
    import matplotlib
    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2)) if n > 10 else list(range(10))  # strong colors first
    return [cmap(order[i % len(order)]) for i in range(n)]


def subtitle(results):
    b = results["budget"]
    name = lambda path: os.path.basename(str(path).rstrip("/"))  # noqa: E731
    return (f"{b['tokens']:,} tokens per run ({b['max_iters']} iters), seed {b['seed']}, data {name(b['dataset'])}, "
            f"base {name(b['init_from'])}\n{results['device']}")


def ema(values, smoothing=0.6):
    """TensorBoard's smoothing: s_t = smoothing * s_{t-1} + (1 - smoothing) * x_t, debiased."""
    out, s = [], 0.0
    for t, x in enumerate(values):
        s = smoothing * s + (1 - smoothing) * x
        out.append(s / (1 - smoothing ** (t + 1)))
    return out


def plot_curves(results, runs_, cols, path):
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    styles = ("-", "--", "-.", ":")
    for k, (r, c) in enumerate(zip(runs_, cols)):
        ls = styles[(k // 10) % len(styles)]
        ax_t.plot(r["steps"]["iter"], ema(r["steps"]["loss"]), color=c, lw=1.3, ls=ls, label=r["name"])
        ax_v.plot(r["curve"]["iter"], r["curve"]["val_loss"], color=c, lw=1.6, ls=ls, marker="o", ms=3.5)
    ax_t.set_title("training loss (logged steps, smoothed: EMA 0.6)")
    ax_v.set_title("validation loss (per eval)")
    for ax in (ax_t, ax_v):
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy loss (nats / token)")
        ax.grid(alpha=0.3)
    # the runs end close together: zoom on the second half when the first drop dwarfs their spread
    finals = [r["curve"]["val_loss"][-1] for r in runs_]
    lo, hi = ax_v.get_ylim()
    last = max(r["curve"]["iter"][-1] for r in runs_)
    if len(runs_) > 1 and max(finals) - min(finals) < 0.25 * (hi - lo) and last > 0:
        ax_in = ax_v.inset_axes([0.40, 0.40, 0.57, 0.55])
        for k, (r, c) in enumerate(zip(runs_, cols)):
            pts = [(i, v) for i, v in zip(r["curve"]["iter"], r["curve"]["val_loss"]) if i >= last / 2]
            ax_in.plot(*zip(*pts), color=c, lw=1.4, ls=styles[(k // 10) % len(styles)], marker="o", ms=3)
        ax_in.set_title(f"zoom: iterations {last // 2}-{last}", fontsize=8)
        ax_in.tick_params(labelsize=7)
        ax_in.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize=9, title="run")
    fig.suptitle(f"Fine-tuning methods, same data, seed and schedule\n{subtitle(results)}", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def place_labels(ax, xs, ys, names, fontsize=9):
    """Pixel positions for the points' labels: each starts right of its point; labels that overlap
    are pushed apart vertically until none do. Returns [(x_px, y_px)] of each label's left middle."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pix = ax.transData.transform(list(zip(xs, ys)))
    sizes = []
    for name in names:
        t = ax.text(0, 0, name, fontsize=fontsize)
        box = t.get_window_extent(renderer)
        sizes.append((box.width, box.height))
        t.remove()
    pos = [[px + 7, py] for px, py in pix]
    for _ in range(500):
        moved = False
        for i in range(len(pos)):
            for j in range(i + 1, len(pos)):
                (xi, yi), (xj, yj) = pos[i], pos[j]
                h = (sizes[i][1] + sizes[j][1]) / 2 + 1
                if xi < xj + sizes[j][0] and xj < xi + sizes[i][0] and abs(yi - yj) < h:
                    up = i if (yi, pix[i][1], -i) > (yj, pix[j][1], -j) else j  # keep the vertical order
                    push = (h - abs(yi - yj)) / 2 + 0.5
                    pos[up][1] += push
                    pos[i + j - up][1] -= push
                    moved = True
        if not moved:
            break
    return pix, pos


def label_points(ax, xs, ys, names, fontsize=9):
    """Name every point (labels right of the points, pushed apart, with a leader line when moved);
    the y range widens until every label fits inside the axes. Set the x range first."""
    fig = ax.figure
    span = (max(ys) - min(ys)) or 0.1
    ax.set_ylim(min(ys) - 0.1 * span, max(ys) + 0.1 * span)
    for _ in range(3):  # widen the y range until every label fits inside the axes
        pix, pos = place_labels(ax, xs, ys, names, fontsize)
        box = ax.get_window_extent()
        below, above = box.y0 + 8 - min(y for _, y in pos), max(y for _, y in pos) + 8 - box.y1
        if below <= 0 and above <= 0:
            break
        lo, hi = ax.get_ylim()
        per_px = (hi - lo) / box.height
        ax.set_ylim(lo - max(below, 0) * per_px * 1.2, hi + max(above, 0) * per_px * 1.2)
    to_pt = 72 / fig.dpi
    for i, name in enumerate(names):
        dx, dy = (pos[i][0] - pix[i][0]) * to_pt, (pos[i][1] - pix[i][1]) * to_pt
        ax.annotate(name, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, va="center",
                    arrowprops=dict(arrowstyle="-", color="gray", lw=0.6, shrinkA=0, shrinkB=4) if abs(dy) > 4 else None)


def plot_params(results, runs_, cols, path):
    import matplotlib.pyplot as plt
    pts = [(r, c) for r, c in zip(runs_, cols) if r["trainable_params"]]
    fig, ax = plt.subplots(figsize=(9, 6), layout="constrained")
    xs = [r["trainable_params"] for r, _ in pts]
    ys = [r["final_val_loss"] for r, _ in pts]
    names = [r["name"] for r, _ in pts]
    ax.scatter(xs, ys, c=[c for _, c in pts], s=55, zorder=3, edgecolors="black", linewidths=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("final validation loss (nats / token)")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Trainable parameters vs final validation loss\n{subtitle(results)}", fontsize=10)
    if xs:
        ax.set_xlim(min(xs) / 2.5, max(xs) * 5)  # room for the labels right of the points
        label_points(ax, xs, ys, names)
    base = next((r for r in runs_ if r["method"] == "full" and r["curve"]["iter"][:1] == [0]), None)
    if base is not None:  # every run starts from this base; most methods start exactly at it
        b = base["curve"]["val_loss"][0]
        lo, hi = ax.get_ylim()
        if lo <= b <= hi:
            ax.axhline(b, color="gray", ls="--", lw=1)
        ax.text(0.01, 0.01, (f"dashed: base model before fine-tuning, val loss {b:.3f}" if lo <= b <= hi else
                             f"base model before fine-tuning: val loss {b:.3f} (above the plot)"),
                transform=ax.transAxes, color="gray", fontsize=9, va="bottom")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(results, runs_, cols, path):
    import matplotlib.pyplot as plt
    cuda = any(r["peak_mem_kind"] == "cuda_max_allocated" for r in runs_)
    panels = [("peak_mem_mb", "peak CUDA memory (MB)" if cuda else "peak process memory, RSS (MB)", ",.0f"),
              ("wall_s", "wall time (s)", ",.0f"), ("tok_per_s", "training throughput (tokens/s)", ",.0f")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.38 * len(runs_) + 2.2), sharey=True, layout="constrained")
    names = [r["name"] for r in runs_]
    ypos = list(range(len(runs_)))
    for ax, (key, label, spec) in zip(axes, panels):
        vals = [r[key] or 0 for r in runs_]
        ax.barh(ypos, vals, color=cols, edgecolor="black", linewidth=0.4)
        top = max(vals) if vals and max(vals) > 0 else 1
        for y, v, r in zip(ypos, vals, runs_):
            text = "n/a" if r[key] is None else format(v, spec)
            if key == "wall_s" and r.get("segments", 1) > 1:
                text += f" ({r['segments']} parts)"  # resumed: start-up counted once per part
            ax.text(v + 0.01 * top, y, text, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.3)
        ax.xaxis.set_major_formatter("{x:,.0f}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
        if key == "peak_mem_mb" and not cuda and results.get("rss_baseline_mb"):
            ax.axvline(results["rss_baseline_mb"], color="gray", ls="--", lw=1)
            ax.text(results["rss_baseline_mb"], -0.95, " python + torch, no model", color="gray", fontsize=8, va="center")
    axes[0].set_yticks(ypos, names)
    axes[0].invert_yaxis()
    axes[0].set_ylim(len(runs_) - 0.5, -1.4)  # room above the first bar for the baseline label
    fig.suptitle(f"Cost per run\n{subtitle(results)}", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group_colors(results):
    """{grid entry: color}: a sweep's runs share their entry's color in the lr and forgetting figures."""
    groups = list(dict.fromkeys(r.get("group", r["name"]) for r in results["runs"]))
    return dict(zip(groups, colors(len(groups))))


def plot_lr(results, path):
    """Final validation loss against learning rate, one line per grid entry, its best rate ringed."""
    import matplotlib.pyplot as plt
    gcol = group_colors(results)
    fig, ax = plt.subplots(figsize=(9, 6), layout="constrained")
    for g in results["best"]:
        c = gcol[g["group"]]
        ax.plot(g["learning_rates"], g["val_losses"], color=c, marker="o", ms=6, lw=1.6, label=g["group"])
        ax.scatter([g["learning_rate"]], [g["final_val_loss"]], s=190, facecolors="none", edgecolors=c, linewidths=2, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale; min_lr scales with it)")
    ax.set_ylabel("final validation loss (nats / token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="run (ring: best rate)", fontsize=9, loc="best")
    fig.suptitle(f"Learning-rate sensitivity: the same data, budget and schedule at each rate\n{subtitle(results)}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forgetting(results, path):
    """Perplexity on the fine-tuning data (learned) against perplexity on the base's own data
    (forgot), one point per run; a sweep's rates joined by a line; the base model is the star."""
    import matplotlib.pyplot as plt
    fg = results["forgetting"]
    gcol = group_colors(results)
    runs_ = [r for r in results["runs"] if r.get("learned_ppl") is not None]
    fig, ax = plt.subplots(figsize=(11, 8.5), layout="constrained")
    for group, c in gcol.items():
        pts = sorted((r["learning_rate"], r["learned_ppl"], r["forgot_ppl"]) for r in runs_ if r.get("group", r["name"]) == group)
        if pts:
            ax.plot([p[1] for p in pts], [p[2] for p in pts], color=c, lw=1, alpha=0.6, label=group)
    ax.scatter([r["learned_ppl"] for r in runs_], [r["forgot_ppl"] for r in runs_], s=55, zorder=3, edgecolors="black",
               linewidths=0.5, c=[gcol[r.get("group", r["name"])] for r in runs_])
    bx, by = fg["base"]["learned_ppl"], fg["base"]["forgot_ppl"]
    ax.scatter([bx], [by], marker="*", s=320, color="black", zorder=4)
    ax.axvline(bx, color="gray", ls="--", lw=1)
    ax.axhline(by, color="gray", ls="--", lw=1)
    xs = [r["learned_ppl"] for r in runs_] + [bx]
    ys = [r["forgot_ppl"] for r in runs_] + [by]
    span = (max(xs) - min(xs)) or 1
    ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.3 * span)  # room for the labels right of the points
    label_points(ax, xs, ys, [r["name"] for r in runs_] + ["base (before fine-tuning)"], fontsize=8)
    ax.set_xlabel(f"perplexity on {fg['learned_data']} val (fine-tuning data): lower = learned more")
    ax.set_ylabel(f"perplexity on {fg['forgot_data']} val (the base's own data): higher = forgot more")
    ax.grid(alpha=0.3)
    ax.text(0.01, 0.01, "dashed: the base model (star)", transform=ax.transAxes, color="gray", fontsize=9, va="bottom")
    if len(gcol) < len(runs_):  # a sweep: the colors are its entries
        ax.legend(title="run (its rates joined)", fontsize=9, loc="upper right")
    fig.suptitle(f"Learning vs forgetting ({fg['tokens']['learned']:,} and {fg['tokens']['forgot']:,} tokens, windows of "
                 f"{fg['block_size']})\n{subtitle(results)}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw(results, folder, sweep=False):
    """Draw the figures into `folder` from results as results.json holds them: the three of every grid,
    the lr figure for a sweep, the learned-vs-forgot figure when runs were scored. Returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    runs_ = results["runs"]
    if not runs_:
        return []
    cols = colors(len(runs_))
    paths = [os.path.join(folder, f) for f in FIGURES]
    plot_curves(results, runs_, cols, paths[0])
    plot_params(results, runs_, cols, paths[1])
    plot_cost(results, runs_, cols, paths[2])
    if sweep:
        paths.append(os.path.join(folder, "compare_lr.png"))
        plot_lr(results, paths[-1])
    if results.get("forgetting") and any(r.get("learned_ppl") is not None for r in runs_):
        paths.append(os.path.join(folder, "compare_forgetting.png"))
        plot_forgetting(results, paths[-1])
    return paths

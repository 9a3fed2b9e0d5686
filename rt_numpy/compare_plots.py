"""The figures of ``python -m rt_numpy compare`` (docs/results.md shows them).

* ``{task}_curves.png`` - held-out metric against steps and against training time, per arm
  (mean over seeds, the band one standard deviation);
* ``recall_distance.png`` - recall accuracy against the distance of the record, per arm;
* ``{task}_clusters.png`` - which pixels or bytes a trained routing head puts in one cluster;
* ``{task}_mass_recall.png`` - on a trained dense model's queries and keys, the share of each
  query's dense softmax mass that each arm's visible keys cover.
"""
from __future__ import annotations

import os

import numpy as np

from rt_numpy import baselines, data, kmeans, model

COLOURS = {"local": "#7f7f7f", "routing": "#d62728", "strided": "#1f77b4", "lsh": "#2ca02c",
           "nearest": "#ff7f0e", "dense": "#000000"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_all(figures, settings, out_dir, log=print):
    """Every figure of every task into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        paths.append(curves(fig["task"], fig["curves"], os.path.join(out_dir, f"{name}_curves.png")))
        if name == "recall" and fig.get("rows"):
            paths.append(recall_distance(fig["task"], fig["rows"], os.path.join(out_dir, "recall_distance.png")))
        if "routing" in fig["fits"] and name != "recall":
            paths.append(clusters(fig["task"], *fig["fits"]["routing"], os.path.join(out_dir, f"{name}_clusters.png")))
        if fig.get("mass_recall"):
            paths.append(mass_recall_bars(fig["mass_recall"], os.path.join(out_dir, f"{name}_mass_recall.png"),
                                          name))
    for p in paths:
        log(f"  plot: {p}")
    return paths


def curves(task, arm_curves, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, per_seed in arm_curves.items():
        steps = np.array([c["step"] for c in per_seed[0]])
        values = np.array([[c[task.metric] for c in curve] for curve in per_seed])  # (seeds, points)
        seconds = np.array([[c["seconds"] for c in curve] for curve in per_seed]).mean(axis=0)
        mean, std = values.mean(axis=0), values.std(axis=0)
        for ax, x in zip(axes, (steps, seconds)):
            ax.plot(x, mean, color=COLOURS[arm], label=arm)
            ax.fill_between(x, mean - std, mean + std, color=COLOURS[arm], alpha=0.2)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training time (s)")
    for ax in axes:
        ax.set_ylabel(f"held-out {task.unit}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{task.name}: held-out {task.unit} during training (mean ± std over seeds)")
    return _save(plt, fig, path)


def recall_distance(task, rows, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len({p for p, _ in task.grid}), figsize=(10, 3.4), squeeze=False)
    for ax, pairs in zip(axes[0], sorted({p for p, _ in task.grid})):
        distances = [d for p, d in task.grid if p == pairs]
        for r in rows:
            mean = [r["cells"][(pairs, d)][0] for d in distances]
            std = [r["cells"][(pairs, d)][1] for d in distances]
            ax.errorbar(distances, mean, yerr=std, color=COLOURS[r["arm"]], label=r["arm"], marker="o", capsize=3)
        ax.axhline(1 / len(data.VALUE_ALPHABET), color="k", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("distance from record to query (bytes)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{pairs} pairs")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(plt, fig, path)


def cluster_ids(fit, cfg, x):
    """Cluster of every position for head 0 of the last routing layer (-1: in no window).

    With balanced membership a token may be in several windows: the one with the best score wins.
    """
    trace = {}
    model.forward(fit["params"], x, cfg, fit["kmeans"], trace=trace)
    layer = max(i for i in range(cfg.n_layers) if cfg.is_routing_layer(i))
    means = fit["kmeans"][f"h{layer}"]["means"]
    qn = kmeans.normalize(trace[f"h{layer}"]["q"][:1, :1], cfg.norm)  # (1, 1, T, D) head 0 of row 0
    windows = kmeans.balanced_membership(qn, means[:1], min(cfg.window_size, x.shape[1]))[0, 0]  # (K, W)
    scores = kmeans.similarities(qn, means[:1])[0, 0]  # (T, K)
    ids = np.full(x.shape[1], -1)
    for c in np.argsort(scores[windows, np.arange(len(windows))[:, None]].mean(axis=1)):  # weakest first
        ids[windows[c]] = c  # later (stronger) clusters overwrite
    return ids


def clusters(task, fit, cfg, x, trace, path):
    plt = _pyplot()
    ids = cluster_ids(fit, cfg, x)
    cmap = plt.get_cmap("tab20")
    if task.name == "images":
        shape = (cfg.seq_len // task.width, task.width)
        fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
        axes[0].imshow(np.append(x[0, 1:], 0).reshape(shape), cmap="gray_r")  # x[0, 0] is the start token
        axes[0].set_title("a held-out image")
        shown = np.ma.masked_less(ids.reshape(shape), 0)
        axes[1].imshow(shown, cmap=cmap, vmin=0, vmax=19)
        axes[1].set_title("cluster of each pixel (routing head 0)")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
    else:
        n, per_line = min(len(ids), 640), 80
        fig, ax = plt.subplots(figsize=(11, 0.32 * (n // per_line + 1) + 0.6))
        text = data.decode(x[0, :n])
        for t, ch in enumerate(text[:n]):
            colour = "#cccccc" if ids[t] < 0 else cmap(ids[t] % 20)
            ax.text((t % per_line) / per_line, 1 - (t // per_line + 1) / (n // per_line + 1),
                    ch if ch.isprintable() and ch != " " else "·", color=colour, family="monospace", fontsize=8)
        ax.axis("off")
        ax.set_title("the bytes of a held-out window, coloured by their cluster (routing head 0, last layer)")
    return _save(plt, fig, path)


def mass_recall_bars(values, path, task_name):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    arms = list(values)
    ax.bar(arms, [values[a] for a in arms], color=[COLOURS[a] for a in arms])
    for i, a in enumerate(arms):
        ax.text(i, values[a] + 0.01, f"{values[a]:.2f}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of dense softmax mass")
    ax.set_title(f"{task_name}: mass a sparse pattern keeps, on a trained dense model")
    return _save(plt, fig, path)


def mass_recall(dense_fit, dense_cfg, x, arm_cfgs):
    """Mean share of the trained dense model's softmax mass that each arm's pattern keeps.

    Every head of every layer of the dense model is read, and every arm's pattern is put on
    those heads: local and strided by position, LSH by hashing the dense queries, routing by
    clustering them (10 online k-means steps on the dense queries, then
    balanced or nearest membership).  Returns ``{arm: mean share}``.
    """
    trace = {}
    model.forward(dense_fit["params"], x, dense_cfg, dense_fit["kmeans"], trace=trace)
    out = {}
    for arm, cfg in arm_cfgs.items():
        shares = []
        for i in range(dense_cfg.n_layers):
            q = trace[f"h{i}"]["q"]  # (B, H, T, D)
            B, H, T, D = q.shape
            counts = _pattern(arm, cfg, q)
            shares.append(baselines.attention_mass_recall(q, trace[f"h{i}"]["k"], counts, scale=1 / np.sqrt(D)))
        out[arm] = float(np.mean(shares))
    return out


def _pattern(arm, cfg, q):
    """Visibility of ``arm``'s own heads when they are given the queries ``q`` (B, H, T, D)."""
    B, H, T, D = q.shape
    if arm == "local":
        return baselines.visibility("local", T, block_size=cfg.block_size, look_back=cfg.look_back)
    if arm == "strided":
        return baselines.visibility("strided", T, stride=cfg.stride)
    if arm == "dense":
        return baselines.visibility("dense", T)
    qn = kmeans.normalize(q, cfg.norm)
    if arm == "lsh":
        rot = baselines.lsh_rotations(H, D, cfg.num_clusters, seed=cfg.lsh_seed, dtype=q.dtype)
        return baselines.visibility("lsh", T, chunks=baselines.lsh_chunks(baselines.lsh_buckets(qn, rot),
                                                                           cfg.window_size))
    state = kmeans.init_state(H, cfg.num_clusters, D, rng=np.random.default_rng(0), norm=cfg.norm,
                              dtype=q.dtype)
    for _ in range(10):  # online k-means on the dense model's own queries
        state, _ = kmeans.kmeans_step(state, qn, ema_decay=0.5, norm=cfg.norm)
    if arm == "nearest":
        return baselines.visibility("routing", T, assignments=kmeans.nearest(qn, state["means"]))
    return baselines.visibility("routing", T, windows=kmeans.balanced_membership(qn, state["means"],
                                                                                  cfg.window_size))

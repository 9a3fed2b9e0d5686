"""Model answers to the exercises of tutorial 04 (checking your own implementation against rt_numpy).

Run from anywhere: ``python tutorials/solutions/04_crosscheck.py``.  It prints one verdict per exercise and
exits with status 1 unless every check passes.  Exercise 4.4 needs torch; without it the script says that
it skipped it and judges the other three.
"""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, for `checks`

import numpy as np  # noqa: E402
from checks import ex04, report  # noqa: E402

from rt_numpy import crosscheck, kmeans  # noqa: E402

FIG_DIR = Path(os.environ.get("RT_NUMPY_FIG_DIR") or tempfile.mkdtemp(prefix="rt_numpy_04_solutions_"))
FIG_DIR.mkdir(parents=True, exist_ok=True)

# ------------------------------------------------------------------ the tutorial's case (sections 1-2)
B, H, T, D, K, W = 1, 2, 16, 8, 4, 4
rng = np.random.default_rng(0)
q, v, upstream = rng.standard_normal((3, B, H, T, D))  # three (B, H, T, D) arrays
means = kmeans.normalize(rng.standard_normal((H, K, D)), "l2")  # (H, K, D) unit centroids
ref = crosscheck.reference(q, None, v, means, window_size=W, upstream=upstream, shared_qk=True,
                           **crosscheck.port_conventions(shared_qk=True))
case_path = FIG_DIR / "case_port_shared_qk.npz"
crosscheck.save(case_path, ref)
case = crosscheck.load(case_path)


def unit_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def routing_attention_with(q, v, means, W, bug=None, *, eps=1e-5, beta=1e-4, decay=0.999):
    """The tutorial's my_routing_attention (section 3), with one optional planted bug."""
    B, H, T, D = q.shape
    K = means.shape[1]
    out = np.zeros_like(q)
    windows = np.zeros((B, H, K, W), dtype=np.int64)
    errors, pooled = [], np.zeros((H, K, D))
    received = np.zeros((H, K), dtype=bool)
    for b in range(B):
        for h in range(H):
            x = q[b, h]  # (T, D)
            unit = unit_rows(x)  # (T, D)
            sims = (x if bug == "route_raw" else unit) @ means[h].T  # (T, D) @ (D, K) -> (T, K)
            nearest = sims.argmax(axis=1)  # (T,)
            squared = (unit - means[h][nearest]) ** 2  # (T, D)
            errors.append(squared.sum(1).mean() if bug == "commitment_squared_norms" else squared.mean())
            np.add.at(pooled[h], nearest, unit)
            received[h, nearest] = True
            total, count = np.zeros((T, D)), np.zeros(T)
            for c in range(K):
                members = np.argsort(-sims[:, c], kind="stable")[:W]  # (W,), most similar first
                windows[b, h, c] = members
                logits = x[members] @ unit[members].T / np.sqrt(D)  # (W, D) @ (D, W) -> (W, W)
                where = np.arange(W) if bug == "causal_by_rank" else members  # ranks, or original positions
                logits = np.where(where[None, :] > where[:, None], -np.inf, logits)  # causal
                logits = np.where(members[None, :] == members[:, None], -5e4, logits)  # self: last resort
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                total[members] += p @ v[b, h, members]  # (W, W) @ (W, D) -> (W, D)
                count[members] += 1
            with np.errstate(invalid="ignore"):  # the no_combine_eps bug: 0 / 0 at a token in no window
                out[b, h] = total / (count + (0.0 if bug == "no_combine_eps" else eps))[:, None]
    target = unit_rows(pooled)  # (H, K, D)
    new_means = np.where(received[..., None], decay * means + (1 - decay) * target, means)
    return {"out": out, "query_windows": windows, "commitment": beta * np.mean(errors), "new_means": new_means}


# ------------------------------------------------------------------ Exercise 4.1 (easy)
def official_case():
    g = np.random.default_rng(1)
    q1, v1, up1 = g.standard_normal((3, B, H, T, D))  # three (B, H, T, D) arrays
    mu1 = kmeans.normalize(g.standard_normal((H, K, D)), "l2")  # (H, K, D)
    path = FIG_DIR / "case_official.npz"
    crosscheck.save(path, crosscheck.reference(q1, None, v1, mu1, window_size=W, upstream=up1,
                                               **crosscheck.official_conventions()))
    loaded = crosscheck.load(path)
    x = loaded["q"]  # (B, H, T, D)
    x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)  # layer norm, no scale
    sims = np.einsum("bhtd,hkd->bhtk", x_hat, loaded["means"])  # (B, H, T, K)
    nearest = sims.argmax(-1)  # (B, H, T)
    n_k = loaded["means"].shape[1]
    counts = np.stack([np.bincount(nearest[:, h].ravel(), minlength=n_k) for h in range(H)])  # (H, K)
    mine = {"assignments": nearest[None], "cluster_counts": counts[None]}  # (1, B, H, T), (1, H, K)
    print("  4.1, errors by name:", crosscheck.assert_close(loaded, mine, rtol=0))
    return path, mine


# ------------------------------------------------------------------ Exercise 4.2 (medium)
def planted_bugs():
    def bug(name):
        return lambda q, v, means, W: routing_attention_with(q, v, means, W, bug=name)

    predicted = {
        "causal_by_rank": {"out"},  # only the attention inside a window sees the mask
        "no_combine_eps": {"out"},  # 1e-5 / n_i relative, far above rtol = 1e-12, and NaN (0/0) in no window
        "commitment_squared_norms": {"commitment"},  # D times larger; out never reads the loss
        # routing with the raw queries changes the top-W windows (norms differ), hence out, but not the nearest
        # centroid: argmax_c x . mu_c = argmax_c |x| (x_hat . mu_c), so the loss and the update stay put
        "route_raw": {"out", "query_windows"},
    }
    for name, names in predicted.items():
        with np.errstate(invalid="ignore"):
            errors = crosscheck.compare(case, bug(name)(q, v, means, W))
        print(f"  {name:26s} " + "  ".join(f"{n} {e:.1e}" for n, e in sorted(errors.items())))
    return {name: (bug(name), names) for name, names in predicted.items()}


# ------------------------------------------------------------------ Exercise 4.3 (medium)
def my_grad_v(q, v, means, W, upstream, *, eps=1e-5):
    """d sum(upstream * out) / dv of the port-convention routing attention, by hand."""
    B, H, T, D = q.shape
    K = means.shape[1]
    grad_v = np.zeros_like(v)
    for b in range(B):
        for h in range(H):
            x = q[b, h]  # (T, D)
            unit = unit_rows(x)  # (T, D)
            sims = unit @ means[h].T  # (T, D) @ (D, K) -> (T, K)
            windows = [np.argsort(-sims[:, c], kind="stable")[:W] for c in range(K)]  # K arrays (W,)
            count = np.bincount(np.concatenate(windows), minlength=T)  # (T,): n_i
            g_tilde = upstream[b, h] / (count + eps)[:, None]  # (T, D): the scatter-mean's backward
            for members in windows:
                logits = x[members] @ unit[members].T / np.sqrt(D)  # (W, W)
                logits = np.where(members[None, :] > members[:, None], -np.inf, logits)
                logits = np.where(members[None, :] == members[:, None], -5e4, logits)
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                np.add.at(grad_v[b, h], members, p.T @ g_tilde[members])  # (W, W) @ (W, D) -> (W, D)
    return grad_v


def linear_in_v_check():
    """out is linear in v, so a central difference along a direction of v is exact up to rounding, for any h."""
    r = np.random.default_rng(3).standard_normal(v.shape)
    exact = np.sum(my_grad_v(q, v, means, W, upstream) * r)

    def f(v_):
        return np.sum(upstream * routing_attention_with(q, v_, means, W)["out"])

    for h in (1e-3, 1.0, 100.0):
        numeric = (f(v + h * r) - f(v - h * r)) / (2 * h)
        print(f"  h = {h:g}: central difference {numeric:+.12f}, by hand {exact:+.12f}")
        assert abs(numeric - exact) < 1e-9 * max(1.0, abs(exact))


# ------------------------------------------------------------------ Exercise 4.4 (open)
def torch_routing_attention(q, v, means, W, *, eps=1e-5, beta=1e-4, decay=0.999):
    """The loop version of section 3 in PyTorch; differentiable in q and v."""
    import torch

    B, H, T, D = q.shape
    K = means.shape[1]
    rows, windows, errors = [], [], []
    pooled = torch.zeros(H, K, D, dtype=q.dtype)
    received = torch.zeros(H, K, dtype=torch.bool)
    for b in range(B):
        out_b, windows_b = [], []
        for h in range(H):
            x = q[b, h]  # (T, D)
            unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (T, D)
            sims = unit @ means[h].T  # (T, D) @ (D, K) -> (T, K)
            nearest = sims.argmax(dim=1)  # (T,)
            errors.append(((unit - means[h][nearest]) ** 2).mean())
            with torch.no_grad():  # the centroids get no gradient
                pooled[h].index_add_(0, nearest, unit)
                received[h, nearest] = True
            members_all = sims.topk(W, dim=0).indices.T  # (W, K) -> (K, W), most similar first
            total = torch.zeros(T, D, dtype=q.dtype)
            count = torch.zeros(T, dtype=q.dtype)
            for members in members_all:
                logits = x[members] @ unit[members].T / D**0.5  # (W, D) @ (D, W) -> (W, W)
                logits = logits.masked_fill(members[None, :] > members[:, None], float("-inf"))  # causal
                logits = logits.masked_fill(members[None, :] == members[:, None], -5e4)  # self: last resort
                total = total.index_add(0, members, logits.softmax(dim=1) @ v[b, h, members])  # (W, D)
                count = count.index_add(0, members, torch.ones(W, dtype=q.dtype))
            out_b.append(total / (count + eps)[:, None])
            windows_b.append(members_all)
        rows.append(torch.stack(out_b))  # (H, T, D)
        windows.append(torch.stack(windows_b))  # (H, K, W)
    target = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (H, K, D)
    new_means = torch.where(received[..., None], decay * means + (1 - decay) * target, means)
    return {"out": torch.stack(rows), "query_windows": torch.stack(windows),  # (B, H, T, D), (B, H, K, W)
            "commitment": beta * torch.stack(errors).mean(), "new_means": new_means}


verdicts = [report("Exercise 4.1", ex04.check_saved_case, official_case),
            report("Exercise 4.2", ex04.check_planted_bugs, planted_bugs, case)]
linear_in_v_check()
verdicts.append(report("Exercise 4.3", ex04.check_grad_v, my_grad_v, case))
if ex04.torch_installed():
    verdicts.append(report("Exercise 4.4", ex04.check_torch_port, torch_routing_attention, case_path))
else:
    print(ex04.TORCH_SKIP)
sys.exit(0 if all(v is True for v in verdicts) else 1)

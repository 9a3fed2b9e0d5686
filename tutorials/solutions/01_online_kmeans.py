"""Model answers to the exercises of tutorial 01 (online k-means, the router).

Run: python tutorials/solutions/01_online_kmeans.py   (exits 1 unless every answer passes its check)
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, for `checks`

import numpy as np  # noqa: E402
from checks import ex01, report  # noqa: E402

from rt_numpy import kmeans  # noqa: E402

FAST = os.environ.get("RT_NUMPY_FAST") == "1"


# ----------------------------------------------------------------- Exercise 1.1 (easy): bias correction
def ema_step_corrected(means, counts, sums, x, decay, t, eps=1e-5):
    """One bias-corrected EMA step for one head (statistics started at zero; t = 1, 2, ...)."""
    K = len(means)
    a = np.argmax(x @ means.T, axis=1)  # (M, D) @ (D, K) -> (M, K) -> (M,)
    onehot = np.eye(K)[a]  # (M, K)
    counts = decay * counts + (1 - decay) * onehot.sum(axis=0)  # (K,), uncorrected, carried on
    sums = decay * sums + (1 - decay) * (onehot.T @ x)  # (K, M) @ (M, D) -> (K, D), uncorrected
    counts_hat = counts / (1 - decay**t)  # (K,)
    sums_hat = sums / (1 - decay**t)  # (K, D)
    total = counts_hat.sum()
    smoothed = (counts_hat + eps) / (total + K * eps) * total  # (K,)
    new_means = np.where(counts[:, None] > 0, sums_hat / smoothed[:, None], means)  # (K, D): unseen keep theirs
    return new_means, counts, sums, counts_hat
    # Why the overshoot vanishes: the sum no longer starts at mu_0, so every centroid is an average of the
    # unit vectors it received.  The 1 - lambda^t factor cancels in s_hat / n_hat (up to the smoothing); what
    # it fixes is counts_hat, an unbiased "points per step" from the first step on.


# ----------------------------------------------------------------- Exercise 1.2 (medium): restarts
def step_with_restart(state, points, rng, ema_decay):
    """kmeans_step, then re-seed every cluster that received no point from a point of this batch."""
    new, stats = kmeans.kmeans_step(state, points, ema_decay=ema_decay, norm="l2")
    received = stats["counts"].sum(axis=0)  # (S, H, K) -> (H, K)
    means, counts, sums = (new[key].copy() for key in ("means", "counts", "sums"))
    B, H, T, D = points.shape
    K = means.shape[1]
    for h, c in zip(*np.nonzero(received == 0)):
        seed = points[rng.integers(B), h, rng.integers(T)]  # (D,), one of head h's points
        counts[h, c] = counts[h].sum() / K  # a fair share of the running count
        sums[h, c] = counts[h, c] * seed  # so that sums / ñ(counts) is the seed again (up to the smoothing)
        means[h, c] = seed
    return {"means": means, "counts": counts, "sums": sums}


# ----------------------------------------------------------------- Exercise 1.3 (open): the sweep
H, T, D, K = 2, 128, 64, 8  # tutorial 01 section 3, with the batch size left free
TOPIC_FREQ = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])  # (K,)
topics = np.random.default_rng(1).standard_normal((H, K, D))  # (H, K, D)
heads = np.arange(H)[None, :, None]  # (1, H, 1)
STEPS = 150 if FAST else 400


def token_batch(rng, batch, noise=1.5):
    """Raw fake queries (batch, H, T, D) and their topics (batch, H, T), as in the tutorial."""
    z = rng.choice(K, size=(batch, H, T), p=TOPIC_FREQ)  # (batch, H, T)
    return topics[heads, z] + noise * rng.standard_normal((batch, H, T, D)), z  # (batch, H, T, D), (batch, H, T)


def losses_of(decay, batch, steps=STEPS, seed=4):
    """Commitment loss per step of one online k-means run (norm="ln", init="normal")."""
    data_rng = np.random.default_rng(seed)
    state = kmeans.init_state(H, K, D, rng=np.random.default_rng(seed + 1), init="normal", norm="ln",
                              dtype=np.float64)
    losses = []
    for _ in range(steps):
        x = kmeans.normalize(token_batch(data_rng, batch)[0], "ln")  # (batch, H, T, D)
        losses.append(kmeans.commitment_loss(x, state["means"], commitment=1.0))
        state, _ = kmeans.kmeans_step(state, x, ema_decay=decay, norm="ln")
    return np.array(losses)  # (steps,)


SWEEP_LOSSES = {}  # (decay, batch) -> losses, kept for the printout below
SWEEP_RESULT = []  # the last (table, fastest), so that the printout does not run the sweep again


def sweep(decays, batch_sizes):
    """Steps until a 5-step running mean of the loss is within 5% of the best floor of all runs."""
    for decay in decays:
        for batch in batch_sizes:
            SWEEP_LOSSES[decay, batch] = losses_of(decay, batch)
    floor = min(np.mean(losses[-20:]) for losses in SWEEP_LOSSES.values())
    table = np.full((len(decays), len(batch_sizes)), np.inf)  # (decays, batch sizes)
    for i, decay in enumerate(decays):
        for j, batch in enumerate(batch_sizes):
            smooth = np.convolve(SWEEP_LOSSES[decay, batch], np.ones(5) / 5, mode="valid")  # (steps - 4,)
            hit = np.nonzero(smooth <= 1.05 * floor)[0]
            if len(hit):
                table[i, j] = hit[0] + 5  # the step at which the 5-step window that first gets there ends
    i, j = np.unravel_index(np.argmin(table), table.shape)
    SWEEP_RESULT[:] = [table, (decays[i], batch_sizes[j])]
    return table, (decays[i], batch_sizes[j])


DECAYS = (0.9, 0.99, 0.999)
BATCH_SIZES = (1, 2, 4, 8)

results = [
    report("Exercise 1.1", ex01.check_bias_correction, ema_step_corrected),
    report("Exercise 1.2", ex01.check_restart, step_with_restart),
    report("Exercise 1.3", ex01.check_sweep, sweep, DECAYS, BATCH_SIZES),
]

table, fastest = SWEEP_RESULT or sweep(DECAYS, BATCH_SIZES)
print(f"\nsteps to converge ({STEPS} steps at most; inf = never), rows λ, columns batch size:")
print("      " + "".join(f"{b:>8d}" for b in BATCH_SIZES))
for decay, row in zip(DECAYS, table):
    print(f"{decay:6.3f}" + "".join(f"{v:8.0f}" for v in row))
print("points seen to converge (steps x batch):")
for decay, row in zip(DECAYS, table * np.array(BATCH_SIZES)):
    print(f"{decay:6.3f}" + "".join(f"{v:8.0f}" for v in row))
print("peak loss of each run:", {key: round(float(v.max()), 1) for key, v in SWEEP_LOSSES.items()})
print("fastest in steps:", fastest)
# One good answer: a smaller λ converges in fewer steps, because it forgets the random start sooner.  With
# λ = 0.99 a larger batch also converges in fewer steps: more points per cluster per step make the step-1
# overshoot λ / ((1 - λ) N_c) smaller.  With λ = 0.9 the batch size hardly matters in steps, so per point seen
# small batches are the cheapest.  λ = 0.999 is slow because without bias correction the initial sum fades only
# as λ^t (about 1000 steps), and its first steps overshoot hugely: with batch 1 the peak loss is thousands of
# times the floor.

sys.exit(0 if all(r is True for r in results) else 1)

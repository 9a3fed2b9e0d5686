"""Checks for the exercises of tutorial 01 (online k-means, the router).

Each check builds its own small data, runs the student's function on it and
compares with rt_numpy.kmeans or with properties that any right answer has.
"""
import numpy as np

from rt_numpy import kmeans


def _unit(degrees):
    """Unit vectors at the given angles in degrees: (...,) -> (..., 2)."""
    angle = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def _arc(rng, center, m, half_width):
    """m unit vectors at angles uniform in [center - half_width, center + half_width] degrees: (m, 2)."""
    return _unit(center + rng.uniform(-half_width, half_width, m))


def _smoothed(n, eps):
    """Laplace-smoothed counts, as kmeans.update_state divides by them: (..., K) -> (..., K)."""
    total = n.sum(axis=-1, keepdims=True)
    K = n.shape[-1]
    return (n + eps) / (total + K * eps) * total


# ----------------------------------------------------------------------------------- Exercise 1.1
def check_bias_correction(ema_step_corrected):
    """``ema_step_corrected(means, counts, sums, x, decay, t)`` -> ``(means, counts, sums, counts_hat)``.

    Run from zero-started statistics on points in a 120° arc, with one centroid (180°) that no point
    ever reaches, for two decays.
    """
    for decay in (0.9, 0.99):
        rng = np.random.default_rng(11)
        means = _unit([0, 30, -40, 180])  # (K, 2); the last one faces away from every point
        K = len(means)
        counts, sums = np.zeros(K), np.zeros((K, 2))  # the running EMAs start at zero
        ref = {"means": means[None], "counts": counts[None], "sums": sums[None]}  # the library's EMA, H = 1
        for t in range(1, 21):
            x = _arc(rng, 0, 32, 60)  # (M, 2)
            stats = kmeans.cluster_stats(x[None, None], means[None])  # assignments with the centroids of this step
            ref = kmeans.update_state(ref, stats, ema_decay=decay)  # counts and sums: the plain EMA
            n, s = ref["counts"][0], ref["sums"][0]  # (K,), (K, D)
            out = ema_step_corrected(means.copy(), counts.copy(), sums.copy(), x.copy(), decay, t)
            assert isinstance(out, tuple) and len(out) == 4, \
                "return a tuple of four arrays: (means, counts, sums, counts_hat)"
            new_means, counts, sums, counts_hat = (np.asarray(v, dtype=float) for v in out)
            for name, value, shape in (("means", new_means, (K, 2)), ("counts", counts, (K,)),
                                       ("sums", sums, (K, 2)), ("counts_hat", counts_hat, (K,))):
                assert value.shape == shape, f"{name} should have shape {shape}, got {value.shape}"
                assert np.all(np.isfinite(value)), \
                    f"{name} has a NaN or an infinity at step t={t} (λ={decay}): is t counted from 1?"
            assert np.allclose(counts, n, rtol=1e-10, atol=1e-12) and np.allclose(sums, s, rtol=1e-10, atol=1e-12), (
                f"at step t={t} (λ={decay}) the returned counts and sums are not the plain running averages "
                "n ← λn + (1−λ)N and s ← λs + (1−λ)Σ: keep them uncorrected (the next step builds on them) "
                "and apply the 1 − λᵗ correction only when you compute the centroids and counts_hat")
            assert np.allclose(counts_hat, n / (1 - decay**t), rtol=1e-10, atol=1e-12), (
                f"counts_hat at step t={t} (λ={decay}) should be n / (1 − λᵗ): did you forget the correction, "
                "or count t from 0?")
            received = n > 0  # (K,) clusters that have had at least one point
            if t == 1:
                batch_mean = stats["sums"][0, 0] / np.maximum(stats["counts"][0, 0], 1)[:, None]  # (K, D)
                assert np.allclose(new_means[received], batch_mean[received], rtol=1e-4, atol=1e-6), (
                    f"after the first step (λ={decay}) a centroid that received points should be exactly the "
                    f"mean of its points, {batch_mean[received].round(4).tolist()}, with no overshoot; "
                    f"got {new_means[received].round(4).tolist()}")
            expected = np.where(received[:, None],
                                (s / (1 - decay**t)) / _smoothed(n / (1 - decay**t), 1e-5)[:, None], means)
            assert np.array_equal(new_means[~received], means[~received]), (
                "a cluster that has received no point yet must keep its centroid (its corrected sum is 0, so "
                "s / ñ would make it the zero vector)")
            assert np.allclose(new_means, expected, rtol=1e-4, atol=1e-8), (
                f"the centroids at step t={t} (λ={decay}) should be ŝ / ñ with ŝ = s / (1 − λᵗ) and ñ the "
                f"smoothed n / (1 − λᵗ); expected {expected.round(4).tolist()}, got {new_means.round(4).tolist()}")
            norms = np.linalg.norm(new_means, axis=-1)
            assert np.all(norms <= 1 + 1e-4), (
                f"a centroid is longer than the unit vectors it averages (norms {norms.round(4)}): "
                "the overshoot is still there")
            means = new_means


# ----------------------------------------------------------------------------------- Exercise 1.2
def check_restart(step_with_restart):
    """``step_with_restart(state, points, rng, ema_decay)`` -> new state, on two heads of 2-D arcs.

    Head 0 sees points within 40° of 0°, with centroids at 0°, 20°, 80° and 200°; head 1 is the same
    picture turned by 90°.  The centroid at 200° (290° for head 1) never wins a point without a restart.
    """
    decay, steps, last = 0.9, 30, 10
    data_rng, student_rng = np.random.default_rng(21), np.random.default_rng(22)
    state = kmeans.state_from_means(np.stack([_unit([0, 20, 80, 200]), _unit([90, 110, 170, 290])]))  # (H, K, 2)
    H, K, _ = state["means"].shape
    received = []
    for step in range(steps):
        points = np.stack([_arc(data_rng, 0, 64, 40), _arc(data_rng, 90, 64, 40)])[None]  # (B=1, H, T, 2)
        before = {k: v.copy() for k, v in state.items()}
        plain, stats = kmeans.kmeans_step(state, points, ema_decay=decay, norm="l2")  # the step without restarts
        got = stats["counts"][0]  # (H, K) points each cluster received in this step
        received.append(got)
        new = step_with_restart(state, points.copy(), student_rng, decay)
        assert isinstance(new, dict), f"return the new state (a dict), got a {type(new).__name__}"
        try:
            kmeans.check_state(new)
        except (TypeError, ValueError, KeyError) as error:
            raise AssertionError(f"the returned state is not a valid k-means state: {error}") from None
        assert new["means"].shape == (H, K, 2), f"means should stay (H, K, D) = {(H, K, 2)}, got {new['means'].shape}"
        assert all(np.array_equal(state[k], before[k]) for k in state), \
            "the input state was changed in place: build new arrays (the library never changes its inputs)"
        dead = got == 0  # (H, K)
        alive = ~dead
        assert np.allclose(new["means"][alive], plain["means"][alive], rtol=1e-5, atol=1e-8), (
            f"step {step}: a cluster that received points should move exactly as kmeans_step moves it; "
            "restart only the clusters that received none")
        for h, c in zip(*np.nonzero(dead)):
            distance = np.abs(points[0, h] - new["means"][h, c]).max(axis=-1)  # (T,)
            assert distance.min() < 1e-12, (
                f"step {step}: cluster {c} of head {h} received no point, so it should be re-seeded as one of "
                f"head {h}'s points of this batch; its centroid is {new['means'][h, c].round(4)}")
        consistent = new["sums"] / _smoothed(new["counts"], 1e-5)[..., None]  # (H, K, D), what the next update uses
        assert np.allclose(new["means"], consistent, rtol=1e-4, atol=1e-6), (
            f"step {step}: means ≠ sums / ñ(counts) after your restart, so the next update will undo it "
            "(the sums still hold the old centroid). Set the restarted cluster's sums (and counts) to match")
        norms = np.linalg.norm(new["means"], axis=-1)
        assert norms.max() < 10, f"step {step}: a centroid exploded (norms {norms.round(1)})"
        state = new
    late = np.array(received[-last:])  # (last, H, K)
    stuck = np.argwhere(late.min(axis=0) == 0)
    assert not len(stuck), (
        f"in the last {last} of {steps} steps, cluster(s) {[tuple(map(int, hc)) for hc in stuck]} (head, cluster) "
        "still had steps with no point: a restarted centroid should win points from then on")


# ----------------------------------------------------------------------------------- Exercise 1.3
def check_sweep(sweep, decays, batch_sizes):
    """``sweep(decays, batch_sizes)`` -> ``(table, fastest)``; checks the form and the consistency only.

    ``table[i, j]`` is the student's measure of how long the run with ``decays[i]`` and
    ``batch_sizes[j]`` takes to converge (lower is faster; ``inf`` for never within the budget), and
    ``fastest`` is the ``(decay, batch_size)`` pair that the table says is fastest.
    """
    out = sweep(list(decays), list(batch_sizes))
    assert isinstance(out, tuple) and len(out) == 2, "return a pair: (table, fastest)"
    table, fastest = out
    table = np.asarray(table, dtype=float)
    shape = (len(decays), len(batch_sizes))
    assert table.shape == shape, (
        f"table should have shape (len(decays), len(batch_sizes)) = {shape}, got {table.shape}: one row per "
        "decay, one column per batch size")
    assert not np.any(np.isnan(table)), "the table holds NaN: use np.inf for a run that never converged"
    assert np.all(table > 0), "the table should hold a positive cost (steps, or points seen): lower is faster"
    assert np.isfinite(table).any(), "no run converged within your budget: give it more steps, or a looser target"
    assert isinstance(fastest, tuple) and len(fastest) == 2, "fastest should be a pair (decay, batch_size)"
    decay, batch = fastest
    assert decay in decays and batch in batch_sizes, (
        f"fastest = {fastest} is not on the grid: decays {list(decays)}, batch sizes {list(batch_sizes)}")
    i, j = list(decays).index(decay), list(batch_sizes).index(batch)
    assert table[i, j] == table.min(), (
        f"your own table says otherwise: {fastest} costs {table[i, j]}, but the smallest entry is {table.min()} "
        f"at {[(decays[a], batch_sizes[b]) for a, b in np.argwhere(table == table.min())]}")

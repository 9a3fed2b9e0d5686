"""Checks for tutorial 06, the family of content-based sparse attention.

Each check compares the answer with the library (rt_numpy.baselines, rt_numpy.attention,
rt_numpy.causality) or with a property, never with stored numbers.
"""
import numpy as np

from rt_numpy import attention, baselines, causality, kmeans


def check_strided_mask(strided_mask):
    """Exercise 6.1: ``strided_mask(T, S)`` equals the strided visibility for several T and S."""
    for T, S in ((12, 3), (13, 4), (10, 1), (7, 7), (5, 9), (96, 4)):
        got = np.asarray(strided_mask(T, S))
        assert got.shape == (T, T), f"strided_mask({T}, {S}) has shape {got.shape}, expected ({T}, {T})"
        want = baselines.visibility("strided", T, stride=S) > 0
        wrong = np.argwhere(got.astype(bool) != want)
        if len(wrong):
            i, j = (int(n) for n in wrong[0])
            if j > i:
                why = f"query {i} must not see the later key {j} (causal: j <= i)"
            elif want[i, j]:
                why = f"query {i} should see key {j}: i - j = {i - j} is a multiple of S = {S}"
            else:
                why = f"query {i} should not see key {j}: i - j = {i - j} is not a multiple of S = {S}"
            raise AssertionError(f"strided_mask({T}, {S}): {why} ({len(wrong)} entries differ)")


def _measured_keys(kind, T, L, W):
    """Mean keys per query of a mask built by the library (routing: K = T / W disjoint windows)."""
    if kind == "dense":
        counts = baselines.visibility("dense", T)
    elif kind == "local":
        counts = baselines.visibility("local", T, block_size=L)
    elif kind == "strided":
        counts = baselines.visibility("strided", T, stride=T // W)
    else:
        order = np.random.default_rng(T + W).permutation(T)  # any partition into windows of W
        windows = np.sort(order.reshape(1, 1, T // W, W), axis=-1)  # (1, 1, K, W)
        counts = baselines.visibility("routing", T, windows=windows)
    return baselines.keys_per_query(counts)


def check_formula_keys(formula_keys):
    """Exercise 6.2: the formulas of docs/algorithm.md#73-the-budget equal the counted keys per query."""
    for T, L, W in ((96, 8, 24), (1152, 32, 96), (64, 16, 16), (40, 5, 8)):
        for kind in ("dense", "local", "strided", "routing"):
            got = float(formula_keys(kind, T, L, W))
            want = _measured_keys(kind, T, L, W)
            hint = {"local": " Blocks after the first see L + (L + 1) / 2 keys on average; the first block sees "
                             "only (L + 1) / 2.",
                    "strided": " Query i sees i // S + 1 keys.",
                    "routing": " In a window of W sorted positions, the r-th member sees r + 1 keys.",
                    "dense": " Query i sees i + 1 keys."}[kind]
            assert abs(got - want) < 1e-9 * max(1.0, want), (
                f"formula_keys({kind!r}, T={T}, L={L}, W={W}) = {got:.4f}, but the mask has {want:.4f} keys per "
                f"query on average.{hint}")


def check_lsh_leak(lsh_leak, q, v, rot, chunk_size):
    """Exercise 6.3: a change after position i that moves the LSH outputs at positions <= i."""
    i, q_later = lsh_leak(q, v, rot, chunk_size)
    i, q_later = int(i), np.asarray(q_later, dtype=q.dtype)
    T = q.shape[0]
    assert q_later.shape == q.shape, f"q_later has shape {q_later.shape}, expected {q.shape}"
    assert 0 <= i < T - 1, f"i must be in 0..{T - 2}, so that there is a position after it; got {i}"
    assert np.array_equal(q_later[:i + 1], q[:i + 1]), (
        f"q_later must equal q at positions 0..{i}: a leak is a change of the past caused by the future only")
    assert not np.array_equal(q_later[i + 1:], q[i + 1:]), f"q_later is q: change something after position {i}"

    def run(x):
        return baselines.lsh_attention(x[None, None], None, v[None, None], rot, window_size=chunk_size)[0, 0]

    before, after = run(q), run(q_later)
    moved = np.abs(after[:i + 1] - before[:i + 1]).max()
    assert moved > 1e-6 * np.abs(before).max(), (
        f"the outputs at positions <= {i} did not change (largest change {moved:.1e}). The later change must put "
        f"a token into another bucket, so that the sorted order and the chunk boundaries shift.")

    def visible(x):
        buckets = baselines.lsh_buckets(kmeans.normalize(x[None, None]), rot)  # (1, 1, rounds, T)
        return baselines.visibility("lsh", T, chunks=baselines.lsh_chunks(buckets, chunk_size))[0, 0]

    assert not np.triu(visible(q_later), 1).any(), "a later key became visible: that should never happen in LSH"
    assert not np.array_equal(visible(q)[:i + 1, :i + 1], visible(q_later)[:i + 1, :i + 1]), (
        "the outputs changed but no earlier query's visible earlier keys did: check the inputs you passed")


def _topics(T, D, rng):
    topic = rng.choice(4, size=T)  # (T,)
    return 2.0 * rng.standard_normal((4, D))[topic] + rng.standard_normal((T, D))  # (T, D)


def check_query_clustering(clustered_attention, is_causal):
    """Exercise 6.4: one cluster is dense attention; no weight on later keys; the verdict agrees with certify."""
    rng = np.random.default_rng(64)
    T, D = 32, 4
    q, k, v = _topics(T, D, rng), rng.standard_normal((T, D)), rng.standard_normal((T, D))
    one = np.asarray(clustered_attention(q, k, v, 1))
    assert one.shape == (T, D), f"clustered_attention(q, k, v, 1) has shape {one.shape}, expected {(T, D)}"
    dense = attention.dense_causal_attention(q[None, None], k[None, None], v[None, None])[0, 0]
    assert np.allclose(one, dense, rtol=1e-8, atol=1e-10), (
        "with one cluster every key is in the query's cluster: the output should be dense causal attention "
        "with logits q . k / sqrt(D)")
    x = _topics(T, D, rng)
    weights = np.asarray(clustered_attention(x, x, np.eye(T), 3))  # v = identity: out[i, j] is i's weight on j
    assert weights.shape == (T, T), f"with v of shape ({T}, {T}) the output should be ({T}, {T}), got {weights.shape}"
    assert np.abs(np.triu(weights, 1)).max() < 1e-12, "a query gave weight to a later key: keep j <= i"
    assert weights.min() > -1e-12 and np.allclose(weights.sum(axis=1), 1.0), (
        "with k = q each query is in its own key's cluster, so each row of weights should be >= 0 and sum to 1")
    assert is_causal in (True, False), f"is_causal must be True or False, got {is_causal!r}"
    y = _topics(T, D, rng)
    vy = rng.standard_normal((T, D))
    cert = causality.certify(lambda x: clustered_attention(x, x, vy, 4), y, rng=np.random.default_rng(0),
                             time_axis=0, n_positions=12)
    assert cert.passed == is_causal, (
        f"you say is_causal = {is_causal}, but causality.certify finds: {cert}. Which inputs do the "
        f"centroids depend on?")

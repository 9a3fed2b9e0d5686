"""Hostile input at the public boundary: each class of bad argument gets a TypeError or ValueError that
names the parameter and the value, before anything is computed or allocated.

1. model.forward / loss: params, kmeans_states and ids that do not fit the config (check_params,
   check_kmeans_states, check_ids), also inside autograd.
2. Absurd sizes: Config relations, init_params, forward, and the data helpers refuse a request whose
   arrays would not fit in memory (_checks.allocation), with the memory limit fixed by monkeypatch so
   that the tests do not depend on the machine.
3. rt_numpy.ops primitives and rt_numpy.data helpers: non-arrays, wrong dtypes, shapes, axes, sizes.
"""
import autograd
import numpy as np
import pytest

from rt_numpy import _checks, data, model, ops

CFG = model.Config(vocab_size=32, seq_len=16, width=16, n_layers=2, num_heads=2, n_route_heads=1,
                   n_route_layers=1, num_clusters=2, window_size=8, block_size=8)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    params, states = model.init_params(CFG, rng), model.init_kmeans(CFG, rng)
    ids = rng.integers(0, CFG.vocab_size, (2, CFG.seq_len))
    return params, states, ids


@pytest.fixture
def small_memory(monkeypatch):
    """A memory limit of 1 GiB, whatever the machine has."""
    monkeypatch.setattr(_checks, "memory_limit", lambda: _checks.GiB)


# --------------------------------------------------------------------------- 1. the model's entry checks
def with_param(params, name, value):
    return {**params, name: value}


def nan_at(a, index):
    a = a.copy()
    a[index] = np.nan
    return a


@pytest.mark.parametrize("change, error, match", [
    (lambda p: with_param(p, "wte", np.zeros((33, 16), np.float32)), ValueError,
     r"params\['wte'\] must have shape \(32, 16\) for this config, got \(33, 16\)"),
    (lambda p: with_param(p, "wte", nan_at(p["wte"], (3, 4))), ValueError,
     r"params\['wte'\] contains NaN or infinity: got nan at index \(3, 4\)"),
    (lambda p: with_param(p, "h1.mlp.b_in", np.full(64, np.inf, np.float32)), ValueError,
     r"params\['h1.mlp.b_in'\] contains NaN or infinity: got inf"),
    (lambda p: with_param(p, "ln_f.g", p["ln_f.g"].astype(np.float64)), TypeError,
     r"params\['ln_f.g'\] must have dtype float32 \(cfg.dtype\), got float64"),
    (lambda p: with_param(p, "ln_f.b", [0.0] * 16), TypeError, r"params\['ln_f.b'\] must be an array, got list"),
    (lambda p: {k: v for k, v in p.items() if k != "h0.attn.w_q"}, ValueError, r"missing \['h0.attn.w_q'\]"),
    (lambda p: with_param(p, "lm_head", np.zeros((16, 32), np.float32)), ValueError,
     r"not in the config \['lm_head'\]"),
    (lambda p: list(p.values()), TypeError, "params must be a dict"),
])
def test_params_that_do_not_fit_the_config_are_named(setup, change, error, match):
    params, states, ids = setup
    with pytest.raises(error, match=match):
        model.forward(change(params), ids, CFG, states)
    with pytest.raises(error, match=match):  # loss goes through the same check
        model.loss(change(params), ids, ids, CFG, states)


def test_kmeans_states_of_another_config_are_refused(setup):
    params, states, ids = setup
    other_k = model.init_kmeans(model.Config(**{**CFG.to_dict(), "num_clusters": 4}), np.random.default_rng(1))
    with pytest.raises(ValueError, match=r"kmeans_states\['h1'\]\['means'\] must have shape \(1, 2, 8\) "
                                         r"for this config, got \(1, 4, 8\)"):
        model.forward(params, ids, CFG, other_k)
    two_layers = model.init_kmeans(model.Config(**{**CFG.to_dict(), "n_route_layers": 2}), np.random.default_rng(1))
    with pytest.raises(ValueError, match=r"states for \['h0'\], which are not routing layers"):
        model.forward(params, ids, CFG, two_layers)
    with pytest.raises(ValueError, match=r"no state for routing layers \['h1'\]"):
        model.forward(params, ids, CFG, {})
    bad = {"h1": {**states["h1"], "means": nan_at(states["h1"]["means"], (0, 1, 2))}}
    with pytest.raises(ValueError, match=r"kmeans_states\['h1'\]\['means'\] contains NaN .* index \(0, 1, 2\)"):
        model.forward(params, ids, CFG, bad)
    with pytest.raises(TypeError, match="kmeans_states must be a dict"):
        model.forward(params, ids, CFG, None)


@pytest.mark.parametrize("ids, targets, error, match", [
    (np.zeros((2, 16)), None, TypeError, "ids must be an integer array"),
    (np.zeros((2, 17), int), None, ValueError, r"1 <= T <= seq_len=16, got T=17"),
    (np.full((2, 16), 32), None, ValueError, r"ids must lie in \[0, vocab_size=32\), got values in \[32, 32\]"),
    (np.zeros((2, 16), int), np.zeros((2, 15), int), ValueError, r"targets must have the shape of ids \(2, 16\)"),
    (np.zeros((2, 16), int), np.full((2, 16), -1), ValueError, r"targets must lie in \[0, vocab_size=32\)"),
    (np.zeros((2, 16), int), np.zeros((2, 16), bool), TypeError, "targets must be an integer array"),
])
def test_bad_ids_and_targets_of_loss(setup, ids, targets, error, match):
    params, states, _ = setup
    with pytest.raises(error, match=match):
        model.loss(params, ids, ids if targets is None else targets, CFG, states)


def test_forward_checks_rng_and_trace(setup):
    params, states, ids = setup
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got 0"):
        model.forward(params, ids, CFG, states, rng=0)
    with pytest.raises(TypeError, match="trace must be a dict or None, got list"):
        model.forward(params, ids, CFG, states, trace=[])
    with pytest.raises(TypeError, match="cfg must be a model.Config, got dict"):
        model.forward(params, ids, CFG.to_dict(), states)


def test_entry_checks_look_through_autograd_and_name_the_parameter(setup):
    params, states, ids = setup

    def objective(p):
        return model.loss(p, ids, ids, CFG, states)[0]

    grads = autograd.grad(objective)(params)  # the checks see ArrayBoxes (and a DictBox) here
    assert set(grads) == set(params) and all(np.isfinite(g).all() for g in grads.values())
    with pytest.raises(ValueError, match=r"params\['h0.attn.w_v'\] contains NaN"):
        autograd.grad(objective)(with_param(params, "h0.attn.w_v", nan_at(params["h0.attn.w_v"], (0, 0))))


def test_finite_arrays_tells_overflow_from_nan():
    """Huge finite values overflow the float64 sum only with infinities, so the full scan finds nothing."""
    big = np.full(4, np.finfo(np.float64).max)
    _checks.finite_arrays({"a": big, "b": big})  # the sum is inf, every entry finite: accepted
    with pytest.raises(ValueError, match=r"^b contains NaN or infinity: got -inf at index \(2,\)"):
        _checks.finite_arrays({"a": np.ones(3), "b": np.array([1.0, 2.0, -np.inf])})


# --------------------------------------------------------------------------- 2. absurd sizes
@pytest.mark.parametrize("fields, match", [
    (dict(num_clusters=10 ** 7), r"num_clusters must be <= seq_len=16, got 10000000"),
    (dict(look_back=3), r"look_back must be <= seq_len / block_size = 2, got 3"),
    (dict(window_size=32), r"window_size must be <= seq_len=16, got 32"),
    (dict(block_size=5), r"seq_len must be a multiple of block_size=5"),
    (dict(width=18, num_heads=4), r"width must be a multiple of num_heads=4, got 18"),
])
def test_config_checks_sizes_against_each_other(fields, match):
    with pytest.raises(ValueError, match=match):
        model.Config(**{**CFG.to_dict(), **fields})


def test_config_from_dict_needs_a_dict():
    with pytest.raises(TypeError, match="values must be a dict"):
        model.Config.from_dict([("width", 16)])


def test_init_params_refuses_a_model_that_cannot_fit(small_memory):
    cfg = model.Config(**{**CFG.to_dict(), "width": 2 ** 14, "num_heads": 2})
    with pytest.raises(ValueError, match=r"init_params: [\d,]+ parameters \(width=16384.*would need about "
                                         r"\d+(\.\d+)? GiB, more than the machine's memory \(1 GiB\)"):
        model.init_params(cfg, np.random.default_rng(0))


def test_forward_refuses_a_request_that_cannot_fit(setup, small_memory):
    """Many clusters on a long context: the distances alone (B, Hr, T, K) exceed the limit."""
    cfg = model.Config(vocab_size=32, seq_len=2 ** 15, width=16, n_layers=1, num_heads=2, n_route_heads=1,
                       n_route_layers=1, num_clusters=2 ** 13, window_size=8, block_size=8, pos_encoding="rotary")
    rng = np.random.default_rng(0)
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    assert model.forward_bytes(cfg, 1, 2 ** 15) > 4 * 2 ** 15 * 2 ** 13  # at least the distances, float32
    with pytest.raises(ValueError, match=r"forward of ids \(1, 32768\) \(num_clusters=8192.*would need about"):
        model.forward(params, np.zeros((1, 2 ** 15), np.int64), cfg, states)


def test_forward_bytes_grows_with_every_size():
    base = model.forward_bytes(CFG, 2, 16)
    assert model.forward_bytes(CFG, 4, 16) == 2 * base  # linear in B
    assert model.forward_bytes(CFG, 2, 16) > model.forward_bytes(CFG, 2, 8)
    more_k = model.Config(**{**CFG.to_dict(), "num_clusters": 8})
    assert model.forward_bytes(more_k, 2, 16) > base


@pytest.mark.parametrize("call, match", [
    (lambda: data.random_batches(np.zeros(1000, np.uint8), 10 ** 9, 64, np.random.default_rng(0)),
     r"random_batches\(batch_size=1000000000, seq_len=64\) would need about"),
    (lambda: next(data.document_batches([np.zeros(10, np.uint8)], 1, 10 ** 9)),
     r"document_batches\(batch_size=1, seq_len=1000000000\) would need about"),
    (lambda: data.recall_task(10 ** 8, 100, rng=np.random.default_rng(0)),
     r"recall_task\(batch_size=100000000, seq_len=100\) would need about"),
])
def test_data_refuses_requests_that_cannot_fit(call, match, small_memory):
    with pytest.raises(ValueError, match=match):
        call()


def test_eval_batches_counts_only_the_windows_there_are(monkeypatch):
    """A batch size above the number of windows costs only the windows: refused only when those do not fit."""
    monkeypatch.setattr(_checks, "memory_limit", lambda: 2 ** 20)  # 1 MiB
    few = np.zeros(10 * 64 + 1, np.uint8)  # 10 windows of 64
    assert len(next(data.eval_batches(few, 10 ** 9, 64))[0]) == 10
    with pytest.raises(ValueError, match=r"eval_batches\(batch_size=1000000000, seq_len=64\) would need about"):
        next(data.eval_batches(np.zeros(2 ** 12 * 65, np.uint8), 10 ** 9, 64))


def test_allocation_message_names_the_request_and_the_estimate():
    with pytest.raises(ValueError, match=r"^make\(n=3\) would need about 2 GiB, more than the limit given "
                                         r"\(1 GiB\): make the sizes smaller$"):
        _checks.allocation("make(n=3)", 2 * _checks.GiB, limit=_checks.GiB)
    assert _checks.allocation("make(n=3)", 10, limit=_checks.GiB) == 10
    assert _checks.memory_limit() > 0


# --------------------------------------------------------------------------- 3. ops and data
X = np.ones((2, 3))
X3 = np.ones((2, 3, 4))


@pytest.mark.parametrize("call, error, match", [
    (lambda: ops.add(X, [1.0]), TypeError, "add: b must be an array or a real number, got list"),
    (lambda: ops.multiply(X, np.ones(3, bool)), TypeError, "multiply: b must hold integers or floats, got dtype bool"),
    (lambda: ops.add(X, True), TypeError, "add: b must be an array or a real number, got bool"),
    (lambda: ops.add(X, np.bool_(True)), TypeError, "add: b must hold integers or floats, got dtype bool"),
    (lambda: ops.subtract(X, np.ones(4)), ValueError,
     r"subtract: a of shape \(2, 3\), b of shape \(4,\) do not broadcast"),
    (lambda: ops.divide(None, X), TypeError, "divide: a must be an array or a real number, got NoneType"),
    (lambda: ops.exp("a"), TypeError, "exp: x must be an array or a real number, got str"),
    (lambda: ops.gelu(np.array(["a"], object)), TypeError, "gelu: x must hold integers or floats, got dtype object"),
    (lambda: ops.scale(X, np.ones(3)), TypeError, "scale: c must be a constant number"),
    (lambda: ops.sum(X, axis=5), ValueError, r"sum: axis must be in \[-2, 1\] \(an array of 2 axes\), got 5"),
    (lambda: ops.sum(X, axis=(0, -2)), ValueError, "sum: axis must not repeat an axis"),
    (lambda: ops.mean(np.ones(0)), ValueError, "mean: no entries to average"),
    (lambda: ops.broadcast_to(X, (4,)), ValueError, r"broadcast_to: x of shape \(2, 3\), shape of shape \(4,\)"),
    (lambda: ops.broadcast_to(X, (1, 3)), ValueError, r"broadcast_to: x of shape \(2, 3\) does not broadcast to"),
    (lambda: ops.broadcast_to(X, (2, -3)), ValueError, r"broadcast_to: shape\[1\] must be >= 0, got -3"),
    (lambda: ops.broadcast_to(X, (2, 3.0)), TypeError, r"broadcast_to: shape\[1\] must be an integer"),
    (lambda: ops.unbroadcast(X, (4,)), ValueError, r"unbroadcast: g of shape \(2, 3\), shape of shape \(4,\)"),
    (lambda: ops.matmul(X, X), ValueError, r"matmul: a of shape \(2, 3\) and b of shape \(2, 3\) do not chain"),
    (lambda: ops.matmul([[1.0]], X), TypeError, "matmul: a must be an array, got list"),
    (lambda: ops.matmul(np.ones(3), X), ValueError, r"matmul: a must have at least 2 axes, got shape \(3,\)"),
    (lambda: ops.reshape(X, (7,)), ValueError, r"reshape: x of shape \(2, 3\) \(6 entries\) cannot take shape \(7,\)"),
    (lambda: ops.reshape(X, (-1, -1)), TypeError, "reshape: shape must be an int or a tuple of ints"),
    (lambda: ops.transpose(X, (0, 0)), ValueError, r"transpose: axes must be a permutation of the 2 axes"),
    (lambda: ops.transpose(X, (0, 5)), ValueError, r"transpose: axes must be in \[-2, 1\]"),
    (lambda: ops.split_heads(X, 1), ValueError, r"split_heads: x must have shape \(B, T, C\), got \(2, 3\)"),
    (lambda: ops.split_heads(X3, 2.0), TypeError, "split_heads: H must be an integer, got 2.0"),
    (lambda: ops.split_heads(X3, 0), ValueError, "split_heads: H must be >= 1, got 0"),
    (lambda: ops.merge_heads(X3), ValueError, r"merge_heads: x must have shape \(B, H, T, D\), got \(2, 3, 4\)"),
    (lambda: ops.merge_heads(None), TypeError, "merge_heads: x must be an array, got NoneType"),
    (lambda: ops.concatenate([]), TypeError, "concatenate: xs must be a non-empty list or tuple"),
    (lambda: ops.concatenate([X, X3]), ValueError, r"concatenate: xs\[1\] of shape \(2, 3, 4\) does not fit xs\[0\]"),
    (lambda: ops.concatenate([X, X], axis=5), ValueError, r"concatenate: axis must be in \[-2, 1\]"),
    (lambda: ops.slice_axis(X, 2, 1), ValueError,
     r"slice_axis: stop must be in \[2, 3\] \(start=2, x.shape\[1\]=3\), got 1"),
    (lambda: ops.slice_axis(X, -1, 2), ValueError, r"slice_axis: start must be in \[0, 3\]"),
    (lambda: ops.slice_axis(X, 0, 9), ValueError, r"slice_axis: stop must be in \[0, 3\]"),
    (lambda: ops.slice_axis(X, 0, 1, axis=5), ValueError, r"slice_axis: axis must be in \[-2, 1\]"),
    (lambda: ops.pad_axis(X, -1, 0), ValueError, "pad_axis: before must be >= 0, got -1"),
    (lambda: ops.pad_axis(X, 1.5, 0), TypeError, "pad_axis: before must be an integer, got 1.5"),
    (lambda: ops.softmax(np.ones((2, 0))), ValueError, r"softmax: logits of shape \(2, 0\) have nothing to normalise"),
    (lambda: ops.softmax(X, axis=2), ValueError, r"softmax: axis must be in \[-2, 1\]"),
    (lambda: ops.softmax([1.0]), TypeError, "softmax: logits must be an array, got list"),
    (lambda: ops.masked_fill(X, np.ones((2, 3), bool), "a"), TypeError, "masked_fill: value must be a real number"),
    (lambda: ops.masked_fill(X, None, 0.0), TypeError, "mask must be a boolean array"),
    (lambda: ops.cross_entropy(X, [0, 1]), TypeError, "cross_entropy: targets must be an integer array, got list"),
    (lambda: ops.cross_entropy(np.ones((0, 3)), np.zeros(0, int)), ValueError,
     "cross_entropy: needs at least one target"),
    (lambda: ops.cross_entropy(np.float64(1.0), np.zeros((), int)), ValueError,
     "cross_entropy: logits must have at least 1 axes"),
    (lambda: ops.layer_norm(X, np.ones(4)), ValueError, r"layer_norm: gamma must have shape \(C,\) = \(3,\)"),
    (lambda: ops.layer_norm(X, beta=np.ones((1, 3))), ValueError, r"layer_norm: beta must have shape \(C,\)"),
    (lambda: ops.layer_norm(X, eps=-1.0), ValueError, r"layer_norm_free: eps must be > 0.0, got -1.0"),
    (lambda: ops.layer_norm(np.ones((2, 0))), ValueError, "layer_norm_free: x of shape .* has no entries"),
    (lambda: ops.l2_normalize(X, eps="a"), TypeError, "l2_normalize: eps must be a real number"),
    (lambda: ops.gather_rows(X, [0]), TypeError, "gather_rows: idx must be an integer array, got list"),
    (lambda: ops.gather_rows(np.ones(3), np.zeros(1, int)), ValueError, "gather_rows: x must have at least 2 axes"),
    (lambda: ops.scatter_add_rows(X, np.zeros(2, int), -1), ValueError, "scatter_add_rows: n must be >= 0, got -1"),
    (lambda: ops.scatter_add_rows(X, np.zeros(3, int), 2), ValueError,
     r"scatter_add_rows: idx must have shape y.shape\[:-1\]=\(2,\), got \(3,\)"),
])
def test_ops_name_the_function_and_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ops_take_numbers_numpy_scalars_and_shapes_of_any_integer_kind():
    """The checks' fast paths (arrays first, a tuple of ints) refuse nothing they took before."""
    np.testing.assert_array_equal(ops.add(X, np.float64(2.0)), X + 2.0)
    np.testing.assert_array_equal(ops.multiply(X, 3), X * 3)
    np.testing.assert_array_equal(ops.add(np.int64(1), X), 1 + X)
    np.testing.assert_array_equal(ops.broadcast_to(X[:1], [2, 3]), np.ones((2, 3)))
    np.testing.assert_array_equal(ops.broadcast_to(X[:1], (np.int64(2), 3)), np.ones((2, 3)))


D8 = np.arange(100, dtype=np.uint8)
RNG = np.random.default_rng(0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: data.decode(None), TypeError, "ids must be a 1-D integer array of token ids, got NoneType"),
    (lambda: data.decode(np.array([1.5])), TypeError, "ids must be an integer array of token ids, got dtype float64"),
    (lambda: data.python_corpus(True), TypeError, "max_bytes must be an integer, got True"),
    (lambda: data.enwik_corpus(max_bytes="a"), TypeError, "max_bytes must be an integer"),
    (lambda: data.enwik_corpus(5), TypeError, "path must be a str or a path, got int"),
    (lambda: data.enwik_corpus("/no/such/file.bz2"), FileNotFoundError, "path: no such file"),
    (lambda: data.load_corpus(None), ValueError, "name must be one of"),
    (lambda: data.split(None), TypeError, "data must be a 1-D integer array of token ids, got NoneType"),
    (lambda: data.split(np.zeros((4, 4), np.int64)), ValueError, r"data must be 1-D, got shape \(4, 4\)"),
    (lambda: data.split(np.zeros(0, np.uint8)), ValueError, "data must not be empty"),
    (lambda: data.split(D8, None), TypeError, "fractions must be a sequence of 3 numbers"),
    (lambda: data.split(D8, ("a", 0.5, 0.5)), TypeError, r"fractions\[0\] must be a real number"),
    (lambda: data.random_batches(D8, 1.5, 8, RNG), TypeError, "batch_size must be an integer, got 1.5"),
    (lambda: data.random_batches(D8, 2, -1, RNG), ValueError, "seq_len must be >= 1, got -1"),
    (lambda: data.random_batches(D8, 2, 8, None), TypeError, "rng must be a numpy.random.Generator"),
    (lambda: data.random_batches(np.ones(100), 2, 8, RNG), TypeError, "data must be an integer array"),
    (lambda: next(data.eval_batches(D8, 2, 1.5)), TypeError, "seq_len must be an integer, got 1.5"),
    (lambda: data.documents(np.ones(5) * 1.5, b"x"), TypeError, "data must be an integer array"),
    (lambda: data.documents(np.array([300]), b"x"), ValueError, r"data must hold byte values in \[0, 256\)"),
    (lambda: next(data.document_batches(None, 2, 8)), TypeError, "docs must be a list of 1-D token arrays"),
    (lambda: next(data.document_batches([D8, None], 2, 8)), TypeError, r"docs\[1\] must be a 1-D integer array"),
    (lambda: next(data.document_batches([D8], "a", 8)), TypeError, "batch_size must be an integer"),
    (lambda: data.bits_per_byte("a"), TypeError, "mean_nll_nats must be a number or a float array, got str"),
    (lambda: data.recall_task("a", 100, rng=RNG), TypeError, "batch_size must be an integer"),
    (lambda: data.recall_task(2, 100, rng=None), TypeError, "rng must be a numpy.random.Generator"),
    (lambda: data.recall_accuracy(None, np.zeros((2, 3)), np.ones((2, 3), bool)), TypeError,
     "logits_or_pred must be an array, got NoneType"),
    (lambda: data.recall_accuracy(np.zeros((2, 3)), np.zeros((2, 3)), np.full((2, 3), 2)), TypeError,
     "mask must be a bool array, got int64"),
    (lambda: data.image_batch(np.zeros(5, int)), ValueError, r"pixels must have shape \(B, T\)"),
    (lambda: data.image_batch(np.full((2, 3), 0.5)), TypeError, "pixels must be an integer array"),
    (lambda: data.image_batch(-np.ones((2, 3), int)), ValueError, r"pixels must lie in \[0, IMAGE_LEVELS=17\)"),
])
def test_data_helpers_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()

"""CuPy against NumPy: every primitive, the k-means functions, the kernels, the three attentions,
one training step, sampling and a checkpoint round trip.

Skipped as a whole where CuPy or a GPU is missing (the CPU suite needs neither).  On
a GPU machine ``python bench/gpu_check.py`` runs this file, then the timings.
tests/gpu/test_cuda_emulated.py checks the same CUDA sources on a CPU.
"""
import numpy as np
import pytest

from rt_numpy import backend

if not backend.cupy_available():
    pytest.skip("CuPy with a CUDA GPU is needed for the GPU tests", allow_module_level=True)

import autograd  # noqa: E402

from rt_numpy import attention, kmeans, model, ops, optim, sample, train  # noqa: E402
from rt_numpy.kernels import cupy_kmeans, cupy_routing  # noqa: E402

cp = backend.require_gpu()
F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-4, atol=2e-5)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _close(gpu, cpu, **tol):
    """Compare a tree of CuPy results with the NumPy one."""
    gpu, cpu = backend.to_numpy(gpu), backend.to_numpy(cpu)
    if isinstance(cpu, dict):
        assert set(gpu) == set(cpu)
        for key in cpu:
            _close(gpu[key], cpu[key], **tol)
    elif isinstance(cpu, (list, tuple)):
        assert len(gpu) == len(cpu)
        for a, b in zip(gpu, cpu):
            _close(a, b, **tol)
    else:
        np.testing.assert_allclose(np.asarray(gpu), np.asarray(cpu), **(tol or F64))


def test_arrays_are_on_the_gpu():
    x = backend.to_device(np.ones(3), "gpu")
    assert isinstance(x, cp.ndarray) and backend.device_of(x) == "gpu"
    assert backend.get_array_module(x) is cp
    assert isinstance(backend.to_device(x, "cpu"), np.ndarray)


# --------------------------------------------------------------------------- primitives
def _primitive_cases():
    rng = _rng(1)
    a, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((4, 5))
    pos = rng.uniform(0.5, 2.0, (3, 4, 5))
    m1, m2 = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 6))
    x4 = rng.standard_normal((2, 5, 8))  # (B, T, C)
    gather_idx = rng.integers(0, 4, size=(3, 7))  # rows of a (3, 4, 5) array, with repeats
    scatter_idx = rng.integers(0, 6, size=(3, 7))  # into 6 rows, some never named
    mask = rng.random((4, 5)) > 0.3
    targets = rng.integers(0, 5, size=(3, 4))
    return {
        "add": (ops.add, (a, b), {}), "subtract": (ops.subtract, (a, b), {}),
        "multiply": (ops.multiply, (a, b), {}), "divide": (ops.divide, (a, pos), {}),
        "scale": (lambda x: ops.scale(x, 0.3), (a,), {}),
        "sum": (lambda x: ops.sum(x, axis=(0, 2), keepdims=True), (a,), {}),
        "mean": (lambda x: ops.mean(x, axis=1), (a,), {}),
        "broadcast_to": (lambda x: ops.broadcast_to(x, (3, 4, 5)), (b,), {}),
        "exp": (ops.exp, (a,), {}), "log": (ops.log, (pos,), {}), "sqrt": (ops.sqrt, (pos,), {}),
        "square": (ops.square, (a,), {}), "tanh": (ops.tanh, (a,), {}), "gelu": (ops.gelu, (a,), {}),
        "matmul": (ops.matmul, (m1, m2), {}),
        "reshape": (lambda x: ops.reshape(x, (12, 5)), (a,), {}),
        "transpose": (lambda x: ops.transpose(x, (2, 0, 1)), (a,), {}),
        "split_heads": (lambda x: ops.split_heads(x, 4), (x4,), {}),
        "merge_heads": (lambda x: ops.merge_heads(ops.split_heads(x, 2)), (x4,), {}),
        "concatenate": (lambda x, y: ops.concatenate([x, ops.broadcast_to(y, (3, 4, 5))], axis=0), (a, b), {}),
        "slice_axis": (lambda x: ops.slice_axis(x, 1, 4, axis=2), (a,), {}),
        "pad_axis": (lambda x: ops.pad_axis(x, 2, 1, axis=1), (a,), {}),
        "softmax": (lambda x: ops.softmax(x, mask=MASK[0]), (a,), {"mask": mask}),
        "masked_fill": (lambda x: ops.masked_fill(x, MASK[0], -5e4), (a,), {"mask": mask}),
        "cross_entropy": (lambda x: ops.cross_entropy(x, TARGETS[0]), (a,), {"targets": targets}),
        "layer_norm_free": (lambda x: ops.layer_norm_free(x, 1e-6), (a,), {}),
        "layer_norm": (lambda x, g: ops.layer_norm(x, g, g), (a, b[0]), {}),
        "l2_normalize": (ops.l2_normalize, (a,), {}),
        "gather_rows": (lambda x: ops.gather_rows(x, IDX[0]), (a,), {"idx": gather_idx}),
        "scatter_add_rows": (lambda y: ops.scatter_add_rows(y, IDX[0], 6), (rng.standard_normal((3, 7, 5)),),
                             {"idx": scatter_idx}),
    }


MASK, TARGETS, IDX = [None], [None], [None]  # constants of the current case, on the current device


@pytest.mark.parametrize("name", sorted(_primitive_cases()))
def test_primitive_value_and_gradient_equal_numpy(name):
    fn, args, constants = _primitive_cases()[name]

    def run(device):
        MASK[0] = backend.to_device(constants.get("mask"), device) if "mask" in constants else None
        TARGETS[0] = backend.to_device(constants.get("targets"), device) if "targets" in constants else None
        IDX[0] = backend.to_device(constants.get("idx"), device) if "idx" in constants else None
        xs = backend.to_device(list(args), device)
        out = fn(*xs)
        g = backend.to_device(_rng(2).standard_normal(np.shape(backend.to_numpy(out))), device)
        grads = [autograd.grad(lambda *v: ops.sum(ops.multiply(fn(*v), g)), i)(*xs) for i in range(len(xs))]
        return out, grads

    _close(run("gpu"), run("cpu"))


def test_second_order_gradient_on_gpu():
    """A Hessian-vector product through GELU and softmax: VJPs built from primitives work on CuPy too."""
    x = _rng(3).standard_normal((4, 6))

    def f(x):
        return ops.sum(ops.multiply(ops.softmax(ops.gelu(x)), ops.gelu(x)))

    def hvp(x):
        return autograd.grad(lambda y: ops.sum(ops.multiply(autograd.grad(f)(y), ops.exp(y))))(x)

    _close(hvp(backend.to_device(x, "gpu")), hvp(x))


# --------------------------------------------------------------------------- k-means
def _points(B=2, H=3, T=200, D=16, K=5, dtype=np.float64, seed=4):
    rng = _rng(seed)
    points = kmeans.normalize(rng.standard_normal((B, H, T, D))).astype(dtype)
    means = kmeans.normalize(rng.standard_normal((H, K, D))).astype(dtype)
    return points, means


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cluster_stats_equal_numpy(dtype):
    points, means = _points(dtype=dtype)
    cpu = kmeans.cluster_stats([points, points[::-1]], means)  # Numba where it imports
    gpu = kmeans.cluster_stats(backend.to_device([points, points[::-1]], "gpu"), backend.to_device(means, "gpu"))
    np.testing.assert_array_equal(gpu["assignments"].get(), cpu["assignments"])
    np.testing.assert_array_equal(gpu["counts"].get(), cpu["counts"])
    _close(gpu["sums"], cpu["sums"], **(F64 if dtype == np.float64 else F32))


@pytest.mark.parametrize("update", kmeans.CENTROID_UPDATES)
def test_kmeans_step_and_commitment_equal_numpy(update):
    points, means = _points()
    state = kmeans.state_from_means(means)
    cpu = kmeans.kmeans_step(state, points, centroid_update=update, ema_decay=0.9, norm="l2")
    gpu = kmeans.kmeans_step(backend.to_device(state, "gpu"), backend.to_device(points, "gpu"), centroid_update=update,
                             ema_decay=0.9, norm="l2")
    _close(gpu[0], cpu[0])
    _close(kmeans.commitment_loss(backend.to_device(points, "gpu"), backend.to_device(means, "gpu")),
           kmeans.commitment_loss(points, means))


def test_init_state_from_data_on_gpu():
    points, _ = _points()
    cpu = kmeans.init_state(3, 5, 16, rng=_rng(5), init="data", points=points)
    gpu = kmeans.init_state(3, 5, 16, rng=_rng(5), init="data", points=backend.to_device(points, "gpu"))
    _close(gpu, cpu)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,W", [(1, 1), (9, 9), (1000, 31), (4096, 64), (1500, 1500)])
def test_top_w_kernel_equals_reference(dtype, T, W):
    scores = _rng(T).standard_normal((2, 3, 4, T)).astype(dtype)
    scores[0, 0, 0] = np.round(scores[0, 0, 0])  # ties: the lower position wins
    scores[1, 2, 3] = 0.0
    scores[1, 2, 3, ::2] = -0.0
    np.testing.assert_array_equal(cupy_kmeans.top_w_positions(cp.asarray(scores), W).get(),
                                  kmeans.top_w_reference(scores, W))


def test_balanced_membership_gpu_equals_numpy():
    points, means = _points(T=777)
    gpu = kmeans.balanced_membership(backend.to_device(points, "gpu"), backend.to_device(means, "gpu"), 50)
    ref = kmeans.balanced_membership(backend.to_device(points, "gpu"), backend.to_device(means, "gpu"), 50,
                                     impl="ref")
    np.testing.assert_array_equal(gpu.get(), kmeans.balanced_membership(points, means, 50, impl="ref"))
    np.testing.assert_array_equal(ref.get(), gpu.get())


# --------------------------------------------------------------------------- fused routing kernels
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("last_resort", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 256, 64, 4, 64), (1, 2, 600, 32, 3, 300), (1, 1, 50, 8, 2, 50)], ids=str)
def test_fused_routing_kernels_equal_reference(dtype, last_resort, shape):
    """The CUDA kernels against the NumPy reference and its autograd gradients (no Numba needed)."""
    B, H, T, D, K, W = shape
    rng = _rng(6)
    q, k, v, g = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))
    means = kmeans.normalize(rng.standard_normal((H, K, D))).astype(dtype)
    qw = kmeans.balanced_membership(kmeans.normalize(q), means, W, impl="ref")
    kw = kmeans.balanced_membership(kmeans.normalize(k), means, W, impl="ref")
    scale, eps = 0.125, 1e-2
    self_attend = "last_resort" if last_resort else "allow"

    def reference(q, k, v):
        return attention.cluster_attention_reference(q, k, v, qw, kw, scale=scale, self_attend=self_attend,
                                                     combine_eps=eps)

    grads = autograd.grad(lambda qkv: ops.sum(ops.multiply(reference(*qkv), g)))((q, k, v))
    tol = F64 if dtype == np.float64 else dict(rtol=1e-3, atol=1e-4)
    on_gpu = backend.to_device((q, k, v, qw, kw), "gpu")
    _close(cupy_routing.forward(*on_gpu, scale, last_resort, eps), reference(q, k, v), **tol)
    _close(cupy_routing.backward(cp.asarray(g), *on_gpu, scale, last_resort, eps), grads, **tol)


def test_fused_routing_is_deterministic():
    rng = _rng(7)
    q, v = (cp.asarray(rng.standard_normal((1, 2, 512, 64)).astype(np.float32)) for _ in range(2))
    means = cp.asarray(kmeans.normalize(rng.standard_normal((2, 8, 64))).astype(np.float32))
    w = kmeans.balanced_membership(kmeans.normalize(q), means, 128)
    runs = [cupy_routing.backward(q, q, q, v, w, w, 1.0, False, 1e-2) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert bool((a == b).all())


# --------------------------------------------------------------------------- attentions
@pytest.mark.parametrize("kind", ["dense", "local", "routing", "routing-ref", "routing-separate", "nearest"])
def test_attention_value_and_gradient_equal_numpy(kind):
    rng = _rng(8)
    B, H, T, D, K, W = 2, 2, 64, 16, 4, 16
    q, k, v, g = (rng.standard_normal((B, H, T, D)) for _ in range(4))
    means = kmeans.normalize(rng.standard_normal((H, K, D)))

    def f(q, k, v, means, g, impl):
        if kind == "dense":
            out = attention.dense_causal_attention(q, k, v, self_attend="last_resort")
        elif kind == "local":
            out = attention.local_attention(q, k, v, block_size=16)
        else:
            out, loss, _ = attention.routing_attention(
                q, k, v, means, window_size=W, shared_qk=kind != "routing-separate",
                membership="nearest" if kind == "nearest" else "balanced", impl=impl)
            out = ops.add(out, ops.scale(ops.broadcast_to(loss, out.shape), 1.0))
        return ops.sum(ops.multiply(out, g))

    impl_gpu = "ref" if kind == "routing-ref" else "auto"
    cpu = autograd.value_and_grad(lambda qkv: f(*qkv, means, g, "auto"))((q, k, v))
    args = backend.to_device((q, k, v, means, g), "gpu")
    gpu = autograd.value_and_grad(lambda qkv: f(*qkv, *args[3:], impl_gpu))(args[:3])
    _close(gpu, cpu)


# --------------------------------------------------------------------------- model and training
def _tiny(dtype="float64"):
    cfg, tcfg = train.PRESETS["tiny"]
    import dataclasses

    return dataclasses.replace(cfg, dtype=dtype), tcfg


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_one_training_step_equals_cpu(dtype):
    cfg, tcfg = _tiny(dtype)
    rng = _rng(9)
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    opt = optim.adamw_init(params)
    seq = rng.integers(0, 256, size=(tcfg.batch_size, cfg.seq_len + 1))
    x, y = seq[:, :-1], seq[:, 1:]
    cpu = train.train_step(params, opt, states, x, y, cfg, tcfg, 3, _rng(10))
    gpu = train.train_step(*backend.to_device((params, opt, states), "gpu"), x, y, cfg, tcfg, 3, _rng(10))
    # Adam divides by sqrt(v): parameters move by about lr whatever the gradient's size, so compare
    # with an absolute tolerance well below lr = 3e-3.
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == "float64" else dict(rtol=1e-3, atol=1e-5)
    _close(gpu[:3], cpu[:3], **tol)
    for key in ("loss", "cross_entropy", "commitment", "grad_norm"):
        np.testing.assert_allclose(gpu[3][key], cpu[3][key], rtol=1e-9 if dtype == "float64" else 1e-4)


def test_checkpoint_round_trip_and_resume_on_gpu(tmp_path):
    cfg, tcfg = _tiny()
    import dataclasses

    tcfg = dataclasses.replace(tcfg, steps=4)
    corpus = {name: np.frombuffer(bytes(range(256)) * 8, dtype=np.uint8) for name in ("train", "val", "test")}
    whole = train.train(cfg, tcfg, corpus=corpus, progress=False, device="gpu")
    train.train(cfg, tcfg, corpus=corpus, progress=False, device="gpu", out_dir=str(tmp_path), stop_at=2)
    saved = train.load_checkpoint(tmp_path / "checkpoint")
    assert all(isinstance(a, np.ndarray) for a in saved["params"].values())  # host arrays on disk
    resumed = train.train(cfg, tcfg, corpus=corpus, progress=False, device="gpu", resume=str(tmp_path / "checkpoint"))
    assert isinstance(resumed["params"]["wte"], cp.ndarray)
    _close(resumed["params"], whole["params"], rtol=1e-12, atol=1e-14)
    cpu = train.train(cfg, tcfg, corpus=corpus, progress=False, device="cpu")
    _close(whole["params"], cpu["params"], rtol=1e-8, atol=1e-10)


def test_greedy_sampling_equals_cpu():
    cfg, _ = _tiny()
    rng = _rng(11)
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    prompt = np.frombuffer(b"def f(x):", dtype=np.uint8).astype(np.int64)
    cpu = sample.generate(params, cfg, states, prompt, 20, rng=None, temperature=0.0)
    gpu = sample.generate(backend.to_device(params, "gpu"), cfg, backend.to_device(states, "gpu"), prompt, 20,
                          rng=None, temperature=0.0)
    np.testing.assert_array_equal(gpu, cpu)


def test_cli_trains_on_gpu(tmp_path):
    from rt_numpy.__main__ import main

    assert main(["train", "--preset", "tiny", "--steps", "3", "--device", "gpu", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoint.npz").exists()

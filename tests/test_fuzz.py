"""Fuzz suite (issue #25): hypothesis over every op and backend, argument errors, non-finite inputs,
``apply`` / ``remove``.

* every op on every backend (torch, flex, triton under ``TRITON_INTERPRET=1``) agrees with its dense
  masked reference (``kernels/*_ref.py``) over random valid shapes, 1D/2D/3D grids, dtypes, text
  placement and pattern parameters;
* any argument either works or raises ``ValueError``, and known-bad ones always raise it;
* non-finite keys / values stay inside the pattern: outputs the reference computes finite are exactly
  the reference's, and a NaN reaches every output whose pattern holds it;
* a failed ``apply`` leaves the model unchanged; ``apply`` then ``remove`` is bit-identical.

Deterministic: ``derandomize=True`` (examples derived from the test, no example database), no deadline,
a bounded number of examples per test.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffaccel import ops
from diffaccel.kernels.linear_attention_ref import linear_attention_reference
from diffaccel.kernels.local_ref import local_reference
from diffaccel.kernels.moba_ref import moba_reference, moba_select
from diffaccel.kernels.neighborhood_ref import neighborhood_reference

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              # the Triton interpreter's numpy matmul on NaN inputs (the point of the non-finite tests)
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def fuzz(examples):
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 4e-2}
# examples per backend: the Triton interpreter costs ~1 s a call, eager FlexAttention ~1 s a new shape (dynamo)
EXAMPLES = {"torch": 40, "flex": 6, "triton": 6}
NONFINITE_EXAMPLES = {"torch": 25, "flex": 4, "triton": 4}


@st.composite
def tensors(draw, seq, kv_seq=None, small=False):
    """``(q, k, v)`` ``[B, seq, H, D]`` (k, v: ``kv_seq`` tokens if given) of one dtype, from a drawn seed
    (``small``: one batch element)."""
    b, h = draw(st.integers(1, 1 if small else 2)), draw(st.integers(1, 2))
    d = draw(st.sampled_from([1, 4, 8, 16, 24]))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    return [torch.randn(b, n, h, d, generator=gen).to(dtype) for n in (seq, kv_seq or seq, kv_seq or seq)]


def per_axis_arg(draw, values):
    """An int when every axis has the same value (sometimes), else a tuple."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return tuple(values)


def text(draw):
    return draw(st.integers(0, 4)), draw(st.booleans())


def scale(draw):
    return draw(st.one_of(st.none(), st.floats(0.05, 2.0)))


MAX_AXIS = {1: 24, 2: 9, 3: 5}
MAX_AXIS_SMALL = {1: 16, 2: 6, 3: 3}  # the Triton interpreter's cost grows with the tiles


@st.composite
def neighborhood_cases(draw, small=False):
    nd = draw(st.integers(1, 3))
    grid, ks, dil, st_ = [], [], [], []
    for _ in range(nd):
        n = draw(st.integers(1, (MAX_AXIS_SMALL if small else MAX_AXIS)[nd]))
        d = draw(st.integers(1, min(3, n)))
        k = draw(st.integers(1, n // d)) if d > 1 else draw(st.integers(1, n + 2))
        grid.append(n)
        dil.append(d)
        ks.append(k)
        st_.append(draw(st.integers(1, k)))
    text_len, text_first = text(draw)
    args = dict(grid=tuple(grid), kernel_size=per_axis_arg(draw, ks), dilation=per_axis_arg(draw, dil),
                stride=per_axis_arg(draw, st_), text_len=text_len, text_first=text_first, scale=scale(draw))
    return args, draw(tensors(text_len + math.prod(grid), small=small))


@st.composite
def local_cases(draw, small=False):
    n = (MAX_AXIS_SMALL if small else MAX_AXIS)[2]
    grid = (draw(st.integers(1, n)), draw(st.integers(1, n)))
    radius = draw(st.one_of(st.integers(1, 12), st.floats(0.1, 12.0)))
    down = draw(st.one_of(st.none(), st.integers(2, 4)))
    text_len, text_first = text(draw)
    args = dict(grid=grid, radius=radius, down_factor=down, text_len=text_len, text_first=text_first,
                scale=scale(draw))
    if down is not None and draw(st.booleans()):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        args["pool_weight"] = torch.rand(down, down, generator=gen)
    return args, draw(tensors(text_len + math.prod(grid), small=small))


@st.composite
def moba_cases(draw, small=False):
    nd = draw(st.integers(1, 3))
    grid = tuple(draw(st.integers(1, (MAX_AXIS_SMALL if small else MAX_AXIS)[nd])) for _ in range(nd))
    block = [draw(st.integers(1, n + 1)) for n in grid]
    n_blocks = math.prod(-(-n // min(b, n)) for n, b in zip(grid, block))
    text_len, text_first = text(draw)
    args = dict(grid=grid, block=per_axis_arg(draw, block), selection=draw(st.sampled_from(["query", "tile", "head"])),
                text_len=text_len, text_first=text_first, scale=scale(draw))
    if draw(st.booleans()):
        args["topk"] = draw(st.integers(1, n_blocks + 1))
    else:
        args["threshold"] = draw(st.floats(0.0, 1.0))
    return args, draw(tensors(text_len + math.prod(grid), small=small))


def _block_tuple(args):
    b = args["block"]
    return b if isinstance(b, tuple) else (b,) * len(args["grid"])


def moba_selection_is_stable(args, q, k):
    """Whether the reference selection survives a tiny perturbation of q and k: near-ties may be broken
    differently by backends whose fp32 sums run in another order (documented in ``moba_ref``)."""
    sel_args = dict(topk=args.get("topk"), threshold=args.get("threshold"), selection=args["selection"],
                    text_len=args["text_len"], text_first=args["text_first"])
    block = _block_tuple(args)
    base = moba_select(q, k, args["grid"], block, **sel_args)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        dq, dk = (1e-4 * torch.randn(t.shape, generator=gen) for t in (q, k))
        qp = torch.where(torch.isfinite(q), q.float() + dq, q.float())
        kp = torch.where(torch.isfinite(k), k.float() + dk, k.float())
        if not torch.equal(base, moba_select(qp, kp, args["grid"], block, **sel_args)):
            return False
    return True


def _neighborhood_ref(args, q, k, v):
    grid, ks, dil, st_ = ops.neighborhood_params(args["grid"], args["kernel_size"], args["dilation"], args["stride"])
    return neighborhood_reference(q, k, v, grid, ks, dil, st_, args["text_len"], args["text_first"], args["scale"])


def _local_ref(args, q, k, v):
    a = dict(args)
    return local_reference(q, k, v, a.pop("grid"), a.pop("radius"), **a)


def _moba_ref(args, q, k, v):
    a = {name: x for name, x in args.items() if name not in ("grid", "block")}
    return moba_reference(q, k, v, args["grid"], _block_tuple(args), **a)


# name -> (strategy of (args, (q, k, v)), op, dense reference)
OPS = {"neighborhood": (neighborhood_cases, ops.neighborhood_attention, _neighborhood_ref),
       "local": (local_cases, ops.local_attention, _local_ref),
       "moba": (moba_cases, ops.moba_attention, _moba_ref)}
CASES = [(name, backend) for name in OPS for backend in ("torch", "flex", "triton")
         if not (name == "moba" and backend == "flex")]


def _assert_matches(out, ref, q):
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------ agreement


@pytest.mark.parametrize("name,backend", CASES)
def test_op_agrees_with_the_dense_reference(name, backend):
    cases, fn, ref = OPS[name]

    @fuzz(EXAMPLES[backend])
    @given(case=cases(small=backend == "triton"))
    def check(case):
        args, (q, k, v) = case
        if name == "moba":
            assume(moba_selection_is_stable(args, q, k))
        _assert_matches(fn(q, k, v, backend=backend, **args), ref(args, q, k, v), q)

    check()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_attention_agrees_with_the_reference(backend):
    @fuzz(EXAMPLES[backend])
    @given(data=st.data(), sq=st.integers(1, 40), sk=st.integers(1, 40), eps=st.floats(1e-6, 1.0))
    def check(data, sq, sk, eps):
        q, k, v = data.draw(tensors(sq, sk), label="qkv")
        out = ops.linear_attention(q, k, v, eps=eps, backend=backend)
        _assert_matches(out, linear_attention_reference(q, k, v, eps), q)

    check()


# ------------------------------------------------------------------------------------ non-finite inputs
# (the reference's rule, kernels/reference.py: a non-finite query or visible key makes the query's output
# NaN, a non-finite value v[j, d] output d of every query that sees j; nothing else changes)


@pytest.mark.parametrize("name,backend", CASES)
def test_non_finite_keys_and_values_stay_inside_the_pattern(name, backend):
    cases, fn, ref = OPS[name]

    @fuzz(NONFINITE_EXAMPLES[backend])
    @given(case=cases(small=backend == "triton"), bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
           where=st.lists(st.tuples(st.sampled_from("qkvv"), st.integers(0, 10 ** 6)), min_size=1, max_size=3))
    def check(case, bad, where):
        args, (q, k, v) = case
        for which, at in where:
            t = {"q": q, "k": k, "v": v}[which]
            t.view(-1)[at % t.numel()] = bad
        if name == "moba":
            assume(moba_selection_is_stable(args, q, k))
        out, want = fn(q, k, v, backend=backend, **args), ref(args, q, k, v)
        finite = torch.isfinite(want)
        # outside the pattern of any bad input: exactly the reference (finite); inside: the bad input arrives
        tol = TOL[q.dtype]
        torch.testing.assert_close(out.float()[finite], want.float()[finite], atol=tol, rtol=tol)
        assert torch.isfinite(out[finite]).all()
        if math.isnan(bad):
            assert torch.equal(torch.isnan(out), torch.isnan(want))

    check()


# ------------------------------------------------------------------------------------ arguments


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(10 ** 18, 10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.binary(max_size=2),
    st.lists(st.one_of(st.integers(-2, 9), st.floats(-2, 9), st.none(), st.booleans()), max_size=4),
    st.lists(st.integers(-2, 9), max_size=4).map(tuple), st.just(torch.ones(2)), st.just(object()),
)
# values that are never valid: for int-like arguments (and tensors, grids, flags, names) ...
ALWAYS_BAD = st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not float(x).is_integer()),
                       st.text(min_size=1, max_size=3), st.booleans().map(lambda b: (b, 3)), st.just(object()))
# ... and for the real-valued ones (which must be finite and non-negative)
ALWAYS_BAD_REAL = st.one_of(st.floats(max_value=-1e-6), st.just(float("nan")), st.text(min_size=1, max_size=3),
                            st.booleans().map(lambda b: (b, 3)), st.just(object()))
REAL_ARGS = ("scale", "radius", "threshold")

OP_ARGS = {  # the arguments of each op besides q, k, v
    "neighborhood": ["grid", "kernel_size", "dilation", "stride", "text_len", "text_first", "scale", "backend"],
    "local": ["grid", "radius", "down_factor", "pool_weight", "text_len", "text_first", "scale", "backend"],
    "moba": ["grid", "block", "topk", "threshold", "selection", "text_len", "text_first", "scale", "backend"],
}


def _call(fn, args, q, k, v):
    a = dict(args)
    a.setdefault("backend", "torch")
    return fn(q, k, v, **a)


@pytest.mark.parametrize("name", list(OP_ARGS))
def test_any_argument_works_or_is_a_value_error(name):
    cases, fn, _ = OPS[name]
    names = OP_ARGS[name]

    @fuzz(60)
    @given(case=cases(), arg=st.sampled_from(names + ["q", "k", "v"]), junk=JUNK, data=st.data())
    def check(case, arg, junk, data):
        bad = data.draw(ALWAYS_BAD_REAL if arg in REAL_ARGS else ALWAYS_BAD, label="bad")
        args, (q, k, v) = case
        tensors_ = {"q": q, "k": k, "v": v}
        if arg in tensors_:
            tensors_[arg] = junk
        else:
            args = dict(args, **{arg: junk})
        if arg == "backend" and junk not in (None, "torch"):
            # a junk backend is refused by name before any kernel runs; a valid one may be slow here
            assume(not (isinstance(junk, str) and junk in ("triton", "flex")))
        try:
            out = _call(fn, args, tensors_["q"], tensors_["k"], tensors_["v"])
        except ValueError:
            pass
        else:
            assert out.shape == q.shape
        # a value that is never valid for this argument: always a ValueError
        if arg != "pool_weight":
            bad_args, bad_t = dict(case[0]), {"q": q, "k": k, "v": v}
            if arg in bad_t:
                bad_t[arg] = bad
            else:
                bad_args[arg] = bad
            with pytest.raises(ValueError):
                _call(fn, bad_args, bad_t["q"], bad_t["k"], bad_t["v"])

    check()


@fuzz(60)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=5), min_size=3, max_size=3),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.complex64]),
                       min_size=3, max_size=3),
       name=st.sampled_from(["neighborhood", "local", "moba", "linear"]))
def test_bad_tensors_are_value_errors(shapes, dtypes, name):
    q, k, v = (torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes))
    calls = {
        "neighborhood": lambda: ops.neighborhood_attention(q, k, v, (2, 2), 3, backend="torch"),
        "local": lambda: ops.local_attention(q, k, v, (2, 2), 2, backend="torch"),
        "moba": lambda: ops.moba_attention(q, k, v, (2, 2), 1, topk=2, backend="torch"),
        "linear": lambda: ops.linear_attention(q, k, v, backend="torch"),
    }
    try:
        out = calls[name]()
    except ValueError:
        return
    assert out.shape == q.shape and out.dtype == q.dtype


# ------------------------------------------------------------------------------------ apply / remove


@pytest.fixture(scope="module")
def flux():
    from tiny_models import flux_inputs, run, tiny_flux

    model = tiny_flux()
    x = flux_inputs(model, height=3, width=4)
    return model, x, run(model, x)


OPTION_VALUES = {
    "kernel_size": st.one_of(st.integers(1, 5), st.tuples(st.integers(1, 5), st.integers(1, 5)), JUNK),
    "dilation": st.one_of(st.integers(1, 2), JUNK),
    "stride": st.one_of(st.integers(1, 2), JUNK),
    "radius": st.one_of(st.floats(0.5, 6), JUNK),
    "down_factor": st.one_of(st.none(), st.integers(1, 3), JUNK),
    "block": st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 3), st.integers(1, 3)), JUNK),
    "partitions": st.one_of(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), max_size=2), JUNK),
    "topk": st.one_of(st.integers(1, 4), JUNK),
    "threshold": st.one_of(st.floats(0, 1), JUNK),
    "selection": st.one_of(st.sampled_from(["query", "tile", "head"]), JUNK),
    "dense_steps": st.one_of(st.integers(0, 2), JUNK),
    "backend": st.one_of(st.sampled_from([None, "torch", "flex", "triton"]), JUNK),
    "weights": st.one_of(st.none(), st.just("/nonexistent/ckpt.safetensors"), st.just({"x": torch.ones(1)}), JUNK),
    "ntk_factor": st.one_of(st.floats(0.5, 10), JUNK),
    "layers": st.one_of(st.none(), st.sampled_from(["transformer_blocks.*", "single_*", "nothing.*", ""]),
                        st.lists(st.sampled_from(["transformer_blocks.0.attn", "x"]), max_size=2)),
    "bogus_option": JUNK,
}


def _snapshot(model):
    return ({k: t.detach().clone() for k, t in model.state_dict().items()}, dict(model.attn_processors),
            dict(model._forward_pre_hooks), dict(model._forward_hooks))


def _assert_same(model, snap):
    state, procs, pre, post = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert all(model.attn_processors[k] is p for k, p in procs.items())  # the very same objects
    assert dict(model._forward_pre_hooks) == pre and dict(model._forward_hooks) == post


@fuzz(40)
@given(method=st.one_of(st.sampled_from(["neighborhood", "clear", "moba", "linfusion"]), st.text(max_size=4),
                        st.none(), st.integers()),
       options=st.dictionaries(st.sampled_from(sorted(OPTION_VALUES)), st.none(), max_size=3), data=st.data())
def test_apply_changes_nothing_on_error_and_remove_is_bit_identical(flux, method, options, data):
    import diffaccel
    from diffaccel.api import applied_method
    from tiny_models import run

    model, x, want = flux
    options = {name: data.draw(OPTION_VALUES[name], label=name) for name in options}
    snap = _snapshot(model)
    try:
        diffaccel.apply(model, method, **options)
    except ValueError:
        assert applied_method(model) is None
        _assert_same(model, snap)
        return
    assert applied_method(model) == method
    assert diffaccel.remove(model)
    _assert_same(model, snap)
    assert torch.equal(run(model, x), want)

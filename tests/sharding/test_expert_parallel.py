"""Expert-parallel MoE layer on 8 virtual CPU devices against the single-device
``dense`` reference: outputs, gradients (input and every parameter), overflow
accounting and exchange byte counts, with uneven routing."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import dispatch, expert_parallel, sharding

MESHES = ["data=8", "data=2,expert=4", "expert=8", "fsdp=2,expert=2,tensor=2"]
D, F, E, K = 16, 32, 8, 2


def make_uneven(layer: moejax.MoE) -> None:
    """Feature 0 is large and positive (see ``inputs``): expert 0 wins almost every
    first choice, expert 1 most second choices, the last three never get a token."""
    k_DE = np.array(layer.router.kernel[...])
    k_DE[0, 0], k_DE[0, 1], k_DE[0, -3:] = 4.0, 2.0, -6.0
    layer.router.kernel[...] = jnp.asarray(k_DE)


def inputs(batch=4, seq=8):
    x = jax.random.normal(jax.random.key(1), (batch, seq, D)).at[..., 0].add(2.0)
    probe = jax.random.normal(jax.random.key(2), (batch, seq, D))
    return x, probe


def layer_pair(**cfg_changes):
    cfg = moejax.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, **cfg_changes)
    layer, ref = moejax.MoE(cfg, rngs=nnx.Rngs(0)), moejax.MoE(
        cfg.replace(dispatch="dense", capacity_factor=None, ep_exchange="auto"), rngs=nnx.Rngs(0))
    make_uneven(layer)
    make_uneven(ref)
    return layer, ref


def loss_and_grads(layer, x, probe, mesh=None):
    def loss(m, x):
        y, aux = m(x)
        return jnp.sum(y * probe) + aux["router_loss"], (y, aux)

    fn = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if mesh is None:
        return nnx.jit(fn)(layer, x)
    with jax.set_mesh(mesh):
        sharding.shard_model(layer, mesh)
        return nnx.jit(fn)(layer, x)


def assert_close(actual, expected, rtol=1e-5):
    """max |a - b| <= rtol * max |b|, leaf by leaf (float32 through different sums)."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(np.abs(b).max(), 1e-30)
        assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


@pytest.fixture(scope="module")
def dense_reference():
    """Single-device dense outputs and gradients, computed once for the module."""
    _, ref = layer_pair()
    x, probe = inputs()
    return loss_and_grads(ref, x, probe)


CASES = [(mesh, "all_to_all") for mesh in MESHES] + [
    ("data=2,expert=4", "ragged"), ("fsdp=2,expert=2,tensor=2", "ragged")]


@pytest.mark.parametrize("mesh_spec, exchange", CASES)
def test_sharded_moe_matches_dense_reference(mesh_spec, exchange, dense_reference):
    layer, _ = layer_pair(ep_exchange=exchange)
    x, probe = inputs()
    (_, (y_ref, aux_ref)), grads_ref = dense_reference
    load = np.asarray(aux_ref["expert_load"])
    assert (load == 0).sum() >= 3 and load.max() >= 0.4      # routing really is uneven
    (_, (y, aux)), grads = loss_and_grads(layer, x, probe, sharding.make_mesh(mesh_spec))
    assert_close(y, y_ref)
    assert_close(grads, grads_ref)
    for key in ("aux_loss", "z_loss", "expert_load"):
        assert_close(aux[key], aux_ref[key])
    assert float(aux["dropped_fraction"]) == 0.0 and float(aux["ep_overflow"]) == 0.0


def test_hidden_split_over_a_token_axis_is_gathered_not_summed():
    """Rules that split the batch and the experts' 'mlp' dim over the same axis: devices
    along it hold different tokens, so their hidden slices are gathered (as FSDP), not
    psum-ed as tensor-parallel partials (which added other tokens' outputs)."""
    rules = sharding.DEFAULT_RULES.replace(batch=("data", "fsdp", "expert", "tensor"))
    mesh = sharding.make_mesh("expert=4,tensor=2")
    weights = moejax.MoE(moejax.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K),
                         rngs=nnx.Rngs(0)).experts.weights()
    rng = np.random.default_rng(0)
    x_TD, probe_TD = (jnp.asarray(rng.normal(size=(32, D)), jnp.float32) for _ in range(2))
    experts_TK = jnp.asarray(np.argsort(rng.random((32, E)), axis=1)[:, :K], jnp.int32)
    gates_TK = jnp.asarray(rng.uniform(0.1, 1.0, (32, K)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(dispatch_fn, x_TD, weights):
        y_TD, pullback = jax.vjp(lambda x, w: dispatch_fn(x, gates_TK, experts_TK, w)[0],
                                 x_TD, weights)
        return y_TD, pullback(probe_TD)

    with jax.set_mesh(mesh), sharding.use_rules(rules):
        layout = expert_parallel.layout_for(mesh, weights, 32)
        assert layout.partial_axes == () and layout.token_axes == ("expert", "tensor")
        sharded = functools.partial(expert_parallel.expert_parallel_dispatch, layout=layout,
                                    capacity_factor=None, exchange="all_to_all", backend="ragged")
        got = output_and_grads(sharded, x_TD, weights)
    assert_close(got, output_and_grads(dispatch.dense_dispatch, x_TD, weights))


def test_layer_runs_eagerly_under_set_mesh(dense_reference):
    layer, _ = layer_pair()
    x, _ = inputs()
    (_, (y_ref, _)), _ = dense_reference
    with jax.set_mesh(sharding.make_mesh("data=2,expert=4")):
        y, aux = layer(x)
    assert_close(y, y_ref)
    assert float(aux["dispatch_bytes"]) > 0


def _token_shards(experts_TK, num_shards):
    return np.split(np.asarray(experts_TK), num_shards)      # batch axes split T in order


def keep_fixed(experts_TK, shards, ep, factor):
    """Fixed buffers: per source shard and destination device, only the first
    C = ceil(factor * t * K / P) pairs in slot-major order fit."""
    keep = []
    for experts_tK in _token_shards(experts_TK, shards):
        tokens_local, per_dev = experts_tK.shape[0], E // ep
        capacity = math.ceil(factor * tokens_local * K / ep)
        used, keep_Kt = np.zeros(ep, int), np.zeros(experts_tK.T.shape, bool)
        for k in range(K):                                    # slot-major priority
            for t in range(tokens_local):
                dest = experts_tK[t, k] // per_dev
                keep_Kt[k, t] = used[dest] < capacity
                used[dest] += 1
        keep.append(keep_Kt.T)
    return np.concatenate(keep)


def keep_ragged(experts_TK, shards, ep, factor):
    """Ragged: each receiver lays rows out expert-major, sources in order within an
    expert, a source's pairs in token-major order; rows past R = ceil(factor * t * K)
    drop. Token shards s with the same expert coordinate s % P share nothing: the
    exchange runs within each data group (consecutive runs of P shards)."""
    per_dev = E // ep
    shard_experts = _token_shards(experts_TK, shards)
    tokens_local = shard_experts[0].shape[0]
    rows = math.ceil(factor * tokens_local * K)
    keep = []
    for group in range(shards // ep):
        members = shard_experts[group * ep:(group + 1) * ep]
        counts_PE = np.stack([np.bincount(e.reshape(-1), minlength=E) for e in members])
        kept_PE = np.zeros_like(counts_PE)
        for dest in range(ep):
            offset = 0
            for e in range(dest * per_dev, (dest + 1) * per_dev):
                for src in range(ep):
                    kept_PE[src, e] = np.clip(rows - offset, 0, counts_PE[src, e])
                    offset += counts_PE[src, e]
        for src, experts_tK in enumerate(members):
            seen = np.zeros(E, int)
            keep_tK = np.zeros(experts_tK.shape, bool)
            for t in range(tokens_local):                     # token-major order
                for k in range(K):
                    e = experts_tK[t, k]
                    keep_tK[t, k] = seen[e] < kept_PE[src, e]
                    seen[e] += 1
            keep.append(keep_tK)
    return np.concatenate(keep)


@pytest.mark.parametrize("exchange, keep_rule", [("all_to_all", keep_fixed),
                                                 ("ragged", keep_ragged)])
def test_capacity_drops_are_exactly_the_overflow_and_counted(exchange, keep_rule):
    """With a capacity factor the buffers are smaller than the worst case; the pairs
    that do not fit are dropped. The reference is the dense layer with the gates of
    exactly the pairs the rule (numpy) drops set to zero."""
    factor, mesh = 0.5, sharding.make_mesh("data=2,expert=4")
    layer, ref = layer_pair(capacity_factor=factor, ep_exchange=exchange)
    x, _ = inputs()
    x_TD = x.reshape(-1, D)
    gates_TK, experts_TK, _ = ref.router(x_TD)
    keep_TK = keep_rule(np.asarray(experts_TK), 8, 4, factor)
    assert (~keep_TK).sum() > 0                               # the test does drop
    y_ref, _ = dispatch.dense_dispatch(x_TD, gates_TK * keep_TK, experts_TK,
                                       ref.experts.weights())
    with jax.set_mesh(mesh):
        sharding.shard_model(layer, mesh)
        y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    assert_close(y.reshape(-1, D), y_ref)
    assert float(aux["ep_overflow"]) == (~keep_TK).sum()
    np.testing.assert_allclose(float(aux["dropped_fraction"]), (~keep_TK).mean(), rtol=1e-6)


@pytest.mark.parametrize("exchange", ["all_to_all", "ragged"])
def test_dispatch_bytes_against_buffer_sizes_and_routing(exchange):
    layer, ref = layer_pair(ep_exchange=exchange)
    x, _ = inputs()
    _, experts_TK, _ = ref.router(x.reshape(-1, D))
    mesh = sharding.make_mesh("expert=8")
    with jax.set_mesh(mesh):
        _, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    shards, ep, per_dev, row_bytes = 8, 8, 1, D * 4
    off_pairs = sum(int((e // per_dev != src).sum())
                    for src, e in enumerate(_token_shards(experts_TK, shards)))
    min_bytes = off_pairs * row_bytes * 2
    tokens_local = x.shape[0] * x.shape[1] // shards
    if exchange == "all_to_all":
        rows = (ep - 1) * tokens_local * min(K, per_dev)       # dropless C, off-device share
        expected = shards * rows * (2 * row_bytes + 4)
    else:
        expected = min_bytes + shards * (ep - 1) * E * 4       # payload + gathered counts
    assert float(aux["dispatch_min_bytes"]) == min_bytes
    assert float(aux["dispatch_bytes"]) == expected


def test_exchange_choice_and_fallbacks():
    assert expert_parallel.resolve_exchange("auto", None) == "all_to_all"   # XLA:CPU
    assert expert_parallel.resolve_exchange("auto", 1.25) == "all_to_all"
    assert expert_parallel.resolve_exchange("ragged", None) == "ragged"
    with pytest.raises(ValueError, match="exchange must be one of"):
        expert_parallel.resolve_exchange("alltoall", None)
    with pytest.raises(moejax.ConfigError, match="ep_exchange"):
        moejax.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, ep_exchange="ragged_a2a")
    mesh = sharding.make_mesh("data=2,expert=4")
    weights = layer_pair()[1].experts.weights()
    six_experts = moejax.MoE(moejax.MoEConfig(d_model=D, d_ff=F, num_experts=6, top_k=K),
                             rngs=nnx.Rngs(0)).experts.weights()
    assert expert_parallel.layout_for(None, weights, 32) is None
    assert expert_parallel.layout_for(sharding.make_mesh("data=8"), weights, 32).num_devices_ep == 1
    with pytest.warns(sharding.FallbackWarning, match="6 experts do not divide"):
        assert expert_parallel.layout_for(mesh, six_experts, 32) is None     # 4 does not divide 6
    with pytest.warns(sharding.FallbackWarning, match="12 tokens do not split evenly"):
        assert expert_parallel.layout_for(mesh, weights, 12) is None         # 8 shards vs 12 tokens
    no_batch_split = sharding.DEFAULT_RULES.replace(batch=("data",))
    with pytest.warns(sharding.FallbackWarning, match="do not split the tokens"):
        assert expert_parallel.layout_for(mesh, weights, 32, no_batch_split) is None
    layout = expert_parallel.layout_for(mesh, weights, 32)
    assert layout.experts_per_device == 2 and layout.token_axes == ("data", "expert")
    assert layout.ep_axis == "expert" and layout.partial_axes == ()


def test_ragged_exchange_exports_for_tpu_and_gpu():
    """XLA:CPU has no ragged_all_to_all; the real collective must still lower."""
    layer, _ = layer_pair(ep_exchange="ragged")
    mesh = sharding.make_mesh("data=2,expert=4")
    graphdef, state = nnx.split(layer)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    with jax.set_mesh(mesh):
        x = jax.ShapeDtypeStruct((4, 8, D), jnp.float32)
        # the local experts' grouped matmul ('auto') is the Pallas kernel there too
        kernel = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
        for platform in ("tpu", "cuda"):
            check = [jax.export.DisabledSafetyCheck.custom_call(t)
                     for t in ("ragged_all_to_all", kernel["cuda"])]
            exported = jax.export.export(jax.jit(forward), platforms=[platform],
                                         disabled_checks=check)(state, x)
            assert "ragged_all_to_all" in exported.mlir_module()
            assert kernel[platform] in exported.mlir_module()
            assert exported.nr_devices == 8


@pytest.mark.parametrize("mesh_spec, exchange", [("expert=8", "all_to_all"),
                                                 ("data=2,expert=4", "ragged")])
def test_extreme_routings_match_dense(mesh_spec, exchange):
    """Routings drawn to stress the buffer bounds and the ragged offsets: every
    token on the same two experts (one device receives everything), everything
    on the last device, uniform, and random skews; one compile, many routings."""
    from hypothesis import given, settings, strategies as st

    mesh = sharding.make_mesh(mesh_spec)
    _, ref = layer_pair()
    weights = ref.experts.weights()
    layout = expert_parallel.layout_for(mesh, weights, 32)
    x_TD = jax.random.normal(jax.random.key(5), (32, D))

    @jax.jit
    def sharded(x_TD, gates_TK, experts_TK):
        return expert_parallel.expert_parallel_dispatch(
            x_TD, gates_TK, experts_TK, weights, layout, capacity_factor=None,
            exchange=exchange, backend="ragged")

    @settings(max_examples=8)
    @given(st.sampled_from(["pair", "last", "uniform", "skew"]), st.integers(0, 2**16))
    def check(mode, seed):
        rng = np.random.default_rng(seed)
        p_E = {"pair": np.eye(E)[0] + np.eye(E)[1], "last": np.eye(E)[-1] + np.eye(E)[-2],
               "uniform": np.ones(E), "skew": rng.dirichlet(np.full(E, 0.2)) + 1e-9}[mode]
        p_E = p_E / p_E.sum()
        experts_TK = np.stack([rng.choice(E, K, replace=False, p=p_E) if np.count_nonzero(p_E) >= K
                               else rng.choice(E, K, replace=False) for _ in range(32)])
        gates_TK = rng.uniform(0.1, 1.0, (32, K)).astype(np.float32)
        expected, _ = dispatch.dense_dispatch(x_TD, gates_TK, experts_TK, weights)
        with jax.set_mesh(mesh):
            out, stats = sharded(x_TD, jnp.asarray(gates_TK), jnp.asarray(experts_TK, jnp.int32))
        assert_close(out, expected)
        assert float(stats["ep_overflow"]) == 0.0

    check()


def test_without_expert_axis_each_device_dispatches_its_own_tokens():
    """data=4, tensor=2 with a capacity factor: GShard semantics per device, i.e. the
    single-device capacity dispatch applied to each token shard on its own."""
    factor, mesh = 1.0, sharding.make_mesh("data=4,tensor=2")
    layer, ref = layer_pair(capacity_factor=factor)
    x, _ = inputs()
    x_TD = x.reshape(-1, D)
    gates_TK, experts_TK, _ = ref.router(x_TD)
    weights = ref.experts.weights()
    per_shard = jax.jit(dispatch.capacity_dispatch, static_argnames="capacity_factor")
    outs, dropped = zip(*(per_shard(x_tD, g_tK, e_tK, weights, capacity_factor=factor)
                          for x_tD, g_tK, e_tK in zip(jnp.split(x_TD, 4), jnp.split(gates_TK, 4),
                                                      jnp.split(experts_TK, 4))))
    with jax.set_mesh(mesh):
        sharding.shard_model(layer, mesh)
        y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    assert_close(y.reshape(-1, D), jnp.concatenate(outs))
    assert float(np.mean(dropped)) > 0
    np.testing.assert_allclose(float(aux["dropped_fraction"]), float(np.mean(dropped)), rtol=1e-6)
    assert float(aux["dispatch_bytes"]) == 0.0

"""Many models in one jit: K vmapped models train exactly as K models trained one by one (up to float tolerance)."""

import dataclasses

import jax
import numpy as np
import pytest
from mnist_jax import Config, ModelConfig, create_train_state, evaluate, load_split, train_step
from mnist_jax.data import epoch_permutation
from mnist_jax.multi import (
    create_train_states,
    eval_steps,
    evaluate_many,
    fit_many,
    get_learning_rates,
    predict_many,
    set_learning_rates,
    train_steps,
    unstack,
)
from mnist_jax.steps import StepKeys

# A narrow seed CNN (same layers, dropout on) so that tens of steps take seconds.
SMALL = Config(batch_size=16, epochs=2, model=ModelConfig(conv1_features=8, conv2_features=8, dense_features=32))
TOL = dict(rtol=1e-5, atol=2e-6)


def _data(n=160, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    # Learnable: a bright block whose position encodes the label, plus noise.
    images = rng.random((n, 28, 28, 1), dtype=np.float32) * 0.3
    for i, label in enumerate(labels):
        images[i, 2 * label : 2 * label + 6, 4:24] += 0.7
    return {"image": images, "label": labels}


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _one_by_one(config, train):
    """The reference: `fit`'s schedule (init key, data order, fold_in dropout keys) with the library's own train_step."""
    keys = StepKeys.from_seed(config.seed)
    state = create_train_state(keys.init, config)
    n = len(train["label"])
    for epoch in range(config.epochs):
        for idx in np.asarray(epoch_permutation(keys.data, epoch, n, config.batch_size)):
            batch = {k: v[idx] for k, v in train.items()}
            state, _ = train_step(state, batch, jax.random.fold_in(keys.dropout, state.step))
    return state


@pytest.mark.parametrize("sequential", [False, True])
def test_fit_many_equals_models_trained_one_by_one(sequential):
    train = _data()
    configs = [dataclasses.replace(SMALL, seed=s, learning_rate=lr) for s, lr in ((0, 1e-3), (1, 2e-3), (7, 5e-4))]
    states, histories = fit_many(configs, train, {k: v[:64] for k, v in train.items()}, sequential=sequential)
    assert int(states.step[0]) == 20 and len(histories) == 3  # 2 epochs x 10 steps, 3 models
    np.testing.assert_allclose(get_learning_rates(states), [1e-3, 2e-3, 5e-4], rtol=1e-6)
    for k, config in enumerate(configs):
        reference = _one_by_one(config, train)
        _assert_trees_close(unstack(states.params, k), reference.params, **TOL)
        assert int(states.step[k]) == int(reference.step)
        assert histories[k]["seed"] == config.seed and len(histories[k]["val_accuracy"]) == 2
    assert not np.allclose(np.asarray(states.params["dense2"]["bias"][0]), np.asarray(states.params["dense2"]["bias"][1]))
    fit_times = {h["fit_time_s"] for h in histories}
    assert len(fit_times) == (3 if sequential else 1)  # one after another: each model's own clock


def test_seeds_one_after_another_equal_fit_for_each_seed(tmp_path, mnist_dirs):
    from mnist_jax import fit

    base = dataclasses.replace(SMALL, epochs=1, train_examples=320, **mnist_dirs)
    train = load_split("mnist", "train", num_examples=320, **mnist_dirs)
    test = load_split("mnist", "test", num_examples=500, **mnist_dirs)
    configs = [dataclasses.replace(base, seed=s) for s in (0, 3)]
    states, histories = fit_many(configs, train, test, sequential=True)
    for k, config in enumerate(configs):
        state, history = fit(dataclasses.replace(config, workdir=str(tmp_path / str(k))), verbose=False)
        _assert_trees_close(unstack(states.params, k), state.params, **TOL)
        assert int(states.step[k]) == int(state.step) == 20
        np.testing.assert_allclose(histories[k]["loss"], history["loss"], rtol=1e-5)


@pytest.mark.parametrize("shared_order", [False, True])
def test_fit_many_steps_per_call_chunks_equal_single_steps(shared_order):
    """Several steps per compiled call (lax.scan; 10 steps an epoch = chunks of 4, 4, 2) train exactly as one step per call."""
    train = _data()
    runs = [fit_many([dataclasses.replace(SMALL, seed=s, steps_per_call=n) for s in (0, 3)], train, shared_order=shared_order) for n in (1, 4)]
    (states_1, h_1), (states_4, h_4) = runs
    assert int(states_4.step[0]) == 20
    _assert_trees_close(states_4.params, states_1.params, **TOL)
    for a, b in zip(h_1, h_4, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["accuracy"], b["accuracy"], rtol=1e-6)


@pytest.mark.parametrize("per_model_batch", [False, True])
def test_train_steps_equals_train_step(per_model_batch):
    train = _data(48)
    k = 2
    init_keys = jax.random.split(jax.random.key(3), k)
    dropout_keys = jax.random.split(jax.random.key(4), k)
    states = create_train_states(init_keys, SMALL)
    singles = [create_train_state(init_keys[i], SMALL) for i in range(k)]
    _assert_trees_close(unstack(states.params, 1), singles[1].params, rtol=1e-6, atol=1e-7)  # vmapped init = one-by-one init
    for step in range(3):
        rows = [slice(16 * ((step + i) % 3), 16 * ((step + i) % 3) + 16) for i in range(k)]
        if per_model_batch:
            batch = {key: np.stack([v[r] for r in rows]) for key, v in train.items()}
        else:
            batch = {key: v[rows[0]] for key, v in train.items()}
        rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(dropout_keys, step)
        states, metrics = train_steps(states, batch, rngs)
        for i in range(k):
            own = {key: v[rows[i] if per_model_batch else rows[0]] for key, v in train.items()}
            singles[i], m = train_step(singles[i], own, rngs[i])
            np.testing.assert_allclose(metrics["loss"][i], m["loss"], **TOL)
    for i in range(k):
        _assert_trees_close(unstack(states.params, i), singles[i].params, **TOL)


def test_evaluate_and_predict_many_match_single_model_functions():
    data = _data(70)
    states = create_train_states(jax.random.split(jax.random.key(0), 2), SMALL)
    many = evaluate_many(states, data, batch_size=32)  # 70 = 2 full batches + a padded one
    probs = predict_many(states, data["image"], batch_size=32)
    assert probs.shape == (2, 70, 10)
    for i in range(2):
        single = evaluate(unstack(states, i), data, batch_size=32)
        np.testing.assert_allclose(many["accuracy"][i], single["accuracy"], rtol=1e-6)
        np.testing.assert_allclose(many["loss"][i], single["loss"], rtol=1e-5)
        np.testing.assert_allclose((probs[i].argmax(-1) == data["label"]).mean(), single["accuracy"], rtol=1e-6)
    # one batch per model ([K, B, ...]): model i sees only its own images
    per_model = {"image": np.stack([data["image"][:32], data["image"][32:64]]), "label": np.stack([data["label"][:32], data["label"][32:64]])}
    m = eval_steps(states, per_model)
    for i in range(2):
        single = evaluate(unstack(states, i), {k: v[i] for k, v in per_model.items()}, batch_size=32)
        np.testing.assert_allclose(m["accuracy"][i], single["accuracy"], rtol=1e-6)
        np.testing.assert_allclose(m["loss"][i], single["loss"], rtol=1e-5)


def test_learning_rates_and_config_checks():
    states = create_train_states(jax.random.split(jax.random.key(0), 3), SMALL, learning_rates=[1e-3, 1e-2, 1e-4])
    np.testing.assert_allclose(get_learning_rates(set_learning_rates(states, [1, 2, 3])), [1, 2, 3])
    with pytest.raises(ValueError, match="3 learning rates"):
        set_learning_rates(states, [1e-3, 1e-3])
    with pytest.raises(ValueError, match="batch_size"):
        fit_many([SMALL, dataclasses.replace(SMALL, batch_size=8)], _data(32))

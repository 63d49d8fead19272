import jax
import numpy as np
import pytest

from mnist_jax import Config, UserError, create_train_state, restore_checkpoint, train_step
from mnist_jax import checkpoint


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _trained_state(steps=3):
    state = create_train_state(jax.random.key(0), Config())
    rng = np.random.default_rng(0)
    for i in range(steps):
        batch = {"image": rng.random((8, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, 8).astype(np.int32)}
        state, _ = train_step(state, batch, jax.random.key(i))
    return state


def test_save_restore_round_trip_is_exact(tmp_path):
    state = _trained_state()
    Config(workdir=str(tmp_path)).save(tmp_path / "config.json")
    manager = checkpoint.make_manager(tmp_path / "checkpoints")
    checkpoint.save(manager, state, {"epoch": 1, "history": {"loss": [0.5]}}, metrics={"accuracy": 0.5, "loss": 1.0})
    manager.wait_until_finished()

    restored = restore_checkpoint(tmp_path)
    assert int(restored.step) == 3
    assert _leaves_equal(restored.params, state.params)
    assert _leaves_equal(restored.opt_state, state.opt_state)
    # The restored state trains on exactly like the original.
    batch = {"image": np.ones((8, 28, 28, 1), np.float32), "label": np.arange(8, dtype=np.int32)}
    a, _ = train_step(state, batch, jax.random.key(9))
    b, _ = train_step(restored, batch, jax.random.key(9))
    assert _leaves_equal(a.params, b.params)

    _, meta = checkpoint.restore_latest(manager, state)
    assert meta == {"epoch": 1, "history": {"loss": [0.5]}}
    assert restore_checkpoint(tmp_path / "checkpoints" / "3").step == 3


def test_manager_keeps_last_three_and_the_best(tmp_path):
    state = create_train_state(jax.random.key(0), Config())
    manager = checkpoint.make_manager(tmp_path, keep=3)
    for step, accuracy in zip(range(1, 7), [0.5, 0.9, 0.6, 0.7, 0.65, 0.8]):
        checkpoint.save(manager, state.replace(step=step), {"epoch": step}, metrics={"accuracy": accuracy})
        manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 4, 5, 6]


def test_restore_without_checkpoint_is_a_user_error(tmp_path):
    Config().save(tmp_path / "config.json")
    with pytest.raises(UserError, match="no checkpoint"):
        restore_checkpoint(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        restore_checkpoint(tmp_path / "elsewhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        restore_checkpoint(tmp_path / "plain")

"""The experiment scripts: one runs end to end and writes its three outputs; the on-device augmentation is exact."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402
from common import (VIEWS, Recipe, augment, device_forms, has_avx512, parse_seeds, predict_views, recipe_forms, recipe_steps_per_call,  # noqa: E402
                    warp)

from mnist_jax.runtime import cpu_flags, cpu_model  # noqa: E402


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_an_experiment_writes_results_json_table_and_plot(tmp_path, mnist_dirs):
    cmd = [sys.executable, "experiments/padding.py", "--quick", "--train-examples", "256", "--epochs", "1", "--seeds", "2",
           "--out", str(tmp_path), "--data-dir", mnist_dirs["data_dir"], "--manual-dir", mnist_dirs["manual_dir"]]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True and results["seeds"] == [0, 1]
    same, valid = results["runs"]
    assert (same["label"], valid["label"]) == ("SAME", "VALID")
    assert (same["params"], valid["params"]) == (3_156_098, 1_620_098)
    assert same["shapes"]["flatten"] == [3136] and valid["shapes"]["flatten"] == [1600]
    assert len(same["accuracy"]) == 2 and all(0.3 < a <= 1.0 for a in same["accuracy"])  # two seeds, trained above chance
    table = (tmp_path / "table.md").read_text()
    assert "| `VALID` | 24×24×32 | 12×12×32 | 11×11×64 | 5×5×64 | 1600 | 1,620,098 |" in table and "QUICK size" in table
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_step_time_times_each_variant_and_the_unrolled_scan_trains_the_same(tmp_path, mnist_dirs):
    cmd = [sys.executable, "experiments/step_time.py", "--quick", "--steps", "6", "--repeats", "1", "--dtypes", "float32",
           "--forms", "matmul", "--unrolls", "1,4", "--dispatch-steps", "3", "--trace-steps", "2", "--out", str(tmp_path),
           "--data-dir", mnist_dirs["data_dir"], "--manual-dir", mnist_dirs["manual_dir"]]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    plain, unrolled, dispatched = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert (plain["unroll"], unrolled["unroll"], dispatched["steps_per_call"]) == (1, 4, 1)
    assert all(v["ms_per_step"] > 0 for v in (plain, unrolled, dispatched))
    np.testing.assert_allclose(plain["mean_loss"], unrolled["mean_loss"], rtol=1e-4)  # same steps, same data order
    assert 0.5 < plain["mean_loss"][0] < 2.5  # the first steps of a fresh model (chance is ln 10 = 2.3)
    assert (tmp_path / "trace.json.gz").stat().st_size > 0
    assert "| float32 | `matmul` | 4 | 6 |" in (tmp_path / "table.md").read_text()


def test_augmentation_with_no_shift_rotation_or_zoom_is_the_identity():
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    np.testing.assert_allclose(augment(jax.random.key(1), images, 0.0, 0.0, 0.0), images, atol=1e-6)
    moved = augment(jax.random.key(1), images, 2.0, 10.0, 0.1)
    assert moved.shape == images.shape and not np.allclose(moved, images)


def test_warp_shifts_by_whole_pixels_with_zeros_coming_in():
    images = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    moved = np.asarray(warp(images, np.float32([[1, 0], [0, -2], [0, 0]]), np.zeros(3, np.float32), np.ones(3, np.float32)))
    np.testing.assert_allclose(moved[0, 1:], images[0, :-1], atol=1e-6)  # one pixel down
    np.testing.assert_allclose(moved[1, :, :-2], images[1, :, 2:], atol=1e-6)  # two pixels left
    np.testing.assert_allclose(moved[2], images[2], atol=1e-6)  # the identity
    assert not moved[0, 0].any() and not moved[1, :, -2:].any()


def test_predict_views_averages_each_models_probabilities_over_the_views():
    from flax.training.train_state import TrainState
    import optax

    from mnist_jax.multi import predict_many

    model = Recipe(width=4, dense_features=8).model(("xla",) * 4)
    images = np.asarray(jax.random.uniform(jax.random.key(0), (5, 28, 28, 1)))
    params = jax.vmap(lambda k: model.init(k, images[:1], train=False)["params"])(jax.random.split(jax.random.key(1), 2))
    states = jax.vmap(lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=optax.identity()))(params)
    np.testing.assert_allclose(predict_views(states, images, VIEWS["none"]), predict_many(states, images), rtol=1e-6)
    down = np.asarray(warp(images, np.tile(np.float32([1, 0]), (5, 1)), np.zeros(5, np.float32), np.ones(5, np.float32)))
    both = predict_views(states, images, ((0, 0, 0, 1), (1, 0, 0, 1)))
    np.testing.assert_allclose(both, (predict_many(states, images) + predict_many(states, down)) / 2, rtol=1e-5, atol=1e-7)
    assert both.shape == (2, 5, 10)


def test_recipe_forms_use_xla_convolutions_only_for_seeds_one_after_another_on_an_avx512_cpu():
    assert recipe_forms("cpu", frozenset({"avx2", "avx512f"}), sequential=True) == ("xla",) * 4
    assert recipe_forms("cpu", frozenset({"avx2", "fma"}), sequential=True) == ("matmul",) * 4
    assert recipe_forms("cpu", frozenset(), sequential=True) == ("matmul",) * 4  # flags unknown
    assert recipe_forms("cpu", frozenset({"avx512f"}), sequential=False) == ("matmul",) * 4  # vmapped: a batched matmul
    assert recipe_forms("gpu", frozenset({"avx512f"}), sequential=True) == ("matmul",) * 4
    assert has_avx512(frozenset({"avx512f", "sse2"})) is True and has_avx512(frozenset({"sse2"})) is False and has_avx512(frozenset()) is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's flags choose the forms only on the CPU backend")
def test_device_forms_follow_the_cpus_flags(monkeypatch):
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset({"sse2", "avx512f"}))
    assert device_forms(True) == ("xla",) * 4 and device_forms(False) == ("matmul",) * 4
    monkeypatch.setattr(common, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    assert device_forms(True) == ("matmul",) * 4


def test_cpu_name_and_flags_read_from_a_cpuinfo_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_model(info) == "AMD EPYC 9R14" and cpu_flags(info) == frozenset({"fpu", "sse2", "avx512f"})  # the first CPU's
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # no such lines (an ARM cpuinfo)
    assert cpu_flags(info) == frozenset() and cpu_model(info) == (platform.processor() or platform.machine())
    assert cpu_flags(tmp_path / "missing") == frozenset()
    if platform.machine() == "x86_64" and Path("/proc/cpuinfo").exists():  # this machine's own
        assert "sse2" in cpu_flags()


def test_xla_convolutions_train_one_step_per_call_on_cpu_and_matmul_ones_in_scanned_chunks():
    assert recipe_steps_per_call(("xla",) * 4, "cpu") == 1  # XLA:CPU's convolution is slow inside lax.scan
    assert recipe_steps_per_call(("matmul", "xla", "matmul", "matmul"), "cpu") == 1
    assert recipe_steps_per_call(("matmul",) * 4, "cpu") == 0  # auto: lax.scan chunks
    assert recipe_steps_per_call(("xla",) * 4, "gpu") == 0


def test_seed_lists():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds("5,") == [5]


@pytest.mark.slow  # a whole-process scenario: make test-slow
def test_improved_chooses_on_a_held_out_split_and_draws_the_ensembles_mistakes(tmp_path, mnist_dirs):
    cmd = [sys.executable, "experiments/improved.py", "--quick", "--train-examples", "640", "--holdout", "256", "--epochs", "1",
           "--seeds", "2", "--per-epoch-test", "true", "--out", str(tmp_path), "--data-dir", mnist_dirs["data_dir"],
           "--manual-dir", mnist_dirs["manual_dir"]]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    run_meta = json.loads((tmp_path / "results.json").read_text())
    (run,) = run_meta["runs"]
    assert run["split"] == "validation" and run["test_examples"] == 256  # the held-out images, not the test split
    assert [len(h["val_accuracy"]) for h in run["histories"]] == [1, 1]
    mistakes = run["ensemble_wrong_predictions"]
    assert mistakes["count"] == run["ensemble_wrong"] == len(mistakes["indices"]) and mistakes["total"] == 256
    assert abs(run["ensemble_accuracy"] - (1 - mistakes["count"] / 256)) < 1e-9
    assert run["layer_forms"] == list(device_forms(run["seeds_one_after_another"]))  # the forms it trained
    assert run_meta["machine"]["avx512"] == has_avx512(cpu_flags())
    label = {True: "(AVX-512)", False: "(no AVX-512)", None: ""}[run_meta["machine"]["avx512"]]
    assert f"{run_meta['machine']['cpu']} {label}".strip() + "," in (tmp_path / "table.md").read_text()
    if run["seeds_one_after_another"]:  # CPU: each seed's own training time, summed
        assert run["fit_time_s"] == pytest.approx(sum(h["fit_time_s"] for h in run["histories"]))
    assert (tmp_path / "wrong.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["model-0", "model-1"]
    assert sorted(run["views"]) == sorted(VIEWS)  # on validation, every test-time option the recipe chooses from
    assert run["views"][run["recipe"]["views"]]["ensemble_wrong"] == run["ensemble_wrong"]
    table = (tmp_path / "table.md").read_text()
    assert "validation accuracy %" in table and "**mean ± std**" in table and "**ensemble of 2**" in table

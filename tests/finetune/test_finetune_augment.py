"""Augmented views (``finetune(..., augment="light")``): each view a function of the file's
content, the recipe and the view index; each cached in a store space of its own; each epoch
trains every image on one of its views. Real texture photos (tests/conftest.py's texture_dir),
the tiny random-weight test_efficientnet, real onnxruntime sessions, a real store."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from featurebank.cli import main
from featurebank.errors import FineTuneError
from featurebank.export.registry import get_backbone
from featurebank.finetune.augment import augmented_view, recipe, view_params
from featurebank.finetune.job import finetune
from featurebank.finetune.model import split_backbone
from featurebank.finetune.train import train_top

TINY = dict(backbone="test_efficientnet", weights="random", epochs=2, progress=False)
PRE = get_backbone("efficientnet_lite0").preprocessing  # 224 input, crop_pct 0.875: the square is 256


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREBANK_CACHE", str(tmp_path_factory.mktemp("fb-cache")))
        yield os.environ["FEATUREBANK_CACHE"]


def _key(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_a_view_depends_on_the_content_recipe_and_index_only(texture_dir, tmp_path):
    src = next((texture_dir / "brick").iterdir())
    copy = tmp_path / "elsewhere" / "renamed.jpg"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    light, key = recipe("light"), _key(src)
    a = augmented_view(src, PRE, key, 1, light)
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, augmented_view(copy, PRE, _key(copy), 1, light))  # same bytes, same view
    assert not np.array_equal(a, augmented_view(src, PRE, key, 2, light))  # another index, another view
    params = [view_params(key, v, light) for v in range(1, 201)]
    scales = np.array([w * h for _, _, w, h, _ in params])
    assert 0.35 <= scales.min() and scales.max() <= 1.0 and scales.max() - scales.min() > 0.4
    assert 70 <= sum(p[4] for p in params) <= 130  # flipped about half the time
    assert all(0 <= left and left + w <= 1 + 1e-9 and 0 <= top and top + h <= 1 + 1e-9
               for left, top, w, h, _ in params)


def test_a_whole_square_flipped_view_is_the_mirrored_square(texture_dir):
    src = next((texture_dir / "gravel").iterdir())
    flip_only = {**recipe("light"), "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 1.0}
    got = augmented_view(src, PRE, _key(src), 3, flip_only, mode="exact")
    # the reference: the 160x160 photo's shorter side to 256 (bicubic), then that square to 224, mirrored
    square = Image.open(src).convert("RGB").resize((256, 256), Image.BICUBIC)
    want = np.asarray(square.resize((224, 224), Image.BICUBIC).transpose(Image.FLIP_LEFT_RIGHT))
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 1.0


def test_bad_recipe_names_and_view_indices_are_refused():
    with pytest.raises(FineTuneError, match=r"^augment must be one of none, light; got 'heavy'$"):
        recipe("heavy")
    assert recipe("none") is None
    with pytest.raises(FineTuneError, match=r"augmented views are numbered from 1 \(0 is the plain image\); got 0"):
        view_params("0" * 64, 0, recipe("light"))


def test_identical_views_train_exactly_like_no_views(tiny_backbone, texture_crops):
    X, y = texture_crops
    bottom, _ = split_backbone(tiny_backbone, "blocks.4")
    with torch.no_grad():
        A = bottom(torch.from_numpy(X)).numpy()
    weights = []
    for acts in (A, [A, A.copy(), A.copy()]):
        _, top = split_backbone(tiny_backbone, "blocks.4")
        top = __import__("copy").deepcopy(top)
        torch.manual_seed(1)
        head = torch.nn.Linear(256, 3)
        train_top(acts, y, top, head, epochs=2, seed=3, patience=None, progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in [*top.parameters(), *head.parameters()]]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_views_of_another_shape_are_refused(tiny_backbone, texture_crops):
    X, y = texture_crops
    bottom, top = split_backbone(tiny_backbone, "blocks.4")
    with torch.no_grad():
        A = bottom(torch.from_numpy(X)).numpy()
    with pytest.raises(FineTuneError, match=r"^view 1 has activations of shape \(12, 48, 4, 4\) float32, view 0 \(24, 48, 4, 4\) float32: "):
        train_top([A, A[:12]], y, top, torch.nn.Linear(256, 3), epochs=1, progress=False)


@pytest.fixture(scope="module")
def augmented(texture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-aug")
    r = finetune(texture_dir, out=root / "a.onnx", store=root / "store", augment="light", views=2, **TINY)
    return r, root


def test_each_view_is_cached_in_a_space_of_its_own_and_reused(augmented, texture_dir):
    from featurebank.artifact import read_model_card
    from featurebank.store import open_store

    first, root = augmented
    # 24 training images x 2 views + 30 plain (24 training + 6 validation)
    assert (first.embedded, first.cached) == (30 + 2 * 24, 0)
    with open_store(root / "store", create=False) as st:
        spaces = st.spaces()
        assert sorted((s.info.get("view", 0), len(s)) for s in spaces) == [(0, 30), (1, 24), (2, 24)]
        assert all(s.holds_activations for s in spaces)
        assert [s.info["augment"]["name"] for s in spaces if s.info.get("view")] == ["light", "light"]
    card = read_model_card(first.model_path)
    recipe_card = card.finetune["recipe"]
    assert recipe_card["augment"] == recipe("light") and recipe_card["views"] == 2
    again = finetune(texture_dir, out=root / "b.onnx", store=root / "store", augment="light", views=2,
                     checkpoint_dir=root / "b.ckpt", **TINY)
    assert (again.embedded, again.cached) == (0, 30 + 2 * 24)
    assert again.val_predictions == first.val_predictions
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in first.history]


def test_the_in_memory_views_equal_the_stored_ones(augmented, texture_dir, tmp_path):
    first, _ = augmented
    memory = finetune(texture_dir, out=tmp_path / "m.onnx", augment="light", views=2, **TINY)
    assert memory.val_predictions == first.val_predictions
    np.testing.assert_allclose([h["train_loss"] or 0 for h in memory.history],
                               [h["train_loss"] or 0 for h in first.history], rtol=1e-4)


def test_a_checkpoint_of_another_augmentation_is_not_resumed(augmented, texture_dir):
    first, root = augmented
    with pytest.raises(FineTuneError, match=r"holds checkpoints of another run \(different run_info, views\)"):
        finetune(texture_dir, out=root / "c.onnx", store=root / "store", checkpoint_dir=first.checkpoint_dir, **TINY)


def test_the_command_takes_augment_and_views(texture_dir, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "m.onnx"
    assert main(["finetune", str(texture_dir), "--backbone", "test_efficientnet", "--weights", "random", "--epochs",
                 "1", "--augment", "light", "--views", "1", "--store", str(tmp_path / "st"), "--no-progress",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert (f"frozen layers: 54 images embedded, 0 from the store {tmp_path / 'st'} (counting each of the 1 "
            "augmented views)\n") in text
    assert text.index("linear probe: cross-validated accuracy") < text.index("fine-tuned: validation accuracy")
    assert out.is_file()


@pytest.mark.parametrize("argv,message", [
    (["--views", "2"], "views=2 needs an augmentation: pass augment='light' (--augment light) or drop views"),
    (["--augment", "light", "--views", "0"], "views must be an integer from 1 to 64; got 0"),
])
def test_bad_views_exit_2_before_any_work(argv, message, texture_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["finetune", str(texture_dir), "--backbone", "test_efficientnet", "--weights", "random",
                 "--no-progress", *argv, "-o", str(tmp_path / "m.onnx")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.ckpt").exists()



def test_cached_views_and_the_full_forward_on_augmented_pixels_agree_on_the_first_steps_gradients(augmented,
                                                                                                  texture_dir):
    """The cached path (view 1 read from the store, computed by the exported ONNX bottom) against
    the reference: the same augmented pixels through the whole torch network, the bottom under no_grad."""
    from featurebank.artifact import space_fingerprint
    from featurebank.decoding import to_model_input
    from featurebank.export.weights import build_backbone
    from featurebank.finetune.train import batch_loss, set_train_modes
    from featurebank.store import open_store

    first, root = augmented
    train = sorted(str(p) for p in texture_dir.glob("*/*.jpg") if str(p) not in set(first.val_paths))[:12]
    keys = [_key(p) for p in train]
    t = torch.tensor([sorted(first.classes).index(os.path.basename(os.path.dirname(p))) for p in train])
    with open_store(root / "store", create=False) as st:
        view1 = next(s for s in st.spaces() if s.info.get("view") == 1)
        assert view1.fingerprint == space_fingerprint(view1.output.fingerprint, "fast",
                                                      view={"augment": recipe("light"), "view": 1})
        rows, found = view1.get(keys)
    assert found.all()
    cached = rows.reshape((len(rows), *view1.output.shape))

    spec = get_backbone("test_efficientnet")
    net = build_backbone(spec, "random", seed=0).model
    bottom, top = split_backbone(net, "blocks.4")  # the job's default for test_efficientnet (its last stage)
    pixels = np.stack([augmented_view(p, spec.preprocessing, k, 1, recipe("light"), mode="fast")
                       for p, k in zip(train, keys)])
    x = torch.from_numpy(to_model_input(pixels, spec.preprocessing, "float"))
    grads = []
    for path in ("cached", "full"):
        top.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        head = torch.nn.Linear(256, 3)
        set_train_modes(top, head, False)
        if path == "cached":
            a = torch.from_numpy(cached)
        else:
            with torch.no_grad():
                a = bottom(x)
        loss, _ = batch_loss(top, head, a, t)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in [*top.named_parameters(), *head.named_parameters()]})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-5, msg=name)

"""The vector-space rule of featurebank.artifact: (model output, decode mode) -> store space."""

from __future__ import annotations

import pytest

from featurebank.artifact import (
    DECODE_MODES,
    DEFAULT_DECODE_MODE,
    ModelCard,
    OutputSpec,
    Preprocessing,
    VectorSpace,
    resolve_space,
    space_fingerprint,
)
from featurebank.errors import FingerprintMismatchError, ModelCardError, StoreError

PRE = Preprocessing(input_size=(3, 8, 8), interpolation="bilinear", crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)


def _output(name: str, layer: str, backbone: str = "tiny") -> OutputSpec:
    return OutputSpec.make(name=name, layer=layer, pooling="avg", normalize=False, dim=4, backbone=backbone,
                           weights_sha256="0" * 64, weights_source="random", preprocessing=PRE, precision="fp32")


def _card(*outputs: OutputSpec, backbone: str = "tiny") -> ModelCard:
    return ModelCard(backbone=backbone, weights_source="random", weights_sha256="0" * 64, weights_license="mit",
                     outputs=outputs, preprocessing=PRE)


A, B = _output("a", "blocks.2"), _output("b", "blocks.5")
ONE = _card(A)
TWO = _card(A, B)
A_FAST, A_EXACT = space_fingerprint(A.fingerprint, "fast"), space_fingerprint(A.fingerprint, "exact")
B_FAST, B_EXACT = space_fingerprint(B.fingerprint, "fast"), space_fingerprint(B.fingerprint, "exact")
OTHER = space_fingerprint(_output("a", "blocks.2", backbone="other").fingerprint, "fast")


def test_names_and_default():
    assert DECODE_MODES == ("exact", "fast") and DEFAULT_DECODE_MODE == "fast"


# ---------------------------------------------------------------- no store, no recorded space


def test_model_alone_gives_its_output_under_the_default_or_asked_decode_mode():
    assert resolve_space(ONE) == VectorSpace(A_FAST, A, "fast")
    assert resolve_space(ONE, decode_mode="exact") == VectorSpace(A_EXACT, A, "exact")
    assert resolve_space(TWO, output="blocks.5") == VectorSpace(B_FAST, B, "fast")  # by layer too
    with pytest.raises(ModelCardError, match=r"model has 2 outputs \(a, b\); name one"):
        resolve_space(TWO)
    # a bad argument, not a bad model card: a plain ValueError
    with pytest.raises(ValueError, match="^decode_mode must be one of exact, fast; got decode_mode='quick'$") as info:
        resolve_space(ONE, decode_mode="quick")
    assert type(info.value) is ValueError


# ---------------------------------------------------------------- the store's spaces


def test_store_alone_one_space_is_chosen():
    assert resolve_space(available={OTHER: 7}) == VectorSpace(OTHER)
    assert resolve_space(space=B_EXACT) == VectorSpace(B_EXACT)  # a named space without a model: as given


def test_store_alone_none_or_several_spaces_say_what_exists_and_how_to_choose():
    with pytest.raises(StoreError, match=r"^/data/s holds no vectors yet; embed images into it first "
                                         r"\(`featurebank embed SOURCE --store /data/s`\)$"):
        resolve_space(available={}, store_name="/data/s")
    with pytest.raises(StoreError, match=rf"^the store holds 2 spaces; choose one with space= \(--space\) or model= "
                                         rf"\(--model\): {A_FAST} \(3 vectors\); {OTHER} \(5 vectors\)$"):
        resolve_space(available={A_FAST: 3, OTHER: 5})
    with pytest.raises(ValueError, match="needs a model card, a space fingerprint or the store's spaces"):
        resolve_space()


def test_store_with_model_picks_the_space_of_its_output_and_decode_mode():
    # several spaces: the one this model's output writes
    assert resolve_space(ONE, available={OTHER: 5, A_EXACT: 3}) == VectorSpace(A_EXACT, A, "exact")
    assert resolve_space(TWO, output="b", available={A_FAST: 1, B_FAST: 2, OTHER: 5}) == VectorSpace(B_FAST, B, "fast")
    # both decode modes held: the one asked for
    both = {A_FAST: 3, A_EXACT: 4}
    assert resolve_space(ONE, decode_mode="exact", available=both) == VectorSpace(A_EXACT, A, "exact")
    with pytest.raises(StoreError, match=r"^s holds vectors of model 'm.onnx' \(output a\) under decode modes exact, "
                                         r"fast; pick one with decode_mode= \(--decode-mode\)$"):
        resolve_space(ONE, available=both, model_name="m.onnx", store_name="s")


def test_store_without_the_models_space_names_what_it_holds_and_how_to_fix():
    with pytest.raises(StoreError, match=rf"^s holds no vectors of model 'tiny' \(output a, decode modes exact, fast\); "
                                         rf"it holds {OTHER} \(5 vectors\)\. Embed with that model first "
                                         r"\(`featurebank embed`\), or pick a space from `featurebank store info`$"):
        resolve_space(ONE, available={OTHER: 5}, store_name="s")
    with pytest.raises(StoreError, match=r"holds no vectors of model 'tiny' \(output a, decode mode fast\); "
                                         rf"it holds {A_EXACT} \(3 vectors\)\."):
        resolve_space(ONE, decode_mode="fast", available={A_EXACT: 3})
    with pytest.raises(StoreError, match=r"it holds no vectors yet\."):
        resolve_space(ONE, available={})


# ---------------------------------------------------------------- recorded spaces (classifier, index)


def test_recorded_space_picks_output_and_decode_mode():
    assert resolve_space(TWO, recorded={"classifier": B_EXACT}) == VectorSpace(B_EXACT, B, "exact")
    assert resolve_space(TWO, recorded={"classifier": B_EXACT, "index": B_EXACT}).decode_mode == "exact"
    # a bare output fingerprint fixes the output only: the decode mode asked for, else the default
    assert resolve_space(TWO, recorded={"classifier": B.fingerprint}) == VectorSpace(B_FAST, B, "fast")
    assert resolve_space(TWO, decode_mode="exact", recorded={"index": B.fingerprint}) == VectorSpace(B_EXACT, B, "exact")
    assert resolve_space(ONE, recorded={"index": None}) == VectorSpace(A_FAST, A, "fast")  # an index with no space


def test_recorded_space_of_another_model_is_a_fingerprint_mismatch():
    with pytest.raises(FingerprintMismatchError, match=rf"^the classifier was built on vectors of space {OTHER}, which "
                                                       r"model 'tiny' \(output a, b\) does not produce under any decode "
                                                       r"mode; use the model its vectors came from, or rebuild it from "
                                                       r"this model's vectors$"):
        resolve_space(TWO, recorded={"classifier": OTHER})
    with pytest.raises(FingerprintMismatchError, match=r"the index was built on vectors of space .*\(output a\)"):
        resolve_space(TWO, output="a", recorded={"index": B_FAST})  # another output of the same model


def test_recorded_spaces_that_disagree_are_refused():
    with pytest.raises(FingerprintMismatchError, match=r"^the classifier \(output a\) and the index \(output b\) come "
                                                       r"from different outputs of the model"):
        resolve_space(TWO, recorded={"classifier": A_FAST, "index": B_FAST})
    with pytest.raises(FingerprintMismatchError, match=r"^the classifier \(fast\) and the index \(exact\) were built "
                                                       r"with different decode modes; rebuild one of them$"):
        resolve_space(ONE, recorded={"classifier": A_FAST, "index": A_EXACT})
    with pytest.raises(FingerprintMismatchError, match=r"^decode_mode='exact' was asked for, but the classifier and "
                                                       r"index expect vectors decoded with 'fast'; leave decode_mode out$"):
        resolve_space(ONE, decode_mode="exact", recorded={"classifier": A_FAST, "index": A_FAST})


def test_named_space_is_checked_against_the_model():
    assert resolve_space(TWO, space=B_EXACT, available={B_EXACT: 2}) == VectorSpace(B_EXACT, B, "exact")
    with pytest.raises(FingerprintMismatchError, match=rf"^space {OTHER} is not one that model 'tiny' \(output a\) "
                                                       r"produces under any decode mode"):
        resolve_space(ONE, space=OTHER)


def test_classes_and_finetune_fields_round_trip_and_old_cards_keep_their_fingerprint():
    import dataclasses
    import json

    old = _card(_output("embedding", "blocks.5"))
    meta = old.to_metadata()
    # a card written before `classes` / `finetune` existed has neither key, and reads back unchanged
    assert "featurebank.classes" not in meta and "featurebank.finetune" not in meta
    again = ModelCard.from_metadata(meta)
    assert again == old and again.classes == () and not again.classifies and again.finetune == {}
    prov = {"parent": {"backbone": "tiny", "weights_sha256": "0" * 64}, "recipe": {"epochs": 3, "seed": 0}}
    new = dataclasses.replace(old, classes=("cat", "dog"), finetune=prov, fingerprint="")
    assert new.fingerprint != old.fingerprint and new.classifies
    back = ModelCard.from_metadata(new.to_metadata())
    assert back == new and back.classes == ("cat", "dog") and back.finetune == prov
    edited = dict(new.to_metadata(), **{"featurebank.classes": json.dumps(["cat", "fox"])})
    with pytest.raises(ModelCardError, match="fingerprint does not match its fields"):
        ModelCard.from_metadata(edited)
    with pytest.raises(ModelCardError, match=r"classes must be distinct; got \['a', 'a'\]"):
        dataclasses.replace(old, classes=("a", "a"), fingerprint="")

"""Every option that names a decode mode, a device, a pooling, a precision or an input format
offers exactly the names their owning room defines, once, and defaults to its default."""

from __future__ import annotations

import argparse

from featurebank.artifact import CARD_PRECISIONS, DECODE_MODES, INPUT_FORMATS, POOLINGS, PRECISIONS
from featurebank.cli import build_parser
from featurebank.embedder.devices import DEFAULT_DEVICE, DEVICES

OWNED = {"decode_mode": DECODE_MODES, "device": DEVICES, "pool": POOLINGS, "precision": PRECISIONS,
         "input_format": INPUT_FORMATS}


def _options(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*words, name))
        elif action.dest in OWNED:
            yield " ".join(words), action


def test_named_choices_come_from_their_room():
    seen = {}
    for command, action in _options(build_parser()):
        if command == "sweep" and action.dest == "pool":  # a comma-separated list, checked by sweep_layers
            continue
        # export and --backbone make INT8 models (they calibrate them): the card's precisions; cut writes float ones
        owned = CARD_PRECISIONS if action.dest == "precision" and command != "cut" else OWNED[action.dest]
        assert action.choices is owned, (command, action.option_strings, action.choices)
        if action.dest == "device":
            assert action.default == DEFAULT_DEVICE, command
        seen.setdefault(action.dest, set()).add(command)
    assert seen == {
        "decode_mode": {"embed", "train", "evaluate", "predict", "index build", "search", "serve", "sweep", "fewshot",
                        "store export", "audit", "select", "map"},
        "device": {"embed", "train", "evaluate", "predict", "index build", "search", "serve", "sweep", "fewshot",
                   "audit", "select", "map"},
        "pool": {"embed", "train", "evaluate", "predict", "index build", "search", "fewshot", "export", "cut", "audit",
                 "select", "map"},
        "precision": {"embed", "train", "evaluate", "predict", "index build", "search", "fewshot", "export", "cut",
                      "audit", "select", "map"},
        "input_format": {"export", "cut"},
    }

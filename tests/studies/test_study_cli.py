"""`featurebank sweep` and `featurebank fewshot`: the thin shells, run in-process."""

from __future__ import annotations

import json

from featurebank.cli import COMMAND_MODULES, build_parser, main


def test_commands_are_registered():
    assert "featurebank.cli.study_cmds" in COMMAND_MODULES
    parser = build_parser()
    args = parser.parse_args(["sweep", "imgs/", "--store", "s", "--layers", "blocks.1,features", "--pool", "avg,max"])
    assert args.layers == ["blocks.1", "features"] and args.pool == ["avg", "max"]
    args = parser.parse_args(["fewshot", "imgs/", "--store", "s", "--backbone", "test_efficientnet", "--layer", "blocks.3"])
    assert args.backbone == "test_efficientnet" and args.layers == ["blocks.3"] and args.shots == "1,2,5,10,20,all"


def test_sweep_command_prints_table_recommendation_and_writes_files(texture_dir, studies_store, tmp_path, capsys,
                                                                    texture_sweep):
    out = tmp_path / "out"
    code = main(["sweep", str(texture_dir), "--backbone", "test_efficientnet", "--weights", "random", "--all-stages",
                 "--store", str(studies_store), "--folds", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "recommended: " in text and "featurebank export test_efficientnet --layer" in text
    assert all(layer in text for layer in ("blocks.0", "blocks.4", "features"))
    saved = json.loads((out / "sweep.json").read_text())
    # the command measures exactly what the library call measured
    assert [r["accuracy_folds"] for r in saved["rows"]] == [r["accuracy_folds"] for r in texture_sweep[0].rows]
    assert (out / "sweep.png").stat().st_size > 1000


def test_fewshot_command_with_model_flag(lfw_dir, tiny_model, studies_store, tmp_path, capsys):
    code = main(["fewshot", str(lfw_dir), "--store", str(studies_store), "--model", str(tiny_model), "--shots", "2,5",
                 "--repeats", "2", "--test-size", "0.3", "--no-progress", "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["shots"] == [2, 5] and payload["n_test"] == 60
    assert len(payload["draws"]["5"]) == 2


def test_bad_arguments_are_one_line_errors(lfw_dir, tiny_model, studies_store, capsys):
    code = main(["fewshot", str(lfw_dir), "--store", str(studies_store), "--model", str(tiny_model), "--shots", "2,500",
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("featurebank: error: shots=500 needs 500 training images per class")
    assert "Traceback" not in err
    code = main(["sweep", str(lfw_dir), "--backbone", "test_efficientnet", "--weights", "random", "--layers", "nope",
                 "--store", str(studies_store), "--no-progress"])
    assert code == 2
    assert "unknown layer 'nope'" in capsys.readouterr().err

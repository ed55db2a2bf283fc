"""The ``featurebank`` command: a thin shell over the public functions.

Each subcommand lives in one module of this package that defines ``register(subparsers)``;
each maps to one public library function with the same parameter names (the clip-retrieval /
autofaiss pattern). Errors featurebank raises on purpose become one line on stderr and exit
status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from featurebank import __version__
from featurebank.errors import FeaturebankError

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "featurebank.cli.export_cmds",
    "featurebank.cli.embed_cmds",
    "featurebank.cli.classify_cmds",
    "featurebank.cli.store_cmds",
    "featurebank.cli.search_cmds",
    "featurebank.cli.serve_cmds",
    "featurebank.cli.study_cmds",
    "featurebank.cli.finetune_cmds",
    "featurebank.cli.curation_cmds",
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; an option's help ends with ``(default: X)`` taken
    from the parser itself, unless the help already says what the default is (in words, for
    options whose default is "not given")."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (action.option_strings and action.default is not None and action.default is not False
                and action.default != argparse.SUPPRESS and "default" not in help.lower()):
            help += " (default: %(default)s)"
        return help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurebank",
        formatter_class=_Formatter,
        description=(
            "Transfer learning by feature extraction.\n\n"
            "  1. export a pretrained backbone cut at a layer to one self-describing ONNX file\n"
            "  2. embed folders of images into a content-addressed vector store\n"
            "  3. train / evaluate light classifiers, search and deduplicate on the vectors"
        ),
        epilog="Run `featurebank COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"featurebank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, _Formatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except FeaturebankError as exc:
        print(f"featurebank: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad arguments found by the library (k > count, wrong dim ...)
        print(f"featurebank: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"featurebank: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = {"torch": "export", "timm": "export", "torchvision": "export", "ray": "ray",
                 "fastapi": "service", "uvicorn": "service"}.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"featurebank: error: `featurebank {args.command}` needs {exc.name}, which is not installed; "
              f"pip install 'featurebank[{extra}]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `featurebank ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("featurebank: interrupted; finished work is kept, run the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

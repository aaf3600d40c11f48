"""The `lida` command (see shared/CONTRACT.md). Thin: parses, dispatches, prints one-line errors.

Heavy modules (torch, Beam, Prefect) are imported inside the verbs so `lida --help` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

# verb -> (help, issue that delivers it); verbs appear in the contract's order.
VERBS: dict[str, tuple[str, int]] = {
    "init": ("create the workspace and model version 0", 3),
    "pretrain": ("unsupervised pre-training on real images only", 3),
    "gallery": ("register or list labelled images per source", 4),
    "adapt": ("few-shot attribution adaptation on the gallery", 3),
    "reindex": ("rebuild the FAISS attribution index", 4),
    "scan": ("the nightly job: shard, fingerprint, embed, attribute, write tables", 4),
    "attribute": ("attribute a few images now, one JSON object per image", 5),
    "eval": ("labelled evaluation: Rank-1, mAP, detection accuracy, confusion matrix", 3),
    "report": ("self-contained HTML report for a scan", 5),
    "query": ("DuckDB SQL over the workspace tables", 5),
    "serve": ("register and serve the Prefect deployments on their schedules", 5),
    "demo": ("the main job on bundled sample data in a fresh workspace", 5),
}


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lida",
        description="Tell where AI-generated images came from: low-bit fingerprints, retrieval, few-shot adaptation.",
    )
    parser.add_argument(
        "--workspace",
        default=os.environ.get("LIDA_WORKSPACE", "./lida-workspace"),
        help="workspace path or fsspec URL (env LIDA_WORKSPACE; default ./lida-workspace)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--runner", choices=("local", "dask", "flink", "spark", "dataflow"), default="local")
    parser.add_argument("--runner-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (text, _) in VERBS.items():
        sub.add_parser(verb, help=text, description=text).add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _not_yet(verb: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        raise UserError(f"'lida {verb}' is not available in this version yet (issue #{VERBS[verb][1]})")

    return run


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {verb: _not_yet(verb) for verb in VERBS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help(sys.stderr)
        return 2
    try:
        return HANDLERS[args.verb](args)
    except UserError as exc:
        _fail(args, str(exc))
        return 2
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130


def _fail(args: argparse.Namespace, message: str) -> None:
    if args.json:
        print(json.dumps({"error": message}))
    print(f"lida: error: {message}", file=sys.stderr)

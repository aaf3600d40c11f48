"""The `lida` command (README.md, "Using it"). Thin: parses, dispatches, prints one-line errors.

Heavy modules (torch, Beam, Prefect) are imported inside the verbs so `lida --help` is fast.

Over 400 lines on purpose: every verb's arguments, help and one-line output sit in one file, so
the whole surface of the command (README.md's table) can be read and checked in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from lida_core.errors import UserError
from pipelines.runners import RUNNERS  # names only: Beam itself loads when a job runs

# verb -> help; the contract's verbs in its order, then lida's additions.
VERBS: dict[str, str] = {
    "init": "create the workspace and model version 0",
    "pretrain": "unsupervised pre-training on real images only",
    "gallery": "register or list labelled images per source",
    "adapt": "few-shot attribution adaptation on the gallery",
    "reindex": "rebuild the FAISS attribution index",
    "scan": "the nightly job: shard, fingerprint, embed, attribute, write tables",
    "attribute": "attribute a few images now, one JSON object per image (exit 3 if any file failed)",
    "eval": "labelled evaluation: Rank-1, mAP, detection accuracy, confusion matrix",
    "report": "self-contained HTML report for a scan",
    "query": "DuckDB SQL over the workspace tables",
    "serve": "register and serve the Prefect deployments on their schedules",
    "demo": "the main job on bundled sample data in a fresh workspace",
    "flow": "run one Prefect flow now, no server needed: nightly (scan the inboxes), reindex, adapt",
    "config": "show or change workspace settings (inboxes, labelled_inbox, schedules, thresholds)",
    "compact": "merge finished scans' small Parquet files into large ones, exactly once",
}



def _whole(text: str, least: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (0 epochs or a negative batch would silently do nothing or the default)."""
    return _whole(text, 1, "at least 1")


def whole_number(text: str) -> int:
    """argparse type: a whole number >= 0 (pre-training epochs: 0 keeps the weights and only calibrates)."""
    return _whole(text, 0, "0 or more")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one error line (with where to find the usage), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _global_options(parser: argparse.ArgumentParser, workspace, device, runner, runner_option, json_flag) -> None:
    parser.add_argument("--workspace", default=workspace,
                        help="workspace path or fsspec URL (env LIDA_WORKSPACE; default ./lida-workspace)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=device,
                        help="where embeddings are computed: auto (CUDA when present), cpu or cuda (default auto)")
    parser.add_argument("--runner", choices=tuple(RUNNERS), default=runner,
                        help="where Beam jobs run (default local: one worker per core)")
    parser.add_argument("--runner-option", action="append", default=runner_option, metavar="KEY=VALUE",
                        help="a runner setting, repeatable: workers=N, mode=multi_processing|multi_threading|in_memory "
                             "(local), dask_address=HOST:PORT (dask); other runners get theirs unchanged")
    parser.add_argument("--json", action="store_true", default=json_flag, help="machine-readable output on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lida",
        description="Tell where AI-generated images came from: low-bit fingerprints, retrieval, few-shot adaptation.",
    )
    _global_options(parser, os.environ.get("LIDA_WORKSPACE", "./lida-workspace"), "auto", "local", [], False)
    # The same options after the verb (`lida query SQL --json`): no defaults there, so they only set what is given.
    after = argparse.ArgumentParser(add_help=False)
    _global_options(after, *[argparse.SUPPRESS] * 5)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs = {verb: sub.add_parser(verb, help=text, description=text, parents=[after]) for verb, text in VERBS.items()}

    p = verbs["init"]
    p.add_argument("--profile", metavar="PROFILE", help="paper, srm, stats, small or phase; default: paper with CUDA, else srm "
                   "(co-occurrences of low-bit SRM residuals + a closed-form whitening head); stats, small and phase are "
                   "earlier CPU profiles")
    p.add_argument("--checkpoint", help="a lida checkpoint, or (profile paper) the authors' ResNet-50 .pth")
    p.add_argument("--fingerprint", choices=("scale", "binary"),
                   help="low bits scaled, (x & 7) * 36 (the authors' released code and the default), or binarised, "
                        "255 where any is set (the paper's equation); network profiles only")
    p.add_argument("--patch", choices=("max", "min", "random"),
                   help="read one 32x32 patch instead of the whole image: the highest or lowest gradient complexity, "
                        "or a seeded random one (profile paper: the authors' patch mode, chosen on the 256x256 fingerprint)")
    p.add_argument("--patch-seed", type=whole_number, default=0, help="the seed of --patch random (default 0)")

    p = verbs["pretrain"]
    p.add_argument("paths", nargs="+", metavar="PATH", help="real images: files, folders, fsspec URLs")
    p.add_argument("--epochs", type=whole_number, help="0: keep the weights, only compute the real prototype and calibrate "
                   "(the srm profile fits in closed form and has no epochs)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--labels", choices=("folders",), help="classification pretext: one sub-folder per class")
    p.add_argument("--input", choices=("fingerprint", "rgb"), default="fingerprint", help="rgb: the paper's ablation")
    p.add_argument("--seed", type=int, default=0)

    p = verbs["gallery"]
    gsub = p.add_subparsers(dest="gallery_verb", metavar="ACTION", required=True)
    add = gsub.add_parser("add", help="register labelled images of one source", parents=[after])
    add.add_argument("--source", required=True, help="a generator's name, or 'real'")
    add.add_argument("paths", nargs="+", metavar="PATH")
    gsub.add_parser("list", help="sources, image counts, model and index versions", parents=[after])


    p = verbs["adapt"]
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--seed", type=int, default=0)

    p = verbs["eval"]
    p.add_argument("directory", metavar="DIR", help="one sub-folder per source, 'real' among them; or GenImage's layout, "
                   "<generator>/{train,val}/{ai,nature} (gallery from train, queries from val, nature = real)")
    p.add_argument("--shots", type=positive_int, default=5)
    p.add_argument("--real-shots", type=positive_int, metavar="K",
                   help="real images in the gallery, when not --shots (detection leans on them: docs/results.md, session 27)")
    p.add_argument("--queries", type=positive_int, metavar="N", help="at most N query images per source (a seeded draw)")
    p.add_argument("--holdout", type=float, metavar="SHARE", help="share of the K shots held out to pick the adaptation's "
                   "epoch (default 0.2); 0 trains on every shot for all epochs, as the paper does (network profiles)")
    p.add_argument("--perturb", action="append", default=[], metavar="KIND:V,...",
                   help="also score the queries perturbed, e.g. jpeg:95,90,85 or blur:1 (Gaussian sigma, px); repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-adapt", action="store_true", help="evaluate the current model as it is")
    p.add_argument("--epochs", type=positive_int, help="adaptation epochs on the K-shot gallery (network profiles; srm fits in closed form)")
    p.add_argument("--input", choices=("fingerprint", "rgb"), help="check the model takes this input")

    p = verbs["scan"]
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders (recursively), fsspec URLs")
    p.add_argument("--scan-id", help="re-running a scan id completes it; nothing is added twice")

    p = verbs["query"]
    p.add_argument("sql", metavar="SQL", help="views: images, embeddings, attributions, gallery")

    verbs["compact"].add_argument("--scan-id", action="append", metavar="ID", dest="scan_ids",
                                  help="only this finished scan (repeatable); default: every finished scan")

    verbs["attribute"].add_argument("paths", nargs="+", metavar="FILE", help="images (files, folders, fsspec URLs)")

    p = verbs["report"]
    p.add_argument("--scan-id", help="default: the latest finished scan")
    p.add_argument("--output", metavar="FILE", help="default: WORKSPACE/reports/<scan id>.html")

    p = verbs["demo"]
    p.add_argument("--dir", default="lida-demo", help="the demo folder, deleted and remade each run (default ./lida-demo)")
    p.add_argument("--pretrain-epochs", type=positive_int, default=3, help="unused by the demo's srm profile (a closed-form fit)")
    p.add_argument("--adapt-epochs", type=positive_int, default=40, help="unused by the demo's srm profile (a closed-form fit)")
    p.add_argument("--pretrain-images", type=positive_int, default=48, help="real images written for pre-training")

    p = verbs["flow"]
    p.add_argument("name", choices=("nightly", "reindex", "adapt"))
    p.add_argument("--epochs", type=positive_int, help="adapt: adaptation epochs")
    p.add_argument("--force", action="store_true", help="adapt: run on any new labelled image")

    p = verbs["config"]
    p.add_argument("key", nargs="?", help="a setting; schedules.scan etc. for one schedule")
    p.add_argument("values", nargs="*", help="new value(s); lists take several, 'none' clears an optional one")
    return parser


class _Progress:
    """Progress on stderr: a bar for decoding, one line per epoch."""

    def __init__(self, quiet: bool = False):
        self.bar = None
        self.quiet = quiet

    def __call__(self, stage: str, info: dict) -> None:
        if self.quiet:
            return
        if stage in ("decode", "hash"):
            from tqdm import tqdm

            if self.bar is None or self.bar.total != info["total"] or self.bar.desc != stage:
                self._close()
                self.bar = tqdm(total=info["total"], desc=stage, unit="img", file=sys.stderr, leave=False)
            self.bar.update(info["done"] - self.bar.n)
            if info["done"] >= info["total"]:
                self._close()
            return
        self._close()
        if stage == "epoch":
            parts = [f"epoch {info['epoch']}/{info['epochs']}", f"loss {info['loss']:.4f}"]
            if "images_per_s" in info:
                parts.append(f"{info['images_per_s']:.0f} img/s")
            if "holdout_accuracy" in info:
                parts.append(f"held-out accuracy {info['holdout_accuracy']:.3f}")
            print("  " + ", ".join(parts), file=sys.stderr, flush=True)
        elif stage == "resume":
            print(f"  resuming at epoch {info['epoch']}/{info['epochs']}", file=sys.stderr, flush=True)
        elif stage == "perturb":
            print(f"  perturbation {info['done'] + 1}/{info['total']}: {info['perturbation']} on {info['images']} queries",
                  file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _device(args: argparse.Namespace) -> str:
    """--device auto takes CUDA when torch sees a GPU; cuda without one is a user error."""
    if args.device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if args.device == "cuda":
        raise UserError("--device cuda: torch sees no CUDA device on this machine")
    return "cpu"


def _emit(args: argparse.Namespace, result: dict, text: str) -> int:
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(text)
    return 0


def _errors_text(errors: list) -> str:
    if not errors:
        return ""
    lines = [f"{len(errors)} file(s) skipped:"] + [f"  {uri}: {reason}" for uri, reason in errors[:10]]
    if len(errors) > 10:
        lines.append(f"  ... and {len(errors) - 10} more")
    return "\n" + "\n".join(lines)


def cmd_init(args: argparse.Namespace) -> int:
    from lida_core.lifecycle import init_workspace

    r = init_workspace(args.workspace, args.profile, args.checkpoint, fingerprint_mode=args.fingerprint,
                       patch_select=args.patch, patch_seed=args.patch_seed)
    return _emit(args, r, f"workspace {r['workspace']}: profile {r['profile']}, fingerprint {r['fingerprint']}, "
                          f"model {r['model_version']} ({r['weights']} weights)")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lida_core.gallery import reindex
    from lida_core.lifecycle import pretrain_version
    from lida_core.workspace import Workspace

    ws = Workspace(args.workspace)
    r = pretrain_version(ws, args.paths, args.epochs, args.batch_size, args.lr, args.labels, args.input, args.seed,
                         _Progress(args.json), before_current=lambda version: reindex(ws, version))
    calibration = (f"calibrated on all of them in {r['calibration_folds']} cross-fitted folds" if r.get("calibration_folds")
                   else f"{r['calibration']} held out for calibration")
    return _emit(args, r, f"model {r['model_version']} (from {r['parent']}): pre-trained on {r['images']} real images, "
                          f"{calibration} (threshold {r['threshold']:.3f})" + _errors_text(r["errors"]))


def cmd_gallery(args: argparse.Namespace) -> int:
    from lida_core.gallery import summary as gallery_summary
    from lida_core.index import open_index
    from lida_core.workspace import Workspace

    ws = Workspace(args.workspace)
    if args.gallery_verb == "add":
        from pipelines import gallery  # Beam and torch: 3-4 s of imports that listing does not need

        r = gallery.add(ws, args.source, args.paths, _Progress(args.json), args.runner, args.runner_option)
        return _emit(args, r, f"{r['source']}: {r['added']} added, {r['already_registered']} already registered "
                              f"(model {r['model_version']}, index {r['index']['index_version']})" + _errors_text(r["errors"]))
    r = gallery_summary(ws)
    index = open_index(ws)
    r["index_version"] = index.version if index else None
    r["index_model_version"] = index.model_version if index else None
    lines = [f"model {r['model_version']}, index {r['index_version'] or 'none'}, {r['images']} gallery images"]
    lines += [f"  {source:24s} {count:6d}" for source, count in r["sources"].items()] or ["  (empty: 'lida gallery add --source NAME PATH...')"]
    return _emit(args, r, "\n".join(lines))


def cmd_adapt(args: argparse.Namespace) -> int:
    from lida_core.lifecycle import adapt_and_reindex
    from lida_core.workspace import Workspace

    r = adapt_and_reindex(Workspace(args.workspace), args.epochs, args.lr, args.seed, _Progress(args.json))
    verdict = (f"promoted to current ({r['rule']})" if r["promoted"]
               else f"NOT promoted (worse on held-out gallery images; rule: {r['rule']}); current unchanged")
    for line in r.get("advice") or []:  # on stderr either way: stdout stays the answer (or its JSON)
        print(f"advice: {line}", file=sys.stderr)
    return _emit(args, r, f"candidate {r['model_version']} (from {r['parent']}): held-out accuracy "
                          f"{r['holdout_accuracy_before']:.3f} -> {r['holdout_accuracy_after']:.3f}; {verdict}")


def cmd_eval(args: argparse.Namespace) -> int:
    from lida_core.evaluate import evaluate, evaluation_markdown, save_evaluation
    from lida_core.perturb import parse_perturbations
    from lida_core.workspace import Workspace

    ws = Workspace(args.workspace)
    if args.shots < 1:
        raise UserError("--shots must be at least 1")
    if args.holdout is not None and not 0 <= args.holdout < 1:
        raise UserError(f"--holdout: a share from 0 to below 1, got {args.holdout}")
    try:
        perturbations = parse_perturbations(args.perturb)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    r = evaluate(ws, args.directory, args.shots, args.seed, not args.no_adapt, args.input, args.epochs, _Progress(args.json),
                 perturbations=perturbations, max_queries=args.queries, holdout=args.holdout, real_shots=args.real_shots)
    r["saved"] = save_evaluation(ws, r)
    return _emit(args, r, evaluation_markdown(r) + f"\nsaved: {r['saved']['markdown']}")


def cmd_reindex(args: argparse.Namespace) -> int:
    from lida_core.gallery import reindex
    from lida_core.workspace import Workspace

    ws = Workspace(args.workspace)
    with ws.lock("reindex"):
        r = reindex(ws)
    return _emit(args, r, f"index {r['index_version']}: {r['count']} vectors of model {r['model_version']} "
                          f"({r['kind']}, {r['dimension']}-d)")


def cmd_scan(args: argparse.Namespace) -> int:
    from lida_core.workspace import Workspace
    from pipelines.scan import run_scan

    device = _device(args)
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    bar = None

    def shards(done: int, total: int) -> None:
        """A bar of committed shards on stderr; tqdm shows it only on a terminal (disable=None)."""
        nonlocal bar
        from tqdm import tqdm

        if bar is None:
            bar = tqdm(total=total, desc="shards", unit="shard", file=sys.stderr, disable=None, leave=False)
        bar.update(done - bar.n)

    try:
        r = run_scan(Workspace(args.workspace), args.paths, args.scan_id, args.runner, args.runner_option, device, say,
                     shard_progress=None if args.json else shards)
    finally:
        if bar is not None:
            bar.close()
    total = max(r["images"], 1)
    status = ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in sorted(r["status"].items()))
    predicted = ", ".join(f"{k} {v}" for k, v in r["predicted"].items()) or "none"
    return _emit(args, r, f"scan {r['scan_id']} (model {r['model_version']}): {r['images']} files in {r['seconds']:.1f} s "
                          f"({r['files_per_second']:.1f} files/s): {status}\n"
                          f"predicted: {predicted}" + _counters_text(r.get("counters")) + _errors_text(r["errors"]))


def _counters_text(counters: dict | None) -> str:
    if not counters:
        return ""
    return "\nBeam counters (this run's shards): " + ", ".join(f"{k} {v}" for k, v in counters.items())


def cmd_attribute(args: argparse.Namespace) -> int:
    from lida_core.attribute import attribute_files
    from lida_core.workspace import Workspace

    results = attribute_files(Workspace(args.workspace), args.paths)
    for result in results:
        print(json.dumps(result, default=str))
    return 0 if all("error" not in r for r in results) else 3


def cmd_compact(args: argparse.Namespace) -> int:
    from lida_core.compact import compact
    from lida_core.workspace import Workspace

    r = compact(Workspace(args.workspace), args.scan_ids)
    return _emit(args, r, f"compacted {r['scans']} finished scans: {r['files_before']} files -> {r['files_after']}"
                          + (f" ({r['recovered']} interrupted compactions finished)" if r["recovered"] else ""))


def cmd_query(args: argparse.Namespace) -> int:
    from lida_core.query import run_query
    from lida_core.workspace import Workspace

    columns, rows = run_query(Workspace(args.workspace), args.sql)
    records = [dict(zip(columns, row, strict=True)) for row in rows]
    if args.json:
        print(json.dumps(records, default=str))
        return 0
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [min(60, max(len(r[i]) for r in cells)) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(v[:60].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"({len(rows)} rows)", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lida_core.report import write_report
    from lida_core.workspace import Workspace

    r = write_report(Workspace(args.workspace), args.scan_id, args.output)
    return _emit(args, r, f"report for scan {r['scan_id']}: {r['report']} ({r['bytes'] // 1024} KiB; "
                          f"{r['files']} files, {r['generated']} judged generated)")


def cmd_demo(args: argparse.Namespace) -> int:
    from lida_cli.demo import run_demo

    say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    r = run_demo(args.dir, say, args.pretrain_epochs, args.adapt_epochs, runner=args.runner,
                 runner_options=args.runner_option, pretrain_images=args.pretrain_images)
    status = ", ".join(f"{k} {v}" for k, v in sorted(r["scan"]["status"].items()))
    return _emit(args, r, "\n".join([
        f"demo done in {r['seconds']:.0f} s: model {r['adapted_model']} ({'promoted' if r['promoted'] else 'not promoted'}), "
        f"scan 'demo': {r['scan']['images']} files ({status}), "
        f"{r['attribution_accuracy_on_inbox']:.0%} attributed to their true source",
        f"  workspace: {r['workspace']}",
        f"  tables:    {r['tables']}/<images|embeddings|attributions|gallery>/",
        f"  report:    {r['report']}",
        "  try:", f"    {r['query_example']}"]))


def cmd_flow(args: argparse.Namespace) -> int:
    import logging

    from flows.common import prefect_console_logging
    from lida_core.workspace import Workspace

    prefect_console_logging(logging.INFO if not args.json else logging.WARNING)
    ws = Workspace(args.workspace).require()
    device = _device(args)
    if args.name == "nightly":
        from flows.nightly import run_nightly

        r = run_nightly(ws.url, runner=args.runner, runner_options=args.runner_option, device=device)
        return _emit(args, r, f"nightly: {r['new_files']} new files, {r['already_scanned']} already scanned; report {r['report']}")
    if args.name == "reindex":
        from flows.reindex import run_reindex

        r = run_reindex(ws.url)
        return _emit(args, r, f"index {r['index_version']}: {r['count']} vectors of model {r['model_version']}")
    from flows.adapt import run_adaptation

    r = run_adaptation(ws.url, epochs=args.epochs, force=args.force)
    return _emit(args, r, r["report"])


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from flows.common import prefect_console_logging
    from flows.serve import serve
    from lida_core.workspace import Workspace

    prefect_console_logging(logging.INFO)
    serve(Workspace(args.workspace), args.runner, args.runner_option, _device(args))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lida_core.workspace import Workspace, set_config_value

    ws = Workspace(args.workspace)
    if args.key and args.values:
        set_config_value(ws, args.key, args.values)
    config = asdict(ws.config())
    if args.key:
        head, _, tail = args.key.partition(".")
        if head not in config or (tail and tail not in (config[head] or {})):
            raise UserError(f"no setting {args.key!r}; settings: {', '.join(sorted(config))}")
        value = config[head][tail] if tail else config[head]
        return _emit(args, {args.key: value}, json.dumps(value))
    return _emit(args, config, json.dumps(config, indent=2))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"init": cmd_init, "pretrain": cmd_pretrain, "gallery": cmd_gallery, "adapt": cmd_adapt, "eval": cmd_eval,
                 "reindex": cmd_reindex, "scan": cmd_scan, "query": cmd_query, "compact": cmd_compact,
                 "attribute": cmd_attribute, "report": cmd_report, "demo": cmd_demo, "flow": cmd_flow,
                 "serve": cmd_serve, "config": cmd_config}


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        # Beam warns on import about optional Google Cloud clients that lida never uses.
        handler.addFilter(lambda record: "apitools not found" not in record.getMessage())
    for noisy in ("apache_beam", "faiss", "distributed", "prefect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not os.environ.get("LIDA_DEBUG"):  # a failing worker's traceback is logged by Beam, then raised: say it once
        logging.getLogger("apache_beam.runners").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help(sys.stderr)
        return 2
    from lida_core.errors import user_errors

    try:
        return HANDLERS[args.verb](args)
    except user_errors() as exc:
        _fail(args, str(exc))
        return 2
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130
    except BrokenPipeError:  # `lida ... | head`: the reader has gone; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # never a bare traceback: one line, and the details on request
        if os.environ.get("LIDA_DEBUG"):
            raise
        name, detail = worker_error(exc)
        if name in {e.__name__ for e in user_errors()}:
            _fail(args, detail)
            return 2
        _fail(args, f"{name}: {detail} (set LIDA_DEBUG=1 for the traceback)")
        return 1


def worker_error(exc: BaseException) -> tuple[str, str]:
    """(exception class name, its message's first line); for an error Beam re-raised from a worker, the worker's own.

    Beam wraps what a worker raised in a RuntimeError whose text is the worker's traceback;
    its last `Name: message` line is what went wrong.
    """
    import re

    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:
        found = re.findall(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Mismatch)): (.+?)(?: \[while running '.*'\])?$", text, re.M)
        if found:
            return found[-1]
    return type(exc).__name__, one_line(text)


def one_line(text: str, limit: int = 600) -> str:
    """A message as one line: a first line that introduces a list ("...errors:") keeps the list, joined by '; '."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if not lines[0].endswith(":") or len(lines) == 1:
        return lines[0]
    joined = f"{lines[0]} {'; '.join(lines[1:])}"
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def run() -> None:
    """The installed `lida` command: main(), then leave without running C++ static destructors.

    Beam's in-process job service and torch's thread pools own native threads. Tearing them
    down during interpreter exit sometimes aborts with "terminate called without an active
    exception" (SIGABRT) after the work is done and published, which turns a good run into
    exit code -6. Every lida write is atomic and already synced by the time main() returns,
    so flushing our own streams and leaving with os._exit loses nothing.
    """
    import logging

    code = main()
    _stop_prefect_servers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _stop_prefect_servers() -> None:
    """Stop the temporary Prefect server a flow started (Prefect stops it at exit, which os._exit skips).

    Left running, it outlived the command (uvicorn, ~200 MB, parent pid 1) and held the
    command's stdout open, so `lida flow reindex | cat` never returned.
    """
    server = sys.modules.get("prefect.server.api.server")
    if server is None:
        return
    for instance in list(getattr(server.SubprocessASGIServer, "_instances", {}).values()):
        try:
            instance.stop()
        except Exception:  # noqa: BLE001 - best effort: never turn a finished run into a failure
            pass


def _fail(args: argparse.Namespace, message: str) -> None:
    if args.json:
        print(json.dumps({"error": message}))
    print(f"lida: error: {message}", file=sys.stderr)

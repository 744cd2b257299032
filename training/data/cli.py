"""`genserve-data`: download, list and verify datasets in a data dir."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from genserve.training.data.cifar import cifar10_sources
from genserve.training.data.download import DEFAULT_TIMEOUT, SOURCES, FileCheck, check_local, download
from genserve.training.data.embedded import mnist_5k_path
from genserve.training.data.errors import DatasetError, fix_command
from genserve.training.data.registry import DATASETS, resolve_data_dir
from genserve.training.data.textures import texture_folder

# Worse states sort later; `verify` fails on missing and corrupt.
_RANK = {"ok": 0, "unverified": 1, "missing": 2, "corrupt": 3}


@dataclass
class Report:
    """What a data dir holds for one dataset."""

    name: str
    state: str = "ok"  # ok | unverified (present, no checksum on record) | missing | corrupt
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, state: str, line: str) -> None:
        self.lines.append(line)
        if state != "ok":
            self.problems.append(line)
        if _RANK[state] > _RANK[self.state]:
            self.state = state


def inspect(name: str, root: Path) -> Report:
    """Check the files the loader of `name` would use (checksums where they are on record)."""
    report = Report(name)
    if name == "mnist-5k":
        try:
            report.add("ok", f"embedded: {mnist_5k_path()}")
        except DatasetError as err:
            report.add("missing", str(err))
        return report
    if name == "cifar10":
        return _inspect_cifar10(root, report)
    if name == "faces" and (root / "faces").is_dir():
        report.add("unverified", f"{root / 'faces'}: your own face folder (no checksum on record)")
        return report
    if name == "textures":
        try:
            folder = texture_folder(root)
        except DatasetError:
            folder = root / "brodatz"
        if folder.name != "brodatz":
            report.add("unverified", f"{folder}: your own texture images (no checksum on record)")
            return report
    for spec in SOURCES[name]:
        _add_check(report, check_local(root, spec))
    return report


def _inspect_cifar10(root: Path, report: Report) -> Report:
    sources = cifar10_sources(root)
    if not sources:
        report.add("missing", f"no CIFAR-10 under {root} (cifar10/, cifar-10-batches-py/ or cifar10-jpg/)")
        return report
    kind, path = sources[0]
    for source in ("cifar10", "cifar10-jpg"):
        spec = SOURCES[source][0]
        if path == root / spec.path:
            note = " [lossy JPEG copy, not the official pickle batches]" if source == "cifar10-jpg" else ""
            _add_check(report, check_local(root, spec), note)
            return report
    report.add("unverified", f"{path}: {kind} (no checksum on record for this layout)")
    return report


def _add_check(report: Report, check: FileCheck, note: str = "") -> None:
    state = {"ok": "ok", "missing": "missing"}.get(check.state, "corrupt")
    report.add(state, f"{check.path}: {check.state}" + ("" if check.ok else f" ({check.detail})") + note)


def _summary(report: Report) -> str:
    if not report.problems:
        return f"ok: {len(report.lines)} files verified" if len(report.lines) > 1 else f"ok: {report.lines[0]}"
    more = len(report.problems) - 1
    return f"{report.state}: {report.problems[0]}" + (f" (+{more} more)" if more else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genserve-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="download and verify datasets")
    get.add_argument("names", nargs="+", metavar="NAME", choices=[*SOURCES, "mnist-5k"])
    get.add_argument("--base-url", help="mirror laid out like the data dir (default: official sources; "
                     "env GENSERVE_DATA_URL)")  # fmt: skip
    get.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds without data before failing")
    listing = commands.add_parser("list", help="which datasets are present, missing or verified")
    check = commands.add_parser("verify", help="verify the checksums of datasets; exit 1 if any is bad")
    check.add_argument("names", nargs="+", metavar="NAME", choices=[*DATASETS, "cifar10-jpg"])
    for sub in (get, listing, check):
        sub.add_argument("--data-dir", help="data dir (default: $GENSERVE_DATA, else ./data)")
    args = parser.parse_args(argv)
    root = resolve_data_dir(args.data_dir)
    try:
        if args.command == "download":
            for name in args.names:
                download(name, root, args.base_url, timeout=args.timeout)
            return 0
        if args.command == "list":
            print(f"data dir: {root}")
            for name in DATASETS:
                report = inspect(name, root)
                bad = report.state in ("missing", "corrupt") and name in SOURCES
                print(f"{name:<14} {_summary(report)}" + (f"\n{'':<14} fix: {fix_command(name, root)}" if bad else ""))
            return 0
        worst = "ok"
        for name in args.names:
            report = inspect(name, root)
            print(f"{name}: {report.state}")
            for line in report.lines:
                print(f"  {line}")
            if report.state in ("missing", "corrupt") and name in SOURCES:
                print(f"  fix: {fix_command(name, root)}")
            worst = max(worst, report.state, key=_RANK.__getitem__)
        return 1 if worst in ("missing", "corrupt") else 0
    except DatasetError as err:
        print(f"genserve-data: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

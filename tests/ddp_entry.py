"""A torchrun entry for tests/test_distributed.py: genserve-train's own main (training.cli), plus what
the test needs to see from every rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_entry.py MODEL ... --out RUN

On ranks other than 0 a Python audit hook records every write-like file operation under RUN
(open for writing, mkdir, rename/replace, remove, rmtree); each rank then writes, into
$GENSERVE_TEST_AUDIT_DIR (outside RUN), rank-N.json (those operations) and rank-N.safetensors (its
final model weights).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.truncate", "shutil.rmtree", "os.symlink")


def main(argv: list[str]) -> int:
    audit_dir = Path(os.environ["GENSERVE_TEST_AUDIT_DIR"])
    rank = int(os.environ.get("RANK", "0"))
    out = Path(argv[argv.index("--out") + 1]).resolve()
    writes: list[list[str]] = []

    def under_out(path: object) -> bool:
        if isinstance(path, bytes):
            path = path.decode()
        if not isinstance(path, str | os.PathLike):
            return False
        return Path(os.path.abspath(path)).is_relative_to(out)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            if writing and under_out(path):
                writes.append([event, str(path)])
        elif event in PATH_EVENTS and args and (under_out(args[0]) or (len(args) > 1 and under_out(args[1]))):
            writes.append([event, str(args[0])])

    from safetensors.torch import save_file

    import genserve.training.trainer as trainer_module

    trainers = []
    original_run = trainer_module.Trainer.run

    def run(self):
        trainers.append(self)
        return original_run(self)

    trainer_module.Trainer.run = run
    if rank != 0:
        sys.addaudithook(hook)
    from genserve.training.cli import main as train_main

    code = train_main(argv)
    audit_dir.mkdir(parents=True, exist_ok=True)
    (audit_dir / f"rank-{rank}.json").write_text(json.dumps({"writes": writes, "exit": code}))
    if trainers:
        weights = {k: v.detach().cpu().contiguous() for k, v in trainers[0].model.state_dict().items()}
        save_file(weights, str(audit_dir / f"rank-{rank}.safetensors"))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

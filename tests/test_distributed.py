"""Training under torchrun with DistributedDataParallel (training/distributed.py), on gloo with 2 CPU
processes: the sharding and seeding units, then real torchrun runs of genserve-train's main on the
embedded mnist-5k digits (tests/ddp_entry.py records what each rank wrote and its final weights).

- 2 processes with the global batch B (B/2 rows per rank) end where 1 process with batch B ends,
  within a stated tolerance (the `ae` model: no randomness inside a step, so only the order of the
  floating-point sums differs);
- every rank ends with the same weights (GAN and AAE: one DDP wrapper per network; the VAE's learned
  decoder std, a parameter outside every network);
- only rank 0 writes into the run directory;
- a run stopped after one epoch and resumed ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genserve.training.checkpoint import find_checkpoint
from genserve.training.distributed import Distributed, epoch_seed, shard_indices, shard_size

ENTRY = Path(__file__).with_name("ddp_entry.py")
# 128 images, global batch 16: 8 steps an epoch; tiny final evaluation.
TINY = ["--dataset", "mnist-5k", "--limit", "128", "--batch-size", "16", "--log-every", "2",
        "--nll-k", "2", "--nll-images", "16", "--fid-samples", "16", "--device", "cpu"]
# 1 process against 2 after 8 Adam steps: the gradients differ only by float32 summation order
# (measured: at most 1.5e-8 on weights up to 0.34 in size).
EQUIVALENCE_ATOL = 1e-6


# --- units ---------------------------------------------------------------------------------------

def test_shards_follow_distributed_sampler_semantics() -> None:
    order = torch.tensor([7, 3, 9, 1, 5])
    shards = [shard_indices(order, rank, 2) for rank in range(2)]
    assert [s.tolist() for s in shards] == [[7, 9, 5], [3, 1, 7]]  # padded with the first index
    assert shard_size(5, 2) == 3 and shard_size(4, 2) == 2
    assert shard_indices(order, 0, 1) is order
    # Without padding, the ranks' shards of one step are exactly one process's batch.
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        one = set(order[step * 16:(step + 1) * 16].tolist())
        two = {i for rank in range(2) for i in shard_indices(order, rank, 2)[step * 8:(step + 1) * 8].tolist()}
        assert one == two


def test_epoch_seeds_differ_by_rank_epoch_and_stream() -> None:
    seeds = {epoch_seed(0, rank, epoch, stream) for rank in range(2) for epoch in range(3) for stream in range(2)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert epoch_seed(5, 1, 2, 0) == epoch_seed(5, 1, 2, 0)


def test_environment_parsing_and_checks() -> None:
    assert not Distributed.from_environment({}).enabled
    assert not Distributed.from_environment({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}).enabled
    two = Distributed.from_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (two.rank, two.world_size, two.is_main, two.local_batch_size(16)) == (1, 2, False, 8)
    with pytest.raises(ValueError, match="must be an integer"):
        Distributed.from_environment({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="torchrun"):
        Distributed.from_environment({"WORLD_SIZE": "2"})

    class Config:
        batch_size, balance = 15, False

    with pytest.raises(ValueError, match="multiple of 2"):
        two.check(Config())
    Config.batch_size, Config.balance = 16, True
    with pytest.raises(ValueError, match="--balance"):
        two.check(Config())


# --- torchrun ------------------------------------------------------------------------------------

def train(tmp_path: Path, name: str, processes: int, *args: str) -> tuple[Path, Path]:
    """genserve-train ARGS --out tmp/NAME with 1 process (plain) or N under torchrun; (run dir, audit dir)."""
    run_dir, audit = tmp_path / name, tmp_path / f"{name}-audit-{len(list(tmp_path.glob(f'{name}-audit-*')))}"
    env = {**os.environ, "GENSERVE_TEST_AUDIT_DIR": str(audit), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    result = subprocess.run([*launcher, str(ENTRY), *args, *TINY, "--out", str(run_dir)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    for rank in range(processes):
        record = json.loads((audit / f"rank-{rank}.json").read_text())
        assert record["exit"] == 0
        if rank:
            assert record["writes"] == [], f"rank {rank} wrote into the run directory: {record['writes'][:5]}"
    return run_dir, audit


def rank_weights(audit: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(audit / f"rank-{rank}.safetensors"))


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run_dir) / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        worst = (a[key].float() - b[key].float()).abs().max().item() if a[key].numel() else 0.0
        assert worst <= atol, f"{key}: differs by {worst:.3g} (tolerance {atol:g})"


def test_two_processes_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    one, one_audit = train(tmp_path, "one", 1, "ae", "--epochs", "1")
    two, two_audit = train(tmp_path, "two", 2, "ae", "--epochs", "1")
    reference = checkpoint_weights(one)
    assert_same_weights(checkpoint_weights(two), reference, EQUIVALENCE_ATOL)
    assert_same_weights(rank_weights(two_audit, 1), rank_weights(two_audit, 0))  # the ranks agree exactly
    # The same steps were taken: same number, and the logged losses (means over the ranks) agree.
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (one, two)]
    assert [e["step"] for e in metrics[0]["epochs"]] == [e["step"] for e in metrics[1]["epochs"]] == [8]
    assert metrics[1]["epochs"][0]["train_loss"] == pytest.approx(metrics[0]["epochs"][0]["train_loss"], rel=1e-4)
    assert [s["step"] for s in metrics[1]["steps"]] == [2, 4, 6, 8]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert metrics[1]["final"]["test_mse"] > 0
    assert (two / "plots" / "reconstructions.png").is_file()  # rank 0 drew the pictures


@pytest.mark.parametrize(
    "model, options",
    [("gan", []), ("aae", []), ("vae", ["--likelihood", "gaussian-learned"])],
    ids=["gan", "aae", "vae-learned-std"],
)
def test_every_rank_ends_with_the_same_weights(tmp_path: Path, model: str, options: list[str]) -> None:
    run_dir, audit = train(tmp_path, model, 2, model, "--epochs", "1", *options)
    final = rank_weights(audit, 0)
    # Parameters agree bitwise. Batch-norm statistics (the default GAN's generator) are each rank's own
    # on CPUs, where gloo has no SyncBatchNorm; rank 0's are the ones saved.
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    ranks_agree = {k: v for k, v in final.items() if not (k.endswith(statistics) and k.startswith("generator."))}
    assert_same_weights({k: rank_weights(audit, 1)[k] for k in ranks_agree}, ranks_agree)
    assert_same_weights(checkpoint_weights(run_dir), final)
    if model == "vae":
        assert "log_sigma" in final  # the parameter outside every network was averaged too


@pytest.mark.slow
def test_resume_under_torchrun_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # A VAE on binarised digits: per-rank reparameterisation and binarisation draws, reseeded per epoch.
    # A constant learning rate: the cosine schedule follows the run's total, which --epochs 1 then 2 changes.
    constant = ("--lr-schedule", "constant")
    whole, whole_audit = train(tmp_path, "whole", 2, "vae", "--epochs", "2", *constant)
    part, _ = train(tmp_path, "part", 2, "vae", "--epochs", "1", *constant)
    part, part_audit = train(tmp_path, "part", 2, "vae", "--epochs", "2", "--resume", *constant)
    assert_same_weights(checkpoint_weights(part), checkpoint_weights(whole))
    assert_same_weights(rank_weights(part_audit, 1), rank_weights(whole_audit, 1))
    metrics = json.loads((part / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]

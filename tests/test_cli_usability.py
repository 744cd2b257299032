"""What a new user trips over (issue 15): Ctrl-C, port clashes, a missing repository, --resume on a
missing run, client options after the command, boolean flags, the model list in --help, the
pictures' axes and the progress of the final evaluation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import RunningServer, environment_for_subprocess, server_config, serving_process

from genserve.training.cli import build_parser as train_parser
from genserve.training.cli import main as train_main
from genserve.training.config import TrainConfig


# --- 1. Ctrl-C ---------------------------------------------------------------------------------
def test_sigint_during_training_exits_130_with_one_line_naming_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "genserve.training.cli", "ae", "--dataset", "mnist-5k", "--limit", "64", "--batch-size", "32",
         "--epochs", "1000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment_for_subprocess(),
        # As from a terminal: a test run started in the background has SIGINT ignored, and children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "epoch-000001").is_dir():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("genserve-train: interrupted; the last whole epoch is kept in "), message
    assert str(out / "checkpoints" / "epoch-") in message
    assert f"genserve-train ae --out {out} --resume" in message


def test_interrupted_export_and_eval_exit_130_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import genserve.export.pipeline as export_pipeline
    import genserve.training.evaluation.cli as eval_cli
    from genserve.export.cli import main as export_main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_pipeline, "export_run", interrupted)
    assert export_main([str(tmp_path / "run"), "--repository", str(tmp_path / "repo"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "genserve-export: interrupted" in err and "no partial version" in err
    monkeypatch.setattr(eval_cli, "evaluate_run", interrupted)
    assert eval_cli.main([str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "genserve-eval: interrupted" in err and "metrics.json is unchanged" in err


# --- 2. ports and 3. the repository at start-up ----------------------------------------------------
def _taken_port() -> socket.socket:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def _start_error(config) -> str:
    from genserve.serving.server import GenserveServer, StartupError

    with pytest.raises(StartupError) as info:
        asyncio.run(GenserveServer(config).start())
    return str(info.value)


def test_port_in_use_is_one_line_naming_the_port_and_flag_before_anything_starts(tmp_path: Path) -> None:
    with _taken_port() as listener:
        port = listener.getsockname()[1]
        process = serving_process("--repository", str(tmp_path), "--port", str(port), "--metrics-port", "0")
        events = process.finish()
        assert process.process.returncode == 1
        assert [e["event"] for e in events] == ["startup_failed"], process.lines
        assert f"gRPC port {port}" in events[0]["error"] and "--port" in events[0]["error"]

        error = _start_error(server_config(tmp_path, metrics_port=port))
        assert f"metrics port {port}" in error and "--metrics-port" in error
    error = _start_error(server_config(tmp_path, port=port, metrics_port=port))
    assert "both" in error and "--metrics-port" in error


def test_missing_repository_is_an_error_unless_asked_to_wait(tmp_path: Path, caplog) -> None:
    missing = tmp_path / "typo"
    error = _start_error(server_config(missing))
    assert str(missing) in error and "genserve-export" in error and "--wait-for-repository" in error
    assert "needs repository polling" in _start_error(server_config(missing, wait_for_repository=True))

    caplog.set_level(logging.INFO, logger="genserve")
    server = RunningServer(server_config(missing, wait_for_repository=True, poll_interval_s=0.2)).start()
    try:
        events = [r.getMessage() for r in caplog.records]
        assert "waiting_for_repository" in events and "serving" in events
        assert events.index("waiting_for_repository") < events.index("listening")
    finally:
        server.stop()


def test_empty_repository_is_a_warning_saying_how_to_publish(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="genserve")
    server = RunningServer(server_config(tmp_path)).start()
    try:
        warnings = [r for r in caplog.records if r.getMessage() == "no_models"]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        hint = warnings[0].genserve_fields["hint"]
        assert f"genserve-export RUN_DIR --repository {tmp_path}" in hint
    finally:
        server.stop()


# --- 4. --resume on a run directory that does not exist -------------------------------------------
def test_resume_on_a_missing_run_directory_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "runs" / "typo"
    assert train_main(["vae", "--out", str(missing), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"the run directory {missing} does not exist" in err and "drop --resume" in err
    assert not missing.exists()


# --- 5. client options before or after the command --------------------------------------------------
def test_client_options_go_before_or_after_the_command() -> None:
    from genserve.clients.cli import build_parser

    parser = build_parser()
    for argv in (["--address", "h:1", "--png", "generate", "m"], ["generate", "m", "--address", "h:1", "--png"],
                 ["--timeout", "3", "generate", "--address", "h:1", "m", "--png"]):
        args = parser.parse_args(argv)
        assert (args.address, args.png, args.model) == ("h:1", True, "m"), argv
    args = parser.parse_args(["generate", "m"])
    assert (args.address, args.png, args.timeout) == ("127.0.0.1:8001", False, 60.0)  # the defaults stay


def test_connection_refused_names_the_address_and_how_to_start_a_server(capsys) -> None:
    from genserve.clients.cli import main as client_main

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    assert client_main(["models", "--address", address, "--retries", "0", "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no genserve server answers at {address}" in err and "genserve-serve" in err


# --- 6. boolean flags --------------------------------------------------------------------------------
def test_every_boolean_training_option_takes_x_no_x_and_a_value() -> None:
    parser = train_parser()
    booleans = [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("bool", "bool | None")]
    assert {"binarize", "compile", "amp", "balance", "supervised_prior"} <= set(booleans)
    for name in booleans:
        flag = "--" + name.replace("_", "-")
        assert getattr(parser.parse_args(["vae", flag]), name) is True
        assert getattr(parser.parse_args(["vae", "--no-" + flag[2:]]), name) is False
        assert getattr(parser.parse_args(["vae", flag, "false"]), name) is False  # as existing scripts write it
        assert getattr(parser.parse_args(["vae", flag, "true"]), name) is True
    with pytest.raises(SystemExit):
        parser.parse_args(["vae", "--no-binarize", "true"])
    with pytest.raises(SystemExit):
        parser.parse_args(["vae", "--binarize", "maybe"])


def test_training_options_and_defaults_come_from_the_config_dataclass() -> None:
    parser = train_parser()
    for field in dataclasses.fields(TrainConfig):
        if field.name not in ("model", "extra"):
            assert "--" + field.name.replace("_", "-") in parser._option_string_actions, field.name
    help_text = " ".join(parser.format_help().split())
    assert f"(default {TrainConfig.epochs})" in help_text and f"(default {TrainConfig.noise_factor})" in help_text


def test_serving_boolean_options_have_negations() -> None:
    from genserve.serving.cli import build_parser

    args = build_parser().parse_args(["--no-require-gpu", "--log-json", "--wait-for-repository"])
    assert (args.require_gpu, args.log_json, args.wait_for_repository) == (False, True, True)


# --- 7. the model list in --help ----------------------------------------------------------------------
def test_help_lists_every_registered_model_kind_from_the_registry(monkeypatch) -> None:
    import genserve.training.models as training_models
    from genserve.training.models import model_classes

    help_text = train_parser().format_help()
    for name, cls in model_classes().items():
        assert any(line.split()[:1] == [name] and cls.summary() in line for line in help_text.splitlines()), name

    class Preset(model_classes()["vae"]):
        """A preset added to the registry: the help shows it with no other change."""

    registry = {**model_classes(), "vae-preset": Preset}
    monkeypatch.setattr(training_models, "model_classes", lambda: registry)
    lines = [line.split(None, 1) for line in train_parser().format_help().splitlines() if line.strip()]
    assert ["vae-preset", "A preset added to the registry: the help shows it with no other change"] in lines
    assert train_parser().parse_args(["vae-preset"]).model == "vae-preset"


# --- 8. progress of the final evaluation -----------------------------------------------------------
def test_final_nll_is_logged_in_steps_and_equals_the_one_shot_estimate(caplog) -> None:
    from genserve.training.data.loader import fixed_test_loader
    from genserve.training.evaluation import vae_likelihood_metrics
    from genserve.training.models import build_model
    from genserve.training.models.likelihood import estimate_nll

    config = TrainConfig(model="dense-vae", nll_k=300, nll_images=40)
    torch.manual_seed(0)
    model = build_model("dense-vae", (1, 28, 28), config).eval()
    images = (torch.rand(40, 1, 28, 28) * 255).to(torch.uint8)
    loader = fixed_test_loader(images, None, 20, binarize=False, noise_factor=None)
    caplog.set_level(logging.INFO, logger="genserve.eval")
    torch.manual_seed(1)
    metrics = vae_likelihood_metrics(model, config, loader)
    messages = [r.getMessage() for r in caplog.records]
    assert "test NLL: 300 importance samples on each of 40 test images" in messages
    assert any(m.startswith("test NLL: 300 importance samples on each of 40 test images: done in") for m in messages)
    torch.manual_seed(1)
    with torch.no_grad():
        batches = list(loader)
        for batch in batches:  # the ELBO pass draws one posterior sample per image first
            model.eval_losses(batch)
        one_shot = estimate_nll(model, torch.cat([b.images for b in batches]), k=300).mean().item()
    assert metrics["test_nll_nats"] == pytest.approx(one_shot, rel=1e-6)


# --- 9. and 10. the pictures -------------------------------------------------------------------------
def test_losses_picture_draws_kl_and_its_weight_apart_from_the_loss(tmp_path: Path) -> None:
    from genserve.training.plots import loss_curves, loss_panels

    epochs = [{"epoch": e, "step": 10 * e, "train_loss": 170.0 - e, "test_loss": 171.0 - e, "train_recon": 150.0,
               "test_recon": 151.0, "train_kl": 20.0, "test_kl": 20.0, "train_kl_weight": e / 3} for e in (1, 2, 3)]
    steps = [{"step": s, "loss": 172.0, "recon": 150.0, "kl": 21.0, "kl_weight": s / 30} for s in range(2, 31, 2)]
    assert loss_panels(epochs, steps) == (["loss", "recon"], ["kl"], ["kl_weight"])
    gan = [{"step": 5, "loss": 3.0, "d_loss": 1.2, "g_loss": 1.8, "d_real": 0.6, "d_fake": 0.4}]
    assert loss_panels([], gan) == (["loss", "d_loss", "g_loss"], [], ["d_real", "d_fake"])
    path = loss_curves(tmp_path / "losses.png", epochs, steps, "vae: losses", {"loss": "nats per image"})
    assert path.stat().st_size > 10_000


def test_manifold_spans_the_prior_at_two_standard_deviations_with_round_ends(tmp_path: Path) -> None:
    from genserve.training.pictures import MANIFOLD_STEPS, prior_span
    from genserve.training.plots import manifold

    span = prior_span(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    assert (span[0].item(), span[-1].item(), len(span)) == (-2.0, 2.0, MANIFOLD_STEPS)
    wide = prior_span(5 * torch.randn(20000, generator=torch.Generator().manual_seed(0)))  # the AAE's N(0, 25)
    assert (wide[0].item(), wide[-1].item()) == (-10.0, 10.0)
    images = torch.rand(MANIFOLD_STEPS**2, 1, 8, 8)
    assert manifold(tmp_path / "m.png", images, span.tolist(), span.tolist(), "t", ("z[0]", "z[1]")).is_file()
    with pytest.raises(ValueError, match="evenly spaced"):
        manifold(tmp_path / "m.png", images, [0.0, 0.1, 0.5], [0.0, 1.0, 2.0], "t", ("z[0]", "z[1]"))

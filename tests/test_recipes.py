"""The training recipes: named presets keep the seeds' published layer plans, the defaults' ingredients
(learning-rate schedule, output-bias start, spectral norm, EMA generator) do what they claim, and the
best checkpoint of a GAN is the one with the best sample quality."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from torch import nn

from genserve.training.checkpoint import find_checkpoint, load_trained_model, read_checkpoint
from genserve.training.config import TrainConfig
from genserve.training.data.types import ImageDataset
from genserve.training.models import Batch, StepContext, build_model, model_class, model_classes, model_kinds
from genserve.training.models.gan import MinibatchStdDev
from genserve.training.trainer import Trainer, lr_factor, resolve_batch_size, resolve_binarize


def linear_sizes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def conv_channels(module: nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


def tiny_dataset(n_train: int = 64, n_test: int = 32) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n_train + n_test, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    labels = torch.randint(10, (n_train + n_test,), generator=g)
    names = [str(i) for i in range(10)]
    return ImageDataset("tiny", images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], names)


def trained_dcgan(steps: int):
    """The default DCGAN after `steps` training steps on one random batch."""
    torch.manual_seed(0)
    model = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan"))
    images = torch.rand(8, 1, 28, 28)
    optimizers = model.configure_optimizers()
    for step in range(steps):
        model.train_step(Batch(images, images), optimizers, StepContext(step, 0.0, contextlib.nullcontext))
    return model


def test_every_preset_names_an_existing_default() -> None:
    kinds = model_kinds()
    defaults = model_kinds(presets=False)
    assert defaults == ("vae", "dense-vae", "ae", "dae", "gan", "dcgan", "aae")
    presets = {kind: cls.preset_of for kind, cls in model_classes().items() if cls.preset_of}
    assert presets == {
        "vae-keras": "vae", "dense-vae-csnl": "dense-vae", "ae-keras": "ae", "dae-keras": "dae",
        "gan-balanced": "gan", "dcgan-classic": "dcgan",
    }
    assert set(kinds) == set(defaults) | set(presets)
    for kind in kinds:
        assert model_class(kind).summary() and "\n" not in model_class(kind).summary()
    with pytest.raises(ValueError, match="vae-keras"):  # the error lists every kind, presets included
        TrainConfig(model="nope").validate()


def test_presets_build_the_seeds_layer_plans() -> None:
    shape = (1, 28, 28)
    keras = build_model("vae-keras", shape, TrainConfig(model="vae-keras"))
    assert keras.latent_dim == 2 and conv_channels(keras.encoder) == [32, 64, 64, 64]
    assert linear_sizes(keras.encoder) == [(64 * 14 * 14, 32), (32, 2), (32, 2)]
    csnl = build_model("dense-vae-csnl", shape, TrainConfig(model="dense-vae-csnl"))
    assert linear_sizes(csnl.encoder) == [(784, 420), (420, 210), (210, 105), (105, 16), (105, 16)]
    assert linear_sizes(csnl.decoder) == [(16, 200), (200, 400), (400, 800), (800, 784)]
    ae = build_model("ae-keras", shape, TrainConfig(model="ae-keras"))
    assert conv_channels(ae.encoder) == [16, 8, 8] and ae.latent_dim == 128
    dae = build_model("dae-keras", shape, TrainConfig(model="dae-keras"))
    assert conv_channels(dae.encoder) == [32, 32, 16] and dae.noisy_inputs
    gan = build_model("gan-balanced", shape, TrainConfig(model="gan-balanced"))
    assert gan.balance and gan.generator_ema is None and gan.d_lr_scale == 1.0
    assert not any(isinstance(m, nn.BatchNorm1d) for m in gan.generator.modules())
    assert not any("parametrizations" in name for name, _ in gan.discriminator.named_parameters())
    classic = build_model("dcgan-classic", shape, TrainConfig(model="dcgan-classic"))
    assert classic.generator_ema is None and any(isinstance(m, nn.BatchNorm2d) for m in classic.discriminator)
    assert not any(isinstance(m, MinibatchStdDev) for m in classic.discriminator) and classic.real_label == 1.0
    aae = build_model("aae", shape, TrainConfig(model="aae"), 10)
    assert aae.prior_spec()["std"] == 5.0 and linear_sizes(aae.encoder) == [(784, 1000), (1000, 1000), (1000, 8)]


def test_default_recipes() -> None:
    shape = (1, 28, 28)
    vae = build_model("vae", shape, TrainConfig())
    assert vae.latent_dim == 32 and vae.default_lr_schedule == "cosine"
    assert any(type(m).__name__ == "ResidualBlock" for m in vae.modules())
    gan = build_model("gan", shape, TrainConfig(model="gan"))
    assert gan.generator_ema is not None and gan.default_lr_schedule == "constant"
    sn = [name for name, _ in gan.discriminator.named_parameters() if "parametrizations" in name]
    assert len(sn) == sum(isinstance(m, nn.Linear) for m in gan.discriminator.modules())  # every D layer
    assert any(isinstance(m, MinibatchStdDev) for m in gan.discriminator)
    optimizers = gan.configure_optimizers()
    assert optimizers["discriminator"].param_groups[0]["lr"] == 2 * optimizers["generator"].param_groups[0]["lr"]
    dcgan = build_model("dcgan", shape, TrainConfig(model="dcgan"))
    assert dcgan.generator_ema is not None and any(isinstance(m, MinibatchStdDev) for m in dcgan.discriminator)
    assert dcgan.real_label == 0.9


def test_minibatch_stddev_feature() -> None:
    x = torch.tensor([[0.0, 2.0], [2.0, 4.0]])
    out = MinibatchStdDev()(x)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 1.0], [2.0, 4.0, 1.0]]))
    maps = MinibatchStdDev()(torch.zeros(3, 4, 5, 5))
    assert maps.shape == (3, 5, 5, 5) and maps[:, -1].abs().sum() == 0  # identical samples: no spread


def test_averaged_generator_gets_its_own_batch_norm_statistics() -> None:
    model = trained_dcgan(5)
    norms = [m for m in model.generator_ema.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    rng = torch.get_rng_state()
    model.end_of_epoch()
    assert torch.equal(torch.get_rng_state(), rng)  # fixed noise, the training RNG untouched
    after = [m.running_mean.clone() for m in norms]
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    model.end_of_epoch()  # the same noise: the same statistics
    assert all(torch.equal(a, m.running_mean) for a, m in zip(after, norms, strict=True))
    assert not model.generator_ema.training and all(m.momentum == 0.1 for m in norms)


def test_binarisation_default_comes_from_the_model() -> None:
    assert resolve_binarize(TrainConfig(model="vae", dataset="mnist"))
    assert resolve_binarize(TrainConfig(model="dense-vae-csnl", dataset="mnist-5k"))
    assert not resolve_binarize(TrainConfig(model="vae", dataset="mnist", likelihood="gaussian"))
    assert not resolve_binarize(TrainConfig(model="vae", dataset="cifar10"))
    assert not resolve_binarize(TrainConfig(model="dcgan", dataset="mnist"))
    assert not resolve_binarize(TrainConfig(model="vae", dataset="mnist", binarize=False))


def test_batch_size_default_comes_from_the_model(tmp_path) -> None:
    assert resolve_batch_size(TrainConfig(model="dcgan")) == 64
    assert resolve_batch_size(TrainConfig(model="dcgan-classic")) == 128
    assert resolve_batch_size(TrainConfig(model="vae")) == 128
    assert resolve_batch_size(TrainConfig(model="dcgan", batch_size=16)) == 16
    # The resolved size is what the run records, and what the loader uses.
    trainer = Trainer(TrainConfig(model="dcgan", out=str(tmp_path / "run"), epochs=1), dataset=tiny_dataset(200))
    assert trainer.train_loader.batch_size == 64
    trainer.write_run_files()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 64
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainConfig(model="dcgan", batch_size=0).validate()


def test_dcgan_width_comes_from_the_config() -> None:
    default = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan"))
    wide = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan", dcgan_base_channels=128))
    # 28 px: G 7x7 -> 14x14 -> 28x28, D mirrors it; every hidden width doubles with the base.
    assert conv_channels(default.generator) == [128, 64, 1] and conv_channels(default.discriminator) == [64, 128, 1]
    assert conv_channels(wide.generator) == [256, 128, 1] and conv_channels(wide.discriminator) == [128, 256, 1]
    # dcgan_generator_width: G alone wider, D unchanged
    wide_g = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan", dcgan_generator_width=2))
    assert conv_channels(wide_g.generator) == [256, 128, 1] and conv_channels(wide_g.discriminator) == [64, 128, 1]
    with pytest.raises(ValueError, match="dcgan_generator_width must be at least 1"):
        TrainConfig(model="dcgan", dcgan_generator_width=0).validate()
    with pytest.raises(ValueError, match="dcgan_base_channels must be at least 1"):
        TrainConfig(model="dcgan", dcgan_base_channels=0).validate()


def test_output_bias_starts_at_the_mean_logit() -> None:
    mean = torch.full((1, 28, 28), 0.1)
    mean[:, :14] = 0.3
    dense = build_model("dense-vae", (1, 28, 28), TrainConfig())
    dense.initialize_from_data(mean)
    bias = [m for m in dense.decoder.modules() if isinstance(m, nn.Linear)][-1].bias
    torch.testing.assert_close(bias, torch.logit(mean.flatten()))
    conv = build_model("vae", (1, 28, 28), TrainConfig())
    conv.initialize_from_data(mean)
    bias = [m for m in conv.decoder.modules() if isinstance(m, nn.Conv2d)][-1].bias
    torch.testing.assert_close(bias, torch.logit(mean.mean()).reshape(1))


def test_cosine_schedule() -> None:
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("cosine", 0.0) < 0.1  # warm-up starts low
    assert lr_factor("cosine", 0.02) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.51) == pytest.approx(0.5)
    assert lr_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor("cosine", p / 100) for p in range(2, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_trainer_follows_the_schedule(tmp_path) -> None:
    config = TrainConfig(model="dense-vae", dataset="tiny", out=str(tmp_path / "run"), epochs=2, batch_size=16,
                         nll_k=2, nll_images=4, log_every=1)
    trainer = Trainer(config, dataset=tiny_dataset())
    seen = []
    step = trainer.model.train_step

    def recording(batch, optimizers, ctx):
        seen.append((ctx.progress, optimizers["model"].param_groups[0]["lr"]))
        return step(batch, optimizers, ctx)

    trainer.model.train_step = recording
    trainer.run()
    assert len(seen) == trainer.total_steps == 8
    for progress, lr in seen:
        assert lr == pytest.approx(1e-3 * lr_factor("cosine", progress))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr_schedule"] is None  # the kind's default


def test_ema_generator_is_what_samples_and_exports(tmp_path) -> None:
    model = trained_dcgan(30)
    live = dict(model.generator.named_parameters())
    averaged = dict(model.generator_ema.named_parameters())
    assert set(live) == set(averaged) and not all(torch.equal(live[k], averaged[k]) for k in live)
    assert not any(p.requires_grad for p in model.generator_ema.parameters())
    model.eval()
    noise = torch.randn(4, model.latent_dim)
    with torch.no_grad():
        served = model.servable_parts()["generator"](noise)
        torch.testing.assert_close(served, (model.generator_ema(noise) + 1) / 2)
        torch.testing.assert_close(model.decode(noise), served)
        assert not torch.allclose(served, (model.generator(noise) + 1) / 2)
    model.train()
    assert not model.generator_ema.training  # its batch norm never updates from a batch


def test_gan_best_checkpoint_is_chosen_by_sample_quality(tmp_path) -> None:
    config = TrainConfig(model="gan", dataset="tiny", out=str(tmp_path / "gan"), epochs=3, batch_size=16,
                         fid_samples=32, log_every=2)
    Trainer(config, dataset=tiny_dataset()).run()
    run = tmp_path / "gan"
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    fids = [e["fid_domain"] for e in epochs]
    assert len(fids) == 3 and all(math.isfinite(f) for f in fids)
    best = find_checkpoint(run, "best")
    _, _, state = read_checkpoint(best)
    assert state["selection_metric"] == "fid_domain" and state["best_score"] == min(fids)
    assert state["epoch"] == 1 + fids.index(min(fids))
    assert find_checkpoint(run, "auto") == best  # export and eval take the best by default
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert final["checkpoint"] == "best" and final["checkpoint_epoch"] == state["epoch"]  # what is exported
    model, _, _, path = load_trained_model(run)
    assert path == best and model.generator_ema is not None

    vae = TrainConfig(model="dense-vae", dataset="tiny", out=str(tmp_path / "vae"), epochs=2, batch_size=16,
                      nll_k=2, nll_images=4)
    Trainer(vae, dataset=tiny_dataset()).run()
    assert find_checkpoint(tmp_path / "vae", "auto").name == "epoch-000002"  # chosen by loss: the last


def test_unlabelled_gan_run_has_no_best(tmp_path) -> None:
    data = tiny_dataset()
    unlabelled = ImageDataset("tiny", data.train_images, None, data.test_images, None, None)
    config = TrainConfig(model="gan", dataset="tiny", out=str(tmp_path / "gan"), epochs=2, batch_size=16, fid_samples=16)
    Trainer(config, dataset=unlabelled).run()
    assert not (tmp_path / "gan" / "checkpoints" / "best").exists()
    assert find_checkpoint(tmp_path / "gan", "auto").name == "epoch-000002"

"""The adversarial family: gan, dcgan, aae - shapes, steps, determinism, priors, export, the NaN guard,
and the pictures of a whole (tiny) run."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genserve.training.checkpoint import epoch_checkpoints, load_trained_model
from genserve.training.config import TrainConfig
from genserve.training.data.types import ImageDataset
from genserve.training.models import Batch, StepContext, build_model, model_class
from genserve.training.models.aae import AdversarialAutoencoder
from genserve.training.models.dcgan import DCGAN, ClassicDCGAN, layer_plan
from genserve.training.models.gan import GAN, MLPGAN, BalancedMLPGAN
from genserve.training.models.priors import GaussianPrior, MixturePrior, UniformPrior, build_prior
from genserve.training.pictures import fixed_latents
from genserve.training.trainer import NonFiniteLossError, Trainer

KINDS = ["gan", "gan-balanced", "dcgan", "dcgan-classic", "aae"]
SHAPES = [(1, 28, 28), (3, 32, 32), (1, 64, 64)]
GAN_LOSSES = {"loss", "d_loss", "g_loss", "d_real", "d_fake"}
AAE_LOSSES = GAN_LOSSES | {"recon"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tests are small, and on a busy 2-core machine two OpenMP threads
    fighting other processes run many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(2, h // 4), max(2, w // 4), generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def context(step: int) -> StepContext:
    return StepContext(step=step, progress=0.0, autocast=contextlib.nullcontext)


def labelled_batch(images: torch.Tensor) -> Batch:
    return Batch(images, images, torch.arange(len(images)) % 10)


def test_registry() -> None:
    expected = {
        "gan": MLPGAN, "gan-balanced": BalancedMLPGAN, "dcgan": DCGAN, "dcgan-classic": ClassicDCGAN,
        "aae": AdversarialAutoencoder,
    }
    assert {kind: model_class(kind) for kind in expected} == expected
    for kind, cls in expected.items():
        model = build_model(kind, (1, 28, 28), TrainConfig(model=kind), 10)
        assert type(model) is cls and model.kind == kind and model.can_sample and model.adversarial
    assert MLPGAN.default_lr == ClassicDCGAN.default_lr == 2e-4 and DCGAN.default_lr == 6e-4  # docs/results.md


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_trains_a_few_steps(kind: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(kind, shape, TrainConfig(model=kind), 10)
    optimizers = model.configure_optimizers()
    batch = labelled_batch(smooth_images(4, shape))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = [model.train_step(batch, optimizers, context(i)) for i in range(2)]
    expected = AAE_LOSSES if kind == "aae" else GAN_LOSSES | ({"d_skipped", "g_skipped"} if model.balance else set())
    for losses in history:
        assert set(losses) == expected
        for value in losses.values():
            assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
        assert 0 <= losses["d_real"] <= 1 and 0 <= losses["d_fake"] <= 1
    last = history[-1]
    total = last["d_loss"] + last["g_loss"] + (last["recon"] if kind == "aae" else 0)
    torch.testing.assert_close(last["loss"], total)
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    players = {"encoder", "decoder", "discriminator"} if kind == "aae" else {"generator", "discriminator"}
    assert changed & players if getattr(model, "balance", False) else changed >= players  # balance may skip one

    model.eval()
    assert set(model.eval_losses(batch)) == expected - {"d_skipped", "g_skipped"}
    samples = model.sample(3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, *shape) and samples.dtype == torch.float32
    assert samples.min() >= 0 and samples.max() <= 1
    if kind == "aae":
        assert model.encode(batch.images).shape == (4, model.latent_dim)
        assert model.reconstruct(batch.images).shape == batch.images.shape


def test_named_optimizers_cover_the_players() -> None:
    gan = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan"))
    optimizers = gan.configure_optimizers()
    assert set(optimizers) == {"generator", "discriminator"}
    for name, optimizer in optimizers.items():
        lr = gan.default_lr * (gan.d_lr_scale if name == "discriminator" else 1.0)  # two time-scale rule
        assert optimizer.param_groups[0]["lr"] == lr and optimizer.param_groups[0]["betas"][0] == 0.5
        assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in getattr(gan, name).parameters()}
    aae = build_model("aae", (1, 28, 28), TrainConfig(model="aae"))
    assert set(aae.configure_optimizers()) == {"autoencoder", "discriminator", "encoder"}
    assert build_model("gan", (1, 28, 28), TrainConfig(model="gan", lr=1e-3)).configure_optimizers()[
        "generator"].param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("kind", ["gan", "dcgan"])
def test_generator_step_leaves_the_discriminators_gradients_alone(kind: str) -> None:
    """D's gradients after a whole step are the ones its own update used: G's backward pass through D
    computes no gradients for D's weights (they would be discarded, and cost a backward pass)."""
    torch.manual_seed(0)
    model = build_model(kind, (1, 28, 28), TrainConfig(model=kind), 10)
    optimizers = model.configure_optimizers()
    used: list[torch.Tensor] = []
    optimizers["discriminator"].register_step_pre_hook(
        lambda *_: used.extend(p.grad.clone() for p in model.discriminator.parameters()))
    model.train_step(labelled_batch(smooth_images(4, (1, 28, 28))), optimizers, context(0))
    assert used and all(g.abs().sum() > 0 for g in used)
    for grad, parameter in zip(used, model.discriminator.parameters(), strict=True):
        assert torch.equal(parameter.grad, grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())


@pytest.mark.parametrize("kind", ["gan", "gan-balanced"])
def test_gan_architecture_and_value_ranges(kind: str) -> None:
    model = build_model(kind, (1, 28, 28), TrainConfig(model=kind))
    linear = [m for m in model.generator if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(100, 256), (256, 512), (512, 1024), (1024, 784)]
    linear = [m for m in model.discriminator if isinstance(m, nn.Linear)]
    last = 256 + int(model.minibatch_std)  # the default appends the minibatch-stddev feature
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 1024), (1024, 512), (512, 256), (last, 1)]
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.discriminator) == 3
    assert all(m.negative_slope == 0.2 for m in model.modules() if isinstance(m, nn.LeakyReLU))

    seen: list[torch.Tensor] = []
    model.discriminator.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    images = torch.zeros(4, 1, 28, 28)
    images[:, :, :14] = 1.0
    model.train_step(Batch(images, images), model.configure_optimizers(), context(0))
    real = seen[0]  # the first D call sees the real batch, mapped to [-1, 1]
    assert real.min() == -1 and real.max() == 1


@pytest.mark.parametrize(("size", "plan"), [(28, (7, 7, 2)), (32, (4, 4, 3)), (64, (4, 4, 4)), (16, (4, 4, 2))])
def test_dcgan_layer_plan(size: int, plan: tuple[int, int, int]) -> None:
    assert layer_plan(size, size) == plan


def test_dcgan_rules() -> None:
    model = build_model("dcgan-classic", (3, 64, 64), TrainConfig(model="dcgan-classic"))
    g, d = list(model.generator), list(model.discriminator)
    assert isinstance(g[-1], nn.Tanh) and isinstance(g[-2], nn.ConvTranspose2d)  # no batch norm at G's output
    assert isinstance(d[0], nn.Conv2d) and isinstance(d[1], nn.LeakyReLU)  # none at D's input
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g) == 4 and sum(isinstance(m, nn.BatchNorm2d) for m in d) == 3
    assert not any(isinstance(m, nn.MaxPool2d | nn.AvgPool2d) for m in model.modules())
    assert all(m.stride == (2, 2) for m in d[:-2] if isinstance(m, nn.Conv2d))
    assert any(isinstance(m, nn.ReLU) for m in g) and not any(isinstance(m, nn.LeakyReLU) for m in g)
    default = build_model("dcgan", (3, 64, 64), TrainConfig(model="dcgan"))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in default.discriminator) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in default.generator) == 4
    resize = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan", upsample="resize"))
    upsamplers = [m for m in resize.generator.modules() if isinstance(m, nn.Upsample)]
    assert len(upsamplers) == 2
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in resize.generator.modules()) == 1  # only the projection
    with pytest.raises(ValueError, match="even"):
        build_model("dcgan", (1, 5, 5), TrainConfig(model="dcgan"))


def test_latent_is_the_noise() -> None:
    model = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan", noise_dim=32))
    assert model.latent_dim == 32 and model.prior_spec() == {"distribution": "normal", "mean": 0.0, "std": 1.0, "dim": 32}
    with pytest.raises(ValueError, match="noise_dim"):
        build_model("gan", (1, 28, 28), TrainConfig(model="gan", latent_dim=16))


def test_balance_skips_the_player_far_ahead() -> None:
    model = build_model("dcgan-classic", (1, 28, 28), TrainConfig(model="dcgan-classic", balance=True))
    assert isinstance(model, GAN) and model.balance
    t = torch.tensor
    assert model.players_to_update(t(0.1), t(1.0)) == (False, True)
    assert model.players_to_update(t(1.0), t(0.1)) == (True, False)
    assert model.players_to_update(t(1.0), t(1.5)) == (True, True)
    model.players_to_update = lambda d, g: (False, True)
    before = {k: v.clone() for k, v in model.discriminator.state_dict().items() if "running" not in k and "num_batches" not in k}
    out = model.train_step(Batch(smooth_images(4, (1, 28, 28)), smooth_images(4, (1, 28, 28))),
                           model.configure_optimizers(), context(0))
    assert out["d_skipped"] == 1 and out["g_skipped"] == 0
    after = model.discriminator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_noise_samples_are_deterministic(kind: str) -> None:
    config = TrainConfig(model=kind, seed=3)
    samples = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(kind, (1, 28, 28), config, 10).eval()
        with torch.no_grad():
            samples.append(model.decode(fixed_latents(model, config)))
            assert torch.equal(samples[-1], model.decode(fixed_latents(model, config)))
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)
    assert samples[0].shape == (64, 1, 28, 28)


@pytest.mark.parametrize("kind", KINDS)
def test_servable_parts(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind, (3, 32, 32), TrainConfig(model=kind), 10)
    model.train_step(labelled_batch(smooth_images(4, (3, 32, 32))), model.configure_optimizers(), context(0))
    model.eval()
    parts = {name: part.eval() for name, part in model.servable_parts().items()}
    z = model.prior_sample(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        if kind == "aae":
            assert set(parts) == {"encoder", "decoder"}
            images = smooth_images(3, (3, 32, 32))
            torch.testing.assert_close(parts["encoder"](images), model.encode(images), rtol=0, atol=0)
            out = parts["decoder"](z)
        else:
            assert set(parts) == {"generator"}
            out = parts["generator"](z)
        torch.testing.assert_close(out, model.decode(z), rtol=0, atol=0)
        again = (parts.get("generator") or parts["decoder"])(z)
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, again, rtol=0, atol=0)


@pytest.mark.parametrize("upsample", ["transposed", "resize"])
def test_dcgan_generator_exports_to_onnx_with_dynamic_batch(upsample: str, tmp_path) -> None:
    import onnxruntime as ort
    torch.manual_seed(0)
    model = build_model("dcgan", (1, 28, 28), TrainConfig(model="dcgan", upsample=upsample)).eval()
    generator = model.servable_parts()["generator"].eval()
    noise = torch.randn(2, model.latent_dim)
    program = torch.onnx.export(generator, (noise,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "generator.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        z = torch.randn(n, model.latent_dim)
        (out,) = session.run(None, {session.get_inputs()[0].name: z.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out, generator(z).numpy(), atol=1e-5)


# --- priors -------------------------------------------------------------------------------------
def test_priors_sample_and_describe_themselves() -> None:
    g = torch.Generator().manual_seed(0)
    gaussian = build_prior(TrainConfig(prior="gaussian", prior_std=5.0), 4)
    assert isinstance(gaussian, GaussianPrior)
    assert gaussian.spec() == {"distribution": "normal", "mean": 0.0, "std": 5.0, "dim": 4}
    assert gaussian.sample(20000, g).std().item() == pytest.approx(5.0, rel=0.02)

    uniform = build_prior(TrainConfig(prior="uniform", prior_std=2.0), 3)
    assert isinstance(uniform, UniformPrior)
    assert uniform.spec() == {"distribution": "uniform", "low": -2.0, "high": 2.0, "dim": 3}
    draws = uniform.sample(20000, g)
    assert draws.abs().max() <= 2.0 and draws.std().item() == pytest.approx(4 / math.sqrt(12), rel=0.03)

    mixture = build_prior(TrainConfig(prior="mixture", prior_std=5.0), 2)
    assert isinstance(mixture, MixturePrior) and mixture.components == 10
    spec = mixture.spec()
    assert json.loads(json.dumps(spec)) == spec and spec["distribution"] == "gaussian_mixture"
    means = np.array(spec["means"])
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 5.0)
    assert spec["std"] == pytest.approx(0.5) and sum(spec["weights"]) == pytest.approx(1.0)
    labels = torch.arange(1000) % 10
    tied = mixture.sample(1000, g, labels)
    nearest = torch.cdist(tied, mixture.means).argmin(1)
    assert (nearest == labels).float().mean() > 0.99


@pytest.mark.parametrize("name", ["gaussian", "uniform", "mixture"])
def test_prior_marginal_densities_integrate_to_one(name: str) -> None:
    prior = build_prior(TrainConfig(prior=name, prior_std=2.0), 3)
    step = 0.01
    xs = np.arange(-8, 8, step) + step / 2  # midpoints: the uniform's edges fall between them
    for dim in range(3):
        assert prior.marginal_density(xs[:, None], (dim,)).sum() * step == pytest.approx(1.0, abs=0.01)
    coarse = xs[::8] + 3.5 * step
    grid = np.stack(np.meshgrid(coarse, coarse), -1).reshape(-1, 2)
    assert prior.marginal_density(grid, (0, 1)).sum() * (8 * step) ** 2 == pytest.approx(1.0, abs=0.01)


def test_prior_errors() -> None:
    with pytest.raises(ValueError, match="mixture"):
        build_prior(TrainConfig(prior="gaussian", supervised_prior=True), 2, 10)
    with pytest.raises(ValueError, match="labelled"):
        build_prior(TrainConfig(prior="mixture", supervised_prior=True), 2, 0)
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        build_prior(TrainConfig(prior="mixture"), 1)
    with pytest.raises(ValueError, match="unknown prior"):
        build_prior(TrainConfig(prior="laplace"), 2)


def test_aae_prior_and_supervision() -> None:
    config = TrainConfig(model="aae", latent_dim=2, prior="mixture", supervised_prior=True, prior_std=5.0)
    torch.manual_seed(0)
    model = build_model("aae", (1, 28, 28), config, 10)
    assert model.prior_spec()["distribution"] == "gaussian_mixture" and model.prior_spec()["dim"] == 2
    assert model.discriminator[0].in_features == 2 + 10  # code and one-hot label
    z = model.prior_sample(500, torch.Generator().manual_seed(0))
    assert z.shape == (500, 2) and z.norm(dim=1).mean().item() == pytest.approx(5.0, rel=0.05)
    images = smooth_images(4, (1, 28, 28))
    model.train_step(labelled_batch(images), model.configure_optimizers(), context(0))
    with pytest.raises(ValueError, match="labelled"):
        model.train_step(Batch(images, images), model.configure_optimizers(), context(1))
    assert build_model("aae", (1, 28, 28), TrainConfig(model="aae")).latent_dim == 8


# --- whole runs ---------------------------------------------------------------------------------
def tiny_dataset(labelled: bool = True, n_train: int = 64, n_test: int = 32) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = (smooth_images(n_train + n_test, (1, 28, 28)) * 255).round().to(torch.uint8)
    labels = torch.randint(10, (n_train + n_test,), generator=g) if labelled else None
    return ImageDataset(
        "tiny",
        images[:n_train],
        None if labels is None else labels[:n_train],
        images[n_train:],
        None if labels is None else labels[n_train:],
        [str(i) for i in range(10)] if labelled else None,
    )


def test_nan_guard_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    config = TrainConfig(model="gan", dataset="tiny", out=str(tmp_path / "run"), epochs=3, batch_size=16,
                         log_every=1, fid_samples=16)
    trainer = Trainer(config, dataset=tiny_dataset(labelled=False))
    steps_per_epoch = len(trainer.train_loader)
    poisoned_step = steps_per_epoch + 2  # inside epoch 2
    real_step = trainer.model.train_step

    def poisoned(batch, optimizers, ctx):
        losses = real_step(batch, optimizers, ctx)
        if ctx.step == poisoned_step:
            losses["loss"] = torch.tensor(float("nan"))
        return losses

    trainer.model.train_step = poisoned
    with pytest.raises(NonFiniteLossError, match=f"step {poisoned_step} "):
        trainer.run()
    run_dir = tmp_path / "run"
    assert [p.name for p in epoch_checkpoints(run_dir)] == ["epoch-000001"]
    model, loaded_config, _, path = load_trained_model(run_dir)
    assert path.name == "epoch-000001" and loaded_config.model == "gan"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1] and metrics["final"] == {}


@pytest.mark.parametrize(
    ("kind", "options", "pictures"),
    [
        ("dcgan", {"balance": True}, {"adversarial_losses.png", "discriminator_outputs.png"}),
        ("aae", {"latent_dim": 2, "prior": "mixture", "supervised_prior": True},
         {"adversarial_losses.png", "discriminator_outputs.png", "aae_latent_prior.png", "aae_latent_histograms.png"}),
    ],
)
def test_tiny_run_writes_pictures_and_metrics(kind: str, options: dict, pictures: set[str], tmp_path) -> None:
    config = TrainConfig(model=kind, dataset="tiny", out=str(tmp_path / kind), epochs=2, batch_size=16,
                         log_every=2, fid_samples=32, **options)
    Trainer(config, dataset=tiny_dataset()).run()
    plots = {p.name for p in (tmp_path / kind / "plots").glob("*.png")}
    assert pictures <= plots and {"samples.png", "progress_strip.png"} <= plots
    final = json.loads((tmp_path / kind / "metrics.json").read_text())["final"]
    assert final["fid_samples"] == 32 and final["fid_domain"] >= 0
    assert set(final["class_coverage"]) == {str(i) for i in range(10)}
    assert sum(final["class_coverage"].values()) == pytest.approx(1.0)
    assert 0 <= final["class_coverage_entropy_nats"] <= math.log(10) + 1e-9
    assert "parzen_ll_nats" not in final  # not an MNIST-like dataset
    if kind == "aae":
        assert "test_mse" in final

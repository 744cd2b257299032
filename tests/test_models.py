"""The VAE and autoencoder family: shapes, training, losses, servable parts, NLL estimates."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from genserve.training.config import TrainConfig
from genserve.training.models import Batch, GenerativeModel, StepContext, build_model, model_class
from genserve.training.models.autoencoder import (
    ConvAutoencoder,
    DenoisingAutoencoder,
    KerasConvAutoencoder,
    KerasDenoisingAutoencoder,
)
from genserve.training.models.likelihood import bernoulli_log_prob, estimate_nll, gaussian_log_prob
from genserve.training.models.vae import VAE, ConvVAE, CsnlDenseVAE, DenseVAE, KerasConvVAE

KINDS = ["dense-vae", "dense-vae-csnl", "vae", "vae-keras", "ae", "ae-keras", "dae", "dae-keras"]
SHAPES = [(1, 28, 28), (3, 32, 32), (1, 64, 64)]
VAE_KINDS = ["dense-vae", "dense-vae-csnl", "vae", "vae-keras"]


def smooth_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Blurry random images in [0, 1]: low-resolution noise upsampled, so there is structure to learn."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(2, h // 4), max(2, w // 4), generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def make_batch(kind: str, images: torch.Tensor, noise_factor: float = 0.5) -> Batch:
    if not model_class(kind).noisy_inputs:
        return Batch(images=images, inputs=images)
    g = torch.Generator().manual_seed(1)
    noisy = (images + noise_factor * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return Batch(images=images, inputs=noisy)


def context(step: int, progress: float = 1.0) -> StepContext:
    return StepContext(step=step, progress=progress, autocast=contextlib.nullcontext)


def train(model: GenerativeModel, batch: Batch, steps: int) -> list[dict[str, torch.Tensor]]:
    optimizers = model.configure_optimizers()
    return [model.train_step(batch, optimizers, context(i, i / steps)) for i in range(steps)]


def test_registry_builds_each_kind() -> None:
    expected = {
        "dense-vae": DenseVAE, "dense-vae-csnl": CsnlDenseVAE, "vae": ConvVAE, "vae-keras": KerasConvVAE,
        "ae": ConvAutoencoder, "ae-keras": KerasConvAutoencoder, "dae": DenoisingAutoencoder,
        "dae-keras": KerasDenoisingAutoencoder,
    }
    for kind, cls in expected.items():
        model = build_model(kind, (1, 28, 28), TrainConfig(model=kind))
        assert type(model) is cls and model.kind == kind


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_forward_shapes(kind: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(kind, shape, TrainConfig(model=kind))
    images = smooth_images(4, shape)
    codes = model.encode(images)
    assert codes.shape == (4, model.latent_dim)
    assert model.decode(codes).shape == images.shape
    recon = model.reconstruct(images)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    assert recon.min() >= 0 and recon.max() <= 1
    assert model.can_encode and model.can_reconstruct
    if kind in VAE_KINDS:
        assert model.can_sample
        assert model.sample(3, torch.Generator().manual_seed(0)).shape == (3, *shape)
        assert model.prior_spec() == {"distribution": "normal", "mean": 0.0, "std": 1.0, "dim": model.latent_dim}
    else:
        assert not model.can_sample
        with pytest.raises(NotImplementedError):
            model.sample(3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_train_step_decreases_loss(kind: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(kind, shape, TrainConfig(model=kind))
    batch = make_batch(kind, smooth_images(8, shape))
    torch.manual_seed(1)
    before = model.eval_losses(batch)
    history = train(model, batch, 20)
    torch.manual_seed(1)
    after = model.eval_losses(batch)

    expected = {"loss", "recon", "kl", "kl_weight"} if kind in VAE_KINDS else {"loss", "mse"}
    assert set(history[-1]) == expected
    assert set(after) == expected - {"kl_weight"}
    for value in [*history[-1].values(), *after.values()]:
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
    assert after["loss"] < before["loss"]
    assert history[-1]["loss"] < history[0]["loss"]


def test_eval_loss_is_the_negative_elbo() -> None:
    config = TrainConfig(beta=4.0, kl_warmup=0.5)  # neither may change the reported ELBO
    torch.manual_seed(0)
    model = build_model("dense-vae", (1, 28, 28), config)
    images = smooth_images(8, (1, 28, 28))
    losses = model.eval_losses(Batch(images, images))
    torch.testing.assert_close(losses["loss"], losses["recon"] + losses["kl"])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
def test_servable_parts(kind: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(kind, shape, TrainConfig(model=kind))
    images = smooth_images(3, shape)
    parts = {name: part.eval() for name, part in model.servable_parts().items()}
    with torch.no_grad():
        if model.noisy_inputs:
            assert set(parts) == {"denoiser"}
            outputs = [parts["denoiser"](images), parts["denoiser"](images)]
        else:
            assert set(parts) == {"encoder", "decoder"}
            codes = parts["encoder"](images)
            if kind in VAE_KINDS:
                mean, logvar = codes
                assert mean.shape == logvar.shape == (3, model.latent_dim)
                codes = mean
            assert codes.shape == (3, model.latent_dim) and codes.dtype == torch.float32
            outputs = [parts["decoder"](codes), parts["decoder"](codes)]
    assert outputs[0].shape == images.shape and outputs[0].dtype == torch.float32
    assert outputs[0].min() >= 0 and outputs[0].max() <= 1
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_autoencoder_code_size() -> None:
    config = TrainConfig(model="ae", latent_dim=7)  # ignored by the autoencoders
    assert build_model("ae", (1, 28, 28), config).latent_dim == 4 * 7 * 7
    assert build_model("dae", (1, 28, 28), config).latent_dim == 16 * 7 * 7
    assert build_model("ae", (1, 64, 64), config).code_shape == (4, 8, 8)
    assert build_model("ae-keras", (1, 28, 28), config).latent_dim == 8 * 4 * 4
    assert build_model("dae-keras", (1, 28, 28), config).latent_dim == 16 * 4 * 4
    odd = build_model("ae-keras", (3, 31, 9), config)
    assert odd.code_shape == (8, 4, 2)
    assert odd.reconstruct(torch.rand(2, 3, 31, 9)).shape == (2, 3, 31, 9)


def test_vae_latent_dim_and_odd_sizes() -> None:
    assert build_model("vae", (1, 28, 28), TrainConfig()).latent_dim == 32
    assert build_model("vae-keras", (1, 28, 28), TrainConfig()).latent_dim == 2
    model = build_model("vae", (3, 31, 9), TrainConfig(latent_dim=5))
    assert model.encode(torch.rand(2, 3, 31, 9)).shape == (2, 5)
    assert model.sample(2).shape == (2, 3, 31, 9)


def test_kl_warmup_schedule() -> None:
    model = build_model("dense-vae", (1, 28, 28), TrainConfig(beta=2.0, kl_warmup=0.5))
    assert isinstance(model, VAE)
    weights = [model.kl_weight(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert weights == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0])
    assert build_model("dense-vae", (1, 28, 28), TrainConfig(beta=3.0)).kl_weight(0.0) == 3.0

    images = smooth_images(4, (1, 28, 28))
    out = model.train_step(Batch(images, images), model.configure_optimizers(), context(0, 0.125))
    assert out["kl_weight"].item() == pytest.approx(0.5)
    assert out["loss"].item() == pytest.approx(out["recon"].item() + 0.5 * out["kl"].item(), rel=1e-5)


def test_log_likelihoods() -> None:
    torch.manual_seed(0)
    logits, images = torch.randn(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    expected = images * F.logsigmoid(logits) + (1 - images) * F.logsigmoid(-logits)
    torch.testing.assert_close(bernoulli_log_prob(logits, images), expected.flatten(1).sum(1))

    fixed = build_model("vae", (1, 28, 28), TrainConfig(likelihood="gaussian", gaussian_sigma=0.2))
    assert isinstance(fixed, VAE) and fixed.log_sigma is None
    normal = torch.distributions.Normal(torch.sigmoid(logits), 0.2)  # the normaliser is included
    torch.testing.assert_close(
        fixed.log_likelihood(logits, images), normal.log_prob(images).flatten(1).sum(1)
    )
    torch.testing.assert_close(
        gaussian_log_prob(torch.sigmoid(logits), images, math.log(0.2)),
        normal.log_prob(images).flatten(1).sum(1),
    )


def test_gaussian_learned_std_is_learned() -> None:
    torch.manual_seed(0)
    model = build_model("dense-vae", (1, 28, 28), TrainConfig(likelihood="gaussian-learned"))
    assert isinstance(model, VAE) and model.log_sigma is not None
    assert any(p is model.log_sigma for p in model.parameters())
    images = smooth_images(16, (1, 28, 28))
    start = model.log_sigma.item()
    assert start == pytest.approx(math.log(0.1))
    train(model, Batch(images, images), 30)
    with torch.no_grad():
        residual = (model.reconstruct(images) - images).square().mean().sqrt().log().item()
    end = model.log_sigma.item()
    assert end != start
    assert abs(end - residual) < abs(start - residual)  # the std moves towards the residual's


def test_nll_estimate_is_below_the_negative_elbo() -> None:
    torch.manual_seed(0)
    model = build_model("dense-vae", (1, 28, 28), TrainConfig())
    images = smooth_images(32, (1, 28, 28))
    train(model, Batch(images, images), 100)  # a trained posterior leaves a gap between ELBO and NLL
    test = images[:16]
    g = torch.Generator().manual_seed(0)

    def average_nll(k: int, repeats: int) -> torch.Tensor:
        return torch.stack([estimate_nll(model, test, k, generator=g) for _ in range(repeats)]).mean(0)

    neg_elbo = average_nll(1, 50)  # k=1 is a one-sample estimate of -ELBO
    nll = {k: average_nll(k, repeats) for k, repeats in ((10, 20), (100, 5), (1000, 1))}
    assert nll[10].mean() < neg_elbo.mean() - 1.0
    assert nll[1000].mean() < nll[100].mean() < nll[10].mean()
    assert (nll[1000] <= neg_elbo + 0.5).all()

    torch.manual_seed(2)
    eval_loss = torch.stack([model.eval_losses(Batch(test, test))["loss"] for _ in range(50)]).mean()
    assert eval_loss.item() == pytest.approx(neg_elbo.mean().item(), abs=0.5)

    # Chunked (k > batch_size) gives the same estimate up to the sampling noise.
    chunked = estimate_nll(model, test, 1000, batch_size=64, generator=g)
    assert chunked.shape == (16,)
    assert abs(chunked.mean().item() - nll[1000].mean().item()) < 0.5


def test_training_is_reproducible() -> None:
    def run(kind: str) -> list[float]:
        torch.manual_seed(0)
        model = build_model(kind, (1, 28, 28), TrainConfig(model=kind))
        batch = make_batch(kind, smooth_images(8, (1, 28, 28)))
        return [out["loss"].item() for out in train(model, batch, 5)]

    for kind in ("vae", "ae", "vae-keras"):
        assert run(kind) == run(kind)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["vae", "ae", "dae"])
def test_onnx_export_with_dynamic_batch(kind: str, tmp_path) -> None:
    import onnxruntime as ort
    torch.manual_seed(0)
    model = build_model(kind, (1, 28, 28), TrainConfig(model=kind))
    for name, part in model.servable_parts().items():
        part.eval()
        takes_images = name in ("encoder", "denoiser")

        def example(n: int, takes_images: bool = takes_images) -> torch.Tensor:
            return torch.rand(n, 1, 28, 28) if takes_images else torch.rand(n, model.latent_dim)

        program = torch.onnx.export(
            part, (example(2),), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
        path = tmp_path / f"{name}.onnx"
        program.save(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs = example(5)
        outputs = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
        with torch.no_grad():
            expected = part(inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-4)

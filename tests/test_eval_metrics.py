"""Sample-quality metrics: the Fréchet distance, the domain classifier and its cache, Inception FID,
class coverage, the Parzen window, and genserve-eval on a tiny run."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from genserve.training.config import TrainConfig
from genserve.training.data.types import ImageDataset
from genserve.training.evaluation import classifier as classifier_module
from genserve.training.evaluation.classifier import cache_path, domain_classifier
from genserve.training.evaluation.cli import main as eval_main
from genserve.training.evaluation.fid import feature_statistics, fid_from_features, frechet_distance
from genserve.training.evaluation.parzen import parzen_log_likelihoods, parzen_metrics, select_sigma
from genserve.training.evaluation.sample_quality import coverage, real_subset, sample_quality_metrics
from genserve.training.models import build_model
from genserve.training.trainer import Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tests are small, and on a busy 2-core machine two OpenMP threads
    fighting other processes run many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- the Fréchet distance -------------------------------------------------------------------------
def test_frechet_distance_of_diagonal_gaussians_is_analytic() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)  # 5 + 1 + 1
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert fid_from_features(a, b) == pytest.approx(reference, rel=1e-8)


def test_fid_with_fewer_samples_than_dimensions_stays_real_and_zero_on_itself() -> None:
    features = np.random.default_rng(1).normal(size=(20, 300))  # singular covariance
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(features, features + 1.0) == pytest.approx(300.0, rel=1e-6)  # a pure shift


def test_fid_sample_space_and_covariance_routes_agree() -> None:
    rng = np.random.default_rng(2)
    for n1, n2, d in [(30, 40, 64), (200, 150, 8)]:  # the feature route, then the covariance route
        a = rng.normal(size=(n1, d))
        b = rng.normal(size=(n2, d)) * 1.5 + 0.3
        via_covariances = frechet_distance(*feature_statistics(a), *feature_statistics(b))
        assert fid_from_features(a, b) == pytest.approx(via_covariances, rel=1e-7)


def test_fid_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="mismatched"):
        fid_from_features(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- the domain classifier ------------------------------------------------------------------------
def test_domain_classifier_is_accurate_cached_and_gives_fid(mnist_5k: ImageDataset) -> None:
    model, accuracy = domain_classifier(mnist_5k)
    assert accuracy > 0.85  # trained in seconds on the 4,500 embedded MNIST training digits
    path = cache_path(mnist_5k)
    assert path.is_file() and not list(path.parent.glob(".*.tmp*"))  # no temporary file left
    again, cached_accuracy = domain_classifier(mnist_5k)  # from the cache: the same network
    assert cached_accuracy == accuracy
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, again.state_dict()[key], rtol=0, atol=0)

    with torch.no_grad():
        test = mnist_5k.test_images.float() / 255
        features = model.features(test)
        noise = model.features(noise_images(500, (1, 28, 28)).float() / 255)
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)
    half = fid_from_features(features[:250], features[250:])  # two halves of the test set: small
    assert fid_from_features(features, noise) > 20 * max(half, 1.0)


def test_damaged_classifier_cache_is_retrained(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GENSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(classifier_module, "EPOCHS", 1)
    dataset = tiny_labelled_dataset()
    _, accuracy = domain_classifier(dataset)
    path = cache_path(dataset)
    assert path.is_relative_to(tmp_path / "classifiers")
    path.write_bytes(b"not safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, retrained = domain_classifier(dataset)
    assert retrained == accuracy and any("unreadable classifier cache" in str(w.message) for w in caught)
    unlabelled = ImageDataset("x", dataset.train_images, None, dataset.test_images, None)
    with pytest.raises(ValueError, match="no class labels"):
        domain_classifier(unlabelled)


def tiny_labelled_dataset() -> ImageDataset:
    """Two classes that are easy to tell apart: dark and bright images."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 2
    images = (torch.rand(96, 1, 28, 28, generator=g) * 100 + labels[:, None, None, None] * 150).to(torch.uint8)
    return ImageDataset("tiny-2", images[:64], labels[:64], images[64:], labels[64:], ["dark", "bright"])


# --- class coverage -------------------------------------------------------------------------------
def test_class_coverage_shares_and_entropy() -> None:
    names = [str(i) for i in range(4)]
    even = coverage(torch.eye(4).repeat(5, 1), names)
    assert even["class_coverage"] == {n: 0.25 for n in names}
    assert even["class_coverage_entropy_nats"] == pytest.approx(math.log(4))
    collapsed = coverage(torch.tensor([[0.0, 5.0, 0.0, 0.0]]).repeat(7, 1), names)
    assert collapsed["class_coverage"]["1"] == 1.0 and collapsed["class_coverage_entropy_nats"] == 0.0


def test_sample_metrics_work_for_any_sampler(mnist_5k: ImageDataset) -> None:
    torch.manual_seed(0)
    config = TrainConfig(model="dense-vae", fid_samples=64)
    vae = build_model("dense-vae", mnist_5k.image_shape, config, mnist_5k.num_classes)
    out = sample_quality_metrics(vae, mnist_5k, config, ["fid_domain", "class_coverage", "parzen_ll_nats"])
    assert out["fid_samples"] == 64 and out["fid_real_images"] == 64 and out["fid_domain"] > 0
    assert out["parzen_samples"] == 64 and out["parzen_test_images"] == len(mnist_5k.test_images)
    again = sample_quality_metrics(vae, mnist_5k, config, ["fid_domain"])
    assert again["fid_domain"] == out["fid_domain"]  # the same samples for the same seed
    with pytest.raises(ValueError, match="cannot sample"):
        sample_quality_metrics(build_model("ae", (1, 28, 28), config), mnist_5k, config, ["fid_domain"])
    with pytest.raises(ValueError, match="unknown sample metrics"):
        sample_quality_metrics(vae, mnist_5k, config, ["is"])
    assert len(real_subset(mnist_5k.test_images, 10)) == 10


# --- Inception FID --------------------------------------------------------------------------------
def test_inception_port_matches_the_packaged_network_and_gives_fid(mnist_5k: ImageDataset) -> None:
    from genserve.training.evaluation.inception import load_inception, tf_bilinear_resize, weights_path

    # TensorFlow 1 bilinear resize (align_corners=False): output pixel i samples input i * in / out.
    ramp = torch.tensor([0.0, 1.0]).expand(1, 1, 2, 2)
    torch.testing.assert_close(tf_bilinear_resize(ramp, 4)[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))

    network = load_inception()
    test = mnist_5k.test_images[:4].float() / 255
    noise = noise_images(4, (1, 28, 28)).float() / 255
    with torch.inference_mode():
        real_features = network(test)
        noise_features = network(noise)
        if hasattr(torch.jit, "load"):  # the packaged TorchScript network itself, as the reference
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                packaged = torch.jit.load(str(weights_path()))
            reference = packaged(network.preprocess(test[:1]))
            torch.testing.assert_close(real_features[:1], reference, rtol=1e-4, atol=1e-4)
    assert real_features.shape == (4, 2048)
    assert fid_from_features(real_features, real_features) == pytest.approx(0.0, abs=1e-3)
    assert fid_from_features(real_features, noise_features) > 100


def test_inception_archive_reader_runs_no_foreign_code(tmp_path) -> None:
    import pickle
    import zipfile

    from genserve.training.evaluation.inception import read_archive_tensors

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"unexpected .*print"):
        read_archive_tensors(path)


# --- Parzen windows -------------------------------------------------------------------------------
def test_parzen_single_sample_is_a_gaussian_density() -> None:
    points = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    sigma = 0.7
    expected = torch.distributions.Normal(0.0, sigma).log_prob(points).sum(1).double()
    torch.testing.assert_close(parzen_log_likelihoods(torch.zeros(1, 5), points, [sigma])[0], expected)


def test_parzen_matches_the_analytic_smoothed_density(monkeypatch) -> None:
    # Samples of N(0, 1) under a window of width sigma estimate the density N(0, 1 + sigma^2).
    g = torch.Generator().manual_seed(0)
    samples, points = torch.randn(20000, 1, generator=g), torch.randn(500, 1, generator=g)
    sigma = 0.5
    exact = torch.distributions.Normal(0.0, math.sqrt(1 + sigma**2)).log_prob(points[:, 0]).double()
    estimate = parzen_log_likelihoods(samples, points, [sigma])[0]
    assert (estimate - exact).abs().mean().item() < 0.02
    monkeypatch.setattr("genserve.training.evaluation.parzen.CHUNK_ELEMENTS", 20000 * 7)  # chunks of 7 points
    torch.testing.assert_close(parzen_log_likelihoods(samples, points, [sigma])[0], estimate)


def test_parzen_sigma_is_chosen_on_validation() -> None:
    g = torch.Generator().manual_seed(0)
    samples, validation, test = (torch.rand(n, 10, generator=g) for n in (300, 100, 50))
    sigmas = [0.02, 0.1, 0.3, 3.0]
    scores = parzen_log_likelihoods(samples, validation, sigmas).mean(1)
    assert select_sigma(samples, validation, sigmas) == sigmas[int(scores.argmax())]
    out = parzen_metrics(samples, validation, test, sigmas)
    assert out["parzen_sigma"] == select_sigma(samples, validation, sigmas)
    assert out["parzen_samples"] == 300 and out["parzen_test_images"] == 50 and out["parzen_ll_stderr_nats"] > 0
    with pytest.raises(ValueError, match="values each"):
        parzen_log_likelihoods(samples, torch.rand(3, 4))


# --- genserve-eval ----------------------------------------------------------------------------------
def test_genserve_eval_updates_metrics_json(mnist_5k: ImageDataset, tmp_path, capsys) -> None:
    run_dir = tmp_path / "gan"
    config = TrainConfig(model="gan", dataset="mnist-5k", out=str(run_dir), epochs=1, batch_size=500, fid_samples=32)
    Trainer(config, dataset=mnist_5k).run()
    before = json.loads((run_dir / "metrics.json").read_text())
    assert before["final"]["fid_samples"] == 32 and "parzen_ll_nats" in before["final"]

    assert eval_main([str(run_dir), "--metrics", "fid_domain,class_coverage", "--fid-samples", "48"]) == 0
    printed = capsys.readouterr().out
    assert "fid_domain" in printed and "class_coverage_entropy_nats" in printed
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["epochs"] == before["epochs"] and after["steps"] == before["steps"]
    final = after["final"]
    assert final["fid_samples"] == 48 and final["fid_domain"] > 0 and final["eval_checkpoint"] == "best"  # auto: the GAN's best
    assert final["parzen_ll_nats"] == before["final"]["parzen_ll_nats"]  # untouched metrics are kept
    assert final["domain_classifier_accuracy"] == before["final"]["domain_classifier_accuracy"]

    assert eval_main([str(run_dir), "--metrics", "likelihood"]) == 2
    assert eval_main([str(run_dir), "--metrics", "bogus"]) == 2
    assert eval_main([str(tmp_path / "missing")]) == 2
    assert "is not a genserve run directory" in capsys.readouterr().err

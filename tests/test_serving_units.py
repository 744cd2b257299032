"""Unit tests of the serving building blocks: config, codec, latents, batcher, proto generation, logs.

No models and no network: these run in a few seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genserve.clients import codec as client_codec
from genserve.serving import codec, latents, protos_build
from genserve.serving.batcher import DynamicBatcher
from genserve.serving.calls import ServerState
from genserve.serving.config import ConfigError, ModelSettings, load_config
from genserve.serving.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from genserve.serving.logs import JsonFormatter, TextFormatter, log_event
from genserve.serving.models import holder_name
from genserve.serving.oip_names import parse_version, split_oip_name
from genserve.serving.protos import genserve_pb2 as pb
from genserve.serving.versions import LoadedGraph, checked_run, finite_rows

# --- config ------------------------------------------------------------------------------------


def test_config_from_yaml_with_per_model_overrides_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "repository: /models\nport: 9000\nlimits: {max_samples_per_request: 16}\n"
        "defaults: {max_batch_size: 8, max_queue_delay_us: 100}\n"
        "models:\n  mnist-vae: {max_batch_size: 32, execution_provider: cpu}\n"
    )
    config = load_config(path, port=9100, host=None)
    assert (config.repository, config.port, config.host) == ("/models", 9100, "127.0.0.1")
    assert config.limits.max_samples_per_request == 16
    assert config.settings_for("mnist-vae") == ModelSettings(max_batch_size=32, max_queue_delay_us=100, execution_provider="cpu")
    assert config.settings_for("other").max_batch_size == 8
    assert config.settings_for("other").warmup_sizes == (1, 8)


def test_config_from_toml_merges_nested_flags(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    path.write_text(f'repository = "/m"\n[tls]\ncert_file = "{cert}"\n[defaults]\ninstances = 2\n')
    config = load_config(path, tls={"key_file": str(cert), "client_ca_file": None})
    assert config.tls.cert_file == str(cert) and config.tls.key_file == str(cert)
    assert config.defaults.instances == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("repository: /m\nprot: 1\n", "unknown setting prot"),
        ("repository: /m\ndefaults: {max_batch: 3}\n", "defaults.max_batch"),
        ("repository: /m\ndefaults: {max_batch_size: 0}\n", "max_batch_size must be a positive integer"),
        ("repository: /m\nmodels: {a: {execution_provider: tpu}}\n", "models.a.execution_provider"),
        ("repository: /m\ntls: {cert_file: /nonexistent}\n", "cert_file and tls.key_file go together"),
        ("port: 1\n", "no model repository"),
        ("repository: /m\nlimits: {max_images_per_request: -1}\n", "limits.max_images_per_request"),
        ("repository: /m\nevent_loop: trio\n", "event_loop must be one of auto, uvloop, asyncio"),
        ("repository: /m\ndefaults: {dynamic_batching: 0}\n", "defaults.dynamic_batching must be true or false"),
        ("repository: /m\nmodels: {a: {cpu_memory_arena: 'no'}}\n", "models.a.cpu_memory_arena must be true or false"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


# --- codec -------------------------------------------------------------------------------------
SHAPE = (1, 4, 5)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("encoding", ["raw-uint8", "raw-float32", "png"])
def test_images_round_trip(encoding: str) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, *SHAPE), dtype=np.uint8)
    floats = pixels.astype(np.float32) / 255
    if encoding == "raw-uint8":
        message = client_codec.images_to_proto(pixels)
    elif encoding == "raw-float32":
        message = client_codec.images_to_proto(floats)
    else:
        message = client_codec.images_to_proto(pixels, "png")
    decoded = codec.decode_images(message, SHAPE, max_images=10)
    assert decoded.dtype == np.float32 and decoded.shape == (3, *SHAPE)
    np.testing.assert_allclose(decoded, floats, atol=1e-7)
    for image_format in (pb.IMAGE_FORMAT_FLOAT32, pb.IMAGE_FORMAT_UINT8, pb.IMAGE_FORMAT_PNG):
        again = client_codec.images_from_proto(codec.encode_images(decoded, image_format))
        np.testing.assert_allclose(again, floats, atol=1e-6)


def test_rgb_png_and_grayscale_conversion() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    message = pb.Images(png=pb.PngImages(png=[_png(rgb)]))
    decoded = codec.decode_images(message, (3, 4, 5), max_images=1)
    np.testing.assert_array_equal(codec.to_uint8(decoded[0]), rgb.transpose(2, 0, 1))
    gray = codec.decode_images(message, (1, 4, 5), max_images=1)  # converted with PIL's L
    assert gray.shape == (1, 1, 4, 5)


def _tensor(dtype: int, shape: list[int], data: bytes) -> pb.Images:
    return pb.Images(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (pb.Images(), "no images given"),
        (_tensor(pb.DATA_TYPE_UINT8, [1, 1, 4, 5], b"\0" * 19), "19 bytes of data, but shape"),
        (_tensor(pb.DATA_TYPE_UINT8, [1, 1, 5, 4], b"\0" * 20), r"does not match the model's images \(N, 1, 4, 5\)"),
        (_tensor(pb.DATA_TYPE_UNSPECIFIED, [1, 1, 4, 5], b"\0" * 20), "dtype DATA_TYPE_UNSPECIFIED is not supported"),
        (_tensor(7, [1, 1, 4, 5], b"\0" * 20), "dtype 7 is not supported"),
        (_tensor(pb.DATA_TYPE_FLOAT32, [1, 1, 4, 5], np.full(20, np.nan, "<f4").tobytes()), "NaN or infinite"),
        (_tensor(pb.DATA_TYPE_FLOAT32, [1, 1, 4, 5], np.full(20, 2.0, "<f4").tobytes()), r"must be in \[0, 1\]"),
        (_tensor(pb.DATA_TYPE_UINT8, [0, 1, 4, 5], b""), "0 images"),
        (_tensor(pb.DATA_TYPE_UINT8, [-1, 1, 4, 5], b""), "shape .* is invalid"),
        (_tensor(pb.DATA_TYPE_UINT8, [5, 1, 4, 5], b"\0" * 100), "more than the limit of 4"),
        (pb.Images(png=pb.PngImages(png=[b"not a png"])), "not a valid PNG"),
        (pb.Images(png=pb.PngImages(png=[_png(np.zeros((5, 5), np.uint8))])), "PNG is 5x5, the model takes 5x4"),
    ],
)
def test_bad_images_are_invalid_arguments(images: pb.Images, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_images(images, SHAPE, max_images=4)


def test_jpeg_is_refused_as_png() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(buffer, format="JPEG")
    with pytest.raises(InvalidArgument, match="not a PNG file"):
        codec.decode_images(pb.Images(png=pb.PngImages(png=[buffer.getvalue()])), SHAPE, max_images=1)


def test_latent_validation() -> None:
    good = codec.array_to_tensor(np.zeros((3, 2), np.float32))
    assert codec.latents_from_tensor(good, 2).shape == (3, 2)
    with pytest.raises(InvalidArgument, match=r"shape \(N, 4\)"):
        codec.latents_from_tensor(good, 4)
    bad = codec.array_to_tensor(np.array([[0.0, np.inf], [1, 2]], np.float32))
    with pytest.raises(InvalidArgument, match="NaN or infinite values \\(in 1 of 2 rows\\)"):
        codec.latents_from_tensor(bad, 2)
    with pytest.raises(InvalidArgument, match="must be DATA_TYPE_FLOAT32"):
        codec.latents_from_tensor(codec.array_to_tensor(np.zeros((1, 2), np.uint8)), 2)


# --- latents -----------------------------------------------------------------------------------
def test_normal_prior_matches_numpy_pcg64() -> None:
    prior = {"distribution": "normal", "mean": 0.5, "std": 2.0, "dim": 3}
    z = latents.sample_prior(prior, 4, seed=11)
    expected = (0.5 + 2.0 * np.random.Generator(np.random.PCG64(11)).standard_normal((4, 3))).astype(np.float32)
    np.testing.assert_array_equal(z, expected)
    np.testing.assert_array_equal(z, latents.sample_prior(prior, 4, seed=11))
    assert not np.array_equal(z, latents.sample_prior(prior, 4, seed=12))
    cold = latents.sample_prior(prior, 4, seed=11, temperature=0.5)
    np.testing.assert_allclose(cold - 0.5, (z - 0.5) / 2, rtol=1e-6)


def test_uniform_and_mixture_priors() -> None:
    uniform = latents.sample_prior({"distribution": "uniform", "low": -2.0, "high": 4.0, "dim": 2}, 2000, seed=0)
    assert uniform.min() >= -2 and uniform.max() <= 4 and abs(uniform.mean() - 1) < 0.2
    means = [[10.0, 0.0], [-10.0, 0.0]]
    prior = {"distribution": "gaussian_mixture", "weights": [0.5, 0.5], "means": means, "std": 0.1, "dim": 2}
    z = latents.sample_prior(prior, 1000, seed=3)
    assert np.all(np.abs(np.abs(z[:, 0]) - 10) < 1) and 350 < (z[:, 0] > 0).sum() < 650
    with pytest.raises(FailedPrecondition, match="cannot be sampled"):
        latents.sample_prior({"distribution": "cauchy", "dim": 2}, 1, seed=0)


def test_interpolation_paths() -> None:
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 2.0], np.float32)
    line = latents.interpolate(a, b, 5)
    np.testing.assert_allclose(line[0], a)
    np.testing.assert_allclose(line[-1], b)
    np.testing.assert_allclose(line[2], (a + b) / 2)
    arc = latents.interpolate(a, a * 1, 3, spherical=True)  # parallel: linear fallback, no NaN
    assert np.isfinite(arc).all()
    unit = latents.interpolate(a, np.array([0.0, 1.0], np.float32), 7, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    z = latents.sample_posterior(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), seed=5)
    np.testing.assert_array_equal(z, np.random.Generator(np.random.PCG64(5)).standard_normal((2, 3)).astype(np.float32))


# --- batcher -----------------------------------------------------------------------------------
class SlowGraph:
    """A stand-in graph: doubles its input; records batch sizes; can be held to build a queue."""

    def __init__(self, seconds: float = 0.0):
        self.batches: list[int] = []
        self.seconds = seconds
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def run(self, rows: np.ndarray) -> list[np.ndarray]:
        self.release.wait(10)
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("boom")
        self.batches.append(len(rows))
        return [rows * 2, rows[:, :1]]


def _batcher(graph: SlowGraph, executor, **knobs) -> DynamicBatcher:
    settings = {"max_batch_size": 8, "max_queue_delay_us": 20_000, "max_queue_size": 8, **knobs}
    batcher = DynamicBatcher("test.graph", graph.run, executor, **settings)
    batcher.start()
    return batcher


def _rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None].repeat(2, axis=1)


class _RequestCounts:
    def __init__(self) -> None:
        self.done: list[bool] = []

    def request_done(self, ok: bool, seconds: float) -> None:
        self.done.append(ok)


def test_finite_rows_checks_every_output_and_is_not_fooled_by_an_overflowing_sum() -> None:
    huge = np.full((3, 4), 3e38, np.float32)  # finite, but their float32 sum overflows to inf
    second = np.zeros((3, 2), np.float32)
    assert finite_rows([huge, second]).tolist() == [True, True, True]
    second[2, 1] = np.inf
    huge[0, 3] = np.nan
    assert finite_rows([huge, second]).tolist() == [False, True, False]


def test_a_nan_row_fails_only_its_own_request_of_a_merged_batch() -> None:
    """The finiteness check runs once per execution, in the batch's thread; each request is judged by
    its own rows."""
    batches: list[int] = []

    def run(rows: np.ndarray) -> list[np.ndarray]:
        batches.append(len(rows))
        with np.errstate(invalid="ignore"):
            return [np.sqrt(rows)]  # NaN for a negative input

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher("test.graph", checked_run(run, None), executor, max_batch_size=8,
                                     max_queue_delay_us=50_000, max_queue_size=8, policy="fixed")
            batcher.start()
            counts = _RequestCounts()
            graph = LoadedGraph("test", 1, "graph", "default", None, None, batcher, counts)
            good = np.array([[1.0, 4.0], [9.0, 16.0]], np.float32)
            bad = np.array([[1.0, 4.0], [-1.0, 16.0]], np.float32)
            answers = await asyncio.gather(graph.infer(good), graph.infer(bad), return_exceptions=True)
            assert batches == [4]  # one execution for both
            outputs, _ = answers[0]
            assert len(outputs) == 1  # the graph's outputs only, not the per-row check
            np.testing.assert_array_equal(outputs[0], np.sqrt(good))
            assert isinstance(answers[1], InvalidArgument) and "1 of this request's 2 rows" in str(answers[1])
            assert counts.done == [True, False]
            await batcher.close()

    asyncio.run(scenario())


def test_batcher_merges_concurrent_requests_and_splits_big_ones() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = _batcher(graph, executor)
            results = await asyncio.gather(*(batcher.infer(_rows(10 * i, 2)) for i in range(3)))
            for i, (outputs, timing) in enumerate(results):
                np.testing.assert_array_equal(outputs[0], _rows(10 * i, 2) * 2)
                np.testing.assert_array_equal(outputs[1], _rows(10 * i, 2)[:, :1])
                assert timing.queue_seconds >= 0 and timing.compute_seconds > 0
            assert graph.batches == [6]  # three requests, one execution
            outputs, _ = await batcher.infer(_rows(0, 20))  # 20 rows -> 8 + 8 + 4, reassembled in order
            np.testing.assert_array_equal(outputs[0], _rows(0, 20) * 2)
            assert graph.batches[1:] == [8, 8, 4]
            await batcher.close()

    asyncio.run(scenario())


def test_batcher_with_batching_off_runs_each_request_alone() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = _batcher(graph, executor, merge=False, max_queue_delay_us=10_000_000)
            started = time.monotonic()
            results = await asyncio.gather(*(batcher.infer(_rows(10 * i, 2 + i)) for i in range(3)))
            assert time.monotonic() - started < 5  # never waits the 10 s delay for company
            for i, (outputs, _) in enumerate(results):
                np.testing.assert_array_equal(outputs[0], _rows(10 * i, 2 + i) * 2)
            assert sorted(graph.batches) == [2, 3, 4]  # three requests, three executions
            outputs, _ = await batcher.infer(_rows(0, 20))  # still split at max_batch_size
            np.testing.assert_array_equal(outputs[0], _rows(0, 20) * 2)
            assert graph.batches[3:] == [8, 8, 4]
            await batcher.close()

    asyncio.run(scenario())


def test_batcher_rejects_overflow_drops_expired_and_frees_cancelled() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = _batcher(graph, executor, max_batch_size=1, max_queue_size=3, max_queue_delay_us=0)
            loop = asyncio.get_running_loop()
            graph.release.clear()  # the worker will block on its first batch
            running = loop.create_task(batcher.infer(_rows(0, 1)))
            await asyncio.sleep(0.05)
            expired = loop.create_task(batcher.infer(_rows(1, 1), deadline=loop.time() + 0.01))
            cancelled = loop.create_task(batcher.infer(_rows(2, 1)))
            kept = loop.create_task(batcher.infer(_rows(3, 1)))
            await asyncio.sleep(0.05)
            assert batcher.queue_depth == 3
            with pytest.raises(ResourceExhausted, match="queue is full"):
                await batcher.infer(_rows(4, 1))
            with pytest.raises(ResourceExhausted, match="needs 2 batches"):
                await batcher.infer(_rows(4, 2))
            with pytest.raises(InvalidArgument, match="need 4 batches .* more than the queue holds"):
                await batcher.infer(_rows(4, 4))  # could never fit: no point telling the caller to retry
            cancelled.cancel()
            await asyncio.sleep(0.01)  # no batch runs meanwhile: the worker is still blocked
            assert batcher.queue_depth == 2  # the cancelled request left the queue at once
            graph.release.set()
            assert (await running)[0][0][0, 0] == 0
            with pytest.raises(DeadlineExceeded, match="deadline passed"):
                await expired
            assert (await kept)[0][0][0, 0] == 6
            assert graph.batches == [1, 1]  # the expired and the cancelled request never ran
            await batcher.close()

    asyncio.run(scenario())


def test_batcher_instances_run_batches_concurrently() -> None:
    graph = SlowGraph(seconds=0.3)

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as executor:
            batcher = _batcher(graph, executor, max_batch_size=2, max_queue_delay_us=0, instances=2)
            started = time.perf_counter()
            await asyncio.gather(batcher.infer(_rows(0, 2)), batcher.infer(_rows(2, 2)))
            assert time.perf_counter() - started < 0.58  # two batches of 0.3 s side by side
            assert graph.batches == [2, 2]
            await batcher.close()

    asyncio.run(scenario())


def test_batcher_reports_graph_failures() -> None:
    graph = SlowGraph()
    graph.fail = True

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = _batcher(graph, executor)
            with pytest.raises(Internal, match="onnxruntime failed on a batch of 3: boom"):
                await batcher.infer(_rows(0, 3))
            await batcher.close()

    asyncio.run(scenario())


def test_batcher_waits_at_most_the_queue_delay() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = _batcher(graph, executor, max_queue_delay_us=30_000, policy="fixed")
            started = time.perf_counter()
            await batcher.infer(_rows(0, 1))
            waited = time.perf_counter() - started
            assert 0.025 < waited < 1.0
            await batcher.close()

    asyncio.run(scenario())


def test_adaptive_batcher_does_not_keep_a_lone_request_waiting_for_company() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            for company in (None, lambda: 1):  # unknown; only the request itself holds the version
                batcher = _batcher(graph, executor, max_queue_delay_us=20_000, company=company)
                for i in range(4):  # a lone client: each request some time after the previous one's answer
                    outputs, _ = await batcher.infer(_rows(i, 3))
                    np.testing.assert_array_equal(outputs[0], _rows(i, 3) * 2)
                    await asyncio.sleep(0.05)
                assert (batcher.executions, batcher.waits) == (4, 0)  # never waited for company
                await batcher.close()
            fixed = _batcher(graph, executor, max_queue_delay_us=20_000, policy="fixed")
            await fixed.infer(_rows(0, 3))
            assert fixed.waits == 1  # Triton's policy makes the same request wait out the delay
            await fixed.close()

    asyncio.run(scenario())


async def _trickle(batcher: DynamicBatcher, count: int) -> list:
    """`count` one-row requests, each arriving one pass of the event loop after the previous one."""
    tasks = []
    for i in range(count):
        tasks.append(asyncio.get_running_loop().create_task(batcher.infer(_rows(i, 1))))
        await asyncio.sleep(0)
    return await asyncio.gather(*tasks)


def test_adaptive_batcher_merges_requests_that_come_while_others_hold_the_version() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            # six callers hold the version; the batch closes when full, long before the minute's delay
            adaptive = _batcher(graph, executor, max_batch_size=6, max_queue_delay_us=60_000_000, company=lambda: 6)
            results = await asyncio.wait_for(_trickle(adaptive, 6), timeout=30)
            for i, (outputs, _) in enumerate(results):
                np.testing.assert_array_equal(outputs[0], _rows(i, 1) * 2)
            assert (adaptive.executions, graph.batches) == (1, [6])  # six requests, one execution
            await adaptive.close()
            # the same arrivals without waiting for company (Triton's policy with no delay) run apart
            graph.batches.clear()
            fixed = _batcher(graph, executor, max_batch_size=6, max_queue_delay_us=0, policy="fixed")
            await _trickle(fixed, 6)
            assert fixed.executions > 1 and sum(graph.batches) == 6
            await fixed.close()

    asyncio.run(scenario())


def test_adaptive_batcher_merges_a_fast_stream_of_requests() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            # nobody else holds the version (company counts only the one inside), but requests come
            # far less than a quarter of the delay apart: the stream is merged
            batcher = _batcher(graph, executor, max_batch_size=8, max_queue_size=64, max_queue_delay_us=60_000_000,
                               company=lambda: batcher._inside)
            await asyncio.wait_for(_trickle(batcher, 24), timeout=30)
            assert sum(graph.batches) == 24 and batcher.executions < 12 and batcher.waits > 0
            await batcher.close()

    asyncio.run(scenario())


def test_adaptive_batcher_stops_waiting_once_every_client_of_a_closed_loop_is_queued() -> None:
    graph = SlowGraph()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            # four clients, each sending again after its answer, 0.2 s apart: far less than a quarter of
            # the minute's delay, so the arrival-gap rule alone would hold every batch until the next
            # request is overdue (about 0.5 s after the newest)
            batcher = _batcher(graph, executor, max_queue_delay_us=60_000_000, company=lambda: batcher._inside)
            last_waits: list[float] = []

            async def client(i: int) -> None:
                for round_ in range(3):
                    await asyncio.sleep(0.2 * i if round_ else 0)
                    outputs, timing = await batcher.infer(_rows(i, 1))
                    np.testing.assert_array_equal(outputs[0], _rows(i, 1) * 2)
                    if i == 3 and round_:
                        last_waits.append(timing.queue_seconds)

            await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(4))), timeout=30)
            assert graph.batches == [4, 4, 4]  # each round merged into one batch...
            assert max(last_waits) < 0.2  # ...run as soon as the fourth was queued, not 0.5 s later
            await batcher.close()

    asyncio.run(scenario())


def test_batcher_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="adaptive, fixed"):
        DynamicBatcher("test.graph", SlowGraph().run, None, max_batch_size=1, max_queue_delay_us=0, max_queue_size=1,
                       policy="eager")


# --- names -------------------------------------------------------------------------------------
def test_shutdown_waits_for_calls_to_stop_arriving() -> None:
    async def main() -> None:
        state = ServerState()
        assert await state.wait_quiet(0.05, timeout=1.0)  # nothing ever ran: quiet at once

        async def arrivals(n: int, every: float) -> None:  # short calls, one after another
            for _ in range(n):
                state.call_started()
                await asyncio.sleep(0.001)
                state.call_ended()
                await asyncio.sleep(every)

        feeder = asyncio.create_task(arrivals(10, 0.02))
        started = time.monotonic()
        assert await state.wait_quiet(0.1, timeout=5.0)
        assert feeder.done()  # not quiet while calls kept arriving, though none was running most of the time
        assert time.monotonic() - state.last_call_at >= 0.1
        assert time.monotonic() - started >= 0.2
        forever = asyncio.create_task(arrivals(1000, 0.01))
        assert not await state.wait_quiet(0.1, timeout=0.3)  # never quiet: gives up at the timeout
        forever.cancel()

    asyncio.run(main())


def test_names() -> None:
    assert split_oip_name("mnist-vae.decoder") == ("mnist-vae", "decoder")
    assert split_oip_name("a.b.encoder") == ("a.b", "encoder")
    with pytest.raises(NotFound, match="<model>.<part>"):
        split_oip_name("mnist-vae")
    with pytest.raises(InvalidArgument, match=r"'\.\.'"):
        split_oip_name("a..b.decoder")
    with pytest.raises(InvalidArgument, match="path separator"):
        split_oip_name("a/b.decoder")
    assert parse_version("") is None and parse_version("12") == 12
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(InvalidArgument):
            parse_version(bad)
    assert holder_name("0.0.0.0", 8001) == "genserve-0.0.0.0-8001"
    assert holder_name("::1", 8001) == "genserve-1-8001"


# --- logs --------------------------------------------------------------------------------------
def test_log_lines() -> None:
    logger = logging.getLogger("genserve.test")
    record = logger.makeRecord("genserve.test", logging.INFO, __file__, 1, "rpc", (), None,
                               extra={"genserve_fields": {"request_id": "abc", "ms": 1.5, "error": "bad thing"}})
    data = json.loads(JsonFormatter().format(record))
    assert data["event"] == "rpc" and data["request_id"] == "abc" and data["ms"] == 1.5 and data["level"] == "info"
    text = TextFormatter().format(record)
    assert text.endswith('rpc request_id=abc ms=1.5 error="bad thing"') and "\n" not in text
    log_event(logger, "nothing", level=logging.DEBUG)  # disabled levels cost nothing and do not fail


# --- generated code ----------------------------------------------------------------------------
def test_protos_build_regenerates_when_sources_change(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(protos_build.PROTOS, protos)
    generated = tmp_path / "generated"
    assert protos_build.build(generated, protos) is True
    assert protos_build.is_current(generated, protos)
    assert protos_build.build(generated, protos) is False
    text = (generated / "inference" / "grpc_service_pb2.py").read_text()
    assert "from genserve.serving.generated.inference import model_config_pb2" in text
    assert "from genserve.serving.generated.genserve.v1 import genserve_pb2" in (
        generated / "genserve" / "v1" / "genserve_pb2_grpc.py"
    ).read_text()
    source = protos / "genserve" / "v1" / "genserve.proto"
    source.write_text(source.read_text() + "\nmessage Extra {}\n")
    assert not protos_build.is_current(generated, protos)
    assert protos_build.build(generated, protos) is True
    assert "Extra" in (generated / "genserve" / "v1" / "genserve_pb2.pyi").read_text()
    (protos / "inference" / "model_config.proto").write_text("syntax = \"proto3\"; message {")
    with pytest.raises(protos_build.ProtoBuildError, match="protoc failed"):
        protos_build.build(generated, protos)
    assert (generated / "genserve" / "v1" / "genserve_pb2.py").is_file()  # the old code is untouched


def test_inference_protos_are_tritons() -> None:
    """Fields our OIP protos share with tritonclient's have the same numbers and types (tritonclient
    may be older or newer), and the messages genserve uses are all there."""
    triton = pytest.importorskip("tritonclient.grpc")  # importable beside ours: a private pool
    from genserve.serving.protos import grpc_service_pb2, model_config_pb2

    def fields(descriptor) -> dict[str, tuple]:
        table = {}
        for message in descriptor.message_types_by_name.values():
            stack = [message]
            while stack:
                m = stack.pop()
                stack.extend(m.nested_types)
                for f in m.fields:
                    table[f"{m.full_name}.{f.name}"] = (f.number, f.type, getattr(f.message_type, "full_name", None))
        return table

    for ours, theirs in ((grpc_service_pb2, triton.service_pb2), (model_config_pb2, triton.model_config_pb2)):
        mine, reference = fields(ours.DESCRIPTOR), fields(theirs.DESCRIPTOR)
        shared = set(mine) & set(reference)
        assert len(shared) > 0.8 * len(reference)
        assert {name: mine[name] for name in shared} == {name: reference[name] for name in shared}
    used = ["ModelInferRequest", "ModelInferResponse", "ModelMetadataResponse", "ModelStatistics", "RepositoryIndexResponse"]
    assert all(name in triton.service_pb2.DESCRIPTOR.message_types_by_name for name in used)
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert {"ModelInfer", "ModelMetadata", "ServerLive"} <= {m.name for m in theirs.methods} & {m.name for m in ours.methods}

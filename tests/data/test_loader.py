"""pipetrain.data.loader and pipetrain.data.augment, with real threads (no mocking).

Loader threads are slowed (or failed) where the system lets a harness do it: the
``loader_item`` hook, installed here for the length of a test."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from pipetrain import hooks
from pipetrain.data.augment import augment_digits, augment_noise
from pipetrain.data.datasets import Dataset
from pipetrain.data.loader import Loader, LoaderError, MicroBatch, OrderError
from pipetrain.data.sampler import Batches, split_batch
from pipetrain.data.workload import Workload

SEED = 7
MICROBATCHES = 4
DEADLINE_S = 10.0


def make_workload(epochs: int = 2) -> Workload:
    rng = np.random.default_rng(0)
    x, y = rng.random((200, 64)), rng.integers(0, 10, 200)
    return Workload(
        dataset=Dataset("random", x, y),
        x=x,
        y=y,
        batches=Batches(train_indices=np.arange(160), batch_size=32, seed=1),
        eval_indices=np.arange(160, 200),
        epochs=epochs,
    )


class ItemDelays(hooks.Hooks):
    """Before each item, sleep what ``delay(step, micro-batch)`` says (or raise what it does)."""

    def __init__(self, delay) -> None:
        self.delay = delay

    def loader_item(self, place, step: int, microbatch: int) -> None:
        seconds = self.delay(step, microbatch)
        if seconds:
            time.sleep(seconds)


@pytest.fixture(autouse=True)
def restored_hooks():
    with hooks.installed(hooks.current()):  # whatever a test installs is gone after it
        yield


def make_loader(workload: Workload, *, test_delay_s=None, **overrides) -> Loader:
    if test_delay_s is not None:
        hooks.install(ItemDelays(test_delay_s))
    options = dict(replica=0, replicas=1, microbatches=MICROBATCHES, need_x=True, need_y=True,
                   threads=2, prefetch=4, augment=None, seed=SEED, dtype=np.float64)
    options.update(overrides)
    return Loader(workload, **options)


def sequential(workload: Workload, *, replica: int, replicas: int, augment, dtype):
    """The oracle: the straightforward loop, written independently of the loader."""
    functions = {None: None, "digits": augment_digits, "noise": augment_noise}
    for step in range(1, workload.total_steps + 1):
        epoch, in_epoch = workload.locate(step)
        shares = split_batch(workload.batches.batch(epoch, in_epoch), replicas, MICROBATCHES)
        for mb, indices in enumerate(shares[replica]):
            x = workload.x[indices]
            if augment is not None:
                x = functions[augment](x, indices, SEED, epoch)
            yield step, mb, indices, x.astype(dtype), workload.y[indices]


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("loader-")]


def wait_until(predicate, what: str) -> None:
    """Poll a cheap predicate until it holds; fail after a generous deadline, never sleep blind."""
    deadline = time.monotonic() + DEADLINE_S
    idle = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        idle.wait(0.002)


def random_delays(seed: int):
    rng = np.random.default_rng(seed)
    table = {(step, mb): float(rng.uniform(0, 0.005)) for step in range(1, 11)
             for mb in range(MICROBATCHES)}
    return lambda step, mb: table[(step, mb)]


# -- delivery order and bits -------------------------------------------------------------------

@pytest.mark.parametrize("threads", [0, 1, 2, 8])
@pytest.mark.parametrize("augment", [None, "digits", "noise"])
@pytest.mark.parametrize("delays", [False, True])
def test_delivery_equals_sequential_computation(threads: int, augment, delays: bool) -> None:
    workload = make_workload()
    delay = random_delays(threads * 10 + len(str(augment))) if delays else None
    with make_loader(workload, threads=threads, augment=augment, test_delay_s=delay) as loader:
        loader.start(1, workload.total_steps)
        count = 0
        for step, mb, indices, x, y in sequential(workload, replica=0, replicas=1,
                                                  augment=augment, dtype=np.float64):
            item = loader.get(step, mb, timeout_s=DEADLINE_S)
            assert isinstance(item, MicroBatch)
            assert (item.step, item.microbatch) == (step, mb)
            assert np.array_equal(item.indices, indices)
            assert item.x.dtype == x.dtype and item.x.flags.c_contiguous
            assert np.array_equal(item.x, x)
            assert np.array_equal(item.y, y)
            count += 1
        assert count == workload.total_steps * MICROBATCHES
        assert loader.stats()["items_produced"] == count


def test_replica_share_float32_and_label_only_stage() -> None:
    workload = make_workload()
    expected = list(sequential(workload, replica=1, replicas=2, augment="digits",
                               dtype=np.float32))
    with make_loader(workload, replica=1, replicas=2, augment="digits", dtype=np.float32,
                     threads=3, test_delay_s=random_delays(3)) as loader:
        loader.start(1, workload.total_steps)
        for step, mb, indices, x, _ in expected:
            item = loader.get(step, mb, timeout_s=DEADLINE_S)
            assert item.x.dtype == np.float32 and np.array_equal(item.x, x)
            assert np.array_equal(item.indices, indices)
    plain = [item for item in sequential(workload, replica=0, replicas=1, augment=None,
                                         dtype=np.float64) if 3 <= item[0] <= 4]
    with make_loader(workload, need_x=False, augment="digits") as labels_only:
        labels_only.start(3, 4)  # a resumed run starts mid-way
        for step, mb, indices, _, y in plain:
            item = labels_only.get(step, mb, timeout_s=DEADLINE_S)
            assert item.x is None and np.array_equal(item.y, y)
            assert np.array_equal(item.indices, indices)


def test_out_of_order_get_raises_a_clear_error() -> None:
    workload = make_workload()
    with make_loader(workload) as loader:
        loader.start(2, 3)
        with pytest.raises(OrderError, match="next item is step 2 micro-batch 0"):
            loader.get(2, 1)
        with pytest.raises(OrderError, match="out of order"):
            loader.get(1, 0)
        loader.get(2, 0, timeout_s=DEADLINE_S)
        with pytest.raises(OrderError, match="step 2 micro-batch 1"):
            loader.get(2, 0)  # each item is delivered once
        for step, mb in [(2, 1), (2, 2), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]:
            loader.get(step, mb, timeout_s=DEADLINE_S)
        with pytest.raises(OrderError, match="every item of steps 2..3"):
            loader.get(4, 0)


def test_bad_arguments_are_refused() -> None:
    workload = make_workload()
    with pytest.raises(ValueError, match="unknown augmentation"):
        make_loader(workload, augment="rotate")
    with pytest.raises(ValueError, match="prefetch"):
        make_loader(workload, prefetch=0)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        make_loader(workload, threads=-1)
    with pytest.raises(ValueError, match="replica 2"):
        make_loader(workload, replica=2, replicas=2)
    with make_loader(workload) as loader:
        with pytest.raises(ValueError, match="outside 1..10"):
            loader.start(1, 11)
        with pytest.raises(RuntimeError, match="before start"):
            loader.get(1, 0)


# -- no threads: the consumer loads, between steps with fill() ----------------------------------

def test_without_threads_fill_prepares_up_to_prefetch_and_get_takes_them() -> None:
    workload = make_workload()
    expected = list(sequential(workload, replica=0, replicas=1, augment=None,
                               dtype=np.float64))
    with make_loader(workload, threads=0, prefetch=3) as loader:
        loader.hold_slots()
        loader.start(1, workload.total_steps)
        assert loader_threads() == []
        loader.fill()
        assert loader.stats()["items_produced"] == 3 and loader.stats()["queue_depth"] == 3
        loader.fill()  # nothing was taken: still 3
        assert loader.stats()["items_produced"] == 3
        for k, (step, mb, _indices, x, y) in enumerate(expected):
            item = loader.get(step, mb)
            assert (item.step, item.microbatch) == (step, mb)
            assert np.array_equal(item.x, x) and np.array_equal(item.y, y)
            if mb == MICROBATCHES - 1:  # after a step, as the worker does
                loader.release_taken()
                loader.fill()
                left = len(expected) - (k + 1)
                assert loader.stats()["queue_depth"] == min(3, left)
        assert loader.stats()["items_produced"] == len(expected)


def test_without_threads_a_failure_met_by_fill_is_raised_by_get_of_that_item() -> None:
    workload = make_workload()

    def delay(step: int, mb: int) -> float:
        if (step, mb) == (2, 1):
            raise KeyError("corrupt sample 42")
        return 0.0

    with make_loader(workload, threads=0, prefetch=4, test_delay_s=delay) as loader:
        loader.start(1, workload.total_steps)
        for mb in range(MICROBATCHES):
            loader.get(1, mb)
        loader.fill()  # meets the failure at (2, 1): kept for its get
        loader.get(2, 0)
        with pytest.raises(LoaderError, match="step 2 micro-batch 1") as info:
            loader.get(2, 1)
        assert isinstance(info.value.__cause__, KeyError)


def test_auto_threads_load_small_micro_batches_on_the_main_thread() -> None:
    from pipetrain.data.loader import INLINE_ITEM_BYTES, THREADS, auto_threads

    workload = make_workload()  # a few rows of 64 float64s
    assert auto_threads(workload, replicas=1, microbatches=MICROBATCHES, augment=False) == 0
    assert auto_threads(workload, replicas=1, microbatches=MICROBATCHES,
                        augment=True) == THREADS
    rows = -(-workload.batches.batch_size // MICROBATCHES)
    assert rows * workload.x[0].nbytes <= INLINE_ITEM_BYTES


# -- threads: back-pressure, pause, shutdown, failure --------------------------------------------

def test_back_pressure_bounds_unconsumed_items() -> None:
    workload = make_workload()
    with make_loader(workload, threads=4, prefetch=3) as loader:
        loader.start(1, workload.total_steps)
        wait_until(lambda: loader.stats()["items_produced"] == 3
                   and loader.stats()["in_production"] == 0, "the 3 slots are full")
        # The producers are now blocked on the semaphore; nothing more may appear.
        threading.Event().wait(0.05)
        stats = loader.stats()
        assert stats["items_produced"] == 3 and stats["queue_depth"] == 3
        assert stats["max_queue_depth"] <= 3
        loader.get(1, 0, timeout_s=DEADLINE_S)
        wait_until(lambda: loader.stats()["items_produced"] == 4, "consuming frees a slot")
        for k in range(1, workload.total_steps * MICROBATCHES):
            loader.get(1 + k // MICROBATCHES, k % MICROBATCHES, timeout_s=DEADLINE_S)
        assert loader.stats()["max_queue_depth"] <= 3


def test_held_slots_go_back_after_the_step_and_never_stall_the_consumer() -> None:
    workload = make_workload()
    with make_loader(workload, threads=2, prefetch=4) as loader:
        loader.hold_slots()  # as a worker does: slots come back after its StepDone
        loader.start(1, workload.total_steps)
        wait_until(lambda: loader.stats()["items_produced"] == 4
                   and loader.stats()["in_production"] == 0, "the 4 slots are full")
        for mb in range(MICROBATCHES):
            loader.get(1, mb, timeout_s=DEADLINE_S)
        threading.Event().wait(0.05)  # asserting an absence: the taken slots stay held
        assert loader.stats()["items_produced"] == 4
        loader.release_taken()
        wait_until(lambda: loader.stats()["items_produced"] == 8, "released slots refill")
        # A consumer that never calls release_taken still gets every item: when the one it
        # wants is not claimed, get gives the held slots back itself.
        for k in range(MICROBATCHES, workload.total_steps * MICROBATCHES):
            loader.get(1 + k // MICROBATCHES, k % MICROBATCHES, timeout_s=DEADLINE_S)
        assert loader.stats()["max_queue_depth"] <= 4
    with make_loader(workload, threads=1, prefetch=1) as loader:  # fewer slots than a step
        loader.hold_slots()
        loader.start(1, 2)
        for k in range(2 * MICROBATCHES):
            loader.get(1 + k // MICROBATCHES, k % MICROBATCHES, timeout_s=DEADLINE_S)


def test_pause_stops_production_and_resume_continues() -> None:
    workload = make_workload()
    with make_loader(workload, threads=3, prefetch=40,
                     test_delay_s=lambda step, mb: 0.002) as loader:
        loader.start(1, workload.total_steps)
        loader.get(1, 0, timeout_s=DEADLINE_S)
        loader.pause()  # returns once no item is in production
        produced = loader.stats()["items_produced"]
        assert loader.stats()["in_production"] == 0 and loader.stats()["paused"]
        assert produced < workload.total_steps * MICROBATCHES
        threading.Event().wait(0.05)  # asserting an absence: nothing may happen meanwhile
        assert loader.stats()["items_produced"] == produced
        loader.resume()
        for k in range(1, workload.total_steps * MICROBATCHES):
            loader.get(1 + k // MICROBATCHES, k % MICROBATCHES, timeout_s=DEADLINE_S)
        assert loader.stats()["items_produced"] == workload.total_steps * MICROBATCHES


def test_get_while_paused_times_out_then_stop_joins() -> None:
    workload = make_workload()
    with make_loader(workload, threads=2, prefetch=2) as loader:
        loader.pause()
        loader.start(1, 2)
        with pytest.raises(TimeoutError, match="step 1 micro-batch 0"):
            loader.get(1, 0, timeout_s=0.02)
        assert loader.stats()["items_produced"] == 0
    assert loader_threads() == []


def test_stop_mid_epoch_joins_every_thread() -> None:
    workload = make_workload()
    loader = make_loader(workload, threads=4, prefetch=3, test_delay_s=lambda s, m: 0.001)
    with loader:
        loader.start(1, workload.total_steps)
        names = sorted(t.name for t in loader_threads())
        assert names == ["loader-0", "loader-1", "loader-2", "loader-3"]
        for mb in range(MICROBATCHES):
            loader.get(1, mb, timeout_s=DEADLINE_S)
        loader.get(2, 0, timeout_s=DEADLINE_S)
        loader.stop()
        assert loader_threads() == []
        loader.stop()  # idempotent
        # Items prepared before the stop are still delivered, then the loader says it stopped.
        with pytest.raises(LoaderError, match="stopped before"):
            for k in range(5, workload.total_steps * MICROBATCHES):
                loader.get(1 + k // MICROBATCHES, k % MICROBATCHES)
    assert loader_threads() == []


def test_loader_thread_failure_reaches_get() -> None:
    workload = make_workload()

    def delay(step: int, mb: int) -> float:
        if (step, mb) == (3, 2):
            raise KeyError("corrupt sample 42")
        return 0.0

    with make_loader(workload, threads=3, prefetch=4, test_delay_s=delay) as loader:
        loader.start(1, workload.total_steps)
        with pytest.raises(LoaderError, match="step 3 micro-batch 2") as info:
            for k in range(workload.total_steps * MICROBATCHES):
                loader.get(1 + k // MICROBATCHES, k % MICROBATCHES, timeout_s=DEADLINE_S)
        assert isinstance(info.value.__cause__, KeyError)
        assert "corrupt sample 42" in str(info.value)
        # The failure stopped the siblings on its own, before anyone called stop().
        wait_until(lambda: not loader_threads(), "every loader thread has ended")
        with pytest.raises(LoaderError):
            loader.get(1 + k // MICROBATCHES, k % MICROBATCHES)  # it stays failed


def test_loader_threads_block_control_signals() -> None:
    workload = make_workload()
    masks = []

    def record_mask(step: int, mb: int) -> float:
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return 0.0

    with make_loader(workload, threads=2, test_delay_s=record_mask) as loader:
        loader.start(1, 1)
        for mb in range(MICROBATCHES):
            loader.get(1, mb, timeout_s=DEADLINE_S)
    assert len(masks) == MICROBATCHES
    for mask in masks:
        assert {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGTSTP} <= mask
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_stats_count_consumer_wait() -> None:
    workload = make_workload()
    with make_loader(workload, threads=1, test_delay_s=lambda s, m: 0.01) as loader:
        loader.start(1, 1)
        for mb in range(MICROBATCHES):
            loader.get(1, mb, timeout_s=DEADLINE_S)
        stats = loader.stats()
    assert stats["consumer_wait_s"] >= 0.005
    assert stats["items_consumed"] == stats["items_produced"] == MICROBATCHES
    assert stats["queue_depth"] == 0


# -- augmentation ---------------------------------------------------------------------------------

def test_augment_is_a_function_of_seed_epoch_and_sample() -> None:
    x = np.random.default_rng(1).random((20, 64))
    indices = np.arange(100, 120)
    for augment in (augment_digits, augment_noise):
        whole = augment(x, indices, SEED, 0)
        one_by_one = np.concatenate([augment(x[i : i + 1], indices[i : i + 1], SEED, 0)
                                     for i in range(20)])
        assert np.array_equal(whole, one_by_one)
        reversed_ = augment(x[::-1], indices[::-1], SEED, 0)[::-1]
        assert np.array_equal(whole, reversed_)
        assert np.array_equal(whole, augment(x.copy(), indices, SEED, 0))
        assert whole.shape == x.shape and whole.dtype == x.dtype
        assert not np.array_equal(whole, x)
        assert not np.array_equal(whole, augment(x, indices, SEED, 1))
        assert not np.array_equal(whole, augment(x, indices, SEED + 1, 0))
    assert np.array_equal(x, np.random.default_rng(1).random((20, 64)))  # input untouched


def test_augment_digits_stays_in_range_and_keeps_dtype() -> None:
    x = np.random.default_rng(2).random((50, 64)).astype(np.float32)
    out = augment_digits(x, np.arange(50), SEED, 3)
    assert out.dtype == np.float32 and out.shape == (50, 64)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert augment_noise(x, np.arange(50), SEED, 3).dtype == np.float32


def test_augment_digits_shifts_by_at_most_one_pixel() -> None:
    image = np.zeros((8, 8))
    image[3, 4] = 1.0
    x = np.tile(image.reshape(1, 64), (300, 1))
    out = augment_digits(x, np.arange(300), SEED, 0).reshape(300, 8, 8)
    moves = set()
    for sample in out:
        row, col = np.unravel_index(sample.argmax(), sample.shape)
        moves.add((int(row) - 3, int(col) - 4))
    assert moves == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_augment_digits_matches_a_pixel_by_pixel_oracle() -> None:
    x = np.random.default_rng(3).random((30, 64))
    indices = np.arange(500, 530)
    out = augment_digits(x, indices, SEED, 2).reshape(30, 8, 8)
    for sample, image, index in zip(out, x.reshape(30, 8, 8), indices, strict=True):
        rng = np.random.default_rng([SEED, 3, 2, int(index)])
        dy, dx = np.array(divmod(int(rng.integers(0, 9)), 3)) - 1
        noise = rng.normal(0.0, 0.05, size=(8, 8))
        expected = np.zeros((8, 8))
        for r in range(8):
            for c in range(8):
                if 0 <= r - dy < 8 and 0 <= c - dx < 8:
                    expected[r, c] = image[r - dy, c - dx]
        assert np.array_equal(sample, np.clip(expected + noise, 0.0, 1.0))


def test_augment_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="64 features"):
        augment_digits(np.zeros((2, 10)), np.arange(2), SEED, 0)
    with pytest.raises(ValueError, match="sample indices"):
        augment_noise(np.zeros((2, 10)), np.arange(3), SEED, 0)

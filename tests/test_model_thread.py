"""``dsv2cli/serve/model_thread.py``: the one thread that loads the model and runs the scheduler's loop."""

import threading

import pytest

from dsv2cli.inference.sampling import SamplingParams
from dsv2cli.inference.session import load_for_generation
from dsv2cli.serve.batch import Done, ServeRequest, TokenOut
from dsv2cli.serve.metrics import Metrics
from dsv2cli.serve.model_thread import ModelThread
from dsv2cli.serve.scheduler import Limits, Scheduler
from tests.helpers import reference_model, save_reference


def test_calls_run_in_order_on_one_thread_and_raise_in_the_caller():
    model_thread = ModelThread("test-model")
    try:
        seen = [model_thread.call(threading.current_thread) for _ in range(3)]
        assert seen == [model_thread.thread] * 3 and model_thread.thread is not threading.current_thread()
        order = []
        futures = [model_thread.submit(lambda i=i: order.append(i)) for i in range(5)]
        for future in futures:
            future.result(timeout=10)
        assert order == list(range(5))
        with pytest.raises(ZeroDivisionError):
            model_thread.call(lambda: 1 / 0)
        assert model_thread.call(lambda: "still serving") == "still serving"
    finally:
        model_thread.close()
    model_thread.thread.join(10)
    assert not model_thread.thread.is_alive()


def test_the_scheduler_decodes_on_the_thread_that_loaded_the_model(tmp_path):
    """Loading and decoding on one thread: one OpenMP team (two would make its workers sleep between regions)."""
    save_reference(reference_model(vocab_size=64), tmp_path)
    model_thread = ModelThread("test-model")
    loaded = model_thread.call(lambda: load_for_generation(str(tmp_path), "cpu", "float32", read_weights=False))
    scheduler = Scheduler(loaded, loaded.options, None, Limits(prefix_cache_bytes=0), Metrics(), thread=model_thread)
    threads, done = set(), threading.Event()

    def emit(event):
        threads.add(threading.current_thread())
        if isinstance(event, Done):
            done.set()
        else:
            assert isinstance(event, TokenOut)

    assert not scheduler.alive
    scheduler.submit(ServeRequest([1, 2, 3], 4, emit, SamplingParams(temperature=0.0), ignore_eos=True))
    scheduler.start()
    assert done.wait(60)
    assert threads == {model_thread.thread} and scheduler.alive
    scheduler.stop()
    assert not scheduler.alive and model_thread.thread.is_alive()  # a thread given to the scheduler is its owner's to close
    model_thread.close()

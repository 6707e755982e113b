"""Ctrl-C (SIGINT) stops a long call cleanly with KeyboardInterrupt."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import foldcube


def test_sigint_stops_a_long_forward():
    ev = foldcube.Evoformer.random({"c_m": 64, "c_z": 32, "no_blocks": 48}, seed=0)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((32, 96, 64)).astype(np.float32)
    z = rng.standard_normal((96, 96, 32)).astype(np.float32)
    t0 = time.perf_counter()
    ev(m.copy(), z.copy(), threads=1)  # warm and time one full call
    full = time.perf_counter() - t0
    timer = threading.Timer(full / 10, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ev(m, z, threads=1)
    stopped = time.perf_counter() - t0
    timer.join()
    assert stopped < full / 2, (stopped, full)
    # Python's own handler is back: a SIGINT outside foldcube raises in Python code as usual.
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    # The next call runs to the end (the cancel flag was cleared).
    m2, z2 = rng.standard_normal(m.shape).astype(np.float32), rng.standard_normal(z.shape).astype(np.float32)
    ev(m2[:4], z2, threads=1)
    assert np.all(np.isfinite(m2[:4]))


def test_sigint_stops_a_training_step():
    ev = foldcube.Evoformer.random({"c_m": 64, "c_z": 32, "no_blocks": 24}, seed=0)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((16, 64, 64)).astype(np.float32)
    z = rng.standard_normal((64, 64, 32)).astype(np.float32)
    gm, gz = np.ones_like(m), np.ones_like(z)
    t0 = time.perf_counter()
    ev.train_step(m.copy(), z.copy(), gm, gz, threads=1)
    full = time.perf_counter() - t0
    timer = threading.Timer(full / 10, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        ev.train_step(m, z, gm, gz, threads=1)
    timer.join()
    assert time.perf_counter() - t0 < full / 2

"""Results of every size come back whole, writable, aligned, and through private channels only."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pytest
from procs import open_fds

from dask_forkmap import ResultUnpicklingError, _core, _transport, fork_map

MiB = 1024 * 1024


@pytest.mark.parametrize(
    "nbytes",
    [0, 1, 4096, 65535, 65536, 200_000, _transport.PIPE_MAX - 1000, _transport.PIPE_MAX + 1000, 64 * MiB],
    ids=lambda n: f"{n}B",
)
def test_arrays_of_every_size_round_trip(nbytes: int) -> None:
    source = np.random.default_rng(nbytes).integers(0, 255, nbytes, dtype=np.uint8)
    result = fork_map(lambda: source.copy())
    np.testing.assert_array_equal(result, source)
    assert result.flags.writeable
    if nbytes:  # an empty array's data pointer is arbitrary
        assert result.ctypes.data % 16 == 0
    result[:1] = 7  # an ordinary, writable array
    if nbytes:
        assert result[0] == 7


def test_big_result_is_a_private_copy() -> None:
    source = np.arange(8 * MiB, dtype=np.int64)
    result = fork_map(lambda: source)
    result[:] = -1
    assert source[0] == 0
    assert source[-1] == 8 * MiB - 1


def _private_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def test_big_result_is_mapped_not_copied_on_arrival() -> None:
    # Pages of a big result are mapped as it is read and copied as it is written, not all at once on
    # arrival: a result that is only read never costs a copy in the parent.
    source = np.ones(64 * MiB // 8)
    before = _private_mib()
    result = fork_map(lambda: source)
    arrived = _private_mib()
    assert arrived - before < 16, f"the result's pages were copied on arrival: +{arrived - before:.0f} MiB"
    result[: len(result) // 2] = 2.0  # writing copies the pages written, and only those
    assert 24 < _private_mib() - before < 48
    assert result.sum() == 1.5 * len(result)
    assert source[0] == 1.0


def test_large_in_band_payloads_use_the_memory_file() -> None:
    blob = os.urandom(8 * MiB)
    text = "x" * (3 * MiB)
    assert fork_map(lambda: (blob, text, list(range(100_000)))) == (blob, text, list(range(100_000)))


def test_many_buffers_and_mixed_sizes() -> None:
    arrays = [np.full(n, n, dtype=np.float32) for n in (1, 10, 16_000, 17_000, 300_000) * 20]
    back = fork_map(lambda: arrays)
    assert len(back) == len(arrays)
    for a, b in zip(arrays, back, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pandas_frames_round_trip() -> None:
    df = pd.DataFrame({"a": np.arange(500_000), "b": np.random.default_rng(0).random(500_000), "c": "text"})
    pd.testing.assert_frame_equal(fork_map(lambda: df * 1), df * 1)


def test_cloudpickle_takes_what_pickle_refuses() -> None:
    offset = 3
    add = fork_map(lambda: lambda x: x + offset)
    assert add(4) == 7


def test_a_class_defined_in_the_task_comes_back() -> None:
    def make() -> object:
        class Local:
            def __init__(self) -> None:
                self.value = 11

        return Local()

    assert fork_map(make).value == 11


@pytest.mark.parametrize("payload", [0, 2 * _transport.PIPE_MAX], ids=["pipe", "memory-file"])
def test_unpicklable_in_parent_is_reported(payload: int) -> None:
    class Refuses:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (_explode, (bytes(payload),))

    type_name = f"{__name__}.test_unpicklable_in_parent_is_reported.<locals>.Refuses"
    with pytest.raises(ResultUnpicklingError, match="cannot be unpickled") as info:
        fork_map(Refuses)
    err = info.value
    assert err.type_name == type_name
    assert f"of type {type_name}" in str(err)
    assert err.reason == "RuntimeError: refuses to load"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ResultUnpicklingError
    assert (again.args, again.type_name, again.reason) == (err.args, err.type_name, err.reason)


def _explode(payload: bytes) -> None:
    raise RuntimeError("refuses to load")


def test_live_results_hold_no_file_descriptors() -> None:
    fork_map(int)
    assert _core._reaper.wait(timeout=60)
    before = open_fds()
    results = [fork_map(lambda: np.ones(MiB // 4)) for _ in range(30)]  # 2 MiB each: memfd path
    assert _core._reaper.wait(timeout=60)
    assert open_fds() == before
    assert all(r.sum() == MiB // 4 for r in results)


def test_channels_have_no_name_anyone_could_open(tmp_path: object) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    seen: list[str] = []

    def list_parent_fds() -> list[str]:
        parent = os.getppid()
        return [os.readlink(f"/proc/{parent}/fd/{fd}") for fd in os.listdir(f"/proc/{parent}/fd")]

    seen = fork_map(list_parent_fds)
    fork_map(lambda: np.ones(4 * MiB))
    assert set(os.listdir("/dev/shm")) == shm_before
    memfds = [link for link in seen if "memfd" in link]
    assert memfds, seen
    assert all(link.startswith("/memfd:") and link.endswith("(deleted)") for link in memfds)


def test_frame_reader_assembles_partial_reads() -> None:
    stream, buffers = _transport.dumps({"k": list(range(1000))})
    parts = _transport.encode(0, stream, buffers, -1, "builtins.dict")
    frame = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    r, w = os.pipe()
    os.set_blocking(r, False)
    reader = _transport.FrameReader()
    for i in range(0, len(frame), 7):
        os.write(w, frame[i : i + 7])
        assert reader.read_from(r)
        assert reader.done() == (i + 7 >= len(frame))
    assert reader.loads(-1) == {"k": list(range(1000))}
    assert reader.type_name() == "builtins.dict"
    os.close(w)
    assert not reader.read_from(r)  # EOF
    os.close(r)


def test_frame_reader_flags_text_that_is_not_a_frame() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.write(w, b"Fatal Python error: Segmentation fault\n")
    reader = _transport.FrameReader()
    reader.read_from(r)
    assert reader.not_a_frame
    assert not reader.done()
    assert "Segmentation fault" in reader.text()
    os.close(r)
    os.close(w)


def test_dumps_prefers_plain_pickle() -> None:
    stream, _ = _transport.dumps([1, 2, 3])
    assert stream == pickle.dumps([1, 2, 3], protocol=5)


def _hostile_task(go: int, report: int, nbytes: int) -> np.ndarray:
    """Return a big result, leaving behind a daemon that tries to change it once it is delivered."""
    fds = [int(n) for n in os.listdir("/proc/self/fd")]
    memfd = next(fd for fd in fds if "dask-forkmap-result" in _link(fd))
    held = os.dup(memfd)  # a copy the at-fork hook does not know about
    if os.fork() == 0:
        os.setsid()  # out of the child's process group: the child's end does not kill it
        outcome = b"nothing"
        try:
            os.read(go, 1)
            try:
                os.pwrite(held, b"\xff" * 4096, 0)
                outcome = b"wrote"
            except OSError:
                try:
                    os.ftruncate(held, 0)
                    outcome = b"truncated"
                except OSError:
                    outcome = b"refused"
        finally:
            os.write(report, outcome)
            os._exit(0)
    return np.zeros(nbytes, dtype=np.uint8)


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_a_delivered_result_cannot_be_changed_by_a_process_still_holding_its_file() -> None:
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        result = fork_map(_hostile_task, go_r, report_w, 8 * MiB)
        os.write(go_w, b"x")
        import select

        assert select.select([report_r], [], [], 60)[0], "the daemon did not report"
        assert os.read(report_r, 16) == b"refused"  # the file is sealed: no write, no truncation
        assert not result.any()
        assert len(result) == 8 * MiB
    finally:
        for fd in (go_r, go_w, report_r, report_w):
            os.close(fd)


def test_a_truncated_memory_file_is_an_error_not_a_crash() -> None:
    # A file that could not be sealed (no seals where it lives) and was cut short is reported.
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING: sealing fails quietly
    try:
        stream, buffers = _transport.dumps(np.zeros(8 * MiB, dtype=np.uint8))
        parts = _transport.encode(0, stream, buffers, fd)
        os.ftruncate(fd, 4096)
        r, w = os.pipe()
        os.write(w, b"".join(bytes(memoryview(p).cast("B")) for p in parts))
        reader = _transport.FrameReader()
        assert reader.read_from(r)
        os.close(r)
        os.close(w)
        assert reader.done()
        with pytest.raises(OSError, match="holds 4096 of its"):
            reader.loads(fd)
    finally:
        os.close(fd)

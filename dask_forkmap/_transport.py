"""Moving one object from a forked child to its parent.

Only results travel: the child already holds its inputs, copy-on-write. The object is pickled with
protocol 5 (plain :mod:`pickle` first, :mod:`cloudpickle` when that fails), which splits it into a
pickle stream and out-of-band buffers (numpy arrays, pandas blocks, anything exposing
``PickleBuffer``). Then, by size::

    child                                                     parent
    -----                                                     ------
    small: header | table | name | stream | buffers ---pipe--> read the frame, loads() over it
    large: stream, buffers --pwrite--> memfd                   (created by the parent before the fork)
           header | table | name -------------------pipe--> mmap(memfd, MAP_PRIVATE), loads() over the map

The frame on the pipe always starts with a fixed header, a table of (offset, length) segments and
the name of the result's type: segment 0 is the pickle stream, the rest are the out-of-band
buffers, in order. The name (a few bytes, UTF-8, its length in the header) lets the parent say what
it failed to unpickle. The frame's length is known from the header, so the parent knows the result
is complete without waiting for EOF (which a sibling or grandchild holding the pipe, or a slow
address-space teardown, can delay by seconds).

Large payloads never go through the pipe: the child writes them into an anonymous memory file
(``memfd_create``; nothing another process can open by name) and the parent maps that file
``MAP_PRIVATE``. The child seals the file once written (no write, shrink or grow after that), so
no other process still holding it can change a delivered result or truncate it under the parent's
mapping, which would turn the parent's next read into SIGBUS; the parent checks the file's size
before mapping it. The parent's buffers are then ordinary writable memory with no copy made: a write
copies only the page it touches. Small payloads are copied once into a bytearray, which is writable
too. Segments are 64-byte aligned in both cases, so numpy arrays come back aligned.

Anything not starting with the magic number is not a frame: faulthandler writes a crashed child's
Python stack into the same pipe, and the parent reports it as the crash site.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import struct
import sys
from collections.abc import Sequence
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows, where nothing forks
    fcntl = None  # type: ignore[assignment]

import cloudpickle

__all__ = ["FrameReader", "dumps", "encode", "write_all"]

MAGIC = b"DFM1"
# magic, kind, where, bytes of the type name, number of segments, bytes of data following the name
HEADER = struct.Struct("<4sBBHIQ")
NAME_MAX = 0xFFFF
SEGMENT = struct.Struct("<QQ")

WHERE_PIPE = 0
WHERE_SHM = 1

# Buffers below this size stay in the pickle stream: out-of-band only pays off for big ones.
OUT_OF_BAND_MIN = 64 * 1024
# Payloads up to this size go through the pipe; above it, through the memory file.
PIPE_MAX = 1024 * 1024
ALIGN = 64
# Linux caps one write() at 0x7ffff000 bytes.
_WRITE_MAX = 0x7FFFF000

# Large results are mapped lazily, not with MAP_POPULATE: on a private writable mapping that flag
# write-faults every page, i.e. copies the whole result before the caller has it (140 ms for 256
# MiB here). Mapped lazily, a page is only mapped when read and only copied when written: a result
# that is only read (most are) costs nothing more, one written all over costs the same copy later.


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _data_start(nsegs: int, name_len: int) -> int:
    # In a pipe frame the data starts aligned, so that the aligned offsets stay aligned in memory.
    return _align(HEADER.size + nsegs * SEGMENT.size + name_len)


def dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj`` with protocol 5; return the stream and the out-of-band buffers.

    Plain :mod:`pickle` handles most results at a quarter of cloudpickle's cost; cloudpickle takes
    over for what pickle refuses (lambdas, classes defined inside the task).
    """
    buffers: list[pickle.PickleBuffer] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        # Returning True keeps the buffer in band.
        if memoryview(buf).nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(buf)
        return False

    try:
        return pickle.dumps(obj, protocol=5, buffer_callback=keep), buffers
    except Exception:
        buffers.clear()
    return cloudpickle.dumps(obj, protocol=5, buffer_callback=keep), buffers


def encode(
    kind: int, stream: bytes, buffers: Sequence[pickle.PickleBuffer], shm_fd: int, type_name: str = ""
) -> list[Any]:
    """Lay out one payload; return the parts of the frame to write to the pipe, in order.

    Large payloads are written into ``shm_fd`` here (if there is one) and only described in the frame.
    ``type_name`` travels in the frame, outside the pickle, for the parent's error if unpickling fails.
    """
    name = type_name.encode("utf-8", "replace")[:NAME_MAX]
    segments: list[memoryview] = [memoryview(stream)]
    for buf in buffers:
        segments.append(memoryview(buf).cast("B"))
    offsets = []
    size = 0
    for seg in segments:
        size = _align(size)
        offsets.append(size)
        size += seg.nbytes
    table = b"".join(SEGMENT.pack(off, seg.nbytes) for off, seg in zip(offsets, segments, strict=True))

    if size > PIPE_MAX and shm_fd >= 0:
        os.ftruncate(shm_fd, size)
        for off, seg in zip(offsets, segments, strict=True):
            _pwrite_all(shm_fd, seg, off)
        _seal(shm_fd)
        return [HEADER.pack(MAGIC, kind, WHERE_SHM, len(name), len(segments), size), table, name]

    header = HEADER.pack(MAGIC, kind, WHERE_PIPE, len(name), len(segments), size)
    pad = _data_start(len(segments), len(name)) - len(header) - len(table) - len(name)
    parts: list[Any] = [header, table, name + bytes(pad)]
    pos = 0
    for off, seg in zip(offsets, segments, strict=True):
        if off > pos:
            parts.append(bytes(off - pos))
        parts.append(seg)
        pos = off + seg.nbytes
    return parts


# F_SEAL_WRITE still lets the parent map the file MAP_PRIVATE and write to its private copy.
_SEALS = sum(getattr(fcntl, name, 0) for name in ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE"))


def _seal(fd: int) -> None:
    if fcntl is not None and hasattr(fcntl, "F_ADD_SEALS"):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except OSError:  # pragma: no cover - a file system without seals: the size check still holds
            pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done : done + _WRITE_MAX], offset + done)


def write_all(fd: int, parts: list[Any]) -> None:
    """Write every part to ``fd`` (blocking), coping with partial writes."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:64])
        while n:
            head = views[0]
            if n >= head.nbytes:
                n -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[n:]
                n = 0


class FrameReader:
    """Accumulates what a child writes to its pipe until one whole frame has arrived."""

    __slots__ = ("_buf", "_filled", "_header", "_need", "not_a_frame")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._filled = 0
        self._need = HEADER.size
        self._header: tuple[Any, ...] | None = None
        # Bytes that are not a frame: faulthandler's report of a fatal signal.
        self.not_a_frame = False

    def done(self) -> bool:
        return self._header is not None and self._filled >= self._need

    def read_from(self, fd: int) -> bool:
        """Read what is available on the non-blocking ``fd``; return False at EOF."""
        while True:
            want = max(self._need - self._filled, 65536) if not self.not_a_frame else 65536
            try:
                chunk = os.read(fd, min(want, 16 * 1024 * 1024))
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self._feed(chunk)
            if self.done():
                return True

    def _feed(self, chunk: bytes) -> None:
        self._buf += chunk
        self._filled += len(chunk)
        if self._header is None and not self.not_a_frame and self._filled >= HEADER.size:
            header = HEADER.unpack_from(self._buf)
            if header[0] != MAGIC:
                self.not_a_frame = True
                return
            self._header = header
            _, _, where, name_len, nsegs, size = header
            if where == WHERE_PIPE:
                self._need = _data_start(nsegs, name_len) + size
            else:
                self._need = HEADER.size + nsegs * SEGMENT.size + name_len
        elif not self.not_a_frame and self._filled >= len(MAGIC) and not self._buf.startswith(MAGIC):
            self.not_a_frame = True

    def text(self) -> str:
        """Whatever arrived, as text (for reports when it is not a frame)."""
        return self._buf.decode("utf-8", "replace")

    def kind(self) -> int:
        assert self._header is not None
        return int(self._header[1])

    def type_name(self) -> str | None:
        """The qualified name of the result's type, as the child sent it; None if it sent none."""
        assert self._header is not None
        _, _, _, name_len, nsegs, _ = self._header
        if not name_len:
            return None
        start = HEADER.size + nsegs * SEGMENT.size
        return self._buf[start : start + name_len].decode("utf-8", "replace")

    def loads(self, shm_fd: int) -> Any:
        """Unpickle the complete frame; out-of-band buffers come back writable, without a copy."""
        assert self._header is not None
        _, _, where, name_len, nsegs, size = self._header
        table = HEADER.size
        segs = [SEGMENT.unpack_from(self._buf, table + i * SEGMENT.size) for i in range(nsegs)]
        if where == WHERE_SHM:
            held = os.fstat(shm_fd).st_size
            if held < size:  # mapping it would raise SIGBUS at the first read past the end
                raise OSError(errno.EIO, f"the result's memory file holds {held} of its {size} bytes: it was truncated")
            data = _map_private(shm_fd, size)
        else:
            data = memoryview(self._buf)[_data_start(nsegs, name_len) :]
        stream = data[segs[0][0] : segs[0][0] + segs[0][1]]
        buffers = [data[off : off + n] for off, n in segs[1:]]
        try:
            return pickle.loads(stream, buffers=buffers)
        finally:
            # Only the buffers the result kept should pin the data.
            stream.release()
            data.release()


if sys.version_info >= (3, 13):

    def _map_private(fd: int, size: int) -> memoryview:
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, trackfd=False)
        return memoryview(mm)

else:
    # Before 3.13, mmap.mmap(fd) keeps a duplicate of fd open for as long as the mapping lives: one
    # descriptor per live result, which a graph of many large chunks turns into EMFILE. So take an
    # anonymous mmap object (it owns its address range and holds no descriptor) and map the file over
    # that same range with MAP_FIXED; the object unmaps it when the last view of it dies.
    # Only POSIX has a libc mmap to load, and only there does CDLL(None) mean "this process's own
    # symbols": Windows raises TypeError for it, which must not make importing the package fail.
    _libc_mmap: Any = None
    if os.name == "posix":
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc_mmap = _libc.mmap
            _libc_mmap.restype = ctypes.c_void_p
            _libc_mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            _MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
        except (ImportError, OSError, AttributeError, TypeError):  # pragma: no cover - no ctypes or no libc mmap
            _libc_mmap = None

    def _map_private(fd: int, size: int) -> memoryview:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if _libc_mmap is None:  # pragma: no cover
            return memoryview(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot))
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=prot)
        anchor = ctypes.c_char.from_buffer(mm)
        addr = ctypes.addressof(anchor)
        del anchor
        got = _libc_mmap(addr, size, prot, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        if got != addr:
            err = ctypes.get_errno()
            mm.close()
            raise OSError(err, f"mapping a {size}-byte result failed: {os.strerror(err)}")
        return memoryview(mm)

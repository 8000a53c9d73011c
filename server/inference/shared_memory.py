"""Triton's system shared-memory extension: regions of POSIX shared memory that a client on
the same host registers by key, so that inference reads inputs from them and writes outputs
into them instead of sending the bytes over the socket.

    register(name, key, offset, byte_size)   map bytes [offset, offset + byte_size) of the
                                             object `key` (shm_open's name: /dev/shm/KEY)
    status(name)                             the regions registered ("" : all)
    unregister(name)                         unmap it ("" : all); an unknown name is no error,
                                             as in Triton
    read(region, what) / write(region, ...)  an inference's tensor at an offset inside a region

A region is mapped once, at registration, with mmap over the object's file; reads copy the
tensor's bytes out (slicing an mmap copies), so no numpy array ever points into a mapping
that an unregister may close while a request still runs. Every bound is checked against
the registered size, with a message naming the region and the numbers. Each server process
has its own table: with `--workers N` a registration reaches every worker
(server/process/siblings.py), since the kernel spreads a client's connections among them.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from server.errors import InferenceError, invalid

log = logging.getLogger(__name__)

SHM_DIRECTORY = "/dev/shm"  # where Linux's shm_open keeps its objects


class Region(NamedTuple):
    """Where a request's tensor lies: a registered region, and a window inside it."""

    name: str
    byte_size: int
    offset: int = 0


@dataclass
class _Mapping:
    name: str
    key: str
    offset: int
    byte_size: int
    mapped: mmap.mmap


def _shm_path(key: str) -> str:
    """The file behind shm_open(key). Only a plain name (with or without its leading '/')
    is accepted: a key must not reach files outside /dev/shm."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise invalid(f"shared memory key {key!r} is not a POSIX shared memory name; expected '/name' "
                      f"(as shm_open takes it), with no other '/'")
    return os.path.join(SHM_DIRECTORY, name)


def _open(key: str, offset: int, byte_size: int) -> mmap.mmap:
    path = _shm_path(key)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as error:
        raise invalid(f"Unable to open shared memory region: {key!r}: {error.strerror} ({path})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise invalid(f"shared memory key {key!r} ({path}) is not a shared memory object")
        if offset + byte_size > info.st_size:
            raise invalid(f"shared memory region {key!r} holds {info.st_size} bytes; offset {offset} + byte_size "
                          f"{byte_size} = {offset + byte_size} runs past its end")
        # The mapping covers [0, offset + byte_size): mmap's own offset would have to be page-aligned.
        return mmap.mmap(fd, offset + byte_size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class SystemSharedMemory:
    """The regions one server process has mapped, by name."""

    def __init__(self) -> None:
        self._regions: dict[str, _Mapping] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise invalid("a shared memory region needs a name")
        if offset < 0 or byte_size <= 0:
            raise invalid(f"shared memory region {name!r}: offset {offset} must be >= 0 and byte_size "
                          f"{byte_size} > 0")
        with self._lock:
            if name in self._regions:
                known = self._regions[name]
                raise InferenceError(grpc.StatusCode.ALREADY_EXISTS,
                                     f"shared memory region {name!r} already in manager (key {known.key!r}, "
                                     f"offset {known.offset}, byte_size {known.byte_size}); unregister it first")
            self._regions[name] = _Mapping(name, key, offset, byte_size, _open(key, offset, byte_size))

    def status(self, name: str = "") -> list[tuple[str, str, int, int]]:
        """(name, key, offset, byte_size) of `name`, or of every region; NOT_FOUND for an unknown name."""
        with self._lock:
            if name and name not in self._regions:
                raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                     f"Unable to find system shared memory region: {name!r}")
            chosen = [self._regions[name]] if name else list(self._regions.values())
            return [(region.name, region.key, region.offset, region.byte_size) for region in chosen]

    def unregister(self, name: str = "") -> None:
        with self._lock:
            names = [name] if name else list(self._regions)
            for region in [self._regions.pop(each) for each in names if each in self._regions]:
                region.mapped.close()

    def close(self) -> None:
        """Unmap every region (shutdown)."""
        with self._lock:
            names = sorted(self._regions)
        if names:
            log.info("unmapping %d system shared memory region(s) at shutdown: %s", len(names), ", ".join(names))
        self.unregister()

    # -- inference -------------------------------------------------------------------------
    def read(self, region: Region, what: str) -> bytes:
        """A copy of the request's window of `region` (an input's bytes)."""
        with self._lock:
            mapping = self._window(region, what)
            start = mapping.offset + region.offset
            return mapping.mapped[start:start + region.byte_size]

    def write(self, region: Region, data: bytes, what: str) -> None:
        """Put an output's bytes at the start of the request's window of `region`."""
        with self._lock:
            mapping = self._window(region, what)
            if len(data) > region.byte_size:
                raise invalid(f"shared memory size specified with the request for {what} ({region.byte_size} "
                              f"bytes) should be at least {len(data)} bytes to hold the results")
            start = mapping.offset + region.offset
            mapping.mapped[start:start + len(data)] = data

    def _window(self, region: Region, what: str) -> _Mapping:
        mapping = self._regions.get(region.name)
        if mapping is None:
            known = ", ".join(repr(name) for name in sorted(self._regions)) or "none"
            raise invalid(f"Unable to find shared memory region: {region.name!r} ({what}; registered: {known})")
        if region.offset + region.byte_size > mapping.byte_size:
            raise invalid(f"{what}: shared_memory_offset {region.offset} + shared_memory_byte_size "
                          f"{region.byte_size} = {region.offset + region.byte_size} runs past the end of region "
                          f"{region.name!r} ({mapping.byte_size} bytes)")
        return mapping

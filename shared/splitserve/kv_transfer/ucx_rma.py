"""UCX remote memory access from Python: the libucp calls ucxx does not wrap.

ucxx (PyPI `ucxx-cu12`) gives contexts, workers, endpoints from worker addresses and peer-failure handling, but
its Python API has no memory registration, packed remote keys or put/get. Those are a handful of plain C calls
on the very libucp ucxx has loaded, so they are bound here with ctypes against the handles ucxx exposes
(`UCXContext.handle`, `UCXEndpoint.handle`). ctypes drops the GIL during each call, so a long copy by the cma
transport (process_vm_writev) does not stall other Python threads.

Everything here is synchronous and touches one worker: call it from the thread that owns that worker.
Importing this module imports ucxx; it raises UcxUnavailableError with the reason when that cannot work.
"""

from __future__ import annotations

import ctypes
import os
import select
import time
from typing import Optional


class UcxUnavailableError(ImportError):
    """ucxx/libucx is not installed or cannot load here; the message says what to install or use instead."""


class UcxError(RuntimeError):
    """A UCX call failed; `status` is the ucs_status_t."""

    def __init__(self, what: str, status: int):
        super().__init__(f"{what}: {_status_string(status)} (ucs_status {status})")
        self.status = status


# ucxx's import sets UCX_RNDV_FRAG_MEM_TYPE=cuda unless told otherwise: staging fragments in GPU memory, which a
# CPU-only host has not got. KV blocks are host memory until a GPU path is measured, so stage in host memory.
os.environ.setdefault("UCX_RNDV_FRAG_MEM_TYPE", "host")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets variables this UCX build may not read
try:
    import libucx
    import ucxx._lib.libucxx as ucx_api
except Exception as exc:  # ImportError, or OSError from a libucx that cannot load
    raise UcxUnavailableError(
        f"the UCX KV transport needs ucxx: pip install 'ucxx-cu12>=0.52,<0.53' ({type(exc).__name__}: {exc}); "
        f"or run with --kv-transport tcp") from exc

_libs = {os.path.basename(lib._name): lib for lib in libucx.load_library() if lib is not None}
_ucp = _libs.get("libucp.so")
_ucs = _libs.get("libucs.so")
if _ucp is None or _ucs is None:
    raise UcxUnavailableError(f"libucx loaded {sorted(_libs)}, without libucp.so/libucs.so")

UCS_OK = 0
UCS_INPROGRESS = 1
_UCS_ERR_LAST = -100
UCS_ERR_TIMED_OUT = -20
UCS_ERR_CANCELED = -16

_MEM_MAP_FIELD_ADDRESS, _MEM_MAP_FIELD_LENGTH, _MEM_MAP_FIELD_FLAGS, _MEM_MAP_FIELD_PROT = 1, 2, 4, 8
_MEM_MAP_ALLOCATE = 1 << 1
_MEM_ATTR_FIELD_ADDRESS, _MEM_ATTR_FIELD_LENGTH = 1, 2
_PROT_LOCAL_RW = (1 << 0) | (1 << 1)
_PROT_REMOTE_RW = (1 << 8) | (1 << 9)

_MAX_SLEEP_S = 0.001
FEATURES = (ucx_api.Feature.RMA, ucx_api.Feature.AM, ucx_api.Feature.WAKEUP)


class _MemMapParams(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p), ("length", ctypes.c_size_t),
                ("flags", ctypes.c_uint), ("prot", ctypes.c_uint), ("memory_type", ctypes.c_int),
                ("exported_memh_buffer", ctypes.c_void_p)]


class _MemAttr(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p), ("length", ctypes.c_size_t),
                ("mem_type", ctypes.c_int)]


class _RequestParam(ctypes.Structure):
    """ucp_request_param_t with op_attr_mask = 0: no callback, so the caller polls and frees each request."""

    _fields_ = [("op_attr_mask", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 120)]


def _bind(lib, name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


_vp, _sz, _u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64
_mem_map = _bind(_ucp, "ucp_mem_map", ctypes.c_int8, _vp, ctypes.POINTER(_MemMapParams), ctypes.POINTER(_vp))
_mem_query = _bind(_ucp, "ucp_mem_query", ctypes.c_int8, _vp, ctypes.POINTER(_MemAttr))
_mem_unmap = _bind(_ucp, "ucp_mem_unmap", ctypes.c_int8, _vp, _vp)
_rkey_pack = _bind(_ucp, "ucp_rkey_pack", ctypes.c_int8, _vp, _vp, ctypes.POINTER(_vp), ctypes.POINTER(_sz))
_rkey_buffer_release = _bind(_ucp, "ucp_rkey_buffer_release", None, _vp)
_rkey_unpack = _bind(_ucp, "ucp_ep_rkey_unpack", ctypes.c_int8, _vp, _vp, ctypes.POINTER(_vp))
_rkey_ptr = _bind(_ucp, "ucp_rkey_ptr", ctypes.c_int8, _vp, _u64, ctypes.POINTER(_vp))
_rkey_destroy = _bind(_ucp, "ucp_rkey_destroy", None, _vp)
_put_nbx = _bind(_ucp, "ucp_put_nbx", _vp, _vp, _vp, _sz, _u64, _vp, ctypes.POINTER(_RequestParam))
_get_nbx = _bind(_ucp, "ucp_get_nbx", _vp, _vp, _vp, _sz, _u64, _vp, ctypes.POINTER(_RequestParam))
_ep_flush_nbx = _bind(_ucp, "ucp_ep_flush_nbx", _vp, _vp, ctypes.POINTER(_RequestParam))
_request_check_status = _bind(_ucp, "ucp_request_check_status", ctypes.c_int8, _vp)
_request_cancel = _bind(_ucp, "ucp_request_cancel", None, _vp, _vp)
_request_free = _bind(_ucp, "ucp_request_free", None, _vp)
_worker_progress = _bind(_ucp, "ucp_worker_progress", ctypes.c_uint, _vp)
_status_string_fn = _bind(_ucs, "ucs_status_string", ctypes.c_char_p, ctypes.c_int8)
_NO_CALLBACK = _RequestParam()


def _status_string(status: int) -> str:
    return _status_string_fn(status).decode(errors="replace")


def _check(what: str, status: int) -> None:
    if status != UCS_OK:
        raise UcxError(what, status)


def new_context(config: Optional[dict[str, str]] = None) -> "ucx_api.UCXContext":
    return ucx_api.UCXContext(config or {}, feature_flags=FEATURES)


class Registration:
    """Memory registered with a UCP context for remote read and write, and its packed remote key.

    `address=None` asks UCX to allocate the memory itself (UCX_ALLOC_PRIO: sysv/posix shared memory first),
    which peers on the same host can map and copy into directly; otherwise the given memory is registered.
    """

    def __init__(self, context: "ucx_api.UCXContext", length: int, address: Optional[int] = None):
        mask = _MEM_MAP_FIELD_LENGTH | _MEM_MAP_FIELD_PROT | _MEM_MAP_FIELD_FLAGS
        params = _MemMapParams(field_mask=mask, length=length, prot=_PROT_LOCAL_RW | _PROT_REMOTE_RW,
                               flags=_MEM_MAP_ALLOCATE if address is None else 0)
        if address is not None:
            params.field_mask |= _MEM_MAP_FIELD_ADDRESS
            params.address = address
        self._context = context
        memh = _vp()
        _check(f"registering {length} bytes", _mem_map(context.handle, ctypes.byref(params), ctypes.byref(memh)))
        self._memh = memh
        try:
            attr = _MemAttr(field_mask=_MEM_ATTR_FIELD_ADDRESS | _MEM_ATTR_FIELD_LENGTH)
            _check("querying registered memory", _mem_query(memh, ctypes.byref(attr)))
            self.address, self.length = attr.address, attr.length
            buffer, size = _vp(), _sz()
            _check("packing a remote key", _rkey_pack(context.handle, memh, ctypes.byref(buffer), ctypes.byref(size)))
            self.packed_rkey = ctypes.string_at(buffer, size.value)
            _rkey_buffer_release(buffer)
        except UcxError:
            self.close()
            raise

    def memoryview(self) -> memoryview:
        """The registered bytes, writable, without a copy; valid until close()."""
        return memoryview((ctypes.c_char * self.length).from_address(self.address)).cast("B")

    def close(self) -> None:
        if self._memh:
            _mem_unmap(self._context.handle, self._memh)
            self._memh = None


class RemoteKey:
    """A peer's packed rkey made usable on one endpoint; destroy it before that endpoint closes."""

    def __init__(self, endpoint: "ucx_api.UCXEndpoint", packed: bytes):
        handle = _vp()
        _check("unpacking a remote key", _rkey_unpack(endpoint.handle, packed, ctypes.byref(handle)))
        self._handle = handle

    @property
    def handle(self) -> int:
        return self._handle.value

    def local_pointer(self, remote_address: int) -> Optional[int]:
        """Where `remote_address` is mapped in this process (shared-memory transports), or None."""
        pointer = _vp()
        status = _rkey_ptr(self._handle, remote_address, ctypes.byref(pointer))
        return pointer.value if status == UCS_OK else None

    def destroy(self) -> None:
        if self._handle:
            _rkey_destroy(self._handle)
            self._handle = None


class Operations:
    """Outstanding non-blocking puts/gets on one endpoint, completed (or failed) together by `wait`.

    The worker must be in blocking progress mode (`worker.init_blocking_progress_mode()`).
    """

    def __init__(self, worker: "ucx_api.UCXWorker", endpoint: "ucx_api.UCXEndpoint"):
        self._worker, self._endpoint = worker, endpoint
        self._requests: list[int] = []

    def put(self, local_address: int, nbytes: int, remote_address: int, rkey: RemoteKey) -> None:
        self._track("put", _put_nbx(self._endpoint.handle, local_address, nbytes, remote_address, rkey.handle,
                                    _NO_CALLBACK))

    def get(self, local_address: int, nbytes: int, remote_address: int, rkey: RemoteKey) -> None:
        self._track("get", _get_nbx(self._endpoint.handle, local_address, nbytes, remote_address, rkey.handle,
                                    _NO_CALLBACK))

    def flush(self) -> None:
        """Remote completion of every put before it: the bytes are in the peer's memory when wait() returns."""
        self._track("flush", _ep_flush_nbx(self._endpoint.handle, _NO_CALLBACK))

    def wait(self, deadline: float) -> None:
        """Progresses the worker until every operation completes; raises UcxError on the first failure or at
        the deadline (time.monotonic()), cancelling whatever is still outstanding.

        Between progress calls it sleeps on the worker's event fd (blocking progress mode) rather than
        spinning, so a slow peer costs no CPU; each sleep is capped so a missed event only costs a millisecond.
        """
        try:
            while self._requests:
                while _worker_progress(self._worker.handle):
                    pass
                pending, failure = [], UCS_OK
                for request in self._requests:
                    status = _request_check_status(request)
                    if status == UCS_INPROGRESS:
                        pending.append(request)
                        continue
                    _request_free(request)
                    failure = failure or status
                self._requests = pending
                if failure != UCS_OK:
                    raise UcxError("RMA operation failed", failure)
                if not pending:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UcxError("RMA operations did not complete in time", UCS_ERR_TIMED_OUT)
                if self._worker.arm():
                    select.select([self._worker.epoll_file_descriptor], [], [], min(left, _MAX_SLEEP_S))
        finally:
            self.cancel()

    def cancel(self) -> None:
        for request in self._requests:
            _request_cancel(self._worker.handle, request)
            _request_free(request)
        self._requests = []

    def _track(self, what: str, status_ptr: Optional[int]) -> None:
        if not status_ptr:
            return  # completed in place (UCS_OK)
        if status_ptr >= (1 << 64) + _UCS_ERR_LAST:
            raise UcxError(f"{what} refused", status_ptr - (1 << 64))
        self._requests.append(status_ptr)


def progress(worker: "ucx_api.UCXWorker") -> int:
    return _worker_progress(worker.handle)

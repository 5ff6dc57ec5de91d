"""The nftables mode's I/O: one libnftables context and one nfnetlink socket per node.

What an `nft -f` of a few elements costs, measured on this machine (kernel 6.18,
nftables 1.0.6) against tables of 100 and of 100,000 Services:

- nft's userspace cache is not the problem: for `add`/`delete element`, `add chain` and
  `add rule` nft 1.0.6 dumps only the table's tables, chains and sets (strace: GETTABLE,
  GETCHAIN, GETSET; no GETRULE or GETSETELEM), which stay few here; `delete element`
  needs no handle.
- Closing an nfnetlink socket after a transaction that deleted anything waits for the
  kernel's deferred destruction of what it deleted, an RCU grace period (nft_rcv_nl_event
  flushes the destroy work on NETLINK_URELEASE): 6-15 ms per `nft` process or fresh
  context, whatever the table's size. A context kept open per node never closes its socket:
  an element added or deleted costs 0.07 ms instead of 0.4 ms (add) and 10-15 ms (delete).
- The kernel validates the whole table when a transaction adds a rule (with an expression
  that validates) or a jump/goto element of a verdict map, walking every element of every
  verdict map: 13-14 ms with a `service-ips` map of 100,000 jumps, 0.09 ms without one.
  And a rule reading a map (`dnat ... map @m`) makes it check every element of the map:
  21 ms for a new chain reading a shared endpoint map of 300,000. Both are in the commit
  (sendmsg), nothing in userspace; nftlayout's docstring says how the layout avoids them.

A context's socket belongs to the network namespace it was opened in, so it is made on a
thread inside the node's namespace and may then be used from any thread (one at a time).
Without libnftables every transaction is an `nft -f` process.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading

from dataplanes.base import DataplaneError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NFT_CTX_OUTPUT_JSON = 1 << 4

_LIB: list[ctypes.CDLL | None] = []


def libnftables() -> ctypes.CDLL | None:
    """nft's own library (Debian libnftables1), loaded once; None when absent."""
    if not _LIB:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError:
            lib = None
        if lib is not None:
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            for fn in ("nft_ctx_free", "nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
            for fn in ("nft_ctx_get_error_buffer", "nft_ctx_get_output_buffer"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
                getattr(lib, fn).restype = ctypes.c_char_p
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _LIB.append(lib)
    return _LIB[0]


def _generation(sock: socket.socket, seq: int) -> int:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    sock.send(struct.pack("=LHHLL", 16 + len(body), msg_type, NLM_F_REQUEST, seq, 0) + body)
    data = sock.recv(65536)
    length, kind = struct.unpack_from("=LH", data)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, 16)
        raise DataplaneError(f"reading the nf_tables generation failed: errno {-err}")
    offset = 16 + 4
    while offset + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, offset)
        if atype & 0x3FFF == NFTA_GEN_ID:
            return struct.unpack_from(">I", data, offset + 4)[0]
        offset += (alen + 3) & ~3
    raise DataplaneError("the nf_tables generation reply carried no NFTA_GEN_ID")


def ruleset_generation() -> int:
    """The nf_tables generation of the calling thread's network namespace (a socket of its
    own: closing it may wait for an RCU grace period, see the module's docstring).

    Every committed transaction (ours, nft's, iptables-nft's) bumps it, so an unchanged
    number proves nobody touched the ruleset since our last transaction.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(5)
        return _generation(s, 1)


class NftContext:
    """One node's libnftables context and generation socket. Make it on a thread inside
    the node's network namespace (`node.call(NftContext)`)."""

    def __init__(self) -> None:
        lib = libnftables()
        if lib is None:
            raise DataplaneError("libnftables.so.1 not found (apt-get install libnftables1)")
        self._lib = lib
        self._lock = threading.Lock()
        self._seq = 0
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(5)
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            self._sock.close()
            raise DataplaneError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, script: str, json_output: bool = False) -> tuple[int, str, str]:
        """(exit code, output, errors) of one `nft -f` script, one transaction."""
        lib = self._lib
        with self._lock:
            if self._ctx is None:
                raise DataplaneError("the nftables context was closed")
            flags = lib.nft_ctx_output_get_flags(self._ctx)
            if json_output:
                lib.nft_ctx_output_set_flags(self._ctx, flags | NFT_CTX_OUTPUT_JSON)
            try:
                rc = lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            finally:
                if json_output:
                    lib.nft_ctx_output_set_flags(self._ctx, flags)
                # Reading a buffer also empties it for the next command.
                out = lib.nft_ctx_get_output_buffer(self._ctx) or b""
                err = lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return (1 if rc else 0), out.decode(errors="replace"), err.decode(errors="replace")

    def generation(self) -> int:
        """The nf_tables generation of the context's namespace (see ruleset_generation)."""
        with self._lock:
            if self._ctx is None:
                raise DataplaneError("the nftables context was closed")
            self._seq += 1
            return _generation(self._sock, self._seq)

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
                self._sock.close()

    def __del__(self) -> None:  # a context dropped unclosed must not keep its namespace
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def run_nft(script: str) -> tuple[int, str]:
    """`nft -f` on a fresh context: (exit code, errors), in the calling thread's namespace."""
    ctx = NftContext()
    try:
        rc, _, err = ctx.run(script)
        return rc, err
    finally:
        ctx.close()

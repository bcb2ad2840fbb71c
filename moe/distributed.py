"""Expert parallelism: a SparseMoE's experts spread over the ranks of a process group.

    import torch.distributed as dist
    from moe.distributed import ExpertParallelMoE, TorchTransport

    dist.init_process_group("gloo")                   # torchrun / torch.multiprocessing
    layer = moe.SparseMoE(d, F, E, k, seed=0)         # the same config and seed everywhere
    ep = ExpertParallelMoE(layer, TorchTransport(timeout=60))
    y = ep(x_local)                                   # bitwise layer(x_local)
    y, ctx = ep.forward_train(x_local)
    g = ep.backward(ctx, dy_local, aux_coef=0.01)     # g["w_up"]: this rank's experts only

or, under ``mpiexec -n 4 python script.py`` (mpi4py; ``pip install moe[mpi]``)::

    from moe.distributed import ExpertParallelMoE, MPITransport
    ep = ExpertParallelMoE(layer, MPITransport(timeout=60))   # MPI.COMM_WORLD by default

Every rank holds the full layer *config* and the replicated weights (router, expert_bias,
shared experts); of the routed experts it keeps and computes only its own
(``ep.local_experts``: contiguous slices by default -- ``E % world`` need not be 0 -- or
a given ``expert_to_rank`` map).  Each call runs on the rank's own tokens:

1. router logits and top-k routing locally (the router is replicated), the local
   dispatch (the stable sort by expert, as the single-process layer does it);
2. the per-expert row counts exchanged (``alltoall_counts``), then the routed rows
   (``alltoallv``): to each owner the source's rows of that owner's experts, in the
   source's expert-sorted order;
3. the owner orders what arrived *expert-major, then by source rank, then the source's
   order* -- for each of its experts exactly the rows the single-process layer would give
   that expert on the concatenation of all ranks' tokens (rank 0's first) -- and runs the
   grouped FFN (the core's ``ffn_grouped``) on its experts' weights;
4. the results travel back, and the home rank combines them in slot order and adds the
   shared experts (computed locally).

A token's FFN output depends only on its own row, so the output on each rank is bitwise
the single-process ``layer(x_local)``.  Nothing is reduced in an order that depends on
timing: every exchange lands in fixed positions.

Capacity (``capacity_factor``): decided per rank on its own tokens, exactly as the
single-process layer on those tokens decides it (each expert keeps its first
``ceil(cf * T_rank * k / E)`` assignments *from that rank*); an expert may thus receive up
to ``world`` times that over all ranks.  A global capacity (over all ranks' tokens) is not
implemented.  The losses (aux_loss, z_loss) are likewise those of the rank's own tokens.

Backward (``forward_train`` / ``backward``, as SparseMoE's): the exchange in reverse --
the rows' output gradients to the owners, the grouped FFN backward there, the rows' input
gradients back, then dispatch / combine / routing / router backward at home.
``grads["x"]`` is bitwise the single-process layer's on the rank's tokens.  The routed
experts' weight gradients stay with their owners (``grads["w_up"]`` etc. have
``len(local_experts)`` rows, in ``local_experts`` order) and are bitwise those of the
single-process layer on the concatenation of all ranks' tokens when the routing of the
concatenation is the ranks' routings concatenated (dropless top-k; not with capacity,
whose cut depends on the batch).  The replicated weights' gradients (router_weight,
shared experts, shared gate) are summed over the ranks (data parallel: the gradient of the
sum of the ranks' losses) in a fixed order: all-gathered, then added in rank order
(``g_0 + g_1 + ...`` in float32), so every rank gets the same bits on every run.

Faults: every collective runs under the transport's timeout (gloo's, or MPITransport's
polling deadline: a peer that raised, died or hangs makes the others raise
``ExpertParallelError`` within it, never a hang, never a partial result).  After an error
the layer refuses further calls.  With MPI the communicator is then unusable (a collective
is left pending): end the job with ``comm.Abort()``; MPICH's ``mpiexec`` by default kills
the whole job at once when a rank dies (see MPITransport).  A config mismatch
(n_experts, top_k, d_model, d_ff, weight shapes, routing options, the replicated weights'
values, the expert map) raises ``ValueError`` at construction on every rank, naming the
field.

Not covered (NotImplementedError at construction): routers other than top-k, null
experts, expert LoRA, expert skipping, router_bias, expert_mask / allowed masks,
heterogeneous d_ff, compute_dtype="bfloat16".  Memory: the wrapper copies its local
experts' weights out of ``layer`` and reads the replicated weights from it; the caller may
drop the other experts' weights from ``layer`` (e.g. build it with ``init=False`` and
assign only what this rank needs -- the routed experts' arrays must still have the full
shape, so zeros for the remote ones).

Transports (the five methods of ``Transport``; the layer does not depend on the engine):
``TorchTransport`` (torch.distributed; gloo on CPU tested, NCCL untested -- the buffers are
CPU NumPy arrays) and ``MPITransport`` (mpi4py nonblocking collectives on the NumPy
buffers, polled against the timeout; tested with the MPICH wheel's ``mpiexec``, and the
Open MPI wheel's, on one host, 2 and 4 processes).  Both give the same bits.
"""
from __future__ import annotations

import datetime
import pickle
import time
import zlib

import numpy as np

from . import _C
from ._api import (
    ACTIVATIONS,
    GATED,
    RoutingResult,
    check_choice,
    combine,
    dispatch,
    route_args,
    token_rows,
    weight_bits,
)
from .train import (
    TrainContext,
    check_backward_args,
    combine_backward,
    dispatch_backward,
    route_backward,
)

__all__ = ["ExpertParallelError", "ExpertParallelMoE", "MPITransport", "TorchTransport",
           "Transport"]


class ExpertParallelError(RuntimeError):
    """A collective failed (a peer raised, died or timed out) or the layer is broken by an
    earlier failure."""


# --------------------------------------------------------------------------- #
# Transport
# --------------------------------------------------------------------------- #

class Transport:
    """The collectives an ExpertParallelMoE needs; engine-independent (NumPy in and out).

    rank, world: this process's rank and the group size.  timeout: seconds every
    collective may take before it raises ExpertParallelError.  The five methods:

    - alltoall_counts(counts): (world, n) int64, row r sent to rank r -> (world, n), row s
      received from rank s.
    - alltoallv(send, recv_rows=None): send a list of world (n_r, width...) arrays of one
      dtype (array r to rank r); recv_rows[s] the rows rank s sends here (None: exchanged
      first) -> a list of world arrays (from rank s at index s).
    - allreduce_sum(array): the sum over the ranks in a fixed order (all-gather, then
      g_0 + g_1 + ... left to right), the same bits on every rank.
    - allgather_object(obj): the list of every rank's picklable obj.

    Each call must raise (ExpertParallelError) rather than block past ``timeout``.

    The base class implements alltoallv and allreduce_sum on two engine primitives, so an
    engine only moves flat buffers: ``_alltoallv_flat(out, flat, out_counts, in_counts)``
    (one flat send buffer, the blocks for rank 0, 1, ... back to back; one flat receive
    buffer; counts in elements) and ``_allgather_array(out, a)`` (out: (world,) + a.shape,
    row r from rank r).  The send blocks are concatenated into one buffer (one copy of the
    rows sent); the per-source results are views of the one receive buffer; the sum runs
    left to right in the arrays' dtype.  A subclass may instead override the public
    methods.
    """

    rank: int
    world: int
    timeout: float | None
    _closed = False

    def close(self):
        """Release what the transport holds (MPITransport: its duplicate communicator;
        TorchTransport: the group it made for its timeout).  Where the engine's release is
        collective (``MPI_Comm_free``), every rank closes together, after its last call.
        Later calls raise ExpertParallelError; closing twice does nothing.  A transport
        is also a context manager that closes on exit (``with MPITransport() as tr:``)."""
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _check_open(self):
        if self._closed:
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world}: {type(self).__name__} is closed")

    def alltoall_counts(self, counts):
        raise NotImplementedError

    def allgather_object(self, obj):
        raise NotImplementedError

    def _alltoallv_flat(self, out, flat, out_counts, in_counts):
        raise NotImplementedError

    def _allgather_array(self, out, a):
        raise NotImplementedError

    def _check_counts(self, counts):
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] != self.world:
            raise ValueError(f"counts must have shape (world={self.world}, n), got "
                             f"{counts.shape}")
        return counts

    def alltoallv(self, send, recv_rows=None):
        if recv_rows is None:  # one more exchange: the row counts
            n = np.array([[np.shape(a)[0]] for a in send], np.int64)
            recv_rows = self.alltoall_counts(n)[:, 0]
        if len(send) != self.world or len(recv_rows) != self.world:
            raise ValueError(f"alltoallv needs world={self.world} send buffers and receive "
                             "row counts")
        send = [np.ascontiguousarray(a) for a in send]
        width, dtype = send[0].shape[1:], send[0].dtype
        row = int(np.prod(width, dtype=np.int64))
        flat = np.concatenate([a.reshape(-1) for a in send]) if self.world > 1 \
            else send[0].reshape(-1)
        recv_rows = [int(n) for n in recv_rows]
        out = np.empty(sum(recv_rows) * row, dtype)
        self._alltoallv_flat(out, flat, [n * row for n in recv_rows],
                             [a.shape[0] * row for a in send])
        parts, start = [], 0
        for n in recv_rows:
            parts.append(out[start * row:(start + n) * row].reshape((n,) + width))
            start += n
        return parts

    def allreduce_sum(self, array):
        a = np.ascontiguousarray(array).reshape(np.shape(array))  # 0-d stays 0-d
        bufs = np.empty((self.world,) + a.shape, a.dtype)
        self._allgather_array(bufs, a)
        total = bufs[0].copy()
        for b in bufs[1:]:
            total += b
        return total


def _seconds(timeout):
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


class TorchTransport(Transport):
    """torch.distributed collectives over a process group (gloo on the CPU).

    group: a ProcessGroup (default: the default group, which must be initialised).
    timeout: seconds (or a timedelta): when given, a new gloo group over the same ranks is
    made with that timeout (a collective call: every rank must construct its transport
    together); else the group's own timeout (init_process_group's, 30 min by default)
    applies.  NumPy buffers go to torch without copies (torch.from_numpy) and are received
    straight into one NumPy array (the per-source results are views of it); alltoallv's
    send blocks are concatenated into one buffer first (one copy of the rows sent).  NCCL
    groups are untested (they need CUDA tensors: not done).
    """

    def __init__(self, group=None, timeout=None):
        import torch
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchTransport needs torch.distributed initialised "
                               "(dist.init_process_group)")
        self._dist = dist
        self._torch = torch
        if timeout is not None:
            ranks = None if group is None else dist.get_process_group_ranks(group)
            group = dist.new_group(ranks=ranks, backend="gloo",
                                   timeout=datetime.timedelta(seconds=_seconds(timeout)))
            self.timeout = _seconds(timeout)
        else:
            self.timeout = None  # the group's own (init_process_group's)
        self._own_group = timeout is not None
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def close(self):
        """Destroys the group made for the timeout (not a group the caller passed or the
        default one); see Transport.close."""
        if not self._closed and self._own_group:
            self._dist.destroy_process_group(self.group)
        self._closed = True

    def _call(self, what, fn):
        self._check_open()
        try:
            return fn()
        except Exception as exc:  # gloo: timeout, connection closed by a dead peer, ...
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world}: {what} failed (a peer raised, died or "
                f"timed out; timeout "
                f"{'of the group' if self.timeout is None else f'{self.timeout} s'}): "
                f"{type(exc).__name__}: {exc}") from exc

    def alltoall_counts(self, counts):
        counts = self._check_counts(counts)
        out = np.empty_like(counts)
        t = self._torch
        self._call("alltoall_counts", lambda: self._dist.all_to_all_single(
            t.from_numpy(out), t.from_numpy(counts), group=self.group))
        return out

    def _alltoallv_flat(self, out, flat, out_counts, in_counts):
        t = self._torch
        self._call("alltoallv", lambda: self._dist.all_to_all_single(
            t.from_numpy(out), t.from_numpy(flat), output_split_sizes=out_counts,
            input_split_sizes=in_counts, group=self.group))

    def _allgather_array(self, out, a):
        t = self._torch
        self._call("allreduce_sum (all_gather)", lambda: self._dist.all_gather(
            [t.from_numpy(out[r, ...]) for r in range(self.world)], t.from_numpy(a),
            group=self.group))

    def allgather_object(self, obj):
        out = [None] * self.world
        self._call("allgather_object", lambda: self._dist.all_gather_object(
            out, obj, group=self.group))
        return out


class MPITransport(Transport):
    """MPI collectives (mpi4py) on the NumPy buffers themselves, with a timeout.

    comm: an mpi4py communicator (default ``MPI.COMM_WORLD``); the transport works on a
    duplicate of it (``Idup``, made under the timeout: a collective call, every rank of
    ``comm`` must construct its transport together), so its messages never mix with the
    caller's.  timeout: seconds (or a timedelta) per collective; None waits forever (plain
    MPI semantics: a peer that raised or hangs then hangs the others too).

    Mapping: ``alltoall_counts`` -> ``Ialltoall`` on the int64 counts; ``alltoallv`` ->
    ``Ialltoallv`` on one flat send buffer (the blocks concatenated) into one flat receive
    buffer, counts and displacements in elements (the per-source results are views of
    it); ``allreduce_sum`` -> ``Iallgather`` into a (world, ...) array, then the
    rank-order sum (the same bits on every rank); ``allgather_object`` -> pickle, then
    ``Iallgather`` of the sizes and ``Iallgatherv`` of the bytes (the nonblocking form of
    mpi4py's lowercase ``allgather``, so that it too honours the timeout).

    Timeouts: MPI has no per-call timeout, so every collective is started nonblocking and
    its request polled (``Test``, with a short sleep between polls, at most 1 ms) until
    the deadline.  On expiry, or when MPI reports an error, the call raises
    ExpertParallelError and the transport is *broken*: later calls raise at once.  MPI
    cannot cancel a started collective, so the abandoned request and its buffers are kept
    (``_abandoned``) for as long as the transport lives, and the communicator is unusable
    (the peers are at different collectives).  What the caller should do then is end the
    job: ``comm.Abort(1)`` (``MPI_Abort``: the launcher kills every rank).  Do not let
    the process reach ``MPI_Finalize`` normally (mpi4py calls it at exit): with requests
    pending and a peer gone it may block; ``Abort`` or ``os._exit`` end it.  Whether the
    others ever see a dead peer depends on the launcher: MPICH's ``mpiexec`` (hydra), by
    default, kills the whole job as soon as one rank exits without ``MPI_Finalize`` (so
    the survivors are killed, not raised in); with ``mpiexec -disable-auto-cleanup`` they
    live on and raise within the timeout.

    mpi4py is imported here (importing ``mpi4py.MPI`` initialises MPI); it is not a
    dependency of moe (``pip install moe[mpi]``: mpi4py and the MPICH wheel).
    """

    _MAX_PAUSE = 1e-3  # seconds between polls, at most

    def __init__(self, comm=None, timeout=None):
        from mpi4py import MPI
        self._MPI = MPI
        self.timeout = None if timeout is None else _seconds(timeout)
        self._broken = None
        self._abandoned = []
        base = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world = base.Get_rank(), base.Get_size()
        # MPI errors as exceptions on the duplicate (it inherits comm's error handler,
        # which may be ERRORS_ARE_FATAL; mpi4py's COMM_WORLD has ERRORS_RETURN)
        dup = [None]

        def start():
            dup[0], req = base.Idup()
            return req

        self._wait("construction (Idup)", start)
        self.comm = dup[0]
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)

    def close(self):
        """Frees the duplicate communicator (``MPI_Comm_free``, collective: every rank
        closes together); a broken transport keeps it, with its abandoned requests (the
        peers are at other collectives: end the job instead).  See Transport.close."""
        if not self._closed and self._broken is None:
            self.comm.Free()
        self._closed = True

    def _wait(self, what, start, *keep):
        """Start a nonblocking collective (start() -> Request) and wait for it, at most
        ``timeout`` seconds; keep: its buffers (held if the request is abandoned)."""
        self._check_open()
        if self._broken is not None:
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world}: MPITransport is broken by an earlier "
                f"failure ({self._broken}); end the job (comm.Abort())")
        req = None
        try:
            req = start()
            if self.timeout is None:
                req.Wait()
                return
            deadline = time.monotonic() + self.timeout
            pause = 0.0
            while not req.Test():
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"not complete after {self.timeout} s")
                time.sleep(pause)
                pause = min(2 * pause or 1e-5, self._MAX_PAUSE)
        except BaseException as exc:
            self._broken = f"{what}: {type(exc).__name__}: {exc}"
            if req is not None:
                self._abandoned.append((req, keep))
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
                raise
            cause = "could not start (" if req is None else \
                "failed (a peer raised, died or hangs; "
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world}: {what} {cause}timeout "
                f"{'none' if self.timeout is None else f'{self.timeout} s'}): "
                f"{type(exc).__name__}: {exc}; the communicator is unusable now: end the "
                "job (comm.Abort())") from exc

    def _spec(self, a, counts=None):
        """A buffer spec for mpi4py: element datatype when it has one, else bytes."""
        from mpi4py.util import dtlib
        try:
            mpitype, scale = dtlib.from_numpy_dtype(a.dtype), 1
        except (KeyError, ValueError, TypeError):
            mpitype, scale = self._MPI.BYTE, a.dtype.itemsize
            a = a.view(np.uint8)
        if counts is None:
            return [a, mpitype]
        counts = np.asarray(counts, np.int64) * scale
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return [a, (counts.tolist(), displs.tolist()), mpitype]

    def alltoall_counts(self, counts):
        counts = self._check_counts(counts)
        out = np.empty_like(counts)
        self._wait("alltoall_counts (Ialltoall)", lambda: self.comm.Ialltoall(
            [counts, self._MPI.INT64_T], [out, self._MPI.INT64_T]), counts, out)
        return out

    def _alltoallv_flat(self, out, flat, out_counts, in_counts):
        self._wait("alltoallv (Ialltoallv)", lambda: self.comm.Ialltoallv(
            self._spec(flat, in_counts), self._spec(out, out_counts)), flat, out)

    def _allgather_array(self, out, a):
        self._wait("allreduce_sum (Iallgather)", lambda: self.comm.Iallgather(
            self._spec(a.reshape(-1)), self._spec(out.reshape(-1))), a, out)

    def allgather_object(self, obj):
        data = np.frombuffer(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), np.uint8)
        n = np.array([data.size], np.int64)
        sizes = np.empty(self.world, np.int64)
        self._wait("allgather_object (Iallgather of the sizes)", lambda: self.comm.Iallgather(
            [n, self._MPI.INT64_T], [sizes, self._MPI.INT64_T]), n, sizes)
        buf = np.empty(int(sizes.sum()), np.uint8)
        self._wait("allgather_object (Iallgatherv)", lambda: self.comm.Iallgatherv(
            self._spec(data), self._spec(buf, sizes)), data, buf)
        cuts = np.concatenate([[0], np.cumsum(sizes)])
        return [pickle.loads(buf[cuts[r]:cuts[r + 1]].tobytes()) for r in range(self.world)]


# --------------------------------------------------------------------------- #
# The expert-parallel layer
# --------------------------------------------------------------------------- #

def _crc(a):
    return None if a is None else zlib.crc32(np.ascontiguousarray(a).view(np.uint8))


def _fingerprint(layer, expert_to_rank, world):
    """What must agree on every rank, field by field (in a fixed order)."""
    cfg = layer.config()
    fields = [(k, cfg[k]) for k in ("n_experts", "top_k", "d_model", "d_ff")]
    fields += [(k, v) for k, v in sorted(cfg.items()) if k not in dict(fields)]
    for name in ("router_weight", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down",
                 "shared_w_gate", "shared_w_up", "shared_w_down", "shared_gate_weight",
                 "expert_bias"):
        v = getattr(layer, name)
        fields.append((f"{name} shape", None if v is None else tuple(v.shape)))
    for name in ("router_weight", "expert_bias", "shared_w_gate", "shared_w_up",
                 "shared_w_down", "shared_gate_weight"):
        fields.append((f"{name} values (replicated)", _crc(getattr(layer, name))))
    fields.append(("expert_to_rank", tuple(int(r) for r in expert_to_rank)))
    fields.append(("world", world))
    return fields


def _check_supported(layer):
    why = []
    if layer.router != "top_k":
        why.append(f"router={layer.router!r}")
    if layer.n_null:
        why.append("null experts")
    if layer.lora_rank:
        why.append("expert LoRA")
    if layer.skip_threshold > 0:
        why.append("skip_threshold")
    if layer.use_router_bias:
        why.append("router_bias")
    if layer.expert_mask is not None:
        why.append("expert_mask")
    if layer.expert_d_ff is not None:
        why.append("heterogeneous d_ff")
    if layer.compute_dtype != "float32":
        why.append(f"compute_dtype={layer.compute_dtype!r}")
    if why:
        raise NotImplementedError("ExpertParallelMoE does not support yet: " + ", ".join(why))


class ExpertParallelMoE:
    """A SparseMoE run expert-parallel over a Transport's group (see the module docstring).

    layer: the full moe.SparseMoE, the same config and replicated weights on every rank
    (checked at construction; ValueError naming the first field that differs).
    expert_to_rank: (n_experts,) ints in [0, world): the owner of each expert; default
    contiguous slices, the first ``E % world`` ranks one expert more.
    Attributes: local_experts (int64 ids this rank owns, ascending), expert_to_rank.
    Expert weights are copied at construction: after changing them call ``repack()``.
    """

    def __init__(self, layer, transport, expert_to_rank=None):
        _check_supported(layer)
        self.layer, self.transport = layer, transport
        W, E = transport.world, layer.n_experts
        if expert_to_rank is None:
            base, extra = divmod(E, W)
            sizes = [base + (r < extra) for r in range(W)]
            expert_to_rank = np.repeat(np.arange(W), sizes)
        m = np.asarray(expert_to_rank)
        if m.shape != (E,) or m.dtype.kind not in "iu" or (m < 0).any() or (m >= W).any():
            raise ValueError(f"expert_to_rank must be (n_experts={E},) ints in [0, world={W})")
        self.expert_to_rank = m.astype(np.int64)
        self._broken = None
        mine = _fingerprint(layer, self.expert_to_rank, W)
        every = transport.allgather_object(mine)
        for r, theirs in enumerate(every):
            for (name, a), (_, b) in zip(mine, theirs):
                if a != b:
                    raise ValueError(
                        f"ExpertParallelMoE: config mismatch in {name!r}: rank "
                        f"{transport.rank} has {a!r}, rank {r} has {b!r}")
        self.local_experts = np.flatnonzero(self.expert_to_rank == transport.rank)
        # for each owner, its experts (ascending): the order of the rows sent to it
        self._owned = [np.flatnonzero(self.expert_to_rank == r) for r in range(W)]
        self.repack()

    # ---- weights ------------------------------------------------------------------

    def repack(self):
        """Copy and pack this rank's experts from the layer (after editing its weights)."""
        layer, idx = self.layer, self.local_experts
        gated = layer.activation in GATED

        def take(name):
            v = getattr(layer, name)
            return None if v is None else np.ascontiguousarray(v[idx])

        self.w_gate = take("w_gate") if gated else None
        self.w_up, self.w_down = take("w_up"), take("w_down")
        self._biases = layer.use_expert_biases
        bs = (take("b_gate") if gated else None, take("b_up"), take("b_down")) \
            if self._biases else (None, None, None)
        self.b_gate, self.b_up, self.b_down = bs
        code = check_choice(layer.dtype, "dtype", _C.WEIGHT_DTYPES)
        self._capsule = None
        if idx.size:
            self._capsule = _C.pack_experts(
                w_gate=weight_bits(self.w_gate) if gated else None,
                w_up=weight_bits(self.w_up), w_down=weight_bits(self.w_down), dtype=code,
                b_gate=bs[0], b_up=bs[1], b_down=bs[2])
        return self

    def trainable_weights(self):
        """The names backward returns (the layer's; the routed experts' for the local
        experts only)."""
        return self.layer.trainable_weights()

    # ---- the pieces ---------------------------------------------------------------

    def _guard(self):
        if self._broken is not None:
            raise ExpertParallelError("this ExpertParallelMoE is broken by an earlier "
                                      f"failure ({self._broken}); make a new one")

    def _route(self, x2):
        layer = self.layer
        logits = _C.router_logits(x2, layer.router_weight)
        args, kw = route_args(logits, layer.top_k, **self._route_options())
        ids, w, counts, n_dropped, aux, z = _C.route(*args, **kw)
        return logits, RoutingResult(ids, w, counts, int(n_dropped), float(aux), float(z))

    def _route_options(self):
        layer = self.layer
        return dict(scoring=layer.scoring, renormalize=layer.renormalize,
                    routed_scaling=layer.routed_scaling,
                    expert_bias=layer.expert_bias if layer.use_expert_bias else None,
                    n_groups=layer.n_groups, topk_groups=layer.topk_groups,
                    capacity_factor=layer.capacity_factor)

    def _plan(self, counts):
        """After the counts exchange: what this rank sends and receives.

        counts: (E,) this rank's rows per expert.  Returns (send_rows (world,), recv (world,
        n_local) rows per source and local expert, perm: arrival order -> expert-major)."""
        t = self.transport
        W = t.world
        send_rows = np.array([counts[o].sum() for o in self._owned], np.int64)
        every = t.alltoall_counts(np.broadcast_to(counts, (W, counts.size)))  # (W, E)
        recv = every[:, self.local_experts]  # (W, n_local)
        # arrival position of (source s, local expert j, i-th row)
        src_start = np.concatenate([[0], np.cumsum(recv.sum(1))])[:-1]
        within = np.concatenate([np.zeros((W, 1), np.int64), np.cumsum(recv, 1)[:, :-1]], 1)
        perm = [np.arange(recv[s, j]) + src_start[s] + within[s, j]
                for j in range(recv.shape[1]) for s in range(W)]
        perm = np.concatenate(perm).astype(np.int64) if perm else np.zeros(0, np.int64)
        return send_rows, recv, perm

    def _send_parts(self, rows_sorted, offsets):
        """Split the home's expert-sorted rows into one block per owner (its experts in
        ascending order)."""
        parts = []
        for owned in self._owned:
            if owned.size and np.array_equal(owned, np.arange(owned[0], owned[-1] + 1)):
                parts.append(rows_sorted[offsets[owned[0]]:offsets[owned[-1] + 1]])
            else:
                idx = [np.arange(offsets[e], offsets[e + 1]) for e in owned]
                idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
                parts.append(rows_sorted[idx])
        return parts

    def _unsplit(self, parts, offsets, n_rows, d):
        """The inverse of _send_parts: blocks from each owner back into sorted rows."""
        out = np.empty((n_rows, d), np.float32)
        for owned, part in zip(self._owned, parts):
            start = 0
            for e in owned:
                n = offsets[e + 1] - offsets[e]
                out[offsets[e]:offsets[e + 1]] = part[start:start + n]
                start += n
        return out

    def _local_ffn(self, xa, recv):
        """The grouped FFN on the expert-major arrivals: (rows, offsets)."""
        layer = self.layer
        offsets = np.concatenate([[0], np.cumsum(recv.sum(0))]).astype(np.int64)
        if xa.shape[0] == 0 or self._capsule is None:
            return np.zeros((xa.shape[0], layer.d_model), np.float32), offsets
        act = check_choice(layer.activation, "activation", ACTIVATIONS)
        y = _C.ffn_grouped(xa, None, offsets, self._capsule, act,
                           alpha=layer.swiglu_alpha, limit=layer.swiglu_limit)
        return y, offsets

    def _shared(self, x2):
        """(shared experts' output (T, d) float32, gate s (T,) float32 or None) or None."""
        layer = self.layer
        if not layer.n_shared_experts:
            return None
        _, shared, sgate, _ = layer._checked_weights()
        T = x2.shape[0]
        act = check_choice(layer.activation, "activation", ACTIVATIONS)
        tmp = _C.ffn_grouped(x2, None, np.array([0, T], np.int64), shared, act,
                             alpha=layer.swiglu_alpha, limit=layer.swiglu_limit)
        s = None
        if sgate is not None:
            g = _C.router_logits(x2, sgate.reshape(1, -1))[:, 0]
            s = (1.0 / (1.0 + np.exp(-g))).astype(np.float32)
        return tmp, s

    def _exchange(self, parts, recv_rows, what):
        try:
            return self.transport.alltoallv(parts, recv_rows)
        except BaseException as exc:
            self._broken = f"{what}: {exc}"
            raise

    # ---- forward ------------------------------------------------------------------

    def _forward(self, x):
        self._guard()
        layer = self.layer
        lead, x2 = token_rows(x, layer.d_model)
        x2 = np.ascontiguousarray(x2)
        d, W = layer.d_model, self.transport.world
        try:
            logits, routing = self._route(x2)
            disp = dispatch(x2, routing.expert_ids, layer.n_experts)
            send_rows, recv, perm = self._plan(disp.counts)
        except ExpertParallelError as exc:
            self._broken = str(exc)
            raise
        parts = self._send_parts(disp.x_sorted, disp.offsets)
        arrived = self._exchange(parts, recv.sum(1), "the rows' exchange")
        xa = np.concatenate(arrived)[perm] if W > 1 else arrived[0][perm]
        ya, _ = self._local_ffn(np.ascontiguousarray(xa), recv)
        back = np.empty_like(ya)
        back[perm] = ya
        splits = np.cumsum(recv.sum(1))[:-1]
        results = self._exchange(np.split(back, splits), send_rows, "the results' exchange")
        ys = self._unsplit(results, disp.offsets, disp.x_sorted.shape[0], d)
        out = combine(ys, disp.position, routing.weights)
        sh = self._shared(x2)
        if sh is not None:
            tmp, s = sh
            out += tmp if s is None else s[:, None] * tmp
        saved = dict(logits=logits, disp=disp, ys=ys, xa=xa, recv=recv, perm=perm,
                     send_rows=send_rows, shared=sh)
        return out.reshape(lead + (d,)), routing, saved, lead, x2

    def __call__(self, x, return_routing=False):
        """x: (..., d_model), this rank's tokens -> bitwise layer(x) (a collective call:
        every rank must call it, each with its own tokens, possibly none)."""
        out, routing, _, _, _ = self._forward(x)
        return (out, routing) if return_routing else out

    def forward_train(self, x):
        """(y, ctx) as SparseMoE.forward_train; ctx keeps this rank's logits, routing,
        routed outputs and the rows that arrived for its experts (O(rows * d) floats)."""
        self.layer._check_trainable()
        out, routing, saved, lead, x2 = self._forward(x)
        ctx = TrainContext(self, lead, x2, routing, saved, None, None)
        return out, ctx

    # ---- backward -----------------------------------------------------------------

    def backward(self, ctx, dy, *, aux_coef=0.0, z_coef=0.0, retain=False):
        """Gradients as SparseMoE.backward (a collective call).  "x": bitwise the
        single-process layer's on this rank's tokens; the routed experts' weights
        ("w_gate", "w_up", "w_down", "b_*"): this rank's experts only (local_experts
        order); router_weight and the shared experts' weights: summed over the ranks in
        rank order (the same bits everywhere)."""
        self._guard()
        layer = self.layer
        dy32, aux, z = check_backward_args(self, ctx, dy, aux_coef, z_coef)
        s = ctx.saved
        disp, recv, perm = s["disp"], s["recv"], s["perm"]
        W, d = self.transport.world, layer.d_model
        gated = layer.activation in GATED
        ids, w = ctx.routing.expert_ids, ctx.routing.weights
        dys, dws = combine_backward(s["ys"], disp.position, w, dy32)
        parts = self._send_parts(dys, disp.offsets)
        arrived = self._exchange(parts, recv.sum(1), "the output gradients' exchange")
        dya = np.ascontiguousarray((np.concatenate(arrived) if W > 1 else arrived[0])[perm])
        offsets = np.concatenate([[0], np.cumsum(recv.sum(0))]).astype(np.int64)
        n_local = self.local_experts.size
        grads = {}
        if self._capsule is not None:
            act = check_choice(layer.activation, "activation", ACTIVATIONS)
            args = (np.ascontiguousarray(s["xa"]), None, offsets, self._capsule, act)
            kw = dict(alpha=layer.swiglu_alpha, limit=layer.swiglu_limit)
            dxa, dg, du, dd, dbg, dbu, dbd = _C.ffn_grouped_backward(
                args, kw, dya, w_gate=weight_bits(self.w_gate) if gated else None,
                w_up=weight_bits(self.w_up), w_down=weight_bits(self.w_down),
                biases=self._biases)
        else:
            F = layer.d_ff
            dxa = np.zeros((0, d), np.float32)
            dg = np.zeros((0, F, d), np.float32) if gated else None
            du, dd = np.zeros((0, F, d), np.float32), np.zeros((0, d, F), np.float32)
            dbg = np.zeros((0, F), np.float32) if gated else None
            dbu, dbd = np.zeros((0, F), np.float32), np.zeros((0, d), np.float32)
        grads.update(w_gate=dg, w_up=du, w_down=dd, b_gate=dbg, b_up=dbu, b_down=dbd)
        assert du.shape[0] == n_local
        back = np.empty_like(dxa)
        back[perm] = dxa
        splits = np.cumsum(recv.sum(1))[:-1]
        results = self._exchange(np.split(back, splits), s["send_rows"],
                                 "the input gradients' exchange")
        dxs = self._unsplit(results, disp.offsets, disp.x_sorted.shape[0], d)
        # routing and router at home, in the single-process layer's order
        dl = route_backward(s["logits"], ids, dws, layer.top_k, aux_coef=aux, z_coef=z,
                            router_grad=layer.router_grad, **self._route_options())
        dxr, d_router = _C.router_backward(ctx.x, layer.router_weight, dl)
        dx = dispatch_backward(dxs, disp.position)
        dx += dxr
        if s["shared"] is not None:
            dx = self._shared_backward(ctx.x, dy32, s["shared"], dx, grads)
        try:
            grads["router_weight"] = self.transport.allreduce_sum(d_router)
            for name in ("shared_w_gate", "shared_w_up", "shared_w_down",
                         "shared_gate_weight"):
                if grads.get(name) is not None:
                    grads[name] = self.transport.allreduce_sum(grads[name])
        except ExpertParallelError as exc:
            self._broken = str(exc)
            raise
        if not retain:
            ctx.released = True
            ctx.saved = None
        out = {"x": dx.reshape(ctx.lead + (d,))}
        for name in layer.trainable_weights():
            out[name] = grads[name]
        return out

    def _shared_backward(self, x2, dy, shared, dx, grads):
        """The shared experts' backward (the core's moe_layer_backward_shared, in NumPy
        with the same float64 sums in the same order)."""
        layer = self.layer
        _, packed, sgate, _ = layer._checked_weights()
        tmp, s = shared
        T = x2.shape[0]
        gated = layer.activation in GATED
        act = check_choice(layer.activation, "activation", ACTIVATIONS)
        dsh = dy if s is None else dy * s[:, None]
        args = (x2, None, np.array([0, T], np.int64), packed, act)
        kw = dict(alpha=layer.swiglu_alpha, limit=layer.swiglu_limit)
        dxs, dg, du, dd, _, _, _ = _C.ffn_grouped_backward(
            args, kw, np.ascontiguousarray(dsh, np.float32),
            w_gate=weight_bits(layer.shared_w_gate[None]) if gated else None,
            w_up=weight_bits(layer.shared_w_up[None]),
            w_down=weight_bits(layer.shared_w_down[None]))
        grads["shared_w_gate"] = None if dg is None else dg[0]
        grads["shared_w_up"], grads["shared_w_down"] = du[0], dd[0]
        dx += dxs
        if s is not None:
            s64 = s.astype(np.float64)
            prod = dy.astype(np.float64) * tmp.astype(np.float64)
            dot = np.cumsum(prod, axis=1)[:, -1] if T else np.zeros(0)
            ds = dot * s64 * (1.0 - s64)
            gate = sgate.astype(np.float64)
            dx += (ds[:, None] * gate[None, :]).astype(np.float32)
            acc = ds[:, None] * x2.astype(np.float64)
            col = np.cumsum(acc, axis=0)[-1] if T else np.zeros(layer.d_model)
            grads["shared_gate_weight"] = col.astype(np.float32).reshape(1, -1)
        return dx

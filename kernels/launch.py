"""Launch settings of every Triton kernel: tile sizes, ``num_warps`` and ``num_stages`` per
(GPU architecture, dtype, head dim), from the tables below.

Every launcher asks :func:`cuda_arch` which GPU it launches for (``None``: Triton's CPU interpreter,
where only the tile sizes matter) and takes its settings from :func:`attention_launch`,
:func:`linear_launch` or :func:`gate_launch`.  The compile check (``compile_check.py``, run by the
test suite) runs these launchers on CPU tensors under :func:`simulate_cuda` for sm_80, sm_90 and
sm_100 and compiles every launch they make, so a setting that does not fit a GPU fails a test.

Table rows are per *architecture class* (:func:`arch_class`): ``80`` serves Ampere, Ada and
consumer Blackwell (its settings fit the 99 KB of shared memory of sm_86/89/120 as well as
A100's 163 KB), ``90`` Hopper, ``100`` data-centre Blackwell.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["Launch", "ARCHES", "SMEM_LIMIT", "arch_class", "attention_block", "attention_launch", "cuda_arch",
           "gate_launch", "linear_launch", "simulate_cuda"]

# architecture classes of the tables, and the shared memory one program may use on each (bytes):
# sm_80's row must also fit sm_86/89/120 (99 KB), so it is checked against that
ARCHES = (80, 90, 100)
SMEM_LIMIT = {80: 101376, 90: 232448, 100: 232448}

_simulated = None  # set by simulate_cuda (a plain global: torch.compile traces launchers that read it)


def cuda_arch(device):
    """The compute capability (``major * 10 + minor``) kernels for tensors on ``device`` are launched
    for, or ``None`` when they run through Triton's CPU interpreter.  Inside :func:`simulate_cuda`:
    the simulated architecture, whatever the device."""
    if _simulated is not None:
        return _simulated
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@contextlib.contextmanager
def simulate_cuda(arch):
    """Launchers choose their CUDA settings for ``arch`` (e.g. 90) whatever their tensors' device
    (for the compile check: the launches are recorded, never run)."""
    global _simulated
    previous, _simulated = _simulated, int(arch)
    try:
        yield
    finally:
        _simulated = previous


def arch_class(arch):
    """Table row of a compute capability: 100 (sm_100/103), 90 (sm_90), else 80."""
    if arch in (100, 101, 103):
        return 100
    if arch == 90:
        return 90
    return 80


@dataclass(frozen=True)
class Launch:
    """One kernel's launch: ``block`` (its tile), ``rows`` (the rows of the tile one program owns),
    ``sub`` (the tile it streams the other operand in), ``num_warps`` and ``num_stages``."""

    block: int
    sub: int
    num_warps: int = 4
    num_stages: int = 2
    rows: int = 0

    def __post_init__(self):
        if not self.rows:
            object.__setattr__(self, "rows", self.block)

    def options(self, arch):
        """Keyword arguments of the launch (none for the interpreter)."""
        return {} if arch is None else {"num_warps": self.num_warps, "num_stages": self.num_stages}


def _kind(dtype):
    return "fp32" if dtype == torch.float32 else "16bit"


def _dim_class(head_dim):
    # padded head dim (BLOCK_D) of the block-sparse kernels
    return max(16, 1 << max(0, (int(head_dim) - 1).bit_length()))


# ---------------------------------------------------------------------------------------------
# block-sparse attention core (neighborhood, local, MoBA): forward, backward dK/dV, backward dQ
# ---------------------------------------------------------------------------------------------

# Tiles of the block-sparse core, chosen with the compile check (no spills in any forward kernel,
# shared memory within every target).  16-bit inputs: 128-slot blocks on tensor cores (fp32
# accumulation); the forward streams keys in 64-slot pieces with 8 warps; the backward kernels keep
# two fp32 accumulators per owned row (dK and dV), so on sm_80/sm_90 a program owns half a block (64
# key rows) of dK/dV, and on sm_80 half a block of dQ.  fp32 inputs multiply with fp32 FMAs ("ieee":
# three-pass tf32 spills at every tile size) on 64-slot blocks, in 32- or 16-row pieces.  MoBA's
# smaller kernel blocks (16, 32, 64 slots for small MoBA blocks) have rows of their own.  Head dims
# above 128 (padded to 256) take half the block.

# (arch class, dtype kind, head dim above 128) -> default tile (slots per block) of the patterns
_ATTN_BLOCK = {(a, kind, wide): {"16bit": 128, "fp32": 64}[kind] // (2 if wide else 1)
               for a in ARCHES for kind in ("16bit", "fp32") for wide in (False, True)}

# (dtype kind, head dim above 128, block) -> {kernel: (rows, sub, num_warps, num_stages)}, every arch
_ATTN_ANY_ARCH = {
    ("16bit", False, 64): {"fwd": (64, 64, 4, 2), "dkdv": (64, 32, 8, 2), "dq": (64, 32, 8, 2)},
    ("16bit", False, 32): {"fwd": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2), "dq": (32, 32, 4, 2)},
    ("16bit", False, 16): {"fwd": (16, 16, 4, 2), "dkdv": (16, 16, 4, 2), "dq": (16, 16, 4, 2)},
    ("16bit", True, 64): {"fwd": (64, 32, 8, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)},
    ("16bit", True, 32): {"fwd": (32, 32, 8, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)},
    ("16bit", True, 16): {"fwd": (16, 16, 8, 2), "dkdv": (16, 16, 8, 1), "dq": (16, 16, 8, 1)},
    ("fp32", False, 64): {"fwd": (32, 16, 8, 2), "dkdv": (16, 16, 4, 1), "dq": (32, 16, 4, 1)},
    ("fp32", False, 32): {"fwd": (32, 16, 8, 2), "dkdv": (16, 16, 4, 1), "dq": (32, 16, 4, 1)},
    ("fp32", False, 16): {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)},
    ("fp32", True, 32): {"fwd": (32, 16, 8, 1), "dkdv": (16, 16, 8, 1), "dq": (32, 16, 8, 1)},
    ("fp32", True, 16): {"fwd": (16, 16, 8, 1), "dkdv": (16, 16, 8, 1), "dq": (16, 16, 8, 1)},
}
# 16-bit, head dim up to 128, 128-slot blocks: per architecture
_ATTN_128 = {
    80: {"fwd": (128, 64, 8, 2), "dkdv": (64, 32, 8, 2), "dq": (64, 32, 8, 2)},
    90: {"fwd": (128, 64, 8, 3), "dkdv": (64, 32, 8, 2), "dq": (128, 32, 8, 2)},
    100: {"fwd": (128, 64, 8, 3), "dkdv": (128, 32, 8, 3), "dq": (128, 32, 8, 2)},
}
# (arch class, dtype kind, head dim above 128, block) -> {kernel: (rows, sub, num_warps, num_stages)}
_ATTN = {(a, *key): row for a in ARCHES for key, row in _ATTN_ANY_ARCH.items()}
_ATTN.update({(a, "16bit", False, 128): row for a, row in _ATTN_128.items()})


def attention_block(arch, dtype, head_dim):
    """Default tile (slots per block) of the block-sparse core: 16 on the interpreter."""
    if arch is None:
        return 16
    return _ATTN_BLOCK[arch_class(arch), _kind(dtype), _dim_class(head_dim) > 128]


def attention_launch(arch, dtype, head_dim, kernel, block):
    """:class:`Launch` of block-sparse ``kernel`` (``"fwd"``, ``"dkdv"``, ``"dq"``) for tiles of ``block``."""
    if arch is None:
        return Launch(block, block)
    rows, sub, warps, stages = _ATTN[arch_class(arch), _kind(dtype), _dim_class(head_dim) > 128, block][kernel]
    return Launch(block, sub, warps, stages, rows)


# ---------------------------------------------------------------------------------------------
# linear attention (LinFusion)
# ---------------------------------------------------------------------------------------------

# (arch class, dtype kind) -> {kernel: (tokens per tile, feature tile, num_warps, num_stages)}.
# 16-bit: 64x64 tensor-core tiles (the state kernel with 8 warps: 4 spill on sm_100); fp32: FMA
# products on 32-wide feature tiles with 8 warps (64-wide tiles spill on sm_80).
_LINEAR = {}
for _a in ARCHES:
    _LINEAR[_a, "16bit"] = {k: (64, 64, 8 if k == "state" else 4, 2)
                            for k in ("state", "output", "delta", "dstate", "dq", "dkv")}
    _LINEAR[_a, "fp32"] = {k: (64, 32, 8, 2) for k in ("state", "output", "delta", "dstate", "dq", "dkv")}


def linear_launch(arch, dtype, kernel):
    """:class:`Launch` of linear-attention ``kernel`` (``"state"``, ``"output"``, ``"delta"``, ``"dstate"``,
    ``"dq"``, ``"dkv"``): ``block`` tokens per tile, ``sub`` the largest feature tile (head dims are
    padded to a multiple of it; the same for every kernel of a call)."""
    if arch is None:
        return Launch(64, 64)
    block, sub, warps, stages = _LINEAR[arch_class(arch), _kind(dtype)][kernel]
    return Launch(block, sub, warps, stages)


# ---------------------------------------------------------------------------------------------
# MoBA gate
# ---------------------------------------------------------------------------------------------

# (arch class, dtype kind, padded head dim) -> (query rows per step, candidates per chunk, num_warps, num_stages)
_GATE = {(a, kind, d): (16, 128, 4, 1) if kind == "16bit" else (16, 32, 8, 1)
         for a in ARCHES for kind in ("16bit", "fp32") for d in (16, 32, 64, 128, 256)}


def gate_launch(arch, dtype, head_dim):
    """:class:`Launch` of the MoBA gate: ``block`` query rows per step (divides every kernel block),
    ``sub`` candidate blocks per chunk (a multiple of 32)."""
    if arch is None:
        return Launch(16, 64)
    rows, chunk, warps, stages = _GATE[arch_class(arch), _kind(dtype), min(_dim_class(head_dim), 256)]
    return Launch(rows, chunk, warps, stages)


# ---------------------------------------------------------------------------------------------
# spills the compile check accepts (bytes of spill stores per thread), with the reason
# ---------------------------------------------------------------------------------------------

# (kernel, arch class, dtype kind, padded head dim) -> bytes; 16-bit forward kernels never spill
ALLOWED_SPILLS = {}


def allowed_spills(kernel, arch, dtype, head_dim):
    """Spill stores (bytes per thread) the compile check accepts for one configuration."""
    kind = "fp32" if dtype == "fp32" else "16bit"
    return ALLOWED_SPILLS.get((kernel, arch_class(arch), kind, head_dim), 0)

"""Reading sm_90 SASS without a GPU: parsing `cuobjdump -sass`, finding a kernel's main loop and the path one
warp takes through it, counting its instructions by issue pipe, and the bytes of global loads it keeps in flight.

Used by the static performance model (benchmarks/static_sm90.py) and by the CPU tests of SASS properties
(tests/ops/test_nf4_matmul_sm90.py). Works on any cubin: nvcc's (csrc/) and Triton's.

What is read from each instruction:
- the opcode and operands (`LDG.E.EF.128 R12, desc[UR10][R12.64]`), the guard predicate, the address;
- the control bits of the second 64-bit word (Volta..Hopper encoding, bits 105-125 of the 128-bit instruction):
  stall count, write / read scoreboard barrier, the mask of barriers it waits on. A load that sets write barrier
  b is in flight until an instruction waits on b; cp.async copies (LDGSTS) are tracked by their commit groups
  (LDGDEPBAR) and `DEPBAR.LE SB0, n`.

The main loop is the loop (a backward branch) that streams the weight (evict-first loads), else the one holding
the MMAs, else the FMAs; among several, the one with the most instructions of its own (nested loops excluded:
they are the element-by-element slow paths of ragged tiles). The path through it is the heaviest path from the
loop head to a back edge, with nested loops taken as not executed: on full, aligned tiles every guarded
fast-path block runs and no slow-path loop does, and a fast-path arm is never lighter than the branch that
skips it (an out-of-range row's zero fill).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Instr", "Kernel", "parse_sass", "parse_resource_usage", "cuobjdump", "sass_of_cubin", "pipe_of",
           "main_loop", "LoopProfile", "PIPE_RATES", "Latencies"]

# ------------------------------------------------------------------------------------------ issue pipes
# Thread-operations per clock per SM on sm_90 (4 sub-partitions). Sources: CUDA C++ Programming Guide,
# "Arithmetic Instructions" throughput table, compute capability 9.0 (fp32 FMA 128, 32-bit integer add /
# logical / shift / compare 64, conversions 16, MUFU 16, shuffles 32); NVIDIA's answer on the developer forum
# (GH100: IMAD on the FMA-heavy pipe only, fp32 and fp16x2 on heavy + lite). PRMT, SEL, MOV and the other
# integer ops of the ALU pipe share its 64. F2FP (fp32 pair -> bf16x2 / half2) is a conversion: Triton PR
# #4563 measured Hopper's conversions as slow enough to bound dequantizing kernels.
PIPE_RATES = {
    "fp32": 128,    # FFMA / FMUL / FADD / HFMA2 / HMUL2 / HADD2 (heavy + lite)
    "imad": 64,     # IMAD*, IMUL, IDP: FMA-heavy only (and they take fp32 slots: see `LoopProfile.cycles`)
    "alu": 64,      # LOP3, IADD3, SHF, PRMT, ISETP, SEL, MOV, LEA, ...
    "conv": 16,     # F2F, F2I, I2F, F2FP
    "mufu": 16,     # MUFU.*
    "lsu": 32,      # one 32-bit access per lane and clock (128 B/clk of L1 / shared memory); wider = more
    "shfl": 32,
}

_FP32 = {"FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FFMA2", "FMUL2", "FADD2", "FCHK", "FSWZADD"}
_IMAD = {"IMAD", "IMUL", "IDP", "IDP4A", "IMADSP"}
_ALU = {"LOP3", "LOP", "IADD3", "IADD", "SHF", "SHL", "SHR", "PRMT", "ISETP", "FSETP", "HSETP2", "DSETP", "SEL",
        "FSEL", "MOV", "LEA", "IABS", "IMNMX", "FMNMX", "HMNMX2", "VIADD", "VIADDMNMX", "VIMNMX", "BMSK", "SGXT",
        "PLOP3", "P2R", "R2P", "CS2R", "FLO", "POPC", "BREV", "ICMP", "I2IP", "F2IP", "I2FP", "ISCADD", "BFE",
        "BFI", "LOP32I", "IADD32I", "FSET", "ISET", "PSETP", "VOTE", "VOTEU", "NOP"}
_CONV = {"F2F", "F2I", "I2F", "F2FP", "FRND", "I2I"}
_LSU = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "ATOM", "ATOMS", "ATOMG", "RED", "LDL", "STL", "LD",
        "ST", "MATCH", "LDGMC", "REDG"}
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA", "DMMA"}


def pipe_of(base: str) -> str:
    """Issue pipe of an opcode's base name (before the first dot)."""
    if base in _FP32:
        return "fp32"
    if base in _IMAD:
        return "imad"
    if base in _ALU:
        return "alu"
    if base in _CONV:
        return "conv"
    if base == "MUFU":
        return "mufu"
    if base in _LSU:
        return "lsu"
    if base == "SHFL":
        return "shfl"
    if base in _TENSOR:
        return "tensor"
    if base.startswith("U") or base in {"R2UR", "S2UR", "LDC", "ELECT"}:
        return "uniform"  # uniform datapath / constant cache: an issue slot, no vector pipe
    return "ctrl"         # branches, barriers, scoreboard waits, S2R, warpgroup fences, ...


# ------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str          # "" or "@P0" / "@!P1"
    opcode: str        # full opcode with modifiers, e.g. "LDG.E.EF.128"
    operands: str
    stall: int
    wbar: int          # scoreboard barrier set when the result is written (7: none)
    rbar: int
    wait: int          # mask of scoreboard barriers waited on before issue

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def pipe(self) -> str:
        return pipe_of(self.base)

    @property
    def branch_target(self) -> int | None:
        if self.base not in ("BRA", "BRX", "JMP", "JMX"):
            return None
        m = re.search(r"0x([0-9a-f]+)\s*$", self.operands)
        return int(m.group(1), 16) if m else None

    @property
    def unconditional(self) -> bool:
        return self.pred in ("", "@PT")

    def width_bits(self) -> int:
        """Bits per lane moved by a load / store (32 unless the opcode says otherwise)."""
        mods = self.opcode.split(".")[1:]
        for m in mods:
            if m in ("128", "64", "32", "16", "8", "U8", "S8", "U16", "S16"):
                return {"128": 128, "64": 64, "32": 32, "16": 16, "8": 8, "U8": 8, "S8": 8, "U16": 16,
                        "S16": 16}[m]
        if self.base == "LDSM":  # ldmatrix: .M88.N (N matrices of 8x8 16-bit: N*32 bits per lane)
            n = next((int(m) for m in mods if m in ("1", "2", "4")), 1)
            return 32 * n
        return 32

    def is_global_load(self) -> bool:
        return self.base in ("LDG", "LDGSTS", "LD")


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;"
                   r"\s*/\*\s*(0x[0-9a-f]{16})\s*\*/")
_HI = re.compile(r"^\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")


def _control(hi: int) -> tuple[int, int, int, int]:
    c = hi >> 41
    return c & 0xF, (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 0x3F


@dataclass
class Kernel:
    name: str
    instrs: list[Instr] = field(default_factory=list)


def parse_sass(text: str) -> dict[str, Kernel]:
    """{function name: Kernel} from `cuobjdump -sass` output (sm_90: two 64-bit words per instruction)."""
    kernels: dict[str, Kernel] = {}
    cur: Kernel | None = None
    pending = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            pending = None
            continue
        if cur is None:
            continue
        m = _LINE.search(line)
        if m:
            pending = m
            continue
        h = _HI.match(line)
        if h and pending is not None:
            addr, pred, opcode, operands, _lo = pending.groups()
            stall, wbar, rbar, wait = _control(int(h.group(1), 16))
            cur.instrs.append(Instr(int(addr, 16), (pred or "").strip(), opcode, operands, stall, wbar, rbar, wait))
            pending = None
    return kernels


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """{function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}} from `cuobjdump --dump-resource-usage`."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line) if k in
                         ("REG", "STACK", "SHARED", "LOCAL")}
            name = None
    return out


@functools.cache
def cuobjdump() -> str:
    """cuobjdump from the CUDA toolkit on PATH, else the one Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = subprocess.run(["sh", "-c", f"grep -o '/[^ ]*/bin/nvcc' {nvcc} || true"], capture_output=True,
                              text=True).stdout.strip()
        cand = os.path.join(os.path.dirname(real or nvcc), "cuobjdump")
        if os.path.exists(cand):
            return cand
    raise RuntimeError("no cuobjdump: install the CUDA toolkit or Triton")


def sass_of_cubin(cubin: bytes) -> tuple[str, str]:
    """(cuobjdump -sass, cuobjdump --dump-resource-usage) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


# ------------------------------------------------------------------------------------------ loops
@dataclass
class LoopProfile:
    """One warp's pass through a kernel's main loop, on its hottest path."""
    head: int
    latch: int
    path: list[Instr]
    inflight_bytes: int         # bytes of global loads one warp keeps in flight (steady state)
    stream_only: bool           # inflight counts only evict-first (.EF) loads: the weight stream

    def cycles_alone(self, lat: "Latencies") -> float:
        """Steady-state cycles of one loop pass of a warp running alone on its scheduler (no contention):
        the latency-bound pass time. See `simulate`."""
        return simulate(self.path, lat, self.stream_only)

    @property
    def counts(self) -> Counter:
        return Counter(i.pipe for i in self.path)

    @property
    def opcodes(self) -> Counter:
        return Counter(i.base for i in self.path)

    def lsu_cycles(self) -> float:
        """Cycles of the SM's 128 B/clk L1 / shared-memory data path one warp's loop pass takes."""
        total = 0.0
        for i in self.path:
            if i.pipe == "lsu":
                total += max(1.0, i.width_bits() * 32 / 8 / 128)
            elif i.pipe == "shfl":
                total += 1.0
        return total

    def tensor_macs(self) -> int:
        """Multiply-accumulates of the tensor-core instructions on the path (per warp for HMMA; per warpgroup
        instruction / 4 for HGMMA, which each of the 4 warps issues)."""
        macs = 0
        for i in self.path:
            m = re.match(r"(HMMA|HGMMA)\.(\d+)x?(\d*)x?(\d*)", i.opcode)
            if not m:
                continue
            if m.group(1) == "HMMA":  # HMMA.16816 / HMMA.1688
                digits = m.group(2)
                mm, nn, kk = (16, 8, 16) if digits == "16816" else (16, 8, 8) if digits == "1688" else (16, 8, 16)
                macs += mm * nn * kk
            else:
                mm, nn, kk = int(m.group(2)), int(m.group(3)), int(m.group(4))
                macs += mm * nn * kk // 4
        return macs

    def kinds(self) -> str:
        ops = self.opcodes
        if ops.get("HGMMA"):
            return "HGMMA"
        if ops.get("HMMA"):
            return "HMMA"
        return "FFMA" if ops.get("FFMA") or ops.get("HFMA2") else "none"

    def load_widths(self) -> str:
        ws = Counter()
        for i in self.path:
            if i.pipe == "lsu" and i.base.startswith(("LD", "ATOM")):
                ws[f"{i.base}.{i.width_bits()}"] += 1
        return " ".join(f"{k}x{v}" for k, v in sorted(ws.items()))


def _loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(head index, latch index) of every backward branch."""
    index = {ins.addr: n for n, ins in enumerate(instrs)}
    out = []
    for n, ins in enumerate(instrs):
        t = ins.branch_target
        if t is not None and t <= ins.addr and t in index:
            out.append((index[t], n))
    return out


def main_loop(kernel: Kernel) -> LoopProfile | None:
    """The kernel's main loop (most instructions of its own) and one warp's hottest path through it."""
    instrs = kernel.instrs
    loops = _loops(instrs)
    if not loops:
        return None

    def own(lp):
        h, t = lp
        inner = sum(t2 - h2 + 1 for h2, t2 in loops if (h2, t2) != lp and h <= h2 and t2 <= t)
        return (t - h + 1) - inner

    def has(lp, pred):
        h, t = lp
        return any(pred(i) for i in instrs[h:t + 1])

    # the loop that streams the weight (evict-first loads), else the one with the MMAs, else the FMAs
    for pred in (lambda i: i.is_global_load() and ".EF" in i.opcode, lambda i: i.pipe == "tensor",
                 lambda i: i.base in ("FFMA", "HFMA2"), lambda i: True):
        cands = [lp for lp in loops if has(lp, pred)]
        if cands:
            break
    head, latch = max(cands, key=own)
    # collapse nested loops (not executed on the hot path) and find the heaviest forward path head -> back edge
    nested = [(h2, t2) for h2, t2 in loops if (h2, t2) != (head, latch) and head <= h2 and t2 <= latch]
    index = {ins.addr: n for n, ins in enumerate(instrs)}

    def in_nested(n):
        return any(h2 <= n <= t2 for h2, t2 in nested)

    # block leaders
    leaders = {head}
    for n in range(head, latch + 1):
        t = instrs[n].branch_target
        if t is not None:
            if t in index and head <= index[t] <= latch:
                leaders.add(index[t])
            leaders.add(n + 1)
        if instrs[n].base in ("EXIT", "RET"):
            leaders.add(n + 1)
    for h2, t2 in nested:
        leaders.add(h2)
        leaders.add(t2 + 1)
    starts = sorted(x for x in leaders if head <= x <= latch)
    blocks = {s: (s, (starts[i + 1] - 1) if i + 1 < len(starts) else latch) for i, s in enumerate(starts)}

    @functools.lru_cache(maxsize=None)
    def best(s: int) -> tuple[int, tuple[int, ...]]:
        """(weight, block starts) of the heaviest path from block s to a back edge to `head`."""
        b0, b1 = blocks[s]
        if in_nested(b0):
            weight = 0
            outer = next((h2, t2) for h2, t2 in nested if h2 <= b0 <= t2)
            exits = [outer[1] + 1]
            last = instrs[outer[1]]
        else:
            weight = b1 - b0 + 1
            last = instrs[b1]
            exits = []
            t = last.branch_target
            if last.base in ("EXIT", "RET"):
                return (-10**9, ())
            if t is not None and t in index:
                ti = index[t]
                if ti == head:
                    if last.unconditional:
                        return (weight, (s,))
                    exits.append(("back",))
                elif head < ti <= latch and ti > b1:
                    exits.append(ti)
                if not last.unconditional:
                    exits.append(b1 + 1)
            else:
                exits.append(b1 + 1)
        options = []
        for e in exits:
            if e == ("back",):
                options.append((0, ()))
            elif isinstance(e, int) and e <= latch and e in blocks:
                w, p = best(e)
                if w > -10**9:
                    options.append((w, p))
        if not options:
            return (-10**9, ())
        w, p = max(options, key=lambda x: x[0])
        return (weight + w, (s,) + p)

    _, path_blocks = best(head)
    path = []
    for s in path_blocks:
        b0, b1 = blocks[s]
        if not in_nested(b0):
            path.extend(instrs[b0:b1 + 1])
    inflight, stream_only = _inflight(path)
    return LoopProfile(instrs[head].addr, instrs[latch].addr, path, inflight, stream_only)


def _inflight(path: list[Instr], iterations: int = 4) -> tuple[int, bool]:
    """Max bytes of global loads one warp has outstanding in the steady state of the loop (the last of
    `iterations` simulated passes), counting only evict-first loads when the loop has any."""
    stream_only = any(i.is_global_load() and ".EF" in i.opcode for i in path)

    def counted(i: Instr) -> bool:
        return i.is_global_load() and (not stream_only or ".EF" in i.opcode)

    sb: dict[int, int] = {}
    groups: list[int] = []  # committed cp.async groups (bytes), oldest first
    open_group = 0
    peak = 0
    for it in range(iterations):
        cur_peak = 0
        for i in path:
            for b in range(6):
                if i.wait >> b & 1:
                    sb.pop(b, None)
            if i.base == "DEPBAR":
                m = re.search(r"SB0,\s*0x([0-9a-f]+)|SB0,\s*(\d+)", i.operands)
                if m:
                    keep = int(m.group(1), 16) if m.group(1) else int(m.group(2))
                    while len(groups) > keep:
                        groups.pop(0)
            total = sum(sb.values()) + sum(groups) + open_group
            cur_peak = max(cur_peak, total)
            nbytes = i.width_bits() * 32 // 8
            if i.base == "LDGSTS" and counted(i):
                open_group += nbytes
            elif counted(i) and i.wbar != 7:
                sb[i.wbar] = sb.get(i.wbar, 0) + nbytes
            if i.base == "LDGDEPBAR":
                groups.append(open_group)
                open_group = 0
            cur_peak = max(cur_peak, sum(sb.values()) + sum(groups) + open_group)
        if it == iterations - 1:
            peak = cur_peak
    return peak, stream_only


# ------------------------------------------------------------------------------------------ latency model
@dataclass(frozen=True)
class Latencies:
    """Cycles from issue to the scoreboard release of variable-latency instructions (sm_90, assumptions of the
    static model: benchmarks/static_sm90.py states and calibrates them)."""
    dram: int = 900      # a global load served by HBM under a bandwidth-saturating load (~510 ns at 1.755 GHz)
    l2: int = 300        # a global load that hits L2 (activations, re-read tiles)
    shared: int = 30     # LDS / LDSM / shared atomics
    other: int = 20      # S2R, LDC, SHFL, MUFU, conversions and any other scoreboarded result
    operand_read: int = 8  # read-scoreboard release (a store's / load's source registers consumed)
    hmma: int = 30       # mma.sync result
    hgmma_wait: int = 120  # WARPGROUP.DEPBAR after the last HGMMA issued


def simulate(path: list[Instr], lat: Latencies, stream_only: bool, iterations: int = 5) -> float:
    """Issue the loop path in order, `iterations` times, as one warp alone: an instruction issues when the
    scoreboard barriers it waits on are released and the previous one's stall count has elapsed; a
    variable-latency instruction releases its write barrier `lat.*` cycles after issue; cp.async groups complete
    `lat.dram` after their last copy and `DEPBAR.LE SB0, n` waits for all but the newest n. Returns the cycles of
    the last pass (the steady state, loads of the next pass issued by this one included)."""
    ready = [0.0] * 6
    groups: list[float] = []
    open_done = None
    last_hgmma = 0.0
    t = 0.0
    starts = []
    for _ in range(iterations):
        starts.append(t)
        for i in path:
            for b in range(6):
                if i.wait >> b & 1:
                    t = max(t, ready[b])
            if i.base == "DEPBAR":
                m = re.search(r"SB0,\s*0x([0-9a-f]+)|SB0,\s*(\d+)", i.operands)
                if m:
                    keep = int(m.group(1), 16) if m.group(1) else int(m.group(2))
                    while len(groups) > keep:
                        t = max(t, groups.pop(0))
            if i.base == "WARPGROUP" and "DEPBAR" in i.opcode:
                t = max(t, last_hgmma + lat.hgmma_wait)
            if i.base == "HGMMA":
                last_hgmma = t
            if i.wbar != 7:
                if i.base in ("LDG", "LD"):
                    done = t + (lat.dram if (".EF" in i.opcode or not stream_only) else lat.l2)
                elif i.base in ("LDS", "LDSM", "ATOMS"):
                    done = t + lat.shared
                elif i.base == "HMMA":
                    done = t + lat.hmma
                else:
                    done = t + lat.other
                ready[i.wbar] = max(ready[i.wbar], done)
            if i.rbar != 7:
                ready[i.rbar] = max(ready[i.rbar], t + lat.operand_read)
            if i.base == "LDGSTS":
                open_done = t + lat.dram
            if i.base == "LDGDEPBAR":
                groups.append(open_done if open_done is not None else t)
                open_done = None
            t += max(1, i.stall)
    starts.append(t)
    return starts[-1] - starts[-2]

"""Reading a compiled program's HLO text: its collectives, and how often its loops run.

XLA's own analyses (``compiled.cost_analysis()``) count the body of a ``while`` loop once,
whatever its trip count, and say nothing of collectives. This module reads the optimized,
SPMD-partitioned HLO (``compiled.as_text()``: the program one device runs) instruction by
instruction: each computation's callers and trip counts (``known_trip_count`` of a
``while``), each collective's kind, operand bytes and replica-group size, and the matrix
multiplications' FLOPs counted once and per execution (the ratio corrects XLA's FLOP count
for loops).

Example:
    >>> text = '''
    ... ENTRY %main (p: f32[4,8]) -> f32[4,8] {
    ...   %p = f32[4,8]{1,0} parameter(0)
    ...   ROOT %all-reduce.1 = f32[4,8]{1,0} all-reduce(%p), replica_groups={{0,1},{2,3}}, to_apply=%add
    ... }
    ... '''
    >>> [(c.kind, c.operand_bytes, c.group_size, c.count) for c in collectives(text, 4)]
    [('all-reduce', 128, 2, 1)]
    >>> collectives(text, 4)[0].traffic_bytes  # a ring all-reduce sends 2 (n - 1) / n of it
    128.0
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

__all__ = ["COLLECTIVE_KINDS", "Collective", "collectives", "dot_flops", "summarize"]

#: The collective opcodes (their ``-start`` forms count too; ``-done`` halves are skipped).
COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program, on one device.

    Attributes:
        kind: one of :data:`COLLECTIVE_KINDS`.
        operand_bytes: the bytes of its operands on one device, per execution.
        group_size: devices taking part in each group (1: the collective moves nothing).
        count: executions per step (its loop's trip count; 1 outside loops).
    """

    kind: str
    operand_bytes: int
    group_size: int
    count: int = 1

    @property
    def traffic_bytes(self) -> float:
        """Bytes one device sends per step with the bandwidth-optimal (ring) algorithm:
        all-reduce ``2 (n-1)/n`` of its operand, all-gather ``n-1`` shards, reduce-scatter
        and all-to-all ``(n-1)/n``, collective-permute the operand itself."""
        n = self.group_size
        factor = {
            "all-reduce": 2 * (n - 1) / n,
            "all-gather": n - 1,
            "reduce-scatter": (n - 1) / n,
            "all-to-all": (n - 1) / n,
            "collective-permute": 1.0 if n > 1 else 0.0,
        }[self.kind]
        return factor * self.operand_bytes * self.count


def _shape_bytes(text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed; tokens are 0)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        size = _BYTES.get(dtype)
        if size is not None:
            total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_type(rest: str) -> tuple[str, str]:
    """``"f32[2]{0} add(%a, %b), ..."`` -> ``("f32[2]{0}", "add(%a, %b), ...")``."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _operands(call: str) -> tuple[str, str, str]:
    """``"op(args), attrs"`` -> ``(op, args, attrs)`` (parentheses matched)."""
    op, _, rest = call.partition("(")
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return op.strip(), rest[:i], rest[i + 1 :]
    return op.strip(), rest, ""


@dataclass
class _Instr:
    name: str
    shape: str
    op: str
    args: str
    attrs: str


def _parse(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    """Computation name -> its instructions, and the entry computation's name."""
    comps: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            shape, call = _split_type(m.group(2))
            op, args, attrs = _operands(call)
            comps[current].append(_Instr(m.group(1), shape, op, args, attrs))
    return comps, entry


def _multipliers(comps: dict[str, list[_Instr]], entry: str | None) -> dict[str, int]:
    """How many times each computation runs per execution of the entry (loops multiplied)."""
    callers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, instrs in comps.items():
        for ins in instrs:
            trips = _TRIPS.search(ins.attrs)
            n = int(trips.group(1)) if trips else 1
            for role, callee in _CALLS.findall(ins.attrs):
                callers[callee].append((name, n if role in ("body", "condition") else 1))
            for group in _BRANCHES.findall(ins.attrs):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    callers[callee].append((name, 1))
    memo: dict[str, int] = {}

    def times(name: str, seen: frozenset = frozenset()) -> int:
        if name == entry:
            return 1
        if name not in memo:
            if name in seen:
                return 0
            seen = seen | {name}
            memo[name] = sum(times(c, seen) * n for c, n in callers.get(name, ()))
        return memo[name]

    return {name: times(name) for name in comps}


def _group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group, from any of the HLO printer's three formats."""
    m = re.search(r"replica_groups=\{(\{[^}]*\})", attrs)
    if m:
        return len([x for x in m.group(1).strip("{}").split(",") if x.strip()])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        axes = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes.get(a, 1)) for a in axes)
    return num_devices  # replica_groups={} (or none): every device


def collectives(text: str, num_devices: int) -> list[Collective]:
    """Every collective of a compiled program's HLO text, per device, with its loop count.

    Args:
        text: ``compiled.as_text()`` of an SPMD-partitioned program.
        num_devices: the program's devices (the group of a collective without groups).

    Returns:
        One :class:`Collective` per instruction, in program order.
    """
    comps, entry = _parse(text)
    times = _multipliers(comps, entry)
    out = []
    for name, instrs in comps.items():
        shapes = {ins.name: ins.shape for ins in instrs}
        for ins in instrs:
            kind = ins.op.removesuffix("-start")
            if kind not in COLLECTIVE_KINDS or not times[name]:
                continue
            names = re.findall(r"%([\w.\-]+)", ins.args)
            nbytes = sum(_shape_bytes(shapes.get(n, "")) for n in names)
            nbytes = nbytes or _shape_bytes(ins.args)  # operands printed with their shapes
            size = 2 if kind == "collective-permute" else _group_size(ins.attrs, num_devices)
            out.append(Collective(kind, nbytes, size, times[name]))
    return out


def dot_flops(text: str) -> tuple[float, float]:
    """Matrix-multiplication FLOPs of a program: ``(per execution, counting each loop body
    once)``; their ratio is what XLA's cost analysis misses in loops.

    A ``dot`` costs ``2 x (output elements) x (contracted elements)``.
    """
    comps, entry = _parse(text)
    times = _multipliers(comps, entry)
    weighted = once = 0.0
    for name, instrs in comps.items():
        shapes = {ins.name: ins.shape for ins in instrs}
        for ins in instrs:
            if ins.op != "dot":
                continue
            lhs = re.findall(r"%([\w.\-]+)", ins.args)
            lhs_dims = _ARRAY.findall(shapes.get(lhs[0], "") if lhs else "") or _ARRAY.findall(
                ins.args
            )
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
            out = _ARRAY.findall(ins.shape)
            if not lhs_dims or not out or contracting is None:
                continue
            dims = [int(d) for d in lhs_dims[0][1].split(",") if d]
            k = math.prod(dims[int(i)] for i in contracting.group(1).split(",") if i)
            flops = 2.0 * math.prod(int(d) for d in out[0][1].split(",") if d) * k
            once += flops
            weighted += flops * max(times[name], 0)
    return weighted, once


def summarize(items: list[Collective]) -> list[dict]:
    """Collectives grouped by kind and group size: instructions, executions, operand and
    traffic bytes per device per step (largest traffic first)."""
    groups: dict[tuple[str, int], dict] = {}
    for c in items:
        g = groups.setdefault(
            (c.kind, c.group_size),
            {"kind": c.kind, "group_size": c.group_size, "instructions": 0, "executions": 0,
             "operand_bytes": 0, "traffic_bytes": 0.0},
        )  # fmt: skip
        g["instructions"] += 1
        g["executions"] += c.count
        g["operand_bytes"] += c.operand_bytes * c.count
        g["traffic_bytes"] += c.traffic_bytes
    return sorted(groups.values(), key=lambda g: -g["traffic_bytes"])

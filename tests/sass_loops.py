"""Where a kernel's register spills are in its SASS (cuobjdump -sass): inside an innermost loop, where they run once
per iteration of the kernel's hot loop, or outside it (set up once per program, or once per pass of an outer loop).
ptxas trades a few spills for occupancy when a kernel is launched without a register limit: under Triton 3.6 it
caps some quantized GEMV variants at 128 or 168 registers (3 or 4 blocks of 128 threads per SM) and keeps 4-8
values in local memory, stored before the weight loop and loaded after it. tests/aot_sm90.py fails a decode-path
kernel only for the first kind. Plain text in, no Triton: tests/test_aot_sm90.py checks it without a compiler."""

from __future__ import annotations

import re
from dataclasses import dataclass

# "/*0590*/    @!P1 STL [R1], R2 ;": the address, then the instruction up to its semicolon
_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+([^;]*);")
_BRANCH = re.compile(r"^(?:@!?U?P[T\d]+\s+)?BRA(?:\.[\w.]+)?\s+(?:[^,]*,\s*)?0x([0-9a-f]+)")  # BRA [pred,] target
_SPILL = re.compile(r"^(?:@!?U?P[T\d]+\s+)?(?:LDL|STL)(?:\.[\w.]+)?\s")


@dataclass
class SpillSites:
    instructions: int  # local loads and stores (LDL / STL) in all
    in_loops: int  # of them inside an innermost loop
    loops: int  # innermost loops found


def spill_sites(sass: str) -> SpillSites:
    """Local loads and stores of one function's SASS, and how many lie in an innermost loop. A loop is the range
    [target, branch] of a backward branch (ptxas closes each loop with one, the loop's first instruction its
    target); an innermost loop contains no other loop. The self-branch that ends a function is not a loop."""
    code = [(int(a, 16), text.strip()) for a, text in _INSTRUCTION.findall(sass)]
    loops = []
    for address, text in code:
        m = _BRANCH.match(text)
        if m and int(m.group(1), 16) < address:
            loops.append((int(m.group(1), 16), address))
    innermost = [(s, e) for s, e in loops if not any((s, e) != (s2, e2) and s <= s2 and e2 <= e for s2, e2 in loops)]
    spills = [address for address, text in code if _SPILL.match(text)]
    in_loops = sum(any(s <= a <= e for s, e in innermost) for a in spills)
    return SpillSites(len(spills), in_loops, len(innermost))

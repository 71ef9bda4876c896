#!/usr/bin/env python3
"""Check compiled wgmma kernels for register hazards that the PTX allows but the SASS breaks.

    scripts/sass-lint.py CUBIN_OR_SASS...     exit 1 if any HGMMA has a hazard
    scripts/sass-lint.py --self-test          run the fixtures in scripts/sass-lint-fixtures/

A warpgroup MMA (`wgmma.mma_async`, SASS `HGMMA`) reads its register A operand and updates
its accumulators asynchronously until a `wgmma.wait_group` (SASS `WARPGROUP.DEPBAR.LE gsb0`)
retires it; touching those registers before that is undefined behaviour (PTX ISA,
wgmma.wait_group). ptxas 13.0 can still produce such code from legal PTX: it merged a
loop-carried register copy into the A operand of an in-flight P·V HGMMA in our attention
kernel. This lint walks every path of the SASS from each HGMMA to its wait and reports:

  1. a write to the A registers (Rn..Rn+3) of a register-operand HGMMA before a
     `WARPGROUP.DEPBAR.LE gsb0, 0x0`;
  2. any read or write of its accumulator registers by a non-HGMMA instruction before the
     wait (for a shared-memory-operand HGMMA any `DEPBAR.LE gsb0` ends the walk: in our
     kernels the S = Q K^T group is always the older one when `wait_group 1` runs).

Input: a cubin (disassembled with nvdisasm: $NVDISASM, else `nvdisasm` on PATH, else the
pip wheel that scripts/build-kernels.sh installs, see find_nvdisasm in scripts/lib/nvcc.sh),
or nvdisasm text (.sass).
"""
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "sass-lint-fixtures")
WAIT_ALL = "WARPGROUP.DEPBAR.LE gsb0, 0x0"
# Opcodes whose first operand is not a destination register.
NO_DEST = ("ST", "BRA", "BAR", "RED", "LDGSTS", "EXIT", "RET", "CALL", "WARPGROUP",
           "DEPBAR", "NOP", "MEMBAR", "FENCE", "SYNCS", "ARRIVES", "BSYNC", "BSSY", "WARPSYNC")
HGMMA_RE = re.compile(r"(?:@!?U?P\w+\s+)?HGMMA\.64x(\d+)x16\S*\s+R(\d+),\s*(\S+),")
PRED = re.compile(r"!?U?P(T|\d+)$")


def nvdisasm() -> str:
    if os.environ.get("NVDISASM"):
        return os.environ["NVDISASM"]
    if shutil.which("nvdisasm"):
        return shutil.which("nvdisasm")
    cache = os.environ.get("DPIR_NVDISASM_CACHE",
                           os.path.expanduser("~/.cache/dpir/nvdisasm-13.2.86"))
    return os.path.join(cache, "nvidia", "cu13", "bin", "nvdisasm")


def sass_text(path: str) -> str:
    if path.endswith(".sass"):
        return open(path).read()
    return subprocess.run([nvdisasm(), "-c", path], capture_output=True, text=True,
                          check=True).stdout


def parse(text: str) -> dict:
    """{function: (instructions [(addr, text)], labels {name: index})}"""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            cur = funcs.setdefault(m.group(1), ([], {}))
            continue
        if cur is None:
            continue
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            cur[1][m.group(1)] = len(cur[0])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            cur[0].append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def split(ins: str):
    """(opcode, operands) with any predicate guard removed."""
    body = re.sub(r"^@!?U?P\w+\s+", "", ins)
    op, _, rest = body.partition(" ")
    return op, [x.strip() for x in rest.split(",")] if rest.strip() else []


def written(op: str, operands: list) -> set:
    if not operands or op.startswith(NO_DEST) or op.startswith("HGMMA"):
        return set()
    dest = operands[0]
    # SHFL, LOP3 and ATOM put a predicate result first, the register result second.
    if PRED.match(dest) and op.startswith(("SHFL", "LOP3", "ATOM")) and len(operands) > 1:
        dest = operands[1]
    m = re.match(r"R(\d+)$", dest)
    if not m:
        return set()
    r = int(m.group(1))
    if ".128" in op or re.search(r"\.M(T)?88\.4", op):
        width = 4
    elif (".64" in op or ".WIDE" in op or re.search(r"\.M(T)?88\.2", op) or op.startswith("D")
          or (op.startswith("CS2R") and ".32" not in op)):
        width = 2
    else:
        width = 1
    return set(range(r, r + width))


def walk(instrs, labels, start, stop):
    """Indices reachable from `start` before an instruction for which stop(text) holds."""
    seen, stack = set(), [start]
    while stack:
        j = stack.pop()
        while j < len(instrs) and j not in seen:
            seen.add(j)
            text = instrs[j][1]
            # A predicated wait or EXIT may not run: only an unpredicated one ends the path.
            if not text.startswith("@") and (stop(text) or text == "EXIT"):
                break
            yield j
            op, operands = split(text)
            m = re.search(r"`\((\.L_x_\d+)\)", text)
            if op.startswith(("BRX", "JMX")):
                raise ValueError(f"indirect branch at {instrs[j][0]:04x}: {text}")
            if op.startswith("BRA") and m and m.group(1) in labels:
                if text.startswith("@") or len(operands) > 1 or op != "BRA":
                    stack.append(labels[m.group(1)])
                else:
                    j = labels[m.group(1)]
                    continue
            j += 1


def lint(funcs: dict) -> list:
    """[(function, hgmma addr, hgmma text, offending addr, offending text, kind)]"""
    found = []
    for name, (instrs, labels) in funcs.items():
        for i, (addr, text) in enumerate(instrs):
            m = HGMMA_RE.match(text)
            if not m:
                continue
            n, d0, a = int(m.group(1)), int(m.group(2)), m.group(3)
            acc = set(range(d0, d0 + n // 2))
            a_regs = set()
            if a.startswith("R"):
                r = int(a[1:])
                a_regs = set(range(r, r + 4))
                stop = lambda t: WAIT_ALL in t  # noqa: E731
            else:
                stop = lambda t: "WARPGROUP.DEPBAR.LE gsb0" in t  # noqa: E731
            for j in walk(instrs, labels, i + 1, stop):
                op, operands = split(instrs[j][1])
                if op.startswith(("HGMMA", "WARPGROUP")):
                    continue
                if written(op, operands) & a_regs:
                    found.append((name, addr, text, *instrs[j], "writes the A operand"))
                regs = {int(x) for x in re.findall(r"\bR(\d+)\b", instrs[j][1])}
                if (regs | written(op, operands)) & acc:
                    found.append((name, addr, text, *instrs[j], "touches the accumulators"))
    return found


def report(path: str) -> int:
    funcs = parse(sass_text(path))
    if not funcs:
        raise ValueError(f"{path}: no code sections found in the disassembly")
    for name, (instrs, _) in funcs.items():
        seen = sum(1 for _, t in instrs if "HGMMA" in t)
        if seen != sum(1 for _, t in instrs if HGMMA_RE.match(t)):
            raise ValueError(f"{path}: {name}: an HGMMA form the lint does not parse")
    hazards = lint(funcs)
    for name in funcs:
        n = sum(1 for _, t in funcs[name][0] if HGMMA_RE.match(t))
        if n:
            k = sum(1 for h in hazards if h[0] == name)
            print(f"{os.path.basename(path)}: {name}: {n} HGMMA, {k} hazards")
    for name, a, t, b, u, kind in hazards[:10]:
        print(f"  {name}: {b:04x} {u} {kind} of the HGMMA at {a:04x} ({t}) before its wait")
    return 1 if hazards else 0


def self_test() -> int:
    """Each fixture's first line says how many hazards it must produce."""
    bad = 0
    for f in sorted(os.listdir(FIXTURES)):
        text = open(os.path.join(FIXTURES, f)).read()
        want = int(re.match(r"// expect (\d+) hazards", text).group(1))
        got = len(lint(parse(text)))
        ok = got == want
        bad += not ok
        print(f"sass-lint self-test {f}: {got} hazards (expected {want}) {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


def main(argv) -> int:
    if argv == ["--self-test"]:
        return self_test()
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        return max(report(p) for p in argv)
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"error: sass-lint: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

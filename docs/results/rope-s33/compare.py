"""Compare two probe.py outputs over the families apb runs exactly (families-s32/summary.txt).

    python docs/results/rope-s33/compare.py BEFORE.txt AFTER.txt > docs/results/rope-s33/compare.txt
"""

import sys
from collections import Counter
from pathlib import Path

SUMMARY = Path(__file__).parents[1] / "families-s32" / "summary.txt"


def load(path):
    return {line[:28].strip(): line[28:].strip() for line in open(path) if line.strip()}


def main():
    exact = {line.split()[0] for line in open(SUMMARY) if len(line.split()) > 1 and line.split()[1] == "exact"
             and not line.startswith(" ")}
    before, after = load(sys.argv[1]), load(sys.argv[2])
    counts = Counter()
    print(f"families apb runs exactly (families-s32): {len(exact)}; probed: {len(exact & set(after))}\n")
    print(f"{'family':26s} {'before':18s} after")
    for name in sorted(exact & set(after)):
        b, a = before.get(name, "?"), after[name]
        counts[(b.split("  ")[0].split()[0], a.split()[0])] += 1
        if not (b.startswith("moves") and a.startswith("moves")):
            print(f"{name:26s} {b[:18]:18s} {a}")
    print("\n(before, after): families")
    for (b, a), n in sorted(counts.items()):
        print(f"  {b:8s} -> {a:8s} {n}")
    worst = max((float(a.split()[2]), n) for n, a in after.items() if a.startswith("moves") and n in exact)
    print(f"\nlargest error of a moved query over every family that moves, after: {worst[0]:.1e} ({worst[1]})")


if __name__ == "__main__":
    main()

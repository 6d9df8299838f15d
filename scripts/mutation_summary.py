"""Summary of the last mutation run (``bash scripts/mutation.sh``): per mutated file, how many mutants
the unit tests killed, how many survived, and the score over the files ``setup.cfg [mutmut]`` names.
Survivors are listed by name (``.venv/bin/mutmut show <name>`` prints the diff); those judged
equivalent are explained in docs/mutation.md."""
import json
import sys
from collections import Counter
from pathlib import Path

#: mutmut's exit codes that count as a kill (a failing test, or pytest failing on the mutant)
KILLED = {1, 3}
SURVIVED = {0}
#: a mutant that hangs or crashes the interpreter is caught too, though not by an assertion
CAUGHT_OTHERWISE = {24, -24, 152, 255, 36, -9, -11}
#: no selected test calls the mutated function
NO_TEST = {5, 33}


def main(root="mutants"):
    metas = sorted(Path(root).rglob("*.py.meta"))
    if not metas:
        sys.exit(f"no mutation results under {root}/: run `bash scripts/mutation.sh` first")
    total = Counter()
    survivors = []
    print(f"{'file':58s} {'killed':>7s} {'survived':>9s} {'no test':>8s} {'unchecked':>10s} {'score':>7s}")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter()
        for name, code in codes.items():
            if code in KILLED or code in CAUGHT_OTHERWISE:
                counts["killed"] += 1
            elif code in SURVIVED:
                counts["survived"] += 1
                survivors.append(name)
            elif code in NO_TEST:
                counts["no test"] += 1
                survivors.append(name + "  (no test reaches it)")
            else:  # not run yet (an interrupted run), or skipped
                counts["unchecked"] += 1
        total.update(counts)
        path = str(meta.relative_to(root))[: -len(".meta")]
        print(f"{path:58s} {counts['killed']:7d} {counts['survived']:9d} {counts['no test']:8d} "
              f"{counts['unchecked']:10d} {score(counts):>7s}")
    print(f"{'all':58s} {total['killed']:7d} {total['survived']:9d} {total['no test']:8d} "
          f"{total['unchecked']:10d} {score(total):>7s}")
    if survivors:
        print(f"\n{len(survivors)} mutants not killed:")
        for name in sorted(survivors):
            print("  " + name)


def score(counts):
    """Killed over checked (killed, survived, or reached by no test)."""
    checked = counts["killed"] + counts["survived"] + counts["no test"]
    return f"{100.0 * counts['killed'] / checked:.1f}%" if checked else "-"


if __name__ == "__main__":
    main(*sys.argv[1:])

#!/usr/bin/env bash
# Mutation testing (mutmut, configured in setup.cfg [mutmut]): mutates the loss, masking, embedding
# and network code of every method and mmf_multilevel/modules/, runs the unit tests that reach each
# mutant, and prints the score. Not part of CI (about 3 hours on 2 cores; results are cached in
# mutants/, so a second run only re-tests what changed).
#   bash scripts/mutation.sh                 # run, then print the summary
#   bash scripts/mutation.sh summary         # the summary of the last run only
#   .venv/bin/mutmut show <mutant name>      # the diff of one mutant; docs/mutation.md lists survivors
#   bash scripts/mutation.sh file mmf_multilevel/modules/visual.py tests/core/test_modules.py
#                                            # one file against the tests named (minutes), in a scratch copy
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath "${VENV:-.venv}")
MODE=${1:-run}
if [ "$MODE" = "file" ]; then
  shift
  if [ $# -lt 2 ]; then
    echo "usage: bash scripts/mutation.sh file <file to mutate> <test file or folder>..." >&2
    exit 2
  fi
  target=$1
  shift
  [ -f "$target" ] || { echo "mutation.sh file: no such file: $target" >&2; exit 2; }
  for selection in "$@"; do
    [ -e "$selection" ] || { echo "mutation.sh file: no such test file or folder: $selection" >&2; exit 2; }
  done
  # a scratch copy of the working tree (tracked and untracked, not ignored files) whose setup.cfg mutates the
  # one file against the named tests; its mutants/ is kept between runs, so a rerun checks only what changed
  scratch=${MUTATION_SCRATCH:-${TMPDIR:-/tmp}/mmf_ml_mutation/$(echo "$target" | tr '/.' '__')}
  mkdir -p "$scratch"
  git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$scratch"
  "$VENV/bin/python" - "$scratch/setup.cfg" "$target" "$@" <<'PY'
import re
import sys

path, target, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(path, encoding="utf-8").read()


def replace(key, values):
    global text
    pattern = re.compile(rf"^{key} =\n(?:[ \t]+\S.*\n)+", re.M)
    if not pattern.search(text):
        sys.exit(f"mutation.sh file: setup.cfg [mutmut] has no '{key} =' list")
    text = pattern.sub(f"{key} =\n" + "".join(f"    {value}\n" for value in values), text, count=1)


replace("only_mutate", [target])
replace("pytest_add_cli_args_test_selection", tests)
open(path, "w", encoding="utf-8").write(text)
PY
  cd "$scratch"
  # mutmut re-checks a mutant only when its function changed; a new test changes none, so the survivors (and
  # those no test reached) of the last run are marked unchecked here and run again against today's tests
  "$VENV/bin/python" - <<'PY'
import json
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
from mutation_summary import NO_TEST, SURVIVED  # noqa: E402  (the summary's own reading of the codes)

for meta in Path("mutants").rglob("*.py.meta"):
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    again = [name for name, code in codes.items() if code in SURVIVED | NO_TEST]
    for name in again:
        codes[name] = None
    meta.write_text(json.dumps(data, indent=4))
    if again:
        print(f"{meta}: {len(again)} surviving mutants checked again")
PY
fi
if [ ! -x "$VENV/bin/mutmut" ]; then
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements/mutation.txt
fi
# The package's .pth hook imports mmf_multilevel (its __init__ and compat/) at interpreter start,
# before mutmut can put mutants/ first on sys.path: with those two (never mutated) copied there first
# and mutants/ on PYTHONPATH, the package - and so every module it then imports - is the mutated tree.
mkdir -p mutants/mmf_multilevel
[ -e mutants/mmf_multilevel/__init__.py ] || cp -p mmf_multilevel/__init__.py mutants/mmf_multilevel/
[ -d mutants/mmf_multilevel/compat ] || cp -rp mmf_multilevel/compat mutants/mmf_multilevel/
export PYTHONPATH="$PWD/mutants${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" != "summary" ]; then
  "$VENV/bin/mutmut" run --max-children "${MUTATION_WORKERS:-2}" || true
fi
"$VENV/bin/python" scripts/mutation_summary.py
[ "$MODE" != "file" ] || echo "mutants and their diffs: cd $PWD && PYTHONPATH=$PWD/mutants $VENV/bin/mutmut show <name>"

#!/usr/bin/env bash
# Mutation testing (mutmut, configured in setup.cfg [mutmut]): mutates the loss, masking, embedding
# and network code of every method and mmf_multilevel/modules/, runs the unit tests that reach each
# mutant, and prints the score. Not part of CI (about 3 hours on 2 cores; results are cached in
# mutants/, so a second run only re-tests what changed).
#   bash scripts/mutation.sh                 # run, then print the summary
#   bash scripts/mutation.sh summary         # the summary of the last run only
#   .venv/bin/mutmut show <mutant name>      # the diff of one mutant; docs/mutation.md lists survivors
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
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
if [ "${1:-run}" = "run" ]; then
  "$VENV/bin/mutmut" run --max-children "${MUTATION_WORKERS:-2}" || true
fi
"$VENV/bin/python" scripts/mutation_summary.py

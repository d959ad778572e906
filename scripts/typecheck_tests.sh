#!/usr/bin/env bash
# mypy --strict over the tests, one directory at a time: tests/ has no __init__.py files and
# several conftest.py, so one run over the whole tree stops at "Duplicate module named
# conftest". pytest (rootdir, prepend import mode) puts each test file's directory and tests/
# on sys.path, so helpers are imported by bare name (model_dir, vllm_harness, pg_fixtures);
# MYPYPATH mirrors that: the directory being checked first, then tests/, then the other test
# directories (a test may add one to sys.path itself, as test_incident_db.py does).
# The [tool.mypy] settings come from pyproject.toml; its `files` is ignored when paths are given.
set -euo pipefail
cd "$(dirname "$0")/.."
mypy=${MYPY:-.venv/bin/mypy}
mapfile -t dirs < <(
  find tests -name __pycache__ -prune -o -name .hypothesis -prune -o -name '*.py' -printf '%h\n' |
    sort -u
)
status=0
for dir in "${dirs[@]}"; do
  path=$dir
  for other in "${dirs[@]}"; do
    [ "$other" = "$dir" ] || path+=":$other"
  done
  echo "mypy $dir"
  MYPYPATH=$path "$mypy" --strict "$dir"/*.py || status=1
done
exit "$status"

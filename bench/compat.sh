#!/usr/bin/env bash
# Prove the dependency floor that pyproject.toml declares: install an older transformers into a fresh
# venv (beside this machine's torch) and run the suite's fidelity tests against it.
#
#   bash bench/compat.sh                 # the declared floor (read from pyproject.toml)
#   bash bench/compat.sh 4.46.3          # any other version, e.g. to look for a lower floor
#   TESTS="tests" bash bench/compat.sh   # the whole suite instead of the fidelity tests
#   PINS="websockets==14.2" bash bench/compat.sh   # other floors too, in the same venv
#
# Prints one table row and one JSON line: version, tests passed/failed, seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(python -c "import re,tomllib;d=tomllib.load(open('pyproject.toml','rb'))['project']['dependencies'];print(next(re.search(r'>=([\d.]+)',x).group(1) for x in d if x.startswith('transformers')))")
version=${1:-$floor}
tests=${TESTS:-"tests/test_local_jobs.py tests/test_checkpoint.py tests/test_network.py"}
pins=${PINS:-}
venv=bench/_work/compat-$version${pins:+-$(echo "$pins" | tr ' =' '_-')}
if [ ! -x "$venv/bin/python" ]; then
    python -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q "transformers==$version" $pins >/dev/null
fi
# slowllm itself comes from this checkout (the editable install beside this machine's torch), or:
"$venv/bin/python" -c "import slowllm.node" 2>/dev/null || "$venv/bin/pip" install -q --no-deps -e . >/dev/null
installed=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
start=$(date +%s)
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider $tests > "$venv/pytest.log" 2>&1
rc=$?
set -e
seconds=$(( $(date +%s) - start ))
summary=$(tail -1 "$venv/pytest.log")
echo "| transformers $installed | $summary | ${seconds} s |"
echo "{\"transformers\": \"$installed\", \"exit\": $rc, \"summary\": \"$summary\", \"seconds\": $seconds}"
exit $rc

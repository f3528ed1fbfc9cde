#!/usr/bin/env bash
# PEFT's own LN-tuning tests, taken unchanged from PEFT's sdist on PyPI, run against lntune.
#
#   scripts/peft_conformance.sh [--against-peft] [PYTHON]      (PYTHON defaults to ./.venv/bin/python)
#
# Exits non-zero when a test that passes on real PEFT fails on lntune and is not listed, with its reason, in
# scripts/peft_conformance/expected_failures.txt, or when a listed test passes (so the list stays true).
# What passes on real PEFT is stored in scripts/peft_conformance/peft_baseline.txt; --against-peft runs the
# same selection on real PEFT instead and rewrites that file (needed only when the pinned version changes).
# The PEFT version is lntune.config.PEFT_FORMAT_VERSION (the format lntune writes); it is installed, with the
# other packages only PEFT's test files import, into the cache folder: the project's environment is untouched.
# Needs PyPI the first time (then cached in $LNTUNE_PEFT_CONFORMANCE_CACHE, default ~/.cache/...); the tests
# themselves run offline. About 2-3 minutes on 2 cores.
set -euo pipefail

target=lntune
if [ "${1:-}" = "--against-peft" ]; then
  target=peft
  shift
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
python=${1:-$root/.venv/bin/python}
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")  # absolute, symlink kept (a venv's python)
version=$("$python" -c 'import lntune.config; print(lntune.config.PEFT_FORMAT_VERSION)')
cache=${LNTUNE_PEFT_CONFORMANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lntune-peft-conformance}/peft-$version
# PEFT itself at the pinned version (its tests must run against the PEFT they belong to, whatever the venv has),
# and the test-only imports of its test files that lntune[test] does not install (diffusers, datasets and what
# they import beyond lntune[test]).
extras="peft==$version diffusers==0.42.1 parameterized==0.9.0 requests==2.34.2 urllib3==2.8.0 idna==3.20
  certifi==2026.10.19.post1 charset-normalizer==3.5.3 importlib-metadata==10.2.0 zipp==4.1.2
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 pandas==3.1.1 xxhash==4.1.0"

if [ ! -f "$cache/suite/tests/testing_common.py" ]; then
  rm -rf "$cache/sdist" "$cache/suite"
  mkdir -p "$cache/sdist" "$cache/suite"
  "$python" -m pip download --quiet --no-deps --no-binary :all: "peft==$version" -d "$cache/sdist"
  tar -xzf "$cache/sdist/peft-$version.tar.gz" -C "$cache/sdist"
  cp -r "$cache/sdist/peft-$version/tests" "$cache/suite/tests"
  touch "$cache/suite/tests/__init__.py"  # the test files import each other as the package `tests`
  printf '[pytest]\n' >"$cache/suite/pytest.ini"  # PEFT's own pytest settings (coverage...) do not apply
fi
if [ "$(cat "$cache/extra.done" 2>/dev/null)" != "$extras" ]; then
  rm -rf "$cache/extra"
  # shellcheck disable=SC2086  # one word per requirement
  "$python" -m pip install --quiet --no-deps --target "$cache/extra" $extras
  printf '%s' "$extras" >"$cache/extra.done"  # a changed list reinstalls
fi

run_xml="$cache/$target.xml"
rm -f "$run_xml"
echo "PEFT $version's LN-tuning tests on $target (log: $cache/$target.log)"
status=0
(
  cd "$cache/suite"
  export PYTHONPATH="$cache/extra:$here/peft_conformance:$cache/suite" LNTUNE_CONFORMANCE_TARGET=$target
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
  exec "$python" -m pytest -p no:cacheprovider -p lntune_plugin -q --timeout 300 \
    -W ignore::pytest.PytestRemovedIn10Warning \
    tests/test_custom_models.py tests/test_config.py tests/test_common_gpu.py tests/test_torch_compile.py \
    -k "lntuning or ln_tuning" --junitxml="$run_xml" >"$cache/$target.log" 2>&1
) || status=$?
# pytest: 0 all passed, 1 some failed (judged below); anything else means the run itself broke.
if [ "$status" -gt 1 ] || [ ! -f "$run_xml" ]; then
  tail -20 "$cache/$target.log"
  echo "pytest did not complete (exit $status); see $cache/$target.log"
  exit 1
fi
tail -1 "$cache/$target.log"

if [ "$target" = peft ]; then
  "$python" "$here/peft_conformance/outcomes.py" baseline "$run_xml" "$here/peft_conformance/peft_baseline.txt"
else
  "$python" "$here/peft_conformance/outcomes.py" compare "$here/peft_conformance/peft_baseline.txt" \
    "$here/peft_conformance/expected_failures.txt" "$run_xml"
fi

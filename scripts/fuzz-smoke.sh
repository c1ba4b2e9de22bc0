#!/usr/bin/env bash
# Runs every cargo-fuzz target in proxy/fuzz for FUZZ_SECONDS seconds each (default 15), starting
# from the checked-in seeds (proxy/fuzz/seeds/<target>) plus whatever corpus earlier runs left in
# proxy/fuzz/corpus/<target>. Exits non-zero if any target crashes; the crashing input is kept
# in proxy/fuzz/artifacts/<target>/ and can be replayed with
#   cargo +nightly fuzz run <target> <artifact>     (from proxy/)
#
# cargo-fuzz is installed from crates.io when missing. It needs a nightly compiler; where no
# nightly toolchain is installed the pinned stable one is used with RUSTC_BOOTSTRAP=1, which
# unlocks the same -Z flags (toolchains cannot be downloaded on every machine this runs on).
set -euo pipefail

seconds="${FUZZ_SECONDS:-15}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "fuzz-smoke: FUZZ_SECONDS must be a positive integer, got '$seconds'" >&2
  exit 2
fi

cd "$(dirname "$0")/../proxy"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

toolchain=()
if cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  echo "fuzz-smoke: no nightly toolchain; using the pinned one with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
fi

mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
  echo "fuzz-smoke: no fuzz targets found in proxy/fuzz" >&2
  exit 1
fi

failed=()
for target in "${targets[@]}"; do
  echo "==> fuzzing $target for ${seconds}s"
  corpus=("fuzz/corpus/$target")
  mkdir -p "${corpus[0]}"
  if [ -d "fuzz/seeds/$target" ]; then
    corpus+=("fuzz/seeds/$target")
  fi
  if ! cargo "${toolchain[@]}" fuzz run "$target" "${corpus[@]}" -- \
    -max_total_time="$seconds" -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz-smoke: FAILED: ${failed[*]} (inputs in proxy/fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets ran ${seconds}s each without a crash"

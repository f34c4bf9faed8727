#!/usr/bin/env bash
# Builds target/<host triple>/release/relay (x86_64-unknown-linux-gnu, say)
# optimised with a profile of its own work (profile-guided optimisation): an
# instrumented relay, built apart in target/pgo, takes the benchmark
# harness's load (signed GitHub pushes at 32 connections, then backlogs of
# triggers drained; on PostgreSQL too with --postgres URL), and relay is
# built again with what it recorded. packaging/build-deb.sh --pgo packages
# that build.
#
# Needs llvm-profdata of the LLVM that rustc is built on (`rustc -vV` names
# it): Debian's llvm-NN package for LLVM NN, or `rustup component add
# llvm-tools`; and wrk, which the harness installs with apt-get when missing.
# About 25 minutes on two cores, most of it three release builds (the
# instrumented relay, the harness, relay again). Talks only to 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

postgres=()
parts=relay,delivery
case "${1:-}" in
  --postgres)
    [ -n "${2:-}" ] || { echo "usage: $0 [--postgres postgres://…]" >&2; exit 2; }
    postgres=(--postgres "$2")
    parts=relay,delivery,relay-postgres,delivery-postgres
    ;;
  "") ;;
  *) echo "usage: $0 [--postgres postgres://…]" >&2; exit 2 ;;
esac

host=$(rustc -vV | sed -n 's/^host: //p')
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
profdata=""
for candidate in "llvm-profdata-$llvm" "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" llvm-profdata; do
  if command -v "$candidate" >/dev/null &&
    "$candidate" --version 2>/dev/null | grep -q "LLVM version $llvm\."; then
    profdata=$candidate
    break
  fi
done
if [ -z "$profdata" ]; then
  echo "no llvm-profdata of LLVM $llvm (rustc's): apt install llvm-$llvm, or rustup component add llvm-tools" >&2
  exit 1
fi

work=$PWD/target/pgo
rm -rf "$work/profiles"
mkdir -p "$work/profiles"

echo "== an instrumented relay (target/pgo)"
# --target keeps the flags off build scripts and proc macros: only what is
# linked into relay (its dependencies too) records.
RUSTFLAGS="-Cprofile-generate=$work/profiles" \
  cargo build --release --locked -p relay --bin relay --target "$host" --target-dir "$work"

echo "== the harness's load on it: $parts"
cargo build --release --locked -p relay-bench
target/release/relay-bench --only "$parts" --connections 32 --runs 1 \
  --relay "$work/$host/release/relay" "${postgres[@]}" --out "$work/training.json"

"$profdata" merge -o "$work/relay.profdata" "$work/profiles"

echo "== relay built with that profile (target/$host/release/relay)"
# The same --target as the instrumented build: without it cargo gives each
# crate another metadata hash, the functions other names, and the profile
# matches none of them (silently: the build is a plain one).
RUSTFLAGS="-Cprofile-use=$work/relay.profdata" \
  cargo build --release --locked -p relay --bin relay --target "$host"

#!/usr/bin/env bash
# Builds relay and the harness (the relay-bench crate in bench/) in release
# mode, then runs the benchmark: relay against adnanh/webhook and bare hyper,
# side by side on loopback. Arguments go to relay-bench (--help lists them):
# --duration SECS --runs N --out FILE --only PART,… --connections 1,32
# --postgres URL --relay PATH (another relay build) --plot DIR
# --plot-against EARLIER.json; `plot RUN.json --to DIR` redraws a run.
# Installs wrk and webhook with apt-get when they are missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p relay -p relay-bench
exec "${CARGO_TARGET_DIR:-target}/release/relay-bench" "$@"

#!/usr/bin/env bash
# Builds target/debian/relay_<version>-1_<arch>.deb: the release binary, then
# the shell completions and man pages that very binary prints (so they say
# what its --help says), then `cargo deb --no-build`, which packages them with
# the units in systemd/ and packaging/relay.toml ([package.metadata.deb] in
# Cargo.toml lists every file). Needs cargo-deb: cargo install cargo-deb --locked
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p relay --bin relay
relay=target/release/relay
out=target/packaging
rm -rf "$out"
mkdir -p "$out/completions" "$out/man"
"$relay" completions bash >"$out/completions/relay.bash"
"$relay" completions zsh >"$out/completions/_relay"
"$relay" completions fish >"$out/completions/relay.fish"
"$relay" man --dir "$out/man"
# cargo-deb gzips the man pages itself (usr/share/man/…).
cargo deb --no-build --locked "$@"

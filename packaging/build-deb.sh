#!/usr/bin/env bash
# Builds target/debian/relay_<version>-1_<arch>.deb: the release binary, then
# the shell completions and man pages that very binary prints (so they say
# what its --help says), then `cargo deb --no-build`, which packages them with
# the units in systemd/ and packaging/relay.toml ([package.metadata.deb] in
# Cargo.toml lists every file). Needs cargo-deb: cargo install cargo-deb --locked
# With --pgo first, the binary is packaging/build-pgo.sh's (its needs: there);
# the arguments after it go to that script.
set -euo pipefail
cd "$(dirname "$0")/.."

deb_args=()
if [ "${1:-}" = "--pgo" ]; then
  shift
  packaging/build-pgo.sh "$@"
  set --
  host=$(rustc -vV | sed -n 's/^host: //p')
  relay=target/$host/release/relay
  # cargo deb then takes target/release/… in the assets from target/$host.
  deb_args=(--target "$host")
else
  cargo build --release --locked -p relay --bin relay
  relay=target/release/relay
fi
out=target/packaging
rm -rf "$out"
mkdir -p "$out/completions" "$out/man"
"$relay" completions bash >"$out/completions/relay.bash"
"$relay" completions zsh >"$out/completions/_relay"
"$relay" completions fish >"$out/completions/relay.fish"
"$relay" man --dir "$out/man"
# cargo-deb gzips the man pages itself (usr/share/man/…).
cargo deb --no-build --locked "${deb_args[@]}" "$@"

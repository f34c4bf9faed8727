#!/usr/bin/env bash
# Builds the fuzz targets' seed corpora in fuzz/corpus/ (not committed) from
# ../shared/fixtures (real deliveries of each provider), relay's sample
# configs and a few hand-written pipeline bodies, in each target's input
# shape: the provider targets take a flags byte (bit 0: form post; the rest
# picks the event header) and then the body; signature_headers a selector
# byte, header lines, then the body.
# Usage: fuzz/seed.sh [FIXTURES_DIR [CORPUS_DIR]] (default ../shared/fixtures
# and fuzz/corpus; relative paths are from the repository's root).
set -euo pipefail
cd "$(dirname "$0")/.."
fixtures=$(realpath "${1:-../shared/fixtures}")
corpus=$(realpath -m "${2:-fuzz/corpus}")
[ -d "$fixtures" ] || { echo "no fixtures at $fixtures" >&2; exit 1; }
cd fuzz
mkdir -p "$corpus"

# seed TARGET NAME FLAGS_BYTE FILE: FLAGS_BYTE (as \xNN) then the file.
seed() {
  mkdir -p "$corpus/$1"
  { printf "$3"; cat "$4"; } >"$corpus/$1/$2"
}

for f in "$fixtures"/github/*.json; do
  name=$(basename "$f" .json)
  case $name in
    ping*) flags='\x02' ;; create*) flags='\x04' ;; delete*) flags='\x06' ;; *) flags='\x00' ;;
  esac
  seed github "$name" "$flags" "$f"
  seed generic "$name" '\x00' "$f"
  seed template "$name" '' "$f"
done
seed github push-form '\x01' "$fixtures/github/push-branch-created.json"
for f in "$fixtures"/gitlab/*.json; do
  name=$(basename "$f" .json)
  case $name in tag-*) flags='\x02' ;; pipeline*) flags='\x04' ;; *) flags='\x00' ;; esac
  seed gitlab "$name" "$flags" "$f"
done
for f in "$fixtures"/bitbucket/*.json; do seed bitbucket "$(basename "$f" .json)" '\x00' "$f"; done
for f in "$fixtures"/gitea/*.json; do
  name=$(basename "$f" .json)
  case $name in create*) flags='\x02' ;; delete*) flags='\x04' ;; *) flags='\x00' ;; esac
  seed gitea "$name" "$flags" "$f"
done
seed gitea push-form '\x01' "$fixtures/gitea/push-capture.json"
for f in "$fixtures"/circleci/*.json; do
  name=$(basename "$f" .json)
  case $name in job-*) flags='\x02' ;; *) flags='\x00' ;; esac
  seed circleci "$name" "$flags" "$f"
done

# A generic pipeline source's body (flags 0x84: that source, event "pipeline").
pipeline=$(mktemp)
trap 'rm -f "$pipeline"' EXIT
printf '%s' '{"project":"acme/api","ref":"refs/heads/main","sha":"2222222222222222222222222222222222222222","status":"success","id":4711,"number":7,"trigger":"push","workflow":"build","delivery":"d-1"}' >"$pipeline"
seed generic pipeline '\x84' "$pipeline"

# Form posts: selector 0 GitHub, 1 generic, 2 Gitea; the JSON as payload=.
form_body() { python3 -c 'import sys, urllib.parse; sys.stdout.write("payload=" + urllib.parse.quote_plus(open(sys.argv[1]).read()))' "$1"; }
mkdir -p "$corpus/form"
for i in 0 1 2; do
  { printf "\\x0$i"; form_body "$fixtures/github/push-branch-created.json"; } >"$corpus/form/push-$i"
done
{ printf '\x00'; printf 'a=1&payload=%%7B%%7D&payload=x'; } >"$corpus/form/twice"

# Signature headers: each case with its real signature (HMAC of the body
# under the harness's secret, see src/lib.rs), then a truncated one.
body="$fixtures/github/push-tag-deleted.json"
hmac() { openssl dgst "-$1" -hmac "$2" -r "$body" | cut -d' ' -f1; }
mkdir -p "$corpus/signature_headers"
sig() { { printf "$2"; printf '%s\n' "${@:3}"; cat "$body"; } >"$corpus/signature_headers/$1"; }
sig github-256 '\x00' "sha256=$(hmac sha256 fuzz-github-secret-51x)"
sig github-sha1 '\x01' "sha1=$(hmac sha1 fuzz-github-secret-51x)"
sig bitbucket '\x02' "sha256=$(hmac sha256 fuzz-bitbucket-secret-54x)"
sig gitea '\x03' "$(hmac sha256 fuzz-gitea-secret-55x)"
sig forgejo '\x04' "$(hmac sha256 fuzz-gitea-secret-55x | cut -c1-63)"
sig gitlab-signature '\x05' "v1,AAAA v1a,$(printf x | base64)" "msg_1" "1800000000"
sig gitlab-token '\x06' "fuzz-gitlab-token-52x"
sig circleci '\x07' "v1=$(hmac sha256 fuzz-circleci-secret-56x),v2=abc"
sig generic '\x08' "sha256=$(hmac sha256 fuzz-generic-secret-57x)"
sig generic-base64 '\x09' "$(openssl dgst -sha512 -hmac fuzz-pipeline-secret-58x -binary "$body" | base64 -w0)"

# Configs: relay's samples, and the shipped one (which refuses until filled in).
mkdir -p "$corpus/config"
cp ../relay.toml "$corpus/config/relay.toml"
cp ../packaging/relay.toml "$corpus/config/packaging.toml"

# Payload URLs: printable bytes that read as a request target.
mkdir -p "$corpus/payload_url"
printf '%s' '0123456789abcdef0123456789abcdef00000000AAAA0195f3c1-7d2a-7c3e-9d3e-0c1f2a3b4c5d?exp=1800086400&sig=00ff' >"$corpus/payload_url/url"

for dir in "$corpus"/*; do echo "$(basename "$dir"): $(ls "$dir" | wc -l) seeds"; done

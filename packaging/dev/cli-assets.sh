#!/usr/bin/env bash
# Writes apiclient's shell completions and man pages, generated from its clap
# definitions, under OUTDIR in the layout of /usr (so `cp -a OUTDIR/. /usr/` or an image
# build's staging directory installs them where bash, zsh, fish and man look on Debian):
#
#   OUTDIR/share/bash-completion/completions/apiclient
#   OUTDIR/share/zsh/vendor-completions/_apiclient
#   OUTDIR/share/fish/vendor_completions.d/apiclient.fish
#   OUTDIR/share/man/man1/apiclient.1, apiclient-<subcommand>.1, … (gzip -9n)
#
# Usage: packaging/dev/cli-assets.sh OUTDIR
# Uses $APICLIENT if set (e.g. the binary the image ships), else builds apiclient in
# release mode. Output is reproducible: same binary, same bytes.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
out=$1
cd "$(dirname "$0")/../.."
if [ -z "${APICLIENT:-}" ]; then
  cargo build --release --quiet -p apiclient --bin apiclient
  APICLIENT="${CARGO_TARGET_DIR:-target}/release/apiclient"
fi
mkdir -p "$out/share/bash-completion/completions" "$out/share/zsh/vendor-completions" \
         "$out/share/fish/vendor_completions.d" "$out/share/man/man1"
"$APICLIENT" completions bash > "$out/share/bash-completion/completions/apiclient"
"$APICLIENT" completions zsh > "$out/share/zsh/vendor-completions/_apiclient"
"$APICLIENT" completions fish > "$out/share/fish/vendor_completions.d/apiclient.fish"
man_dir="$out/share/man/man1"
rm -f "$man_dir"/apiclient.1 "$man_dir"/apiclient-*.1 "$man_dir"/apiclient.1.gz "$man_dir"/apiclient-*.1.gz
"$APICLIENT" man --out-dir "$man_dir" > /dev/null
# -n: no name or time stamp in the archive, so the bytes depend on the page alone.
gzip -9n "$man_dir"/apiclient.1 "$man_dir"/apiclient-*.1
find "$out" -type f \( -name 'apiclient*' -o -name '_apiclient' \) | sort

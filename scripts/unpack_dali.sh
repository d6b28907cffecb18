#!/usr/bin/env bash
# Reassembles the parts scripts/pack_dali.sh wrote, on the GPU machine, and says how to use it.
#
#   scripts/unpack_dali.sh PARTSDIR DEST
#   eval "$(scripts/unpack_dali.sh build/dali_parts /tmp/dali)"   # sets PYTHONPATH
#
# Checks every part named in PARTSDIR/SHA256SUMS (a missing or corrupt part is named, and
# nothing is unpacked), then streams the parts in order through a zstd decoder into
# DEST/site. The decoder is the zstd command, or, where it is absent, Python's `zstandard`
# or `pyarrow` (the GPU image has pyarrow). DEST/site is written under a temporary name and
# renamed, and an unpack of the same parts is reused. Progress goes to stderr; stdout is
# one line, `export PYTHONPATH=DEST/site...`. Needs bash, tar, sha256sum, and PYTHON
# (python3) for the fallback decoders.
#
# Where one command can take only 64 MiB of files to the machine, the parts go one per
# command, each copied into one PARTSDIR there (SHA256SUMS with the first); the last command
# brings the last part and runs scripts/gpu_check.sh with DALI_PARTS=PARTSDIR, which calls
# this script.
set -euo pipefail

(($# == 2)) || { echo "usage: $0 PARTSDIR DEST" >&2; exit 2; }
PARTS=$1 DEST=$2 PY=${PYTHON:-python3}
SUMS=$PARTS/SHA256SUMS
[[ -f $SUMS ]] || { echo "unpack_dali.sh: $SUMS not found (pack_dali.sh writes it beside" \
    "the parts)" >&2; exit 1; }
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
export_line() { echo "export PYTHONPATH=$DEST/site\${PYTHONPATH:+:\$PYTHONPATH}"; }
if [[ -d $DEST/site ]] && cmp -s "$SUMS" "$DEST/SHA256SUMS"; then
    echo "unpack_dali.sh: $DEST/site already holds these parts" >&2
    export_line
    exit 0
fi

mapfile -t names < <(awk '{ print $2 }' "$SUMS")
((${#names[@]})) || { echo "unpack_dali.sh: $SUMS lists no parts" >&2; exit 1; }
bad=0
while read -r want name; do
    if [[ ! $name =~ ^[A-Za-z0-9._-]+$ ]]; then
        echo "unpack_dali.sh: $SUMS names '$name', not a part file name" >&2
        bad=1
    elif [[ ! -f $PARTS/$name ]]; then
        echo "unpack_dali.sh: missing part $name in $PARTS" >&2
        bad=1
    elif [[ $(sha256sum "$PARTS/$name" | cut -d' ' -f1) != "$want" ]]; then
        echo "unpack_dali.sh: bad part $name: its sha256 is not the one in $SUMS" \
            "(truncated or corrupt; copy it again)" >&2
        bad=1
    fi
done <"$SUMS"
((bad == 0)) || exit 1
echo "unpack_dali.sh: ${#names[@]} parts verified" >&2

decode() {
    if command -v zstd >/dev/null; then
        zstd -d -q -c
        return
    fi
    "$PY" -c '
import shutil, sys
try:
    import zstandard
    stream = zstandard.ZstdDecompressor().stream_reader(sys.stdin.buffer)
except ImportError:
    try:
        import pyarrow
    except ImportError:
        sys.exit("unpack_dali.sh: no zstd decoder: install zstd, or Python zstandard or pyarrow")
    stream = pyarrow.CompressedInputStream(pyarrow.PythonFile(sys.stdin.buffer, "r"), "zstd")
shutil.copyfileobj(stream, sys.stdout.buffer, 1 << 20)
'
}

partial=$DEST/.site.partial
rm -rf "$partial" "$DEST/site" "$DEST/SHA256SUMS"
mkdir -p "$partial"
(cd "$PARTS" && cat "${names[@]}") | decode | tar -C "$partial" -xf - --strip-components=1
mv "$partial" "$DEST/site"
cp "$SUMS" "$DEST/SHA256SUMS"
echo "unpack_dali.sh: $(du -sh "$DEST/site" | cut -f1) in $DEST/site" >&2
export_line

#!/usr/bin/env bash
# Packs the DALI runtime that Python 3.12 on an offline x86-64 GPU machine needs into
# checksummed parts small enough to carry one at a time (scripts/unpack_dali.sh undoes it).
#
#   scripts/pack_dali.sh [OUTDIR]              (default: build/dali_parts, ignored by git)
#   scripts/pack_dali.sh OUTDIR --site DIR     packs DIR as it is (no download, no pruning)
#
# Fetches cp312/manylinux wheels with `pip download --no-deps` (no install here): DALI at
# the version in constraints.txt, the nvImageCodec and nvCOMP libraries it loads, nvJPEG
# (the GPU decoder nvImageCodec opens; the GPU image has no nvjpeg wheel), nvJPEG2000 and
# nvTIFF (without them nvImageCodec logs an error at every start) and DALI's pure Python
# needs that the GPU image lacks. It unpacks them into one site folder, keeps only
# what an import needs (drops other Pythons' extension modules, headers, tools, bytecode),
# compresses the tar with `zstd --long=27` (a 128 MiB window, which every zstd decoder
# accepts without flags) and splits it into parts of PART_SIZE bytes (60M, as split -b
# reads it) with SHA256SUMS.
# Needs: a python with pip (PYTHON, default python3) that reaches a package index, zstd
# (apt-get install -y zstd), tar, split and sha256sum. ZSTD_LEVEL (19) trades time for size.
set -euo pipefail

PY=${PYTHON:-python3}
PART_SIZE=${PART_SIZE:-60M}
ZSTD_LEVEL=${ZSTD_LEVEL:-19}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=$REPO/build/dali_parts SITE=""
case $# in
    0) ;;
    1) OUTDIR=$1 ;;
    3) [[ $2 == --site && -d $3 ]] || { echo "usage: $0 [OUTDIR [--site DIR]]" >&2; exit 2; }
        OUTDIR=$1 SITE=$(cd "$3" && pwd) ;;
    *) echo "usage: $0 [OUTDIR [--site DIR]]" >&2; exit 2 ;;
esac

for tool in zstd tar split sha256sum; do
    command -v "$tool" >/dev/null || { echo "pack_dali.sh: needs '$tool' on PATH" \
        "(zstd: apt-get install -y zstd; the others are coreutils/tar)" >&2; exit 2; }
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DALI=$(grep -E '^nvidia-dali-cuda130==' "$REPO/constraints.txt" | cut -d= -f3)
[[ -n $DALI ]] || { echo "pack_dali.sh: no nvidia-dali-cuda130==VERSION in constraints.txt" >&2
    exit 2; }

# Downloads the wheels for cp312 into $WORK/site and keeps what an import needs.
fetch_site() {
    "$PY" -m pip --version >/dev/null 2>&1 || { echo "pack_dali.sh: '$PY -m pip' does not" \
        "run; set PYTHON to an interpreter with pip" >&2; exit 2; }
    # DALI's Requires-Dist, pinned to the versions it is tested with here; numpy,
    # packaging and six are on the GPU image already.
    local -a WHEELS=(
        "nvidia-dali-cuda130==$DALI" nvidia-nvimgcodec-cu13==0.9.0.20
        nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.0.4.44
        nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
        astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 nvtx==0.2.17 optree==0.20.0 libcst==1.9.0
    )
    local -a PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
        manylinux2014_x86_64 manylinux1_x86_64)
    local -a TARGET=(--python-version 3.12 --implementation cp --only-binary=:all:
        "${PLATFORMS[@]/#/--platform=}")

    echo "downloading ${#WHEELS[@]} wheels for cp312 (${PLATFORMS[0]}, ...)" >&2
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$WORK/wheels" "${WHEELS[@]}"
    # pip installs for the target Python (unpacking each wheel's data folders correctly) and
    # compiles nothing; the result is never imported here.
    "$PY" -m pip install -q --no-index --no-deps --no-compile "${TARGET[@]}" \
        --target "$WORK/site" "$WORK"/wheels/*.whl

    local site=$WORK/site
    rm -rf "$site/bin" "$site"/*.py "$site/nvidia/nvimgcodec/tools" "$site/nvidia/libnvcomp/bin"
    find "$site" \( -name include -o -name __pycache__ \) -type d -prune -exec rm -rf {} +
    find "$site" -name '*.cpython-3*.so' ! -name '*.cpython-312-x86_64-linux-gnu.so' -delete
    find "$site" -name '*.a' -delete
    # nvidia/ must merge with the GPU image's own nvidia/ (cu13 libraries), not shadow it.
    grep -q extend_path "$site/nvidia/__init__.py" || { echo "pack_dali.sh: nvidia/__init__.py" \
        "does not extend __path__: the pack would hide the image's nvidia/ packages" >&2; exit 1; }
    for module in nvidia/dali/backend_impl nvidia/nvimgcodec/nvimgcodec_impl; do
        [[ -f $site/$module.cpython-312-x86_64-linux-gnu.so ]] || { echo "pack_dali.sh: no cp312" \
            "$module in the wheels" >&2; exit 1; }
    done
    printf '%s\n' "${WHEELS[@]}" >"$site/DALI_PACK.txt"
}

if [[ -z $SITE ]]; then
    fetch_site
    SITE=$WORK/site
fi
name=dali-$DALI-cp312.tar.zst
echo "compressing $(du -sh "$SITE" | cut -f1) (zstd -$ZSTD_LEVEL --long=27)" >&2
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/dali-*.tar.zst.part-* "$OUTDIR/SHA256SUMS"
tar -C "$SITE" -cf - . | zstd -q -T0 "-$ZSTD_LEVEL" --long=27 -o "$WORK/$name"
split -b "$PART_SIZE" -d -a 2 "$WORK/$name" "$OUTDIR/$name.part-"
(cd "$OUTDIR" && sha256sum "$name".part-* >SHA256SUMS)
echo "DALI $DALI for cp312: $(wc -l <"$OUTDIR/SHA256SUMS") parts in $OUTDIR" >&2
(cd "$OUTDIR" && ls -l "$name".part-* SHA256SUMS | awk '{ printf "%12d  %s\n", $5, $9 }') >&2

#!/usr/bin/env bash
# Download the default Pile subset (PubMed Central), or any list of URLs: resumable, checksummed.
set -euo pipefail

DEFAULT_URL="https://dail-wlcb.oss-cn-wulanchabu.aliyuncs.com/LLM_data/our_refined_datasets/pretraining/the-pile-pubmed-central-refine-result.jsonl"

usage() {
    cat <<USAGE
usage: $(basename "$0") [options] [URL ...]

Downloads each URL (default: the PubMed Central subset of The Pile the original used, one .jsonl
file) into the output folder. Any URLs may be given instead, e.g. shards of the corpora below.
A download is written to NAME.part and renamed to NAME once complete (and verified), so an
interrupted run resumes where it stopped when run again; files already present are skipped.
NAME is the URL's last part: shards that share a name in different folders of a dataset (chunk1/,
chunk2/, ...) must go to different output folders.

options:
  -o, --output DIR     folder to download into (default: the current folder)
  --sha256 HEX         expected sha256 of the download (with a single URL)
  --checksums FILE     expected sha256 sums, in sha256sum's format ("HEX  NAME" per line)
  --timeout SECONDS    how long the connectivity check waits (default: 10)
  -h, --help           show this help

Public corpora over plain HTTPS. python -m llama3 preprocess reads .jsonl, .jsonl.zst, .jsonl.gz,
.json.gz and .parquet files (parquet: its "text" column; needs pyarrow, the project's parquet
extra). A file of a Hugging Face dataset is served at
  https://huggingface.co/datasets/OWNER/NAME/resolve/main/PATH
and the dataset's files are listed at https://huggingface.co/datasets/OWNER/NAME/tree/main.
The URLs below follow the layouts the datasets publish; they are patterns, not checked by this
script: look up the file names on the dataset's page first.
  The Pile, a mirror without its copyrighted parts (monology/pile-uncopyrighted, .jsonl.zst):
    https://huggingface.co/datasets/monology/pile-uncopyrighted/resolve/main/train/00.jsonl.zst
    (train/01.jsonl.zst, ..., val.jsonl.zst, test.jsonl.zst)
  SlimPajama (cerebras/SlimPajama-627B, .jsonl.zst; one output folder per chunk):
    https://huggingface.co/datasets/cerebras/SlimPajama-627B/resolve/main/train/chunk1/example_train_0.jsonl.zst
    (validation/chunkN/ and test/chunkN/ hold example_holdout_N.jsonl.zst)
  FineWeb (HuggingFaceFW/fineweb, .parquet; one output folder per crawl or sample):
    https://huggingface.co/datasets/HuggingFaceFW/fineweb/resolve/main/sample/10BT/000_00000.parquet
    (whole crawls under data/CC-MAIN-YYYY-WW/)
  FineWeb-Edu (HuggingFaceFW/fineweb-edu, .parquet; the same layout as FineWeb):
    https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/000_00000.parquet
  Dolma (allenai/dolma, .json.gz): the dataset lists its files' URLs, one per line, per version
  in urls/VERSION.txt, e.g.
    curl -sL https://huggingface.co/datasets/allenai/dolma/resolve/main/urls/v1_6-sample.txt \\
      | xargs $0 -o dolma
USAGE
}

die() { echo "error: $*" >&2; exit 1; }

OUTPUT=.
SHA256=""
CHECKSUMS=""
TIMEOUT=10
URLS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -o|--output) [[ $# -ge 2 ]] || die "$1 needs a value"; OUTPUT="$2"; shift 2 ;;
        --sha256) [[ $# -ge 2 ]] || die "$1 needs a value"; SHA256="$2"; shift 2 ;;
        --checksums) [[ $# -ge 2 ]] || die "$1 needs a value"; CHECKSUMS="$2"; shift 2 ;;
        --timeout) [[ $# -ge 2 ]] || die "$1 needs a value"; TIMEOUT="$2"; shift 2 ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) URLS+=("$1"); shift ;;
    esac
done
[[ ${#URLS[@]} -gt 0 ]] || URLS=("$DEFAULT_URL")
[[ -z "$SHA256" || ${#URLS[@]} -eq 1 ]] || die "--sha256 applies to a single URL; use --checksums FILE for several"
[[ -z "$SHA256" || "$SHA256" =~ ^[0-9a-fA-F]{64}$ ]] || die "--sha256 $SHA256: expected 64 hexadecimal digits"
[[ -z "$CHECKSUMS" || -r "$CHECKSUMS" ]] || die "--checksums $CHECKSUMS: cannot read this file"

if command -v curl >/dev/null; then FETCH=curl
elif command -v wget >/dev/null; then FETCH=wget
else die "neither curl nor wget is installed"; fi
command -v sha256sum >/dev/null || [[ -z "$SHA256$CHECKSUMS" ]] || die "sha256sum is needed to verify checksums"

# Fail at once, with one line, when the host cannot be reached (DNS, refused, timeout, TLS).
check_reachable() {
    local url="$1" host rc=0
    [[ "$url" == http://* || "$url" == https://* ]] || return 0
    host="${url#*://}"; host="${host%%/*}"
    if [[ $FETCH == curl ]]; then
        curl -s -o /dev/null -I --max-time "$TIMEOUT" "$url" 2>/dev/null || rc=$?
        case $rc in
            5|6|7|28|35|60) die "cannot reach $host (curl error $rc): no network connection, or the host is down" ;;
        esac
    else
        wget -q --spider --timeout="$TIMEOUT" --tries=1 "$url" 2>/dev/null || rc=$?
        [[ $rc -ne 4 && $rc -ne 5 ]] || die "cannot reach $host (wget error $rc): no network connection, or the host is down"
    fi
}

expected_sum() {
    local name="$1"
    if [[ -n "$SHA256" ]]; then echo "$SHA256"
    elif [[ -n "$CHECKSUMS" ]]; then awk -v n="$name" '{f=$2; sub(/^\*/, "", f)} f==n {print $1; exit}' "$CHECKSUMS"
    fi
}

verify() {  # verify FILE NAME: true when no sum is known or it matches
    local file="$1" want got
    want="$(expected_sum "$2")"
    [[ -n "$want" ]] || return 0
    echo "verifying sha256 of $2"
    got="$(sha256sum "$file" | cut -d' ' -f1)"
    [[ "${got,,}" == "${want,,}" ]] || { echo "error: $2: sha256 is $got, expected $want" >&2; return 1; }
}

fetch() {  # fetch URL PART: download or resume into PART
    if [[ $FETCH == curl ]]; then
        curl -fL --retry 3 --retry-delay 2 -C - -o "$2" "$1"
    else
        wget -c --tries=3 -O "$2" "$1"
    fi
}

mkdir -p "$OUTPUT"
for url in "${URLS[@]}"; do
    name="$(basename "${url%%\?*}")"
    final="$OUTPUT/$name"
    part="$final.part"
    if [[ -f "$final" ]]; then
        echo "$name: already downloaded"
        verify "$final" "$name" || die "$final does not match its checksum; delete it and run again"
        continue
    fi
    check_reachable "$url"
    [[ -f "$part" ]] && echo "$name: resuming after $(stat -c %s "$part") bytes" || echo "$name: downloading"
    fetch "$url" "$part" || die "$name: download failed; run again to resume"
    if ! verify "$part" "$name"; then
        rm -f "$part"
        die "$name: checksum mismatch; the downloaded data was deleted, run again to download afresh"
    fi
    mv "$part" "$final"
    echo "$name: done ($(stat -c %s "$final") bytes)"
done

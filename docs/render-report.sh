#!/usr/bin/env bash
# Render an hwport report (report.html) to a PNG screenshot with headless Chromium.
#
#   docs/render-report.sh REPORT.html OUT.png [WIDTHxHEIGHT]
#
# The window is 1200x3000 pixels unless WIDTHxHEIGHT says otherwise (the screenshot is the
# window: give a height that holds the content). The browser is $CHROMIUM, else the first
# of chromium, chromium-browser, google-chrome on PATH. It runs with a throw-away profile,
# no network services and no sandbox (so that it also runs as root in a container); the
# report is self-contained and needs no network. It gives up after $RENDER_TIMEOUT seconds
# (default 60).
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTHxHEIGHT]" >&2
    exit 2
fi
report=$1
out=$2
size=${3:-1200x3000}
if [[ ! -f $report ]]; then
    echo "$0: $report: no such file" >&2
    exit 1
fi
if [[ ! $size =~ ^[0-9]+x[0-9]+$ ]]; then
    echo "$0: $size: expected WIDTHxHEIGHT, e.g. 1200x3000" >&2
    exit 2
fi
browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
    for b in chromium chromium-browser google-chrome; do
        if command -v "$b" >/dev/null; then browser=$(command -v "$b"); break; fi
    done
fi
if [[ -z $browser ]]; then
    echo "$0: no chromium found (set CHROMIUM to the browser's path)" >&2
    exit 1
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
url="file://$(realpath "$report")"
out_abs=$(realpath -m "$out")
timeout "${RENDER_TIMEOUT:-60}" "$browser" --headless --no-sandbox --disable-gpu \
    --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars \
    --user-data-dir="$profile" --screenshot="$out_abs" --window-size="${size/x/,}" \
    "$url" >/dev/null 2>&1 || {
    rc=$?
    echo "$0: $browser failed (exit status $rc)" >&2
    exit 1
}
if [[ ! -s $out_abs ]]; then
    echo "$0: $browser wrote no screenshot" >&2
    exit 1
fi
echo "wrote $out"

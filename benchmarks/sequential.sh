#!/usr/bin/env bash
# The script a user writes instead of running the daemon: one file at a time, with curl.
# Upload, wait POLL seconds, ask for the status every POLL seconds until FINISHED, download
# the "all" result set, move the input next to it.
#
# usage: sequential.sh API_BASE KEY TYPE POLL_SECONDS DIR
#   e.g. sequential.sh http://127.0.0.1:8089/api "$IPQS_API_KEY" email 2 ./todo
set -euo pipefail
api=$1 key=$2 type=$3 poll=$4 dir=$5
mkdir -p "$dir/done"
for f in "$dir"/*.csv; do
  answer=$(curl -sS --fail -F "file=@$f;type=text/csv" "$api/json/csv/$key/$type/upload")
  id=$(printf '%s' "$answer" | sed -n 's/.*"id": *\([0-9][0-9]*\).*/\1/p')
  if [ -z "$id" ]; then
    echo "upload of $f failed: $answer" >&2
    exit 1
  fi
  while :; do
    sleep "$poll"
    status=$(curl -sS --fail "$api/json/csv/$key/status/$id")
    case $status in *'"status": "FINISHED"'*) break ;; esac
  done
  link=$(printf '%s' "$status" | sed -n 's/.*"all": *"\([^"]*\)".*/\1/p')
  curl -sS --fail -o "$dir/done/$(basename "$f").all.csv" "$link"
  mv "$f" "$dir/done/"
done
